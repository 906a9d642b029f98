"""The interpreter: runs a plan on a model and writes the run directory.

Order of work: the memory estimate (``memory.plan_memory``: a run that cannot fit stops before
loading); every distinct prompt encoded once, the reference prompts and the empty CFG prompt with
them, so the text encoder can leave the GPU (``offload``); the reference image once, from those
embeddings; the reference latents encoded once; probe passes in batches (each pass conditioned on
the reference, every pass starting from the same seeded noise, no VAE decode of probe outputs) with
capture hooks accumulating into a preallocated buffer; statistics; report. The manifest is
written first (status "running") and rewritten as phases complete, and every process records each
probe batch it finishes (``shards``), so a crash leaves a run directory that says how far it got.
The passes' machinery (encoding, the reference, the probe batches) is ``probes`` and the files a finished
run writes are ``outputs``; this module runs the phases, the run directory, resume and the processes'
shares under accelerate.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import analysis as analysis_mod
from . import capture as capture_mod
from . import checks, compiling, distributed, errors, startup
from . import figures
from . import memory as memory_mod
from . import model as model_mod
from . import offload, outputs
from . import report as report_mod
from . import shards, store
from . import summary as summary_mod
from .phases import Phases, interruptible, stop_point
# The probe machinery lives in probes.py; these names are also the interpreter's (tests patch them here).
from .probes import (ProbeInputs, TextEmbeddings, auto_batch_size, encode_prompts, generate_reference,  # noqa: F401
                     prepare_probe_inputs, prompt_masks, run_probes)
from .plan import Plan, build_plan
from .spec import Spec, spec_hash

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def execute(spec: Spec, raw_text: str, spec_path: str, model_override: str | None = None,
            out_dir: str | None = None, progress: Progress | None = None,
            loaded: model_mod.LoadedModel | None = None, workers=None, models: dict | None = None,
            overrides: list[str] | None = None, plan: Plan | None = None) -> Path:
    """Run ``spec`` end to end and return its run directory.

    Every check that needs no weights runs first (``checks.preflight``: all problems in one error).
    ``loaded`` reuses a model already built or loaded from the spec's source (benchmarks and tests
    run several specs on one model); otherwise the model is loaded here, or taken from ``models`` (a
    dict by source that this call fills: the specs of one invocation share their model).
    ``workers`` reuses a figure pool from ``figures.start_workers`` (start it before loading a
    model: forking is then cheap). Under ``accelerate launch`` every process calls this: the probe
    batches are shared and only the main process writes (see ``otherview.distributed``).
    ``overrides`` are the ``--set`` assignments already applied to ``spec``, recorded in the manifest.
    ``plan`` is what ``checks.preflight(spec, spec_path, model_override, out_dir)`` just returned, where
    the caller has it (the CLI checks every spec before any weights): it is used, not made again.
    """
    ctx = distributed.context(spec.model.device)
    if ctx.world > 1:  # this process's own device: checked again
        spec, plan = spec.model_copy(update={"model": spec.model.model_copy(update={"device": str(ctx.device)})}), None
    spec, plan = checks.preflight(spec, spec_path, model_override, out_dir) if plan is None else (plan.spec, plan)
    device = model_mod.resolve_device(spec.model.device)
    if loaded is None and models is not None:
        loaded = models.get(spec.model.source)
    if not ctx.is_main:
        return _worker(plan, device, Path(ctx.broadcast(None)), ctx, loaded, models)
    run_dir = store.new_run_dir(out_dir or spec.output.dir, spec.experiment.name)
    ctx.broadcast(str(run_dir))
    manifest = {"status": "running", "started": store.now(), "process": store.process_id(), "phase": None,
                "phases_done": [], "run_id": uuid.uuid4().hex, "spec_path": spec_path, "spec_text": raw_text,
                "spec_text_sha256": hashlib.sha256(raw_text.encode()).hexdigest(),
                "spec": spec.model_dump(mode="json"), "spec_hash": spec_hash(spec),
                "random_weights": plan.arch.random_weights, "model_override": model_override,
                "model": {"source": spec.model.source},
                "seeds": {"reference": [sc.seed for sc in plan.design.scenes], "probe": plan.design.seeds,
                          "null": spec.null.seed},
                "resolution": [plan.height, plan.width], "resolution_note": plan.resolution_note,
                "inputs": {sc.image: store.sha256_file(Path(sc.image)) for sc in plan.design.scenes if sc.image},
                "fingerprints": {"model": store.model_fingerprint(spec.model.source), "code": store.code_fingerprint()},
                "versions": store.versions(), "git_sha": store.git_sha(), "device": store.device_info(device),
                "processes": ctx.world, "phases": {}, "overrides": list(overrides or []),
                "layout_id": summary_mod.layout_id(plan)}
    store.write_json(run_dir / "manifest.json", manifest)
    store.write_csv(run_dir / "passes.csv", outputs.pass_rows(plan))
    (progress or log.info)(f"run directory {run_dir}")
    return _run(plan, device, run_dir, manifest, progress, loaded, workers, ctx, models)


def _worker(plan: Plan, device: torch.device, run_dir: Path, ctx: distributed.Context,
            loaded: model_mod.LoadedModel | None, models: dict | None = None, probe: bool = True,
            statistics: bool = True) -> Path:
    """Run a worker's part of a run under accelerate and return the run directory: its share of the probe
    batches and of every sign-flip null's flips.

    The main process decides which batches remain and writes everything but the workers' shard files;
    ``statistics`` is whether it runs the statistics phase (a worker must join it exactly then).
    """
    if probe:
        _, loaded = _phase_probe(plan, device, run_dir, {"model": {}}, Phases(), lambda msg: None, loaded, ctx)
    if statistics:
        _phase_statistics(plan, None, Phases(), lambda msg: None, device, ctx)
    if models is not None and loaded is not None:
        models[plan.spec.model.source] = loaded
    return run_dir


def resume(run_dir: str | Path, raw_text: str | None = None, progress: Progress | None = None,
           loaded: model_mod.LoadedModel | None = None, workers=None) -> Path:
    """Continue an interrupted or failed run in ``run_dir`` from its last finished phase and probe batches.

    Refused (``RunDirError``) when the run is complete or still running, when ``raw_text`` (the spec
    given again) differs from the recorded one, when the model, the reference image files or the
    code that produced its checkpoints differ from those recorded, or when its shard files do not
    fit it: results are then bitwise those of an uninterrupted run (on the CPU; on CUDA, to its own
    determinism). Under ``accelerate launch`` every process calls this: the main process checks and
    shares the probe batches not recorded yet among the processes, whatever their number before.
    """
    run_dir = Path(run_dir)
    ctx = distributed.context(_recorded_device(run_dir))
    if not ctx.is_main:
        job = ctx.broadcast(None)
        if job is None:  # the main process refused, and says why
            return run_dir
        plan = _resume_plan(Spec.model_validate(job["spec"]), job["spec_path"], ctx)
        return _worker(plan, ctx.device, run_dir, ctx, loaded, probe=job["probe"], statistics=job["statistics"])
    try:
        manifest, spec = _resumable(run_dir, raw_text)
        plan = _resume_plan(spec, manifest.get("spec_path", str(run_dir)), ctx)
        probe = "write" not in manifest.get("phases_done", []) and shards.read_complete(run_dir, plan) is None
        if probe and manifest.get("batch_size"):  # shard files of another run or batch size: refused here
            shards.recorded(run_dir, plan, manifest["batch_size"], manifest.get("run_id"))
    except BaseException:
        ctx.broadcast(None)  # the workers stop too
        raise
    ctx.broadcast({"spec": plan.spec.model_dump(mode="json"), "spec_path": manifest.get("spec_path", str(run_dir)),
                   "probe": probe, "statistics": "write" not in manifest.get("phases_done", [])})
    device = model_mod.resolve_device(plan.spec.model.device)
    manifest.setdefault("resumed", []).append({"at": store.now(), "from_status": manifest["status"],
                                               "from_phase": manifest.get("phase"),
                                               "phases_done": list(manifest.get("phases_done", [])),
                                               "processes_before": manifest.get("processes", 1),
                                               "processes": ctx.world})
    manifest.update(status="running", process=store.process_id(), error=None, finished=None, processes=ctx.world)
    store.write_json(run_dir / "manifest.json", manifest)
    (progress or log.info)(f"resuming {run_dir} after phases {', '.join(manifest.get('phases_done', [])) or 'none'}"
                           + (f", {ctx.world} processes" if ctx.world > 1 else ""))
    return _run(plan, device, run_dir, manifest, progress, loaded, workers, ctx)


def _recorded_device(run_dir: Path) -> str:
    """Return the device a run's recorded spec names ("auto" where unreadable): how its processes meet on a resume."""
    try:
        return str(store.read_json(Path(run_dir) / "manifest.json")["spec"]["model"]["device"])
    except Exception:  # noqa: BLE001  the main process's checks say what is wrong with the manifest
        return "auto"


