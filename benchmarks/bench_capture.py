"""Benchmark the per-unit RMS capture: the op alone, then hooked into a full-size FLUX.2 Klein 4B forward.

Part 1 (``op``) times one call per provider on bf16 activations of the capture sites' shapes,
with a device-to-device copy of the same bytes measured in the same process as the yardstick:

- ``naive``: ``x.float().pow(2)`` reshaped to units and summed,
- ``vector_norm``: ``torch.linalg.vector_norm(x.view(B, T, U, g), dim=(1, 3), dtype=float32) ** 2``,
  the best plain-PyTorch form,
- ``compile``: ``torch.compile`` of the naive form,
- ``ours``: ``torch.ops.otherview.unit_sumsq_`` (one segment, and ``ours_3seg`` with the text /
  target / reference split of a probe pass).

Part 2 (``forward``) builds the Klein 4B transformer with random weights (diffusers) and times one
forward at 8192 image tokens (4096 target + 4096 reference) + 512 text tokens, with no hooks, with
reference (vector_norm) hooks, with our op in the hooks, and with our op on a side stream
(``--side-stream`` semantics of :class:`CaptureHooks`), on the 25 capture sites.

Each measurement is one JSON line (device, torch version, git sha, shape, unit width, provider,
median and spread, GB/s) written to ``--out``, or to ``$OUT/bench_capture.jsonl`` when ``$OUT`` is
set; a short table is printed last. Run: ``PYTHONPATH=. python benchmarks/bench_capture.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from otherview.ops import rms  # noqa: E402

OP_SHAPES = [(1, 8704, 12288), (1, 8192, 3072), (4, 8704, 12288)]
UNIT_WIDTHS = [16, 128]

# FLUX.2 Klein 4B (shared/ANCHORS.md).
KLEIN_CONFIG = dict(
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
N_TEXT, N_TARGET, N_REF = 512, 4096, 4096


# ----------------------------------------------------------------------------------------------
# Timing and rows


def _git_sha() -> str:
    if os.environ.get("OTHERVIEW_GIT_SHA"):
        return os.environ["OTHERVIEW_GIT_SHA"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_ms(fn, warmup_ms: float = 50, rep_ms: float = 300) -> tuple[float, float, float]:
    """Return (p20, median, p80) milliseconds of ``fn`` on the device, L2 flushed between calls."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        p20, p50, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
        return p20, p50, p80
    fn()
    torch.cuda.synchronize()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    times = []
    for _ in range(50):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=5)
    return q[0], statistics.median(times), q[3]


def bench_hot_ms(fn, calls: int = 20, loops: int = 15) -> tuple[float, float, float]:
    """Return (p20, median, p80) milliseconds per call of ``calls`` back-to-back calls, no L2 flush.

    Inputs larger than L2 gain nothing from the cache, and this leaves out the write-back of the
    dirty flush buffer that :func:`bench_ms` makes each call pay. Calls shorter than their host-side
    launch path (Python, dispatcher, our two launches: tens of microseconds) leave the device idle
    between them, so for small inputs this measures the host, not the kernel; the ``kernel`` rows
    (profiler device time) are the figure to read there.
    """
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(loops):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    q = statistics.quantiles(times, n=5)
    return q[0], statistics.median(times), q[3]


