"""``otherview exec`` under smaller GPU memory: fresh processes capped at 22 GiB and 14 GiB vs uncapped.

A 24 GB card (RTX 3090/4090, A5000) leaves about 22 GiB to a process, a 16 GB card about 14 GiB.
Each run is a fresh ``python -m otherview exec SPEC --model MODEL`` with ``OTHERVIEW_MEMORY_FRACTION``
set so that ``torch.cuda.set_per_process_memory_fraction`` caps the caching allocator at that size
before anything is allocated (``otherview.memory.apply_process_cap``); the uncapped run goes first
and is the baseline. Per run: the wall time of the whole process (build of the random weights,
compile if on, report included), its exit code, the placement, batch and encoding chunk the budget
chose, the estimated and the measured peak (``torch.cuda.max_memory_allocated`` and ``_reserved``
after the model is loaded), the phase times, and how far its per-pass, per-unit RMS are from the
uncapped run's.

Tolerance: the capped runs use other probe batches (and, under model-offload, the same kernels on
the same inputs otherwise), so their RMS differ from the baseline's by bf16 batch-composition noise
only: passed when the median relative difference is below 1e-3 and the 99th percentile below 1e-2
(bench_plantain's eager-vs-compiled cross-path check, a larger change, allows 1e-2 and 5e-2), and the
reference image is the same.

Usage (one GPU): ``python benchmarks/bench_memory.py`` (``--model builtin:klein-4b``, ``--caps 22 14``,
``--compile off`` as in issue 18). Writes JSON lines to ``--out`` (default ``$OUT/bench_memory.jsonl``
when $OUT is set, else ``benchmarks/results/bench_memory.jsonl``) and prints a table last.
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
sys.path.insert(0, str(ROOT))

from otherview import store  # noqa: E402
from otherview.memory import FRACTION_ENV  # noqa: E402


def _total_memory() -> tuple[int, str]:
    """Return the GPU's total memory (bytes) and name, asked in a child so this process holds no CUDA context."""
    code = "import torch; p = torch.cuda.get_device_properties(0); print(p.total_memory); print(p.name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    return int(out[0]), out[1]


def _run(args, cap_gib: float | None, total: int, out_dir: Path) -> dict:
    env = dict(os.environ)
    env.pop(FRACTION_ENV, None)
    if cap_gib is not None:
        env[FRACTION_ENV] = repr(cap_gib * 2**30 / total)
    cmd = [sys.executable, "-m", "otherview", "exec", args.spec, "--model", args.model, "--out", str(out_dir),
           "--compile", args.compile, "-q"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    row = {"cap_gib": cap_gib, "fraction": None if cap_gib is None else cap_gib * 2**30 / total,
           "wall_s": round(wall, 2), "exit_code": proc.returncode}
    runs = sorted(out_dir.rglob("manifest.json"))
    if runs:
        manifest = json.loads(runs[-1].read_text())
        mem = manifest.get("memory", {})
        row.update(run_dir=str(runs[-1].parent), status=manifest.get("status"), error=manifest.get("error"),
                   placement=mem.get("placement"), batch_size=manifest.get("batch_size"),
                   encode_chunk=mem.get("encode_chunk"), budget_gib=mem.get("budget_gib"),
                   estimated_peak_gib=mem.get("estimated_peak_gib"), estimated_phases_gib=mem.get("estimated_phases_gib"),
                   peak_gib=manifest.get("peak_gpu_memory_gib"), peak_reserved_gib=mem.get("peak_reserved_gib"),
                   phases=manifest.get("phases"))
    if proc.returncode != 0:
        row["stderr_tail"] = proc.stderr[-2000:]
    return row


def _compare(base_dir: str, run_dir: str) -> dict:
    a = store.read_tensors(Path(base_dir) / "rms.safetensors")["rms"].astype(np.float64)
    b = store.read_tensors(Path(run_dir) / "rms.safetensors")["rms"].astype(np.float64)
    rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-30)
    ref_a, ref_b = (Path(d) / "reference.png" for d in (base_dir, run_dir))
    same_ref = ref_a.exists() and ref_b.exists() and ref_a.read_bytes() == ref_b.read_bytes()
    check = {"median_rel": float(np.median(rel)), "p99_rel": float(np.quantile(rel, 0.99)), "max_rel": float(rel.max()),
             "bitwise_equal": bool(np.array_equal(a, b)), "reference_image_equal": bool(same_ref)}
    check["passed"] = bool(check["median_rel"] < 1e-3 and check["p99_rel"] < 1e-2 and same_ref)
    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "plantain.toml"))
    parser.add_argument("--model", default="builtin:klein-4b")
    parser.add_argument("--caps", type=float, nargs="+", default=[22.0, 14.0], help="per-process caps in GiB")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="off")
    parser.add_argument("--out")
    parser.add_argument("--runs", help="keep the run directories under this folder (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or (os.path.join(os.environ["OUT"], "bench_memory.jsonl") if os.environ.get("OUT")
                       else str(ROOT / "benchmarks" / "results" / "bench_memory.jsonl"))
    total, name = _total_memory()
    import torch

    base = {"device": name, "torch": torch.__version__, "git_sha": store.git_sha(ROOT), "model": args.model,
            "spec": Path(args.spec).name, "compile": args.compile, "total_gib": round(total / 2**30, 2)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs or tmp)
        for cap in [None, *args.caps]:
            label = "uncapped" if cap is None else f"cap{cap:g}"
            print(f"running {label} ...", flush=True)
            row = {**base, "run": label, **_run(args, cap, total, root / label)}
            if cap is not None and rows and rows[0].get("status") == "complete" and row.get("status") == "complete":
                row["vs_uncapped"] = _compare(rows[0]["run_dir"], row["run_dir"])
            rows.append(row)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\n{name}, torch {torch.__version__}, {args.model}, compile {args.compile}")
    print(f"{'run':<10} {'exit':>4} {'wall s':>8} {'placement':<14} {'batch':>5} {'est GiB':>8} {'peak GiB':>8} "
          f"{'reserved':>8}  vs uncapped")
    for r in rows:
        print(f"{r['run']:<10} {r['exit_code']:>4} {r['wall_s']:>8.1f} {str(r.get('placement')):<14} "
              f"{str(r.get('batch_size')):>5} {str(r.get('estimated_peak_gib')):>8} {str(r.get('peak_gib')):>8} "
              f"{str(r.get('peak_reserved_gib')):>8}  {r.get('vs_uncapped', r.get('error') or '')}")
    if any(r["exit_code"] != 0 or not r.get("vs_uncapped", {"passed": True})["passed"] for r in rows):
        sys.exit("a run failed or disagreed with the uncapped run")


if __name__ == "__main__":
    main()