def _resume_plan(spec: Spec, spec_path: str, ctx: distributed.Context) -> Plan:
    """Return the plan of a recorded spec, on this process's device under accelerate."""
    if ctx.world > 1:
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"device": str(ctx.device)})})
    arch, problems = checks.with_text_encoder_layers(spec, model_mod.architecture(spec.model.source))
    checks.raise_problems(problems, spec_path)
    return build_plan(spec, arch)


def _resumable(run_dir: Path, raw_text: str | None) -> tuple[dict, Spec]:
    """Return a run's manifest and recorded spec; raise ``RunDirError`` where the run cannot be resumed as it was."""
    manifest = store.read_manifest(run_dir)
    fail = lambda msg: errors.RunDirError(msg, source=str(run_dir))  # noqa: E731
    status = manifest["status"]
    if status == "complete":
        raise fail("the run is already complete: nothing to resume (`otherview report` re-renders its report)")
    if status == "running" and store.process_alive(manifest.get("process")) is not False:
        raise fail(f"the run is still running (process {manifest.get('process', {}).get('pid')}) or on another host")
    try:
        text = manifest["spec_text"]
        if hashlib.sha256(text.encode()).hexdigest() != manifest["spec_text_sha256"]:
            raise fail("manifest.json: the recorded spec text does not match its hash")
        spec = Spec.model_validate(manifest["spec"])
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, errors.RunDirError):
            raise
        raise fail(f"manifest.json does not hold a resumable run ({type(exc).__name__}: {exc})") from None
    if spec_hash(spec) != manifest.get("spec_hash"):
        raise fail("manifest.json: the recorded spec does not match its hash (edited?)")
    if raw_text is not None and raw_text != text:
        raise fail("the spec given differs from the one this run was made from; resume without it, or start a new run")
    for image, digest in (manifest.get("inputs") or {}).items():
        if not Path(image).is_file() or store.sha256_file(Path(image)) != digest:
            raise fail(f"the reference image '{image}' changed or is gone since the run started")
    fingerprints = manifest.get("fingerprints") or {}
    if fingerprints.get("model") != store.model_fingerprint(spec.model.source):
        raise fail(f"the model '{spec.model.source}' differs from the one that made this run's checkpoints")
    if fingerprints.get("code") != store.code_fingerprint():
        raise fail("otherview's code or its torch/diffusers versions differ from those that made this run's "
                   "checkpoints: results would not match an uninterrupted run; start a new run")
    return manifest, spec


