"""The probe forward under ``torch.compile``: without hooks vs with otherview's capture in the graph.

The full-size random Klein 4B transformer at the probe shape (8,192 image + 512 text tokens), compiled
with static shapes as ``otherview exec`` does, at several batch sizes. For each batch size, two graphs
are compiled (no hooks; capture hooks on the 25 sites through ``otherview.capture.attach``) and timed
with CUDA events. Reports ms per sample and the capture's overhead.

Usage (GPU): ``python benchmarks/bench_compiled_forward.py --batches 4 20``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_capture import _build_model, _inputs  # noqa: E402

from otherview import capture, store  # noqa: E402
from otherview.model import architecture  # noqa: E402
from otherview.plan import build_plan  # noqa: E402
from otherview.spec import load_spec  # noqa: E402


def _time(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 20])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    spec, _ = load_spec(ROOT / "specs" / "plantain.toml")
    plan = build_plan(spec, architecture("builtin:klein-4b"))
    model = _build_model()
    base = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "git_sha": store.git_sha(ROOT)}
    rows = []
    for batch in args.batches:
        inputs = _inputs(batch)
        compiled = torch.compile(model, dynamic=False)
        compiled(**inputs)  # compiles the graph without hooks
        t_plain = _time(lambda: compiled(**inputs), 3 * args.reps)
        buffer = torch.zeros(batch, 1, plan.n_units, device="cuda")
        with capture.attach(model, plan, buffer) as cap:
            cap.reset(batch)
            compiled(**inputs)  # the hooks fail the first graph's guards: a second graph, hooks traced in
            t_hooked = _time(lambda: compiled(**inputs), 3 * args.reps)
            rms = cap.rms()
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        p, h = med(t_plain), med(t_hooked)
        row = {**base, "batch": batch, "tokens": plan.text_tokens + plan.target_tokens + plan.reference_tokens,
               "compiled_no_hooks_ms": p, "compiled_capture_ms": h, "ms_per_sample_no_hooks": p / batch,
               "ms_per_sample_capture": h / batch, "capture_overhead": h / p - 1,
               "captured_finite": bool(torch.isfinite(rms).all())}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del compiled, inputs, buffer
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    out = args.out or (os.path.join(os.environ["OUT"], "bench_compiled_forward.jsonl") if os.environ.get("OUT") else None)
    if out:
        with open(out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{'batch':>5} {'no hooks ms/sample':>19} {'capture ms/sample':>18} {'overhead':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['ms_per_sample_no_hooks']:>19.1f} {r['ms_per_sample_capture']:>18.1f} "
              f"{r['capture_overhead']:>+9.2%}")


if __name__ == "__main__":
    main()