def kernel_times_us(fn, calls: int = 20) -> dict[str, float]:
    """Return the mean device time (us) per call of each of our kernels that ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for evt in prof.key_averages():
        if "partials_kernel" in evt.key or "finish_kernel" in evt.key:
            total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            times[evt.key] = total / calls
    return times


class Rows:
    """Collects measurement rows; writes them as JSON lines and prints a table at the end."""

    def __init__(self):
        self.rows: list[dict] = []
        self.meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "git_sha": _git_sha(),
        }

    def add(self, bench, shape, unit_width, provider, p20, median, p80, gbps=None, **extra):
        row = {
            **self.meta, "bench": bench, "shape": list(shape), "unit_width": unit_width,
            "provider": provider, "median_ms": round(median, 5),
            "spread": f"p20-p80 {p20:.4f}-{p80:.4f} ms",
            "gb_per_s": None if gbps is None else round(gbps, 1), **extra,
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def write(self, path: str | None) -> None:
        if path is None and os.environ.get("OUT"):
            path = os.path.join(os.environ["OUT"], "bench_capture.jsonl")
        if path:
            with open(path, "w") as f:
                for row in self.rows:
                    f.write(json.dumps(row) + "\n")

    def table(self) -> str:
        lines = [f"{self.meta['device']} | torch {self.meta['torch']} | {self.meta['git_sha'][:10]}",
                 f"{'bench':8} {'shape':18} {'g':>4} {'provider':14} {'median ms':>10} {'GB/s':>8}  note"]
        for r in self.rows:
            shape = "x".join(str(s) for s in r["shape"])
            gbps = "" if r["gb_per_s"] is None else f"{r['gb_per_s']:.0f}"
            note = r.get("note", "")
            lines.append(f"{r['bench']:8} {shape:18} {r['unit_width'] or '':>4} {r['provider']:14} "
                         f"{r['median_ms']:>10.4f} {gbps:>8}  {note}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Part 1: the op alone


def _naive(x, g, out):
    B, T, C = x.shape
    out += x.float().pow(2).view(B, T, C // g, g).sum(dim=(1, 3)).unsqueeze(1)


def _vector_norm(x, g, out):
    B, T, C = x.shape
    out += torch.linalg.vector_norm(x.view(B, T, C // g, g), dim=(1, 3), dtype=torch.float32).square().unsqueeze(1)


def bench_op(rows: Rows) -> None:
    compiled_naive = torch.compile(_naive, dynamic=False)
    for shape in OP_SHAPES:
        B, T, C = shape
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        nbytes = x.numel() * x.element_size()
        dst = torch.empty_like(x)
        p20, copy_ms, p80 = bench_ms(lambda: dst.copy_(x))
        copy_rw = 2 * nbytes / copy_ms / 1e6
        rows.add("op", shape, None, "copy", p20, copy_ms, p80, gbps=copy_rw,
                 note=f"read+write {copy_rw:.0f} GB/s, read-only {copy_rw / 2:.0f} GB/s")
        p20, hot_copy_ms, p80 = bench_hot_ms(lambda: dst.copy_(x))
        hot_copy_rw = 2 * nbytes / hot_copy_ms / 1e6
        rows.add("op_hot", shape, None, "copy", p20, hot_copy_ms, p80, gbps=hot_copy_rw,
                 note=f"no flush: read+write {hot_copy_rw:.0f} GB/s")
        for g in UNIT_WIDTHS:
            U = C // g
            segs3 = [0, N_TEXT, N_TEXT, N_TEXT + N_TARGET, N_TEXT + N_TARGET, T]
            providers = {
                "naive": (lambda o: _naive(x, g, o), 1),
                "vector_norm": (lambda o: _vector_norm(x, g, o), 1),
                "compile": (lambda o: compiled_naive(x, g, o), 1),
                "ours": (lambda o: torch.ops.otherview.unit_sumsq_(x, g, [0, T], o), 1),
                "ours_3seg": (lambda o: torch.ops.otherview.unit_sumsq_(x, g, segs3, o), 3),
            }
            want = rms.unit_sumsq_ref(x, g, [0, T]) if shape == OP_SHAPES[1] else None
            for name, (fn, S) in providers.items():
                out = torch.zeros(B, S, U, device="cuda")
                fn(out)
                note = ""
                if want is not None and S == 1:  # agreement with the reference, one shape
                    rel = ((out - want).norm() / want.norm()).item()
                    note = f"rel err vs ref {rel:.1e}"
                p20, ms, p80 = bench_ms(lambda: fn(out))
                gbps = nbytes / ms / 1e6
                rows.add("op", shape, g, name, p20, ms, p80, gbps=gbps,
                         ratio_to_copy_rw=round(gbps / copy_rw, 4),
                         ratio_to_copy_read=round(gbps / (copy_rw / 2), 4),
                         note=note or f"{gbps / copy_rw:.0%} of copy r+w")
                if name == "ours":
                    p20, ms, p80 = bench_hot_ms(lambda: fn(out))
                    gbps = nbytes / ms / 1e6
                    rows.add("op_hot", shape, g, name, p20, ms, p80, gbps=gbps,
                             ratio_to_copy_rw=round(gbps / hot_copy_rw, 4),
                             note=f"no flush: {gbps / hot_copy_rw:.0%} of copy r+w")
                    for kernel, us in kernel_times_us(lambda: fn(out)).items():
                        short = "partials" if "partials" in kernel else "finish" if "finish" in kernel else kernel[:14]
                        rows.add("kernel", shape, g, short, us / 1e3, us / 1e3, us / 1e3,
                                 gbps=nbytes / us / 1e3 if short == "partials" else None,
                                 note=f"profiler device time, {kernel[:60]}")
        del x, dst
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Part 2: hooked forward of the full-size model


class CaptureHooks:
    """Forward pre-hooks that add each site's per-unit sums of squares into one buffer.

    Parameters
    ----------
    model : nn.Module
        The transformer.
    sites : list of (name, segments, row0)
        Module name, its flat token segments, and the first buffer row they fill.
    unit_width : int
        Channels per unit.
    kind : {"ours", "reference"}
        ``unit_sumsq_`` or the vector_norm form, one call per segment.
    side_stream : torch.cuda.Stream or None
        If given, each reduction runs there, overlapping the projection GEMM that consumes the same
        input: the side stream waits for the producer (an event on the current stream), the input
        is marked used on the side stream (``record_stream``) so the allocator does not recycle it
        early, and :meth:`wait` makes the current stream wait for the side stream before the buffer
        is read.
    """

    def __init__(self, model, sites, unit_width, batch, kind="ours", side_stream=None):
        self.unit_width, self.kind, self.side = unit_width, kind, side_stream
        widths = [model.get_submodule(name).in_features // unit_width for name, _, _ in sites]
        self.buffer = torch.zeros(batch, 3, sum(widths), device=next(model.parameters()).device)
        self.targets, u0 = [], 0
        for (name, segments, row0), width in zip(sites, widths):
            out = self.buffer[:, row0 : row0 + len(segments) // 2, u0 : u0 + width]
            self.targets.append((model.get_submodule(name), segments, out))
            u0 += width
        self.handles = []

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._make_hook(segs, out)) for m, segs, out in self.targets]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _reduce(self, x, segments, out):
        if self.kind == "ours":
            torch.ops.otherview.unit_sumsq_(x, self.unit_width, segments, out)
            return
        B, g = x.shape[0], self.unit_width
        for s in range(len(segments) // 2):
            part = x[:, segments[2 * s] : segments[2 * s + 1]]
            n = part.shape[1]
            out[:, s] += torch.linalg.vector_norm(
                part.reshape(B, n, -1, g), dim=(1, 3), dtype=torch.float32).square()

    def _make_hook(self, segments, out):
        def hook(module, args):
            x = args[0]
            if self.side is None:
                self._reduce(x, segments, out)
                return
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self._reduce(x, segments, out)
            x.record_stream(self.side)

        return hook

    def wait(self) -> None:
        """Make the current stream wait for the side stream's reductions (before reading the buffer)."""
        if self.side is not None:
            torch.cuda.current_stream().wait_stream(self.side)