def _run(plan: Plan, device: torch.device, run_dir: Path, manifest: dict, progress: Progress | None,
         loaded: model_mod.LoadedModel | None, workers, ctx: distributed.Context | None = None,
         models: dict | None = None) -> Path:
    """Run the phases not yet done, keeping the manifest's status honest whatever ends the run."""
    say = progress or (lambda msg: log.info(msg))
    phases = Phases(manifest.setdefault("phases", {}), manifest, run_dir)
    own_workers = workers is None
    try:
        with interruptible():
            if own_workers:
                workers = figures.start_workers()  # forked now, while this process is still small
            loaded = _execute(plan, device, run_dir, manifest, phases, say, loaded, workers, ctx)
            if models is not None and loaded is not None:
                models[plan.spec.model.source] = loaded
    except BaseException as exc:
        interrupted = isinstance(exc, (errors.Interrupted, KeyboardInterrupt))
        manifest.update(status="interrupted" if interrupted else "failed", finished=store.now(),
                        error=str(exc) if isinstance(exc, errors.OtherviewError) else f"{type(exc).__name__}: {exc}")
        store.write_json(run_dir / "manifest.json", manifest)
        try:
            exc.run_dir = run_dir  # the CLI names it
        except AttributeError:
            pass
        raise
    finally:
        if own_workers and workers is not None:
            workers.shutdown(cancel_futures=True)
    return run_dir


