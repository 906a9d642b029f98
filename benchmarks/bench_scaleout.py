"""Scale-out on 1, 2, ..., k GPUs of one machine: probe passes per second of ``otherview exec``, and the
exact sign-flip null split across the GPUs.

Probes: each point is a fresh ``accelerate launch --multi_gpu --num_processes K -m otherview exec SPEC``
(K = 1: a plain ``otherview exec``), in one call so the 1-GPU baseline shares the machine. The probe-phase
time of a point is the main process's ``probe`` plus ``gather`` phases from the manifest (gather waits
for the slowest process), so passes per second = passes / (probe + gather) and the parallel
efficiency is rate_K / (K x rate_1). The statistics phase (every process takes part: each sign-flip
null's flips are split across the K GPUs) is reported beside it. Every point's arrays are compared
with the 1-GPU run's (bf16 batch composition is the same, so the rows should agree to the kernels' own
nondeterminism).

Exact null: each point is a fresh ``accelerate launch ... bench_scaleout.py --null-worker`` that times
``signflip_null(d, "exact", split=...)`` on N pairs x U units (the same seeded d on every process):
each process counts 1/K of the 2^(N-1) flips on its GPU and the counts are all-reduced. The time is
the main process's median from a barrier to the summed counts; speedup = time_1 / time_K, efficiency =
speedup / K. Every point's counts must be bitwise the 1-GPU counts (``same_counts``).

Usage (GPU machine): ``python benchmarks/bench_scaleout.py --model builtin:klein-4b --spec
specs/plantain.toml [--gpus 1 2 4 8] [--compile off] [--null-pairs 30 32] [--null-units 16320]``;
``--no-exec`` times the null alone, ``--no-null`` the probes alone. Writes JSON lines to ``--out``
(default ``$OUT/bench_scaleout.jsonl``) and prints the tables. On a CPU machine the null part runs
over gloo (``--no-exec --gpus 1 2 --null-pairs 16 --null-units 300``: a smoke test, not a timing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NULL_THRESHOLDS = [3.0, 4.0]
NULL_TAG = "NULL_ROW "  # the null worker's result line on the main process's stdout


def _launcher(k: int) -> list[str]:
    if k == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(k),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _run(k: int, spec: str, model: str, out: Path, extra: list[str]) -> tuple[Path, float]:
    cmd = [*_launcher(k), "-m", "otherview", "exec", spec, "--model", model, "--out", str(out), "-q", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"K={k} failed:\n{done.stdout}\n{done.stderr}")
    run_dir = Path([line for line in done.stdout.splitlines() if line.startswith("/")][-1])
    return run_dir, wall


def _null_worker(n: int, u: int, reps: int) -> None:
    """One process of a split exact null: time it; the main process prints the row (``NULL_TAG``)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from otherview import distributed
    from otherview.ops.signflip import signflip_null

    ctx = distributed.context("auto")
    dev = ctx.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = ctx.flip_split()
    d = torch.randn(n, u, generator=torch.Generator().manual_seed(7919 * n + u)).to(dev)  # the same d everywhere
    d[:, : min(u, 8)] += 1.0  # a few units with an effect
    signflip_null(d[: min(n, 12)], NULL_THRESHOLDS, "exact", split=split)  # warm: kernels, the communicator

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times = []
    for _ in range(reps):
        ctx.barrier()
        sync()
        t0 = time.perf_counter()
        res = signflip_null(d, NULL_THRESHOLDS, "exact", split=split)  # counts on the CPU: synchronised
        times.append(time.perf_counter() - t0)
    if not ctx.is_main:
        return
    digest = hashlib.sha256()
    for name in ("count_hist", "exceed", "fwer_exceed", "fwer_exceed_lo", "max_hist"):
        digest.update(getattr(res, name).numpy().tobytes())
    row = {"null_s": round(statistics.median(times), 4), "spread_s": [round(min(times), 4), round(max(times), 4)],
           "flips": int(res.n_flips), "flip_ranges": [list(r) for r in res.flip_ranges] or [[0, int(res.n_flips)]],
           "counts_sha256": digest.hexdigest(), "null_device": dev.type,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    print(NULL_TAG + json.dumps(row), flush=True)


def _null_points(counts: list[int], pairs: list[int], units: int, reps: int, sha: str) -> list[dict]:
    """Return one row per (pairs, process count): the split exact null's time and its counts' check."""
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for n in pairs:
        base = None
        for k in counts:
            cmd = [*_launcher(k), str(Path(__file__).resolve()), "--null-worker", "--null-pairs", str(n),
                   "--null-units", str(units), "--null-reps", str(reps)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if done.returncode != 0:
                raise SystemExit(f"null K={k} N={n} failed:\n{done.stdout}\n{done.stderr}")
            got = json.loads(next(line for line in done.stdout.splitlines() if line.startswith(NULL_TAG))[len(NULL_TAG):])
            base = base or got
            speedup = base["null_s"] / got["null_s"]
            row = {"bench": "scaleout_null", "gpus": k, "n_pairs": n, "units": units, "mode": "exact", **got,
                   "speedup": round(speedup, 3), "efficiency": round(speedup / k, 3),
                   "same_counts": got["counts_sha256"] == base["counts_sha256"],
                   "git_sha": os.environ.get("OTHERVIEW_GIT_SHA", sha)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _exec_points(counts: list[int], args, n_gpus: int, sha: str) -> list[dict]:
    """Return one row per process count: probe-phase rate and statistics time of a fresh ``otherview exec``."""
    import torch
    from safetensors.numpy import load_file

    extra = ["--compile", args.compile] if args.compile else []
    rows, base_rate, base_rms = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        for k in counts:
            run_dir, wall = _run(k, args.spec, args.model, Path(tmp) / f"k{k}", extra)
            manifest = json.loads((run_dir / "manifest.json").read_text())
            phases = manifest["phases"]
            probe = phases["probe"] + phases.get("gather", 0.0)
            n_passes = len((run_dir / "passes.csv").read_text().strip().splitlines()) - 1
            rate = n_passes / probe
            rms = load_file(str(run_dir / "rms.safetensors"))["rms"].astype(np.float64)
            if k == counts[0]:
                base_rate, base_rms = rate / k, rms
            rel = float(np.max(np.abs(rms - base_rms) / np.maximum(np.abs(base_rms), 1e-12)))
            split = next(iter((manifest.get("null") or {}).values()), {}).get("split")
            row = {"bench": "scaleout", "gpus": k, "passes": n_passes, "probe_s": round(probe, 3),
                   "passes_per_s": round(rate, 2), "efficiency": round(rate / (k * base_rate), 3),
                   "statistics_s": phases.get("statistics"), "null_split": split, "wall_s": round(wall, 2),
                   "max_rel_diff_vs_1": rel, "device": torch.cuda.get_device_name(0) if n_gpus else "cpu",
                   "torch": torch.__version__, "git_sha": os.environ.get("OTHERVIEW_GIT_SHA", sha),
                   "spec": args.spec, "model": args.model}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:klein-4b")
    ap.add_argument("--spec", default="specs/plantain.toml")
    ap.add_argument("--gpus", type=int, nargs="*", default=None, help="process counts (default 1, 2, 4, ... up to all)")
    ap.add_argument("--compile", default=None, choices=["auto", "on", "off"])
    ap.add_argument("--null-pairs", type=int, nargs="*", default=[30, 32], help="N of the exact nulls timed")
    ap.add_argument("--null-units", type=int, default=16320, help="units of the exact nulls (Klein 4B heads)")
    ap.add_argument("--null-reps", type=int, default=3)
    ap.add_argument("--no-exec", action="store_true", help="time the split exact null only")
    ap.add_argument("--no-null", action="store_true", help="time the probes only")
    ap.add_argument("--null-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.null_worker:
        _null_worker(args.null_pairs[0], args.null_units, args.null_reps)
        return
    n_gpus = torch.cuda.device_count()
    counts = args.gpus or sorted({1, *[2 ** i for i in range(1, 4) if 2 ** i <= n_gpus], n_gpus})
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "bench_scaleout.jsonl")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    rows = [] if args.no_exec else _exec_points(counts, args, n_gpus, sha)
    null_rows = [] if args.no_null else _null_points(counts, args.null_pairs, args.null_units, args.null_reps, sha)
    with open(out, "a") as f:
        for row in rows + null_rows:
            f.write(json.dumps(row) + "\n")
    _table(rows, ["gpus", "passes_per_s", "efficiency", "probe_s", "statistics_s", "wall_s", "max_rel_diff_vs_1"],
           ["GPUs", "passes/s", "efficiency", "probe s", "statistics s", "wall s", f"max rel diff vs {counts[0]}"])
    _table(null_rows, ["gpus", "n_pairs", "units", "flips", "null_s", "speedup", "efficiency", "same_counts"],
           ["GPUs", "pairs", "units", "flips", "exact null s", "speedup", "efficiency", f"same counts as {counts[0]}"])


def _table(rows: list[dict], keys: list[str], heads: list[str]) -> None:
    """Print ``rows`` as a markdown table of ``keys`` under ``heads`` (nothing for no rows)."""
    if not rows:
        return
    cell = lambda v: f"{v:.2e}" if isinstance(v, float) and abs(v) < 1e-2 else str(v)  # noqa: E731
    print("\n| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for r in rows:
        print("| " + " | ".join(cell(r[k]) for k in keys) + " |")

if __name__ == "__main__":
    main()