def _capture_sites(model):
    """Return the 25 sites with their segments and first buffer row (0 text, 1 target, 2 reference)."""
    img = [0, N_TARGET, N_TARGET, N_TARGET + N_REF]  # double blocks: image stream only
    joint = [0, N_TEXT, N_TEXT, N_TEXT + N_TARGET, N_TEXT + N_TARGET, N_TEXT + N_TARGET + N_REF]
    sites = [(f"transformer_blocks.{i}.attn.to_out.0", img, 1) for i in range(len(model.transformer_blocks))]
    sites += [(f"single_transformer_blocks.{i}.attn.to_out", joint, 0)
              for i in range(len(model.single_transformer_blocks))]
    return sites


def _build_model():
    from diffusers import Flux2Transformer2DModel

    with torch.device("cuda"):
        model = Flux2Transformer2DModel(**KLEIN_CONFIG).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
    return model


def _inputs(batch, device="cuda"):
    """Return forward kwargs shaped as Flux2KleinPipeline builds them for a probe pass (1024x1024)."""
    side = int(N_TARGET**0.5)  # 1024 px / 8 (VAE) / 2 (patch) -> 64 x 64 = 4096 tokens per image
    hw = torch.cartesian_prod(torch.arange(side), torch.arange(side))
    zeros = torch.zeros(side * side, 1, dtype=torch.long)
    latent_ids = torch.cat([zeros, hw, zeros], 1)  # (T=0, H, W, L=0)
    ref_ids = torch.cat([zeros + 10, hw, zeros], 1)  # reference image at T=10
    img_ids = torch.cat([latent_ids, ref_ids]).unsqueeze(0).expand(batch, -1, -1)
    txt_ids = torch.cat([torch.zeros(N_TEXT, 3, dtype=torch.long), torch.arange(N_TEXT)[:, None]], 1)
    gen = torch.Generator(device=device).manual_seed(0)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    return dict(
        hidden_states=torch.randn(batch, N_TARGET + N_REF, KLEIN_CONFIG["in_channels"], generator=gen, **bf16),
        encoder_hidden_states=torch.randn(batch, N_TEXT, KLEIN_CONFIG["joint_attention_dim"], generator=gen, **bf16),
        timestep=torch.full((batch,), 0.5, **bf16),
        img_ids=img_ids.to(device),
        txt_ids=txt_ids.unsqueeze(0).expand(batch, -1, -1).to(device),
        return_dict=False,
    )