def _phase_reference(loaded, plan: Plan, run_dir: Path, phases: Phases, say: Progress, device, texts=None) -> list:
    from PIL import Image

    spec, images = plan.spec, []
    names = ["reference.png" if len(plan.design.scenes) == 1 else f"reference-{sc.name}.png" for sc in plan.design.scenes]
    if phases.done("reference") and all((run_dir / n).is_file() for n in names):
        # A resumed run: the saved PNGs are the 8-bit images the probes were conditioned on.
        return [Image.open(run_dir / n).convert("RGB") for n in names]
    with phases("reference", device):
        for scene, name in zip(plan.design.scenes, names):
            say(f"reference image {scene.name}" + (f": {spec.reference.steps} steps, guidance "
                                                   f"{spec.reference.guidance_scale}" if scene.prompt else f": {scene.image}"))
            image = generate_reference(loaded, plan, scene, texts)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            store.atomic_write_bytes(run_dir / name, buf.getvalue())
            images.append(image)
    return images


def _phase_statistics(plan: Plan, rms: np.ndarray | None, phases: Phases, say: Progress, device,
                      ctx: distributed.Context | None = None):
    """Return the analyses of the per-pass values ``rms``.

    Under accelerate every process runs this phase: the main process's ``rms`` is broadcast (a
    worker passes None), every process makes the same analyses, and each sign-flip null's flips are
    split across the processes (``Context.flip_split``: counts summed, bitwise the one-process
    null). Every process gets the results; the main process alone goes on to write them.
    """
    with phases("statistics"):
        split = None
        if ctx is not None and ctx.world > 1:
            rms = ctx.broadcast(rms)
            split = ctx.flip_split()
            say(f"{ctx.world} processes: every sign-flip null's flips are split across them")
        return analysis_mod.analyse(plan.design, rms, device, progress=say, split=split)


def _load_model(plan: Plan, device, manifest: dict, phases: Phases, say: Progress, loaded,
                est: memory_mod.Estimate | None = None):
    spec = plan.spec
    placement = est.placement if est is not None else "resident"
    if loaded is None:
        with phases("load_model", device):
            say(f"loading {spec.model.source}" + (" (random weights)" if plan.arch.random_weights else "")
                + f", placement {placement}")
            loaded = model_mod.load(spec.model.source, spec.model.dtype, spec.model.device, placement)
        if plan.arch.text_encoder_out_layers != loaded.arch.text_encoder_out_layers:
            loaded.arch = plan.arch  # the spec's model.text_encoder_out_layers
    manifest["model"].update(loaded.info)
    model_mod.set_attention_backend(loaded, spec.runtime.attention_backend)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return loaded


