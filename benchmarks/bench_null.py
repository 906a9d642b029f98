"""Benchmark the sign-flip null: PyTorch GEMM forms vs the compiled op, in one process.

Providers, all at U = 16,320 units (the Klein 4B head count) and N = 30 and 20 pairs:

- ``torch_gemm``: the best plain-PyTorch formulation: a chunk of sign patterns ``[P, N]`` (float32)
  times ``d [N, U]`` on the GEMM units, then |t| from S and Q, per-flip counts, maxima and per-unit
  exceedances (float32, not the op's exact integers) -- the H100 baseline of shared/ANCHORS.md
  (200 flips: 0.45 ms, 1e6 flips: 723 ms);
- ``ref``: :func:`signflip_null_ref`, the op's specification (float64 GEMM on the quantised ints);
- ``ours``: ``torch.ops.otherview.signflip_null``, exact (2^(N-1) flips) and random (1e6 flips).

The floor is the issue time of one int32 add per unit-flip on every SM (64 lanes a clock, 1.98 GHz
boost on an H100 SXM); ``vs_floor`` is median time over it. Each measurement is one JSON line
(device, torch version, git sha, N, U, mode, flips, provider, median_s, spread) written to
``--out`` and to ``$OUT/bench_null.jsonl`` when ``$OUT`` is set; a short table is printed last.

Run: ``PYTHONPATH=. python benchmarks/bench_null.py`` (GPU) or ``... --cpu`` (exact N = 20 on the
CPU, plus exact N = 30 at 10 units, the tiny demo model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from otherview.ops.fixedpoint import prepare  # noqa: E402
from otherview.ops.signflip import random_signs, signflip_null, signflip_null_ref, step_down  # noqa: E402

U = 16320
THRESHOLDS = [3.0, 4.0]


def _git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
    except OSError:
        return "unknown"


def _time(fn, reps: int, device: torch.device) -> list[float]:
    """Wall seconds of each of ``reps`` calls, with the device synchronised around each."""
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def torch_gemm_null(d: torch.Tensor, signs: torch.Tensor, thresholds, chunk: int = 8192):
    """The GEMM-form null in float32: counts per flip above each threshold, max |t|, exceedances."""
    n = d.shape[0]
    q = (d * d).sum(0) * n
    s_obs = d.sum(0)
    t_obs = (s_obs * torch.sqrt((n - 1) / (q - s_obs * s_obs))).abs()
    counts, maxima, exceed = [], [], torch.zeros(d.shape[1], dtype=torch.long, device=d.device)
    for c0 in range(0, signs.shape[0], chunk):
        s = signs[c0 : c0 + chunk] @ d
        t = (s * torch.rsqrt((q - s * s).clamp_min(1e-30) / (n - 1))).abs()
        counts.append(torch.stack([(t > c).sum(1) for c in thresholds]))
        maxima.append(t.amax(1))
        exceed += (t >= t_obs).sum(0)
    counts = torch.cat(counts, 1)
    hist = [torch.bincount(c, minlength=d.shape[1] + 1) for c in counts]
    return hist, torch.cat(maxima), exceed


def _step_down_rows(d: torch.Tensor, device: torch.device, record) -> None:
    """Time step-down's extra passes (exact, 20% of units carrying effects of graded size)."""
    n, u = d.shape
    d = d.clone()
    d[:, : u // 5] += torch.linspace(0.3, 1.5, u // 5)
    single = signflip_null(d, THRESHOLDS, "exact")
    times = _time(lambda: step_down(d, single, 0.05), 1, device)
    sd = step_down(d, single, 0.05)
    print(f"  step-down: {sd.step_down_passes} passes, FWER rejections {(single.p_fwer <= 0.05).sum()} "
          f"single-step -> {(sd.p_step_down <= 0.05).sum()} step-down", flush=True)
    record(n, u, "exact", 2 ** (n - 1), f"step_down_{sd.step_down_passes}passes", times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="exact N=20 (and N=30, U=10) on the CPU")
    ap.add_argument("--out", default="bench_null.jsonl")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    floor_rate = n_sm * 64 * 1.98e9 if n_sm else None
    meta = dict(device=dev_name, torch=torch.__version__, git_sha=_git_sha(), threads=torch.get_num_threads())
    rows = []
    sinks = [open(args.out, "a")]
    if os.environ.get("OUT"):
        sinks.append(open(Path(os.environ["OUT"]) / "bench_null.jsonl", "a"))

    def record(n, u, mode, flips, provider, times):
        med = statistics.median(times)
        row = dict(meta, N=n, U=u, mode=mode, flips=flips, provider=provider, median_s=med,
                   spread=[min(times), max(times)], reps=len(times),
                   unit_flips_per_s=flips * u / med if med > 0 else 0.0)
        if floor_rate and flips:
            row["floor_s"] = flips * u / floor_rate
            row["vs_floor"] = med / row["floor_s"]
        for f in sinks:
            f.write(json.dumps(row) + "\n")
            f.flush()
        rows.append(row)
        print(f"  {provider:>12} N={n} U={u} {mode:>6} {flips:>11,} flips: {med * 1e3:10.2f} ms", flush=True)

    g = torch.Generator().manual_seed(0)
    if device.type == "cpu":
        for n, u in [(20, U), (30, 10)]:
            d = torch.randn(n, u, generator=g)
            record(n, u, "exact", 2 ** (n - 1), "ours", _time(lambda: signflip_null(d, THRESHOLDS, "exact"), 1, device))
        d = torch.randn(20, U, generator=g)
        record(20, U, "random", 200, "ref", _time(lambda: signflip_null_ref(d, THRESHOLDS, "random", 200), 3, device))
        signs = random_signs(0, range(200), 20).float()
        record(20, U, "random", 200, "torch_gemm", _time(lambda: torch_gemm_null(d, signs, THRESHOLDS), 3, device))
        record(20, U, "prepare", 0, "host_prep", _time(lambda: prepare(d, THRESHOLDS), 3, device))
        _step_down_rows(torch.randn(20, U, generator=g), device, record)
    else:
        warm = torch.randn(12, 2000, device=device)
        signflip_null(warm, THRESHOLDS, "exact")
        signflip_null(warm, THRESHOLDS, "random", 1000)
        for n in (30, 20):
            d = torch.randn(n, U, generator=g).to(device)
            for flips in (200, 1_000_000):
                signs = random_signs(1, range(flips), n).to(device, torch.float32)
                torch_gemm_null(d, signs[:8], THRESHOLDS)
                record(n, U, "random", flips, "torch_gemm",
                       _time(lambda: torch_gemm_null(d, signs, THRESHOLDS), args.reps if flips < 10**5 else 3, device))
            record(n, U, "random", 200, "ref", _time(lambda: signflip_null_ref(d, THRESHOLDS, "random", 200), 3, device))
            if n == 20:
                record(n, U, "random", 1_000_000, "ref",
                       _time(lambda: signflip_null_ref(d, THRESHOLDS, "random", 1_000_000), 1, device))
            op = torch.ops.otherview.signflip_null
            record(n, U, "prepare", 0, "host_prep", _time(lambda: prepare(d, THRESHOLDS), 3, device))
            for k_list, tag in ((THRESHOLDS, "ours"), (THRESHOLDS[:1], "ours_K1")):
                pr = prepare(d, k_list)
                ints = [x.to(device) for x in (pr.q, pr.thr, pr.a_obs, pr.kinv)]
                record(n, U, "random", 1_000_000, tag,
                       _time(lambda: op(*ints, "random", 1_000_000, 3, 4096), args.reps * 2, device))
                reps = 2 if n == 30 else args.reps * 2
                record(n, U, "exact", 2 ** (n - 1), tag, _time(lambda: op(*ints, "exact", 0, 0, 4096), reps, device))
            _step_down_rows(d, device, record)

    for f in sinks:
        f.close()
    print(f"\n{meta['device']} torch {meta['torch']} sha {meta['git_sha'][:10]}")
    print(f"{'provider':>12} {'N':>3} {'mode':>6} {'flips':>13} {'median ms':>11} {'spread ms':>19} {'unit-flips/s':>13} {'vs floor':>9}")
    for r in rows:
        sp = f"{r['spread'][0] * 1e3:.2f}-{r['spread'][1] * 1e3:.2f}"
        vf = f"{r['vs_floor']:.2f}x" if "vs_floor" in r else "-"
        print(f"{r['provider']:>12} {r['N']:>3} {r['mode']:>6} {r['flips']:>13,} {r['median_s'] * 1e3:>11.2f} {sp:>19} {r['unit_flips_per_s']:>13.3e} {vf:>9}")


if __name__ == "__main__":
    main()
