"""GPU memory: the budget a run may use, the peak it will need, and where the weights live.

A run's GPU memory is its weights plus the activations of the step running now. The weights come
from the architecture's configs (parameter counts, no weights allocated); the activations from the
token counts of the plan. The run goes through three phases that do not overlap: encoding the
prompts (text encoder), generating the reference image (transformer, then the VAE decoder), the
probe batches (transformer) and the statistics (the sign-flip null's fixed-size chunks, with the
transformer still resident). A *placement* says which weights are on the GPU in which phase
(``offload`` applies it):

``resident``
    every model on the GPU for the whole run (fastest: nothing moves).
``model-offload``
    one model at a time, in phase order: the text encoder encodes every prompt first (probe,
    reference and empty prompts), then moves to the CPU, and the transformer and VAE take its place
    (diffusers' ``enable_model_cpu_offload`` does the same per call; our phases are explicit, so it
    is done once, by hand). Costs one host round trip of the weights (about 16 GB on Klein 4B: a few
    seconds at PCIe speed).
``block-offload``
    weights stay on the CPU and stream to the GPU one block at a time (diffusers' group
    offloading, block level, on a side stream); torch.compile is off. Every evaluation moves every
    weight across PCIe: several times slower, but Klein 4B probes on a card of a few GiB.

The budget is ``runtime.memory``: ``auto`` is what this process may allocate on the device now,
the smaller of the device's free memory (``torch.cuda.mem_get_info``) and the per-process cap
(``torch.cuda.get_per_process_memory_fraction``); a size caps it further. Setting the environment
variable ``OTHERVIEW_MEMORY_FRACTION`` (0..1) applies ``torch.cuda.set_per_process_memory_fraction``
before anything is allocated (benchmarks emulate a smaller card with it).

Activation sizes are in units of one bf16 hidden state per token (``inner_dim`` channels), from two
runs on an H100 (Klein 4B, 1024x1024, ``benchmarks/results/h100_plantain.jsonl``): the compiled
probe at batch 20 peaked at 31.85 GiB with every weight resident (14.87 GiB of weights, 0.44 GiB of
prompt embeddings: 16.9 hidden-state widths per token and sample); the naive diffusers loop peaked at
17.36 GiB, 2.49 GiB over its weights, which is the VAE decoding 1024x1024 (about 9.5 bytes per pixel
and decoder channel). Eager diffusers' single-stream block holds its fused projection (9 widths),
normalised q and k in fp32 and the SwiGLU temporaries at once: 24 widths is the bound used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from . import errors

# What a plan holds on the GPU, from the configs: the estimate's inputs (re-exported here).
from .footprint import (ACTIVATION_WIDTHS, NULL_CHUNK, VAE_BYTES_PER_PIXEL_CHANNEL, GiB, Sizes, Weights,  # noqa: F401
                        sizes, text_encoder_parameters, transformer_parameters, weights_of)


FRACTION_ENV = "OTHERVIEW_MEMORY_FRACTION"
PLACEMENTS = ("resident", "model-offload", "block-offload")
HEADROOM_FRACTION, HEADROOM_BYTES = 0.10, GiB // 4  # caching-allocator fragmentation and CUDA workspaces
MIN_RESIDENT_BATCH = 4  # per-sample time is flat from batch 4 on (bench_compiled_forward: 126.0 vs 126.8 ms)
MAX_BATCH, MAX_CHUNK = 32, 32
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|GB|G|MiB|MB|M)?\s*$", re.IGNORECASE)
_UNITS = {"gib": GiB, "g": GiB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6, "": GiB}


class MemoryBudgetError(errors.Unavailable):
    """The run does not fit the GPU memory it may use (refused before loading, or an out-of-memory
    error that happened anyway): exit 3. The message names the memory needed, the memory available
    and what to change."""

    def __init__(self, message: str, needed: int | None = None, available: int | None = None):
        super().__init__(message)
        self.needed, self.available = needed, available


def gib(n: float | None) -> str:
    """Return ``n`` bytes written in GiB (``"unlimited"`` for None)."""
    return "unlimited" if n is None else f"{n / GiB:.1f} GiB"


def parse_size(value: Any) -> int | None:
    """Return a ``runtime.memory`` setting in bytes: None for ``"auto"``, a number is GiB.

    Accepts ``"20GiB"``, ``"24 GB"``, ``"512MiB"``, ``20`` or ``12.5``; raises ``ValueError`` otherwise.
    """
    if value is None or value == "auto":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("should be 'auto' or a size greater than 0")
        return int(value * GiB)
    m = _SIZE.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"'{value}' should be 'auto' or a size such as '20GiB', '16GB', '512MiB' or a number of GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


# --------------------------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class Budget:
    """GPU memory a run may use: ``total`` bytes (None: not limited, e.g. on a CPU) and where that came from."""

    total: int | None
    source: str

    @property
    def usable(self) -> int | None:
        """Return the bytes the estimate may fill: the budget less headroom for fragmentation."""
        if self.total is None:
            return None
        return max(0, int(self.total * (1 - HEADROOM_FRACTION)) - HEADROOM_BYTES)


def apply_process_cap(device: torch.device | None = None) -> float | None:
    """Apply ``OTHERVIEW_MEMORY_FRACTION`` with ``torch.cuda.set_per_process_memory_fraction``; return it (None: unset)."""
    value = os.environ.get(FRACTION_ENV)
    if not value or not torch.cuda.is_available():
        return None
    fraction = float(value)
    if not 0 < fraction <= 1:
        raise ValueError(f"{FRACTION_ENV}={value}: should be in (0, 1]")
    torch.cuda.set_per_process_memory_fraction(fraction, _indexed(device))
    return fraction


def _indexed(device: torch.device | None) -> torch.device:
    """Return ``device`` with its index (torch's per-process-fraction calls refuse a bare "cuda")."""
    if device is None or device.index is None:
        try:
            index = torch.cuda.current_device()
        except (AssertionError, RuntimeError):  # no CUDA build (tests fake the device): "cuda" means 0
            index = 0
        return torch.device("cuda", index)
    return device


def device_budget(device: torch.device, setting: Any = "auto") -> Budget:
    """Return the GPU memory this process may use on ``device`` under ``runtime.memory = setting``.

    Parameters
    ----------
    device : torch.device
        The run's device. A CPU has no budget unless ``setting`` gives one.
    setting : "auto" | str | float
        ``runtime.memory``: ``auto``, a size (``"20GiB"``) or a number of GiB.

    Returns
    -------
    Budget
        ``total`` bytes (None: not limited) and a sentence saying where it came from. ``auto`` on
        CUDA is the smaller of the free memory (plus what this process already holds in its cache)
        and the per-process cap (``torch.cuda.get_per_process_memory_fraction`` x total memory); a
        size is taken as it is, capped by that.
    """
    asked = parse_size(setting)
    if device.type != "cuda":
        return Budget(asked, f"runtime.memory = {setting}" if asked else "no GPU: not limited")
    device = _indexed(device)
    apply_process_cap(device)
    free, total = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device) if hasattr(
        torch.cuda, "get_per_process_memory_fraction") else float(os.environ.get(FRACTION_ENV) or 1.0)
    name = torch.cuda.get_device_name(device)
    avail, source = free + held, f"{gib(free + held)} free on {name} ({gib(total)})"
    if fraction < 1 and fraction * total < avail:
        avail, source = int(fraction * total), f"per-process cap {fraction:g} x {gib(total)} on {name}"
    if asked is not None and asked < avail:
        return Budget(asked, f"runtime.memory = {setting} ({source})")
    if asked is not None:
        source += f"; runtime.memory = {setting} is more than that"
    return Budget(avail, source)


