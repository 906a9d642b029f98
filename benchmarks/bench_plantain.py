"""The plantain experiment end to end: the naive diffusers loop vs ``otherview exec``, one process, one device.

1. naive: the loop the diffusers docs suggest. The reference image from one pipeline call, then one
   pipeline call per probe prompt, image-conditioned on it (each call re-encodes its prompt and the
   reference, and decodes its output with the VAE), with PyTorch forward pre-hooks that compute the
   per-unit RMS and copy it to the host.
2. otherview: ``otherview.interpreter.execute`` of the same spec on the same loaded model.

Both capture the same quantity from the same noise, so the naive loop (eager, batch of one) is also
the full-scale cross-path check of otherview's batched, compiled path: the per-unit RMS must agree
within bf16 tolerance.

Usage (GPU): ``python benchmarks/bench_plantain.py --model builtin:klein-4b``; ``--skip-naive`` runs
otherview alone. Writes JSON lines to ``--out`` (default ``$OUT/bench_plantain.jsonl`` when $OUT is
set) and prints a table last.

Whole processes (``--processes``), as a user runs them: the naive script
(``benchmarks/naive_plantain.py``) and ``python -m otherview exec``, each a fresh subprocess, with
otherview's caches first empty (a fresh ``$OTHERVIEW_CACHE``), then warm (the same folder
again: its compile markers, inductor cache and, where torch was installed without bytecode, the
bytecode cache of ``otherview.startup``). Each row has the process's wall time, its load phase
(``load_s``: the model code's imports and the weights) and the weights alone (``weights_s``: drawn
or read, from ``model.load_clock``), each reported apart, the
manifest's phases, the time before the run directory exists (startup), before the first weight is
drawn or read (``first_weight_s``: process start to the end of the model code's imports inside
``load_model``, from the manifest's ``model.load_clock``; ``load_started_s`` is the phase's start),
after the report line (teardown) and outside every phase, and the compile decision. ``--variants``
picks the runs, e.g. ``naive,cold:auto,cold:on,warm:auto,warm:off``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otherview import figures, interpreter, model as model_mod, stats, store  # noqa: E402
from otherview.model import architecture  # noqa: E402
from otherview.plan import build_plan  # noqa: E402
from otherview.spec import load_spec, with_overrides  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


@torch.no_grad()
def naive_loop(loaded, plan) -> tuple[dict[str, float], np.ndarray]:
    """Return the naive loop's phase times and its per-pass, per-unit RMS (n_passes, n_units)."""
    pipe, spec, dev = loaded.pipe, plan.spec, loaded.device
    g = spec.capture.unit_width
    layers = plan.arch.text_encoder_out_layers
    times: dict[str, float] = {}
    _sync(dev)
    start = time.perf_counter()
    image = pipe(prompt=spec.reference.prompt, height=plan.height, width=plan.width,
                 num_inference_steps=spec.reference.steps, guidance_scale=spec.reference.guidance_scale,
                 generator=torch.Generator("cpu").manual_seed(spec.reference.seed),
                 max_sequence_length=plan.text_tokens, text_encoder_out_layers=layers).images[0]
    _sync(dev)
    times["reference"] = time.perf_counter() - start
    rows: list[np.ndarray] = []
    current: dict[str, np.ndarray] = {}

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            rms = x.float().pow(2).reshape(x.shape[0], x.shape[1], -1, g).mean(dim=(1, 3)).sqrt()
            current[name] = rms.cpu().numpy()  # the host copy per hook that otherview avoids
        return hook

    handles = [pipe.transformer.get_submodule(s.name).register_forward_pre_hook(make_hook(s.name)) for s in plan.sites]
    try:
        start = time.perf_counter()
        for p in plan.passes:
            current.clear()
            pipe(image=image, prompt=p.prompt, height=plan.height, width=plan.width,
                 num_inference_steps=spec.probe.steps, guidance_scale=spec.probe.guidance_scale,
                 generator=torch.Generator("cpu").manual_seed(spec.probe.seed), max_sequence_length=plan.text_tokens,
                 text_encoder_out_layers=layers)
            rows.append(np.concatenate([current[s.name][0] for s in plan.sites]))
        _sync(dev)
        times["probe"] = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    times["total"] = times["reference"] + times["probe"]
    return times, np.stack(rows)


_STAMP = re.compile(r"^\[\s*([0-9.]+)s\] (.*)$")