def _phase_probe(plan: Plan, device, run_dir: Path, manifest: dict, phases: Phases, say: Progress, loaded,
                 ctx: distributed.Context | None = None):
    """Return the per-pass values and the loaded model: the probe batches not recorded yet, shared by the processes.

    The main process reads every finished batch (``shards.recorded``) and shares out the missing
    ones; each process records its batches in its own shard file; the main process gets every row
    (``shards.gather``) and writes rms.safetensors; a worker gets None.
    """
    ctx = ctx or distributed.Context()
    est = memory_mod.plan_memory(plan, device)  # a run that cannot fit stops here, before any weight is loaded
    manifest["memory"] = est.record()
    work, rms = _probe_work(plan, device, run_dir, manifest, ctx, est, say)
    manifest["batch_size"] = manifest["memory"]["batch_size"] = work.batch_size  # a resumed run keeps its batch
    if work.todo:  # else every batch is recorded (a run stopped while gathering): no model needed
        inputs, loaded = _probe_inputs(plan, device, run_dir, manifest, phases, say, loaded, ctx, est)
        rms = _probe_batches(plan, device, run_dir, manifest, phases, say, loaded, inputs, work, rms, ctx, est)
    # waits for the slowest process: probe + gather is the parallel probe time
    with phases("gather") if ctx.world > 1 else contextlib.nullcontext():
        rms = shards.gather(ctx, plan, rms, work)
    stop_point("gathered")  # every batch recorded, rms.safetensors not yet written
    if ctx.is_main:
        shards.write_probes(run_dir, plan, rms, work.batch_size)
    if device.type == "cuda":
        manifest["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        manifest["memory"].update(peak_gib=manifest["peak_gpu_memory_gib"],
                                  peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 2))
    return rms, loaded


def _probe_work(plan: Plan, device, run_dir: Path, manifest: dict, ctx: distributed.Context,
                est: memory_mod.Estimate, say: Progress) -> tuple[shards.Work, np.ndarray | None]:
    """Return the batches to run (decided by the main process, on every process) and, on the main one, those recorded."""
    if not ctx.is_main:
        return ctx.broadcast(None), None
    batch_size = manifest.get("batch_size") or plan.batch_size or auto_batch_size(plan, device, est)
    rms, done = shards.recorded(run_dir, plan, batch_size, manifest.get("run_id"))
    n = shards.n_batches(plan, batch_size)
    todo = [b for b in range(n) if b not in done]
    work = shards.Work(batch_size, todo, attempt=len(manifest.get("resumed", [])), run_id=manifest.get("run_id"),
                       processes=ctx.world)
    if manifest.get("resumed"):
        manifest["resumed"][-1].update(batches_recorded=len(done), batches_todo=shards.ranges(todo))
        say(f"probe batches recorded: {len(done)} of {n}; to run: {shards.ranges(todo) or 'none'}")
    return ctx.broadcast(work), rms


def _probe_inputs(plan: Plan, device, run_dir: Path, manifest: dict, phases: Phases, say: Progress, loaded,
                  ctx: distributed.Context, est: memory_mod.Estimate) -> tuple[ProbeInputs, model_mod.LoadedModel]:
    """Return the probe inputs (prompts encoded, reference images made or read, their latents) and the model."""
    loaded = _load_model(plan, device, manifest, phases, say, loaded, est)
    # Every prompt first (probe, reference, the empty CFG prompt): the text encoder can then leave the GPU.
    offload.place(loaded, est, "encode")
    with phases("encode", device):
        texts = encode_prompts(loaded, plan, est.encode_chunk)
    if est.placement != "resident":
        with phases("offload", device):
            say(f"{est.placement}: the text encoder leaves the GPU")
            offload.place(loaded, est, "denoise")
    if ctx.is_main:
        with compiling.eager():  # the reference runs eager: see compiling.decide
            images = _phase_reference(loaded, plan, run_dir, phases, say, device, texts)
        ctx.broadcast(distributed.images_to_bytes(images) if ctx.world > 1 else None)
    else:  # the main process made them: the same pixels, losslessly
        images = distributed.images_from_bytes(ctx.broadcast(None))
    with phases("encode_images", device):
        inputs = prepare_probe_inputs(loaded, plan, images, texts=texts)
    return inputs, loaded