# --------------------------------------------------------------------------------------------- estimate
@dataclass(frozen=True)
class Estimate:
    """The placement chosen for a run, its batch and encoding chunk, and its peak per phase (bytes)."""

    placement: str
    batch_size: int
    encode_chunk: int
    phases: dict[str, int]
    budget: Budget
    compiled: bool
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def record(self) -> dict[str, Any]:
        """Return what the manifest says about memory before the run (peaks in GiB)."""
        return {"placement": self.placement, "budget_gib": None if self.budget.total is None else
                round(self.budget.total / GiB, 2), "budget_source": self.budget.source,
                "estimated_peak_gib": round(self.peak / GiB, 2), "batch_size": self.batch_size,
                "encode_chunk": self.encode_chunk,
                "estimated_phases_gib": {k: round(v / GiB, 2) for k, v in self.phases.items()}}


def phase_peaks(z: Sizes, placement: str, batch: int, chunk: int) -> dict[str, int]:
    """Return the peak bytes of each phase (encode, reference, probe, statistics) under ``placement``.

    resident: every weight plus the phase's activations; model-offload: the text encoder alone while
    encoding, the transformer and VAE after; block-offload: the weights outside the blocks plus two
    blocks (the running one and the one being prefetched), the VAE resident.
    """
    w = z.weights
    te, tr, vae = z.w(w.text_encoder), z.w(w.transformer), z.w(w.vae)
    if placement == "resident":
        te_held = tr_held = te + tr + vae
    elif placement == "model-offload":
        te_held, tr_held = te, tr + vae
    else:
        te_held = z.w(w.text_encoder_rest + 2 * w.text_encoder_layer)
        tr_held = z.w(w.transformer_rest + 2 * w.transformer_block) + vae
    return {"encode": te_held + z.embeddings + chunk * z.encode_prompt,
            "reference": tr_held + z.embeddings + max(z.reference_sample, z.vae),
            "probe": tr_held + z.embeddings + max(batch * z.probe_sample, z.vae),
            "statistics": tr_held + z.null}  # the transformer stays; the null's chunks are fixed in size