def _run_process(cmd: list[str], env: dict, timeout: float) -> tuple[float, int, str, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return time.perf_counter() - start, proc.returncode, proc.stdout, proc.stderr


def _left_running() -> list[str]:
    """Return the command lines of otherview or inductor processes still alive (none should be)."""
    try:
        ps = subprocess.run(["ps", "-eo", "pid,etimes,args"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    me = str(os.getpid())
    return [line.strip()[:200] for line in ps.splitlines()[1:]
            if ("otherview" in line or "compile_worker" in line) and line.split()[0] != me
            and "bench_plantain" not in line]


def _exec_row(base: dict, variant: str, wall: float, rc: int, stdout: str, stderr: str) -> dict:
    """Return one whole-process row of ``otherview exec`` from its wall time, progress lines and manifest."""
    stamps = [(float(m.group(1)), m.group(2)) for m in map(_STAMP.match, stderr.splitlines()) if m]
    first = lambda prefix: next((t for t, msg in stamps if msg.startswith(prefix)), None)  # noqa: E731
    row = {**base, "provider": "otherview exec", "variant": variant, "wall_s": round(wall, 2), "rc": rc}
    run_dir = Path(stdout.strip().splitlines()[-1]) if rc == 0 and stdout.strip() else None
    if run_dir is None or not (run_dir / "manifest.json").exists():
        row["stderr_tail"] = stderr[-3000:]
        return row
    manifest = json.loads((run_dir / "manifest.json").read_text())
    phases = manifest["phases"]
    load = phases.get("load_model", 0.0)
    report_at = first("report:")
    clock = manifest["model"].get("load_clock") or {}  # seconds since the process started
    # the weights alone (drawn or read), without the model code's imports that the load phase includes
    weights = round(clock["done_s"] - clock["weights_started_s"], 2) if clock.get("done_s") is not None else None
    row.update(phases=phases, load_s=load, wall_minus_load_s=round(wall - load, 2),
               startup_s=first("run directory"), before_load_s=first("loading"),
               load_started_s=clock.get("started_s"), first_weight_s=clock.get("weights_started_s"),
               weights_s=weights, wall_minus_weights_s=round(wall - weights, 2) if weights is not None else None,
               bytecode_cache=manifest.get("runtime", {}).get("bytecode_cache"),
               after_report_s=round(wall - report_at, 2) if report_at is not None else None,
               outside_phases_s=round(wall - sum(phases.values()), 2),
               compile=manifest.get("runtime", {}).get("compile_decision"), null=manifest.get("null"),
               batch_size=manifest.get("batch_size"), peak_gib=manifest.get("peak_gpu_memory_gib"),
               run_dir=str(run_dir))
    return row


def _time_null(run_dir: str, spec, device) -> dict:
    """Return the exact null's time on a finished run's differences (median of three, after a warm-up)."""
    arrays = store.read_tensors(Path(run_dir) / "rms.safetensors")
    d = arrays[next(k for k in arrays if k.endswith("/d"))]  # the first contrast's differences
    times = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        res = stats.sign_flip_null(d, spec.null.thresholds, "exact", spec.null.flips, spec.null.seed,
                                   spec.null.quantile, device, fwer=spec.null.fwer, alpha=spec.null.alpha)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"provider": "otherview", "phase": f"exact null alone ({res.result.n_flips:,} flips, {d.shape[1]} units, "
            f"{len(spec.null.thresholds)} thresholds, {spec.null.fwer} FWER)", "seconds": sorted(times[1:])[1], "first_s": times[0]}


def processes(args) -> None:
    """Time whole processes: the naive script and ``otherview exec``, cold then warm caches."""
    spec, _ = load_spec(args.spec)
    out = args.out or (os.path.join(os.environ["OUT"], "bench_processes.jsonl") if os.environ.get("OUT") else None)
    device = model_mod.resolve_device("auto")
    base = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "git_sha": store.git_sha(ROOT), "model": args.model, "spec": args.spec}
    cache = Path(args.cache or tempfile.mkdtemp(prefix="otherview-cache-"))
    runs = Path(args.runs or tempfile.mkdtemp(prefix="otherview-runs-"))
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update(OTHERVIEW_CACHE=str(cache), PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")

    for variant in args.variants.split(","):
        if variant == "naive":
            cmd = [sys.executable, str(ROOT / "benchmarks" / "naive_plantain.py"), "--spec", args.spec, "--model", args.model]
            wall, rc, so, se = _run_process(cmd, env, args.timeout)
            row = {**base, "provider": "naive script", "variant": "naive", "wall_s": round(wall, 2), "rc": rc}
            try:
                inner = json.loads(so.strip().splitlines()[-1])["naive"]
                row.update(phases=inner, load_s=round(inner["load_model"], 2),
                           wall_minus_load_s=round(wall - inner["load_model"], 2))
            except (ValueError, IndexError, KeyError):
                row["stderr_tail"] = se[-3000:]
            emit(row)
            continue
        state, setting = variant.split(":")
        if state == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        cmd = [sys.executable, "-m", "otherview", "exec", args.spec, "--model", args.model, "--out", str(runs),
               "--compile", setting]
        row = _exec_row(base, variant, *_run_process(cmd, env, args.timeout))
        row["left_running"] = _left_running()  # right after the process returned: should be empty
        emit(row)
    done = [r for r in rows if r.get("run_dir")]
    eager = next((r for r in done if not (r.get("compile") or {}).get("compile")), None)
    if eager is not None:
        # Cross-path check: compiled capture (per-site buffer views inside the block graphs) vs eager.
        want = store.read_tensors(Path(eager["run_dir"]) / "rms.safetensors")["rms"].astype(np.float64)
        for r in done:
            got = store.read_tensors(Path(r["run_dir"]) / "rms.safetensors")["rms"]
            rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
            r["rms_vs_eager"] = {"median_rel": float(np.median(rel)), "p99_rel": float(np.quantile(rel, 0.99))}
            print(f"{r['variant']}: rms vs eager run {eager['variant']}: {r['rms_vs_eager']}", flush=True)
            if out:
                with open(out, "a") as f:
                    f.write(json.dumps({**base, "provider": "cross-path check", "variant": r["variant"],
                                        "vs": eager["variant"], **r["rms_vs_eager"]}) + "\n")
    if done and device.type == "cuda":
        emit({**base, **_time_null(done[-1]["run_dir"], spec, device)})
    naive = next((r for r in rows if r["provider"] == "naive script" and r.get("wall_minus_load_s")), None)
    print(f"\n{base['device']}, torch {base['torch']}, {args.model}: whole processes (load excluded)")
    print(f"{'run':<22} {'wall':>7} {'load':>6} {'-load':>7} {'-weights':>9} {'start':>6} {'weight':>6} {'exit':>6} "
          f"{'outside':>8}  vs naive  compile")
    for r in rows:
        if "wall_s" not in r:
            continue
        ratio = f"{naive['wall_minus_load_s'] / r['wall_minus_load_s']:.2f}x" if naive and r.get("wall_minus_load_s") else ""
        fmt = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        dec = r.get("compile") or {}
        print(f"{r['provider'][:9] + ' ' + r['variant']:<22} {fmt(r['wall_s']):>7} {fmt(r.get('load_s')):>6} "
              f"{fmt(r.get('wall_minus_load_s')):>7} {fmt(r.get('wall_minus_weights_s')):>9} {fmt(r.get('startup_s')):>6} "
              f"{fmt(r.get('first_weight_s')):>6} "
              f"{fmt(r.get('after_report_s')):>6} "
              f"{fmt(r.get('outside_phases_s')):>8}  {ratio:>8}  {dec.get('compile', '')} {dec.get('compile_seconds', '')}")
    for r in rows:
        if "phase" in r:
            print(f"{r['phase']}: {r['seconds']:.3f} s (first {r['first_s']:.3f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "plantain.toml"))
    parser.add_argument("--model", default="builtin:klein-4b")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--null-method", choices=["auto", "exact", "random"], default="random",
                        help="the timed run's null (default: the card's 200 random flips); the "
                             "spec's 'auto' null is then timed on the same differences as an extra row")
    parser.add_argument("--out")
    parser.add_argument("--runs", help="keep otherview's run directory under this folder (default: a temporary one)")
    parser.add_argument("--processes", action="store_true", help="time whole processes (see the module docstring)")
    parser.add_argument("--variants", default="naive,cold:auto,cold:on,warm:auto",
                        help="--processes: runs in order; 'naive', or CACHE:COMPILE with CACHE cold|warm")
    parser.add_argument("--cache", help="--processes: the OTHERVIEW_CACHE folder (default: a fresh temporary one)")
    parser.add_argument("--timeout", type=float, default=600, help="--processes: seconds per process")
    args = parser.parse_args()
    if args.processes:
        return processes(args)

    spec, raw = load_spec(args.spec)
    spec = with_overrides(spec, {"model.source": args.model, "runtime.compile": args.compile,
                                 "probe.batch_size": args.batch_size, "null.method": args.null_method})
    plan = build_plan(spec, architecture(spec.model.source))
    device = model_mod.resolve_device(spec.model.device)
    out = args.out or (os.path.join(os.environ["OUT"], "bench_plantain.jsonl") if os.environ.get("OUT") else None)
    base = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "git_sha": store.git_sha(ROOT), "model": spec.model.source,
            "resolution": [plan.height, plan.width], "passes": len(plan.passes), "units": plan.n_units}
    rows = []

    workers = figures.start_workers()  # as `otherview exec` does: forked before the model exists
    start = time.perf_counter()
    loaded = model_mod.load(spec.model.source, spec.model.dtype, spec.model.device)
    _sync(device)
    rows.append({**base, "provider": "one-time", "phase": "build/load model", "seconds": time.perf_counter() - start})

    naive_rms = None
    if not args.skip_naive:
        _peak_reset(device)
        times, naive_rms = naive_loop(loaded, plan)
        for phase, sec in times.items():
            rows.append({**base, "provider": "naive loop", "phase": phase, "seconds": sec, "peak_gib": _peak(device)})

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = interpreter.execute(spec, raw, args.spec, out_dir=args.runs or tmp, loaded=loaded, workers=workers,
                                      progress=lambda m: print(f"  otherview: {m}", flush=True))
        manifest = json.loads((run_dir / "manifest.json").read_text())
        arrays = store.read_tensors(run_dir / "rms.safetensors")
        ours_rms = arrays["rms"]
    phases = manifest["phases"]
    one_time = {"compile": "torch.compile: reference graph", "compile_probe": "torch.compile: probe graph + batch"}
    for phase, sec in phases.items():
        rows.append({**base, "provider": "one-time" if phase in one_time else "otherview",
                     "phase": one_time.get(phase, phase), "seconds": sec, "batch_size": manifest.get("batch_size"),
                     "null": manifest.get("null"), "peak_gib": manifest.get("peak_gpu_memory_gib")})
    total = sum(v for k, v in phases.items() if k not in one_time and k != "load_model")
    rows.append({**base, "provider": "otherview", "phase": "total (no load, no compile)", "seconds": total,
                 "peak_gib": manifest.get("peak_gpu_memory_gib")})

    _sync(device)
    start = time.perf_counter()
    auto = stats.sign_flip_null(arrays["d"], spec.null.thresholds, "auto", spec.null.flips, spec.null.seed,
                                spec.null.quantile, device)
    _sync(device)
    rows.append({**base, "provider": "otherview", "phase": f"null 'auto' alone ({auto.method}, {auto.result.n_flips:,} flips)",
                 "seconds": time.perf_counter() - start})

    check = None
    if naive_rms is not None:
        naive_total = next(r["seconds"] for r in rows if r["provider"] == "naive loop" and r["phase"] == "total")
        rows.append({**base, "provider": "speedup", "phase": "naive total / otherview total", "seconds": None,
                     "ratio": naive_total / total})
        rel = np.abs(ours_rms.astype(np.float64) - naive_rms) / np.maximum(np.abs(naive_rms), 1e-30)
        check = {"median_rel": float(np.median(rel)), "p99_rel": float(np.quantile(rel, 0.99)),
                 "max_rel": float(rel.max()), "passed": bool(np.median(rel) < 1e-2 and np.quantile(rel, 0.99) < 5e-2)}
        rows.append({**base, "provider": "cross-path check", "phase": "otherview vs naive eager batch-of-one RMS",
                     "seconds": None, **check})

    if out:
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"\n{base['device']}, torch {base['torch']}, {spec.model.source} (random weights), "
          f"{plan.height}x{plan.width}, {len(plan.passes)} probe passes, {plan.n_units} units")
    print(f"{'provider':<18} {'phase':<34} {'seconds':>9}  extra")
    for r in rows:
        sec = f"{r['seconds']:.3f}" if r.get("seconds") is not None else ""
        extra = {k: r[k] for k in ("ratio", "peak_gib", "batch_size", "median_rel", "p99_rel", "max_rel", "passed")
                 if r.get(k) is not None}
        print(f"{r['provider']:<18} {r['phase']:<34} {sec:>9}  {extra if extra else ''}")
    if check is not None and not check["passed"]:
        sys.exit("cross-path check FAILED")


if __name__ == "__main__":
    main()
