"""Capture: forward pre-hooks that accumulate per-sample, per-unit sums of squares of each site's input.

One small interface (after diffusers' hooks): ``attach`` finds the sites by fully qualified module
name, registers one pre-hook per site and returns a ``Capture`` whose ``detach`` (or ``with`` exit)
removes every hook. A hook never synchronises the device: it adds into a preallocated fp32 buffer
``[batch, 1, units]`` through ``otherview.ops.rms.unit_sumsq_`` (the compiled op, or the plain-PyTorch
reference where none is built), and the buffer is copied to the host once per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from . import ops
from .ops import rms as rms_ops
from .plan import Plan, Site

log = logging.getLogger(__name__)


class CaptureError(Exception):
    """A site named by the plan is not a module of the model."""


def _reference_sumsq_(x: torch.Tensor, unit_width: int, segments: list[int], out: torch.Tensor) -> None:
    out += rms_ops.unit_sumsq_ref(x, unit_width, segments)


class HookSet:
    """Registered hooks (``handles``) removed together by ``detach`` or on leaving a ``with`` block."""

    handles: list

    def detach(self) -> None:
        """Remove every hook this object registered (safe to call twice)."""
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


@dataclass
class Capture(HookSet):
    """Hooks on a model's sites, accumulating into ``buffer`` while ``active``."""

    plan: Plan
    buffer: torch.Tensor  # fp32 [max_batch, 1, n_units]
    handles: list = field(default_factory=list)
    active: bool = True
    side_stream: "torch.cuda.Stream | None" = None  # where the reductions run, overlapping the projections
    batch: int = 0  # rows of ``buffer`` the current batch uses
    evaluations: int = 0  # counted (active) transformer evaluations since the last reset
    # capture.tokens = "prompt": [max_batch, text_tokens] float, 1 at each row's real prompt tokens;
    # the hooks count only those (each row has its own prompt length)
    token_mask: "torch.Tensor | None" = None

    def reset(self, batch: int) -> None:
        """Zero the buffer rows of a new batch of ``batch`` samples."""
        if batch > self.buffer.shape[0]:
            raise ValueError(f"batch {batch} exceeds the capture buffer's {self.buffer.shape[0]} rows")
        self.batch = batch
        self.sync()
        self.buffer[:batch].zero_()  # on the current stream, which the next hook's wait orders
        self.evaluations = 0

    def sync(self) -> None:
        """Make the current stream wait for reductions queued on the side stream (before reading)."""
        if self.side_stream is not None:
            torch.cuda.current_stream(self.buffer.device).wait_stream(self.side_stream)

    def rms(self) -> torch.Tensor:
        """Return the per-sample, per-unit RMS of the current batch as fp32 ``[batch, units]`` on the host."""
        g = self.plan.unit_width
        counts = torch.empty(self.plan.n_units, dtype=torch.float32)
        for site in self.plan.sites:
            n = (site.segment[1] - site.segment[0]) * g * max(self.evaluations, 1)
            counts[site.unit_offset: site.unit_offset + site.n_units] = float(n)
        self.sync()
        sumsq = self.buffer[: self.batch, 0].float().cpu()  # the one device-to-host copy of a batch
        if self.token_mask is not None:  # each row's own number of real prompt tokens
            real = self.token_mask[: self.batch].float().sum(dim=1).cpu()
            return torch.sqrt(sumsq / (real[:, None] * g * max(self.evaluations, 1)))
        return torch.sqrt(sumsq / counts)



def resolved_kernel(kernel: str, device: torch.device) -> str:
    """Return what ``runtime.capture_kernel`` = ``kernel`` runs on ``device``: "compiled" (otherview's op) or "reference" (PyTorch)."""
    return "compiled" if kernel != "reference" and ops.has_kernel("unit_sumsq_", device) else "reference"