def _probe_batches(plan: Plan, device, run_dir: Path, manifest: dict, phases: Phases, say: Progress, loaded,
                   inputs: ProbeInputs, work: shards.Work, rms: np.ndarray | None, ctx: distributed.Context,
                   est: memory_mod.Estimate) -> np.ndarray:
    """Return ``rms`` with this process's share of ``work`` run, each batch recorded in its shard file as it ends."""
    spec, batch_size = plan.spec, work.batch_size
    mine, ran = work.mine(ctx.rank), []
    path = shards.shard_path(run_dir, work.attempt, ctx.rank)
    buffer = torch.zeros((batch_size, 1, plan.n_units), dtype=torch.float32, device=device)

    def checkpoint(batch: int, rms: np.ndarray) -> None:
        ran.append(batch)
        shards.write_shard(path, plan, rms, ran, batch_size, work.run_id, work.attempt, ctx.rank, ctx.world)

    decision = compiling.decide_for_plan(plan, spec.runtime.compile, device, batch_size, spec.runtime.compile_backend)
    if decision.compile and not est.compiled:  # group offloading's per-block hooks run eager
        decision = compiling.CompileDecision(spec.runtime.compile, False, f"eager under {est.placement}",
                                             spec.runtime.compile_backend)
    compiled = decision.compile
    compiling.compile_for(decision, loaded.pipe.transformer)
    say(f"compile: {decision.reason}")
    manifest["runtime"] = {"compile": compiled, "compile_backend": spec.runtime.compile_backend if compiled else None,
                           "compile_decision": decision.record(),
                           "attention_backend": spec.runtime.attention_backend,
                           "capture_kernel": spec.runtime.capture_kernel, "bytecode_cache": startup.bytecode_cache()}
    n_batches = shards.n_batches(plan, batch_size)
    say(f"{len(plan.passes)} probe passes in batches of {batch_size}, {plan.n_units} units"
        + (f", {n_batches - len(work.todo)} batches recorded before" if len(work.todo) < n_batches else "")
        + (", compiled blocks (the first batch compiles)" if compiled else ""))
    if ctx.world > 1:
        say(f"{ctx.world} processes: this one runs {len(mine)} of {len(work.todo)} batches")
    side = spec.runtime.capture_stream == "side" or (spec.runtime.capture_stream == "auto" and not compiled)
    manifest["runtime"]["capture_stream"] = "side" if side and device.type == "cuda" else "inline"
    manifest["runtime"]["capture_kernel_resolved"] = capture_mod.resolved_kernel(spec.runtime.capture_kernel, device)
    with capture_mod.attach(loaded.pipe.transformer, plan, buffer, spec.runtime.capture_kernel,
                            side_stream=side) as cap:
        if spec.capture.tokens == "prompt":
            cap.token_mask = torch.zeros((batch_size, plan.text_tokens), dtype=torch.float32, device=device)
        clock = compiling.BatchClock()  # the first batch compiles: its extra time is the compile's
        with phases("probe", device), compiling.probe_stance(decision):
            rms = run_probes(loaded, plan, inputs, cap, batch_size, on_batch=clock.wrap(checkpoint), progress=say,
                             out=rms, batches=mine)
        clock.finish(decision)
        manifest["runtime"]["compile_decision"] = decision.record()
        compiling.release(background=True)  # no compile after this: stop inductor's workers meanwhile
    return rms


@memory_mod.oom_as_budget_error
def _execute(plan: Plan, device: torch.device, run_dir: Path, manifest: dict, phases: Phases, say: Progress,
             loaded: model_mod.LoadedModel | None, workers=None, ctx: distributed.Context | None = None):
    """Run the phases a run directory does not have yet: probes (model), statistics and arrays, report.

    Return the model (None when none was needed), for the next spec of the invocation.
    """
    if not phases.done("write"):
        rms = shards.read_complete(run_dir, plan)  # the probes finished before a resume
        if rms is None:
            rms, loaded = _phase_probe(plan, device, run_dir, manifest, phases, say, loaded, ctx)
        results = _phase_statistics(plan, rms, phases, say, device, ctx)
        outputs.write_results(plan, rms, results, run_dir, phases, manifest)
    with phases("report"):
        report_mod.write_report(run_dir, workers)
    stop_point("complete")
    manifest.update(status="complete", finished=store.now())
    store.write_json(run_dir / "manifest.json", manifest)
    say(f"report: {run_dir / 'report.md'}")
    return loaded