def _largest(limit: int, fits) -> int:
    """Return the largest n in [1, limit] with fits(n) (fits is monotone), 0 if none."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _even_batch(fit: int, n: int) -> int:
    # Prefer a size that divides the passes evenly: equal batches keep compiled graphs reusable.
    for b in range(fit, 0, -1):
        if n % b == 0 and b >= fit // 2:
            return b
    return fit


def estimate(plan, budget: Budget, dtype_bytes: int = 2, compiled: bool = True, placement: str | None = None) -> Estimate:
    """Return the fastest placement of ``plan`` that fits ``budget``, with its batch size and encoding chunk.

    Parameters
    ----------
    plan : Plan
        The compiled spec (``plan.batch_size`` None: the batch is sized here).
    budget : Budget
        From ``device_budget``; the estimate fills ``budget.usable`` (the total less 10% and 0.25 GiB).
    dtype_bytes : int
        Bytes per weight and activation value.
    compiled : bool
        torch.compile on (block-offload always runs eager).
    placement : str, optional
        Try only this placement (one of ``PLACEMENTS``).

    Returns
    -------
    Estimate
        Placements are tried in order (resident, model-offload, block-offload); resident is taken
        only where it leaves room for a batch of ``MIN_RESIDENT_BATCH`` (or the spec's fixed batch).
        The batch is the largest that fits, at most ``MAX_BATCH``, preferring one that divides the
        passes; the encoding chunk the largest that fits, at most ``MAX_CHUNK``.

    Raises
    ------
    MemoryBudgetError
        When no placement fits: the message names the memory needed, the memory available and the
        settings that would fit.
    """
    n = len(plan.passes)
    fixed = plan.batch_size
    order = [placement] if placement else list(PLACEMENTS)
    limit = budget.usable
    for place in order:
        is_compiled = compiled and place != "block-offload"
        z = sizes(plan, dtype_bytes, is_compiled)
        if limit is None:  # no budget (a CPU's small models): batches large enough that per-batch Python
            # overhead does not dominate, within 1 GiB of bf16-sized activations
            tokens = plan.text_tokens + plan.target_tokens + plan.reference_tokens
            per_sample = tokens * plan.arch.inner_dim * 2 * int(ACTIVATION_WIDTHS["eager"])
            batch = fixed or max(1, min(n, 64, GiB // (per_sample * 2)))
            return Estimate(place, batch, MAX_CHUNK, phase_peaks(z, place, batch, MAX_CHUNK), budget, is_compiled)
        chunk = _largest(min(MAX_CHUNK, len(plan.prompts) + 1), lambda c: phase_peaks(z, place, 1, c)["encode"] <= limit)
        fit = _largest(min(n, MAX_BATCH) if fixed is None else fixed,
                       lambda b: max(phase_peaks(z, place, b, 1).values()) <= limit)
        want = fixed or (min(n, MIN_RESIDENT_BATCH) if place == "resident" and placement is None else 1)
        if chunk >= 1 and fit >= want:
            batch = fixed or _even_batch(fit, n)
            notes = [] if place == "resident" else [_cost(place, z)]
            return Estimate(place, batch, chunk, phase_peaks(z, place, batch, chunk), budget, is_compiled, notes)
    raise _refusal(plan, budget, dtype_bytes, compiled, order)


def _cost(place: str, z: Sizes) -> str:
    w = z.weights
    if place == "model-offload":
        return (f"model-offload: the text encoder ({gib(z.w(w.text_encoder))}) moves to the CPU after encoding and "
                f"the transformer ({gib(z.w(w.transformer))}) onto the GPU: one host round trip, a few seconds")
    return (f"block-offload: the transformer's {gib(z.w(w.transformer))} cross PCIe on every evaluation and "
            "torch.compile is off: several times slower than resident")


def _refusal(plan, budget: Budget, dtype_bytes: int, compiled: bool, order: list[str]) -> MemoryBudgetError:
    """Return the error for a plan that fits no placement: needed, available, what would fit."""
    place = order[-1]
    z = sizes(plan, dtype_bytes, compiled and place != "block-offload")
    batch = plan.batch_size or 1
    need = max(phase_peaks(z, place, batch, 1).values())
    total_need = int((need + HEADROOM_BYTES) / (1 - HEADROOM_FRACTION)) + 1
    fixes = []
    if plan.batch_size and plan.batch_size > 1:
        one = max(phase_peaks(z, place, 1, 1).values())
        if one <= (budget.usable or 0):
            fixes.append("probe.batch_size = 1 (--batch-size 1) fits, or \"auto\"")
    fixes.append(f"a budget of {gib(total_need)} (runtime.memory / --memory, on a GPU that has it)")
    for side in (plan.height // 2, plan.height // 4):
        if side >= 256 and side % plan.arch.token_multiple == 0:
            fixes.append(f"a smaller image, reference.height = reference.width = {side}")
            break
    return MemoryBudgetError(
        f"not enough GPU memory: this run needs {gib(total_need)} at least ({place}, batch {batch}: "
        + ", ".join(f"{k} {gib(v)}" for k, v in phase_peaks(z, place, batch, 1).items())
        + f", plus headroom), and {gib(budget.total)} is available ({budget.source}); would fit: "
        + "; ".join(fixes), needed=total_need, available=budget.total)


def describe(est: Estimate, dtype_bytes: int = 2) -> list[str]:
    """Return the lines ``otherview plan`` prints about memory: budget, placement, peaks, cost."""
    lines = [f"memory budget: {gib(est.budget.total)} ({est.budget.source})",
             f"placement: {est.placement}, probe batch {est.batch_size}, prompts encoded {est.encode_chunk} at a time"
             + ("" if est.compiled else ", eager (no torch.compile)"),
             "estimated peak memory: " + gib(est.peak) + " ("
             + ", ".join(f"{k} {gib(v)}" for k, v in est.phases.items()) + ")"]
    lines += [f"cost: {n}" for n in est.notes]
    return lines


def is_out_of_memory(exc: BaseException) -> bool:
    """Return whether ``exc`` is a device out-of-memory error (torch's, or a CUDA/cuBLAS one)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def out_of_memory_error(exc: BaseException, record: dict | None, phase: str, device: torch.device) -> MemoryBudgetError:
    """Return the ``MemoryBudgetError`` for an out-of-memory error the estimate did not foresee.

    ``record`` is ``Estimate.record()`` as the manifest holds it (None: no estimate was made).
    """
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not record:
        return MemoryBudgetError(f"out of GPU memory during {phase} ({first}); set runtime.memory lower (--memory)")
    budget = record.get("budget_gib")
    batch = record.get("batch_size") or 1
    fixes = [f"--batch-size {max(1, batch // 2)}" if batch > 1 else None,
             f"--memory {max(1, int(budget * 0.8))}GiB (plans for less than the {budget:.1f} GiB it assumed)"
             if budget else None]
    return MemoryBudgetError(
        f"out of GPU memory during {phase}: the estimate ({record['placement']}, batch {batch}, peak "
        f"{record['estimated_peak_gib']:.1f} GiB) fell short; {gib(peak)} was allocated at most when it ran out "
        f"({first}); try " + " or ".join(f for f in fixes if f), available=None if budget is None else int(budget * GiB))


def plan_memory(plan, device: torch.device, setting: Any = None, placement: str | None = None) -> Estimate:
    """Return the memory estimate of ``plan`` on ``device`` under ``runtime.memory`` (or ``setting``).

    ``placement`` fixes the placement (``causal`` keeps every weight resident). Raises
    ``MemoryBudgetError`` when no placement fits (before any weight is loaded).
    """
    from .model import resolve_dtype

    spec = plan.spec
    dtype_bytes = torch.empty((), dtype=resolve_dtype(spec.model.dtype, device)).element_size()
    compiled = spec.runtime.compile == "on" or (spec.runtime.compile == "auto" and device.type == "cuda")
    budget = device_budget(device, spec.runtime.memory if setting is None else setting)
    return estimate(plan, budget, dtype_bytes, compiled, placement)


def oom_as_budget_error(run):
    """Decorate the interpreter's run so a device out-of-memory error becomes a ``MemoryBudgetError``.

    The run's manifest (its fourth argument) holds the estimate (``manifest["memory"]``) and the
    phases done so far; the message says where it ran out and what to change, without a traceback.
    """
    import functools

    @functools.wraps(run)
    def wrapper(plan, device, run_dir, manifest, phases, *args, **kwargs):
        try:
            return run(plan, device, run_dir, manifest, phases, *args, **kwargs)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            done = list(phases.seconds)
            where = f"the phase after {done[-1]}" if done else "loading the model"
            err = out_of_memory_error(exc, manifest.get("memory"), where, device)
            if device.type == "cuda":
                manifest.setdefault("memory", {})["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 2)
            raise err from None

    return wrapper