def _accumulator(kernel: str, device: torch.device):
    """Return ``accumulate(x, unit_width, segments, out)``, chosen once at attach time.

    Resolved here rather than in the hook so that the hook body holds no dispatch query that
    ``torch.compile`` would have to trace (or break the graph on) at every site.
    """
    if kernel == "reference":
        return _reference_sumsq_
    if kernel == "compiled" and not ops.has_kernel("unit_sumsq_", device):
        raise CaptureError(f"runtime.capture_kernel = 'compiled' but no compiled op is built for {device}")
    if resolved_kernel(kernel, device) == "compiled":
        op = torch.ops.otherview.unit_sumsq_
        return lambda x, unit_width, segments, out: op(x, unit_width, segments, out)
    return rms_ops.unit_sumsq_


def _make_hook(capture: Capture, site: Site, unit_width: int, accumulate):
    # Under regional compilation (one compiled graph per block class, reused by every block of
    # that class) whatever the hook reads from its closure is guarded. Python ints that differ per
    # site (the unit offsets) would fail the guard at each block and recompile per site, so the
    # site's slice of the buffer is taken here, once, as a tensor view: a graph input whose shape
    # is the same for every site of a class. What stays a Python value (segments, token count,
    # unit width) is equal across the sites of one block class.
    rows = capture.buffer[:, :, site.unit_offset: site.unit_offset + site.n_units]
    segments = [int(site.segment[0]), int(site.segment[1])]
    tokens = int(site.tokens)
    name = site.name

    def hook(module, args):
        if capture.active:
            x = args[0]
            if x.shape[1] != tokens:
                raise CaptureError(f"{name} received {x.shape[1]} tokens, the plan expects {tokens}")
            out = rows[: x.shape[0]]
            if capture.token_mask is not None:
                # Only each row's real prompt tokens count: zero the padding (a small [B, text, width] copy).
                mask = capture.token_mask[: x.shape[0], :, None].to(x.dtype)
                x = x[:, segments[0]:segments[1]] * mask
                segs = [0, segments[1] - segments[0]]
            else:
                segs = segments
            side = capture.side_stream
            if side is None:
                accumulate(x, unit_width, segs, out)
            else:
                # The reduction is bandwidth-bound and the projection that reads the same input is
                # compute-bound: run the reduction beside it. The side stream waits for x's
                # producer; record_stream keeps x's memory from being reused before it is read.
                side.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(side):
                    accumulate(x, unit_width, segs, out)
                x.record_stream(side)
        return None

    return hook


def attach(transformer: torch.nn.Module, plan: Plan, buffer: torch.Tensor, kernel: str = "auto",
           side_stream: bool = False) -> Capture:
    """Return a ``Capture`` with one forward pre-hook on each of ``plan``'s sites in ``transformer``.

    Parameters
    ----------
    transformer : torch.nn.Module
        The FLUX.2 transformer; sites are found by fully qualified module name.
    plan : Plan
        Gives the sites, their token segments and unit offsets.
    buffer : torch.Tensor, shape (max_batch, 1, n_units), float32
        Where the hooks accumulate sums of squares; on the transformer's device.
    kernel : {"auto", "compiled", "reference"}
        ``auto`` uses the compiled op where built for the device, else the reference.
    side_stream : bool
        Run the reductions on a CUDA side stream, overlapping the projection GEMMs (eager only:
        under ``torch.compile`` the op is one node of the graph's single stream).
    """
    accumulate = _accumulator(kernel, buffer.device)
    modules = dict(transformer.named_modules())
    capture = Capture(plan=plan, buffer=buffer,
                      side_stream=torch.cuda.Stream(buffer.device) if side_stream and buffer.is_cuda else None)
    try:
        for site in plan.sites:
            module = modules.get(site.name)
            if module is None:
                raise CaptureError(f"capture.sites: no module named '{site.name}' in {type(transformer).__name__}")
            capture.handles.append(module.register_forward_pre_hook(_make_hook(capture, site, plan.unit_width, accumulate)))
            log.debug("capture hook on %s (units %d..%d)", site.name, site.unit_offset, site.unit_offset + site.n_units - 1)
    except BaseException:
        capture.detach()
        raise
    return capture
