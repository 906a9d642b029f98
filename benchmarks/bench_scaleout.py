"""Scale-out: probe-phase passes per second of ``otherview exec`` on 1, 2, ..., k GPUs of one machine.

Each point is a fresh ``accelerate launch --multi_gpu --num_processes K -m otherview exec SPEC`` (K = 1:
a plain ``otherview exec``), in one call so the 1-GPU baseline shares the machine. The probe-phase
time of a point is the main process's ``probe`` plus ``gather`` phases from the manifest (gather waits
for the slowest process), so passes per second = passes / (probe + gather) and the parallel
efficiency is rate_K / (K x rate_1). The statistics phase (the sign-flip null, on the main process's
GPU) is reported beside it. Every point's arrays are compared with the 1-GPU run's (bf16 batch
composition is the same, so the rows should agree to the kernels' own nondeterminism).

Usage (GPU machine): ``python benchmarks/bench_scaleout.py --model builtin:klein-4b --spec
specs/plantain.toml [--gpus 1 2 4 8] [--compile off]``. Writes JSON lines to ``--out`` (default
``$OUT/bench_scaleout.jsonl``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run(k: int, spec: str, model: str, out: Path, extra: list[str]) -> tuple[Path, float]:
    base = ["-m", "otherview", "exec", spec, "--model", model, "--out", str(out), "-q", *extra]
    if k == 1:
        cmd = [sys.executable, *base]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(k),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *base]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"K={k} failed:\n{done.stdout}\n{done.stderr}")
    run_dir = Path([line for line in done.stdout.splitlines() if line.startswith("/")][-1])
    return run_dir, wall


def main() -> None:
    import torch
    from safetensors.numpy import load_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:klein-4b")
    ap.add_argument("--spec", default="specs/plantain.toml")
    ap.add_argument("--gpus", type=int, nargs="*", default=None, help="process counts (default 1, 2, 4, ... up to all)")
    ap.add_argument("--compile", default=None, choices=["auto", "on", "off"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n_gpus = torch.cuda.device_count()
    counts = args.gpus or sorted({1, *[2 ** i for i in range(1, 4) if 2 ** i <= n_gpus], n_gpus})
    extra = ["--compile", args.compile] if args.compile else []
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "bench_scaleout.jsonl")
    rows, base_rate, base_rms = [], None, None
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
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
            row = {"bench": "scaleout", "gpus": k, "passes": n_passes, "probe_s": round(probe, 3),
                   "passes_per_s": round(rate, 2), "efficiency": round(rate / (k * base_rate), 3),
                   "statistics_s": phases.get("statistics"), "wall_s": round(wall, 2), "max_rel_diff_vs_1": rel,
                   "device": torch.cuda.get_device_name(0) if n_gpus else "cpu", "torch": torch.__version__,
                   "git_sha": os.environ.get("OTHERVIEW_GIT_SHA", sha), "spec": args.spec, "model": args.model}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"\n| GPUs | passes/s | efficiency | probe s | statistics s | wall s | max rel diff vs {counts[0]} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gpus']} | {r['passes_per_s']} | {r['efficiency']} | {r['probe_s']} | {r['statistics_s']} | "
              f"{r['wall_s']} | {r['max_rel_diff_vs_1']:.2e} |")


if __name__ == "__main__":
    main()