def bench_forward(rows: Rows, batches, reps: int, unit_width: int = 16) -> None:
    model = _build_model()
    sites = _capture_sites(model)
    side = torch.cuda.Stream()
    variants = {"none": None, "reference": ("reference", None), "ours": ("ours", None),
                "ours_side": ("ours", side)}
    for batch in batches:
        kwargs = _inputs(batch)
        hooks = {name: CaptureHooks(model, sites, unit_width, batch, kind=spec[0], side_stream=spec[1])
                 for name, spec in variants.items() if spec is not None}

        def forward(name):
            """Time one forward with variant ``name``'s hooks attached (none for "none")."""
            h = hooks.get(name)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.no_grad(), (h if h is not None else contextlib.nullcontext()):
                start.record()
                model(**kwargs)
                if h is not None:
                    h.wait()
                end.record()
            end.synchronize()
            return start.elapsed_time(end)

        times = {name: [] for name in variants}
        for name in variants:  # warm-up (cuDNN plans, allocator)
            forward(name)
        for h in hooks.values():
            h.buffer.zero_()
        for name in ("reference", "ours", "ours_side"):
            forward(name)
        torch.cuda.synchronize()
        ref_buf = hooks["reference"].buffer
        agree = {n: ((hooks[n].buffer - ref_buf).norm() / ref_buf.norm()).item() for n in ("ours", "ours_side")}
        for _ in range(reps if batch == 1 else max(3, reps // 2)):  # interleaved rounds
            for name in variants:
                times[name].append(forward(name))
        base = statistics.median(times["none"])
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
            med = statistics.median(ts)
            # Paired: each round's forward against that round's unhooked one, so slow drift of the
            # clocks cancels; the median of those ratios is the overhead figure that counts.
            paired = 100 * statistics.median(t / n - 1 for t, n in zip(ts, times["none"]))
            note = f"{paired:+.2f}% vs none (paired median; medians {100 * (med / base - 1):+.2f}%)"
            if name in agree:
                note += f", buffer rel diff vs reference {agree[name]:.1e}"
            rows.add("forward", (batch, N_TEXT + N_TARGET + N_REF, 3072), unit_width, name, q[0], med, q[3],
                     overhead_pct=round(paired, 3), reps=len(ts), note=note)
        del kwargs, hooks
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="JSON-lines output (default $OUT/bench_capture.jsonl when $OUT is set)")
    parser.add_argument("--part", choices=["op", "forward", "all"], default="all")
    parser.add_argument("--batches", default="1,4", help="forward batch sizes, comma-separated")
    parser.add_argument("--reps", type=int, default=16, help="timed forwards per variant at B=1 (half at B>1)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_capture needs a CUDA device")
    rows = Rows()
    t0 = time.time()
    try:
        if args.part in ("op", "all"):
            bench_op(rows)
        if args.part in ("forward", "all"):
            bench_forward(rows, [int(b) for b in args.batches.split(",")], args.reps)
    finally:
        rows.write(args.out)
        print(f"\n[{time.time() - t0:.0f} s]\n" + rows.table())


if __name__ == "__main__":
    main()
