"""The interpreter: runs a plan on a model and writes the run directory.

Order of work: the reference image once; every distinct prompt encoded once; the reference latents
encoded once; probe passes in batches (each pass conditioned on the reference, every pass starting
from the same seeded noise, no VAE decode of probe outputs) with capture hooks accumulating into a
preallocated buffer; statistics; report. The manifest is written first (status "running") and
rewritten as phases complete, and per-pass RMS are checkpointed after every batch, so a crash
leaves a run directory that says how far it got.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import capture as capture_mod
from . import compiling
from . import figures
from . import inference
from . import model as model_mod
from . import report as report_mod
from . import stats, store
from .plan import Plan, PlanError, build_plan
from .spec import Spec, spec_hash, with_overrides

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class Phases:
    """Wall-clock seconds of each phase, in the order they ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str, device: torch.device | None = None):
        start = time.perf_counter()
        yield
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[name] = round(time.perf_counter() - start, 4)


@dataclass
class ProbeInputs:
    """Everything a probe batch needs that does not depend on the batch."""

    prompt_embeds: torch.Tensor  # [n_prompts, text_tokens, joint_dim]
    text_ids: torch.Tensor  # [1, text_tokens, 4]
    latents: torch.Tensor  # [1, target_tokens, channels] the shared initial noise
    latent_ids: torch.Tensor  # [1, target_tokens, 4]
    image_latents: torch.Tensor  # [1, reference_tokens, channels]
    image_latent_ids: torch.Tensor  # [1, reference_tokens, 4]
    prompt_index: dict[str, int]


def _generator(seed: int) -> torch.Generator:
    # Seeded on the CPU so the same seed gives the same noise on every device.
    return torch.Generator(device="cpu").manual_seed(seed)


def resolve_image(image: str, spec_path: str) -> Path:
    """Return the reference image file of a spec: a relative path is relative to the spec's folder."""
    path = Path(image).expanduser()
    if not path.is_absolute():
        path = Path(spec_path).resolve().parent / path
    if not path.is_file():
        raise PlanError(f"reference.image: no such file '{path}'")
    return path


def generate_reference(loaded: model_mod.LoadedModel, plan: Plan):
    """Return the reference image (PIL) generated from the spec's prompt, or loaded from its file."""
    spec = plan.spec
    if spec.reference.image is not None:
        from PIL import Image

        return Image.open(spec.reference.image).convert("RGB")
    return loaded.pipe(prompt=spec.reference.prompt, height=plan.height, width=plan.width,
                       num_inference_steps=spec.reference.steps, guidance_scale=spec.reference.guidance_scale,
                       generator=_generator(spec.reference.seed), max_sequence_length=plan.text_tokens,
                       text_encoder_out_layers=plan.arch.text_encoder_out_layers).images[0]


@torch.no_grad()
def prepare_probe_inputs(loaded: model_mod.LoadedModel, plan: Plan, image, chunk: int | None = None) -> ProbeInputs:
    """Return prompt embeddings (each distinct prompt once), the shared noise and the reference latents."""
    pipe, dev = loaded.pipe, loaded.device
    # Prompts are padded to max_sequence_length, so a chunk of 32 is 16k tokens through the text
    # encoder: big enough to keep a GPU busy, small enough for its hidden states to fit.
    chunk = chunk or (32 if dev.type == "cuda" else 8)
    prompts = plan.prompts
    embeds = []
    with model_mod.only_needed_layers(pipe.text_encoder, max(plan.arch.text_encoder_out_layers)):
        for i in range(0, len(prompts), chunk):
            e, text_ids = pipe.encode_prompt(prompt=prompts[i:i + chunk], device=dev,
                                             max_sequence_length=plan.text_tokens,
                                             text_encoder_out_layers=plan.arch.text_encoder_out_layers)
            embeds.append(e)
    prompt_embeds = torch.cat(embeds).to(loaded.dtype)
    channels = pipe.transformer.config.in_channels // 4
    latents, latent_ids = pipe.prepare_latents(batch_size=1, num_latents_channels=channels, height=plan.height,
                                               width=plan.width, dtype=loaded.dtype, device=dev,
                                               generator=_generator(plan.spec.probe.seed))
    pixels = pipe.image_processor.preprocess(image, height=plan.height, width=plan.width, resize_mode="crop")
    image_latents, image_latent_ids = pipe.prepare_image_latents(images=[pixels], batch_size=1,
                                                                 generator=_generator(plan.spec.probe.seed),
                                                                 device=dev, dtype=pipe.vae.dtype)
    if image_latents.shape[1] != plan.reference_tokens or latents.shape[1] != plan.target_tokens:
        raise RuntimeError(f"token counts differ from the plan: target {latents.shape[1]} vs {plan.target_tokens}, "
                           f"reference {image_latents.shape[1]} vs {plan.reference_tokens}")
    return ProbeInputs(prompt_embeds=prompt_embeds, text_ids=text_ids[:1], latents=latents, latent_ids=latent_ids,
                       image_latents=image_latents.to(loaded.dtype), image_latent_ids=image_latent_ids,
                       prompt_index={p: i for i, p in enumerate(prompts)})


def auto_batch_size(plan: Plan, device: torch.device) -> int:
    """Return a probe batch size: all passes on the CPU's small models, sized to free memory on CUDA."""
    n = len(plan.passes)
    if device.type != "cuda":
        return min(n, 8)
    free, _ = torch.cuda.mem_get_info(device)
    tokens = plan.text_tokens + plan.target_tokens + plan.reference_tokens
    # A single-stream block holds a few [tokens, 4 x inner] bf16 tensors at once; 24 inner-widths a
    # sample is a safe bound (Klein 4B, batch 20 on an H100: 31.9 GiB peak with all weights resident).
    per_sample = tokens * plan.arch.inner_dim * 2 * 24
    fit = max(1, int(free * 0.6 // per_sample))
    fit = min(fit, n, 32)
    # Prefer a size that divides the passes evenly: equal batches keep compiled graphs reusable.
    for b in range(fit, 0, -1):
        if n % b == 0 and b >= fit // 2:
            return b
    return fit


@torch.no_grad()
def run_probes(loaded: model_mod.LoadedModel, plan: Plan, inputs: ProbeInputs, cap: capture_mod.Capture,
               batch_size: int, on_batch: Callable[[int, np.ndarray], None] | None = None,
               progress: Progress | None = None, max_batches: int | None = None) -> np.ndarray:
    """Return the per-pass, per-unit RMS, shape (n_passes, n_units), running the passes in batches.

    A short last batch is padded by repeating its last pass (results dropped) so every batch has
    one shape and a compiled graph is reused rather than recompiled. ``max_batches`` stops early
    (the compile warm-up runs one batch).
    """
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    pipe, dev, spec = loaded.pipe, loaded.device, plan.spec
    transformer = pipe.transformer
    dtype = transformer.dtype
    steps, guidance = spec.probe.steps, spec.probe.guidance_scale
    cfg = guidance > 1 and not pipe.config.is_distilled
    out = np.zeros((len(plan.passes), plan.n_units), dtype=np.float32)
    negative = None
    if cfg:
        negative, _ = pipe.encode_prompt(prompt=[""], device=dev, max_sequence_length=plan.text_tokens,
                                         text_encoder_out_layers=plan.arch.text_encoder_out_layers)
        negative = negative.to(loaded.dtype)
    n_batches = math.ceil(len(plan.passes) / batch_size)
    for k in range(n_batches if max_batches is None else min(max_batches, n_batches)):
        batch = plan.passes[k * batch_size:(k + 1) * batch_size]
        real = len(batch)
        b = batch_size if n_batches > 1 else real
        prompts = [p.prompt for p in batch] + [batch[-1].prompt] * (b - real)
        idx = torch.tensor([inputs.prompt_index[p] for p in prompts], device=dev)
        embeds = inputs.prompt_embeds.index_select(0, idx)
        text_ids = inputs.text_ids.expand(b, -1, -1)
        latents = inputs.latents.expand(b, -1, -1).clone()
        img_ids = torch.cat([inputs.latent_ids, inputs.image_latent_ids], dim=1).expand(b, -1, -1)
        ref = inputs.image_latents.expand(b, -1, -1)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = compute_empirical_mu(image_seq_len=plan.target_tokens, num_steps=steps)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, dev, sigmas=sigmas, mu=mu)
        if hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(0)
        cap.reset(b)
        for step, t in enumerate(timesteps):
            timestep = t.expand(b).to(latents.dtype) / 1000
            model_input = torch.cat([latents, ref], dim=1).to(dtype)
            cap.active = True
            cap.evaluations += 1
            noise = transformer(hidden_states=model_input, timestep=timestep, guidance=None, encoder_hidden_states=embeds,
                                txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0][:, : latents.shape[1]]
            if cfg:
                # Only the conditional evaluation is captured: the unconditional one is the same
                # empty prompt for both members of every pair.
                cap.active = False
                neg = transformer(hidden_states=model_input, timestep=timestep, guidance=None,
                                  encoder_hidden_states=negative.expand(b, -1, -1), txt_ids=text_ids, img_ids=img_ids,
                                  return_dict=False)[0][:, : latents.shape[1]]
                noise = neg + guidance * (noise - neg)
            if step < len(timesteps) - 1:  # the last step's latents are never used: no decode, no step
                latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
        rms = cap.rms().numpy()[:real]
        start = batch[0].index
        out[start:start + real] = rms
        if on_batch is not None:
            on_batch(start + real, out)
        if progress is not None:
            progress(f"probe batch {k + 1}/{n_batches}: passes {start + 1}-{start + real} of {len(plan.passes)}")
    return out


def use_compile(setting: str, device: torch.device) -> bool:
    """Return whether compiling is allowed at all ("auto": on CUDA only; ``compiling.decide`` says whether it pays)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _unit_rows(plan: Plan, d: np.ndarray, t: np.ndarray, inf: inference.UnitInference) -> list[dict]:
    """Return units.csv's rows: where each unit sits, its effect (mean d, t, d_z and interval) and p-values."""
    mean_d = d.mean(axis=0)
    rows = []
    for u in plan.units:
        i = u.index
        rows.append({"unit": i, "site": u.site, "stream": u.stream, "block": u.block, "channel_start": u.channel_start,
                     "channel_end": u.channel_end, "kind": u.kind, "head": u.head, "subgroup": u.subgroup,
                     "mean_d": float(mean_d[i]), "t": float(t[i]), "d_z": float(inf.d_z[i]),
                     "d_z_low": float(inf.d_z_low[i]), "d_z_high": float(inf.d_z_high[i]),
                     "p_uncorrected": float(inf.p_uncorrected[i]), "p_fwer": float(inf.p_fwer[i]), "q": float(inf.q[i]),
                     "axis_rho": float(inf.axis.rho[i]), "axis_p": float(inf.axis.p_uncorrected[i]),
                     "axis_p_fwer": float(inf.axis.p_fwer[i]), "axis_q": float(inf.axis_q[i])})
    return rows


def execute(spec: Spec, raw_text: str, spec_path: str, model_override: str | None = None,
            out_dir: str | None = None, progress: Progress | None = None,
            loaded: model_mod.LoadedModel | None = None, workers=None) -> Path:
    """Run ``spec`` end to end and return its run directory.

    ``loaded`` reuses a model already built or loaded from the spec's source (benchmarks and tests
    run several specs on one model); otherwise the model is loaded here. ``workers`` reuses a figure
    pool from ``figures.start_workers`` (start it before loading a model: forking is then cheap).
    """
    say = progress or (lambda msg: log.info(msg))
    if model_override:
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"source": model_override})})
    if spec.reference.image is not None:
        spec = with_overrides(spec, {"reference.image": str(resolve_image(spec.reference.image, spec_path))})
    model_mod.check_attention_backend(spec.runtime.attention_backend)  # before minutes of loading
    arch = model_mod.architecture(spec.model.source)
    plan = build_plan(spec, arch)
    device = model_mod.resolve_device(spec.model.device)
    run_dir = store.new_run_dir(out_dir or spec.output.dir, spec.experiment.name)
    phases = Phases()
    manifest = {"status": "running", "started": store.now(), "spec_path": spec_path, "spec_text": raw_text,
                "spec": spec.model_dump(mode="json"), "spec_hash": spec_hash(spec), "random_weights": arch.random_weights,
                "model": {"source": spec.model.source}, "seeds": {"reference": spec.reference.seed, "probe": spec.probe.seed,
                                                                   "null": spec.null.seed},
                "resolution": [plan.height, plan.width], "resolution_note": plan.resolution_note,
                "versions": store.versions(), "git_sha": store.git_sha(), "device": store.device_info(device),
                "phases": phases.seconds}
    store.write_json(run_dir / "manifest.json", manifest)
    say(f"run directory {run_dir}")
    own_workers = workers is None
    if own_workers:
        workers = figures.start_workers()  # forked now, while this process is still small
    try:
        _execute(plan, device, run_dir, manifest, phases, say, loaded, workers)
    except BaseException as exc:
        manifest.update(status="failed", error=f"{type(exc).__name__}: {exc}", finished=store.now())
        store.write_json(run_dir / "manifest.json", manifest)
        raise
    finally:
        if own_workers and workers is not None:
            workers.shutdown(cancel_futures=True)
    return run_dir


def _execute(plan: Plan, device: torch.device, run_dir: Path, manifest: dict, phases: Phases, say: Progress,
             loaded: model_mod.LoadedModel | None, workers=None) -> None:
    spec = plan.spec
    if loaded is None:
        with phases("load_model", device):
            say(f"loading {spec.model.source}" + (" (random weights)" if plan.arch.random_weights else ""))
            loaded = model_mod.load(spec.model.source, spec.model.dtype, spec.model.device)
    manifest["model"].update(loaded.info)
    model_mod.set_attention_backend(loaded, spec.runtime.attention_backend)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with phases("reference", device), compiling.eager():  # eager: see compiling.decide
        say("reference image" + (f": {spec.reference.steps} steps, guidance {spec.reference.guidance_scale}"
                                 if spec.reference.prompt else f": {spec.reference.image}"))
        image = generate_reference(loaded, plan)
    image.save(run_dir / ".reference.png.tmp", format="PNG")
    (run_dir / ".reference.png.tmp").replace(run_dir / "reference.png")
    with phases("encode", device):
        inputs = prepare_probe_inputs(loaded, plan, image)
    batch_size = plan.batch_size or auto_batch_size(plan, device)
    manifest["batch_size"] = batch_size
    buffer = torch.zeros((batch_size, 1, plan.n_units), dtype=torch.float32, device=device)

    def checkpoint(done: int, rms: np.ndarray) -> None:
        store.write_tensors(run_dir / "rms.safetensors", {"rms": rms[:done]}, {"passes_done": str(done)})

    decision = compiling.decide_for_plan(plan, spec.runtime.compile, device, batch_size, spec.runtime.compile_backend)
    compiled = decision.compile
    compiling.compile_for(decision, loaded.pipe.transformer)
    say(f"compile: {decision.reason}")
    manifest["runtime"] = {"compile": compiled, "compile_backend": spec.runtime.compile_backend if compiled else None,
                           "compile_decision": decision.record(),
                           "attention_backend": spec.runtime.attention_backend,
                           "capture_kernel": spec.runtime.capture_kernel}
    say(f"{len(plan.passes)} probe passes in batches of {batch_size}, {plan.n_units} units"
        + (", compiled blocks (the first batch compiles)" if compiled else ""))
    side = spec.runtime.capture_stream == "side" or (spec.runtime.capture_stream == "auto" and not compiled)
    manifest["runtime"]["capture_stream"] = "side" if side and device.type == "cuda" else "inline"
    with capture_mod.attach(loaded.pipe.transformer, plan, buffer, spec.runtime.capture_kernel,
                            side_stream=side) as cap:
        clock = compiling.BatchClock()  # the first batch compiles: its extra time is the compile's
        with phases("probe", device), compiling.probe_stance(decision):
            rms = run_probes(loaded, plan, inputs, cap, batch_size, on_batch=clock.wrap(checkpoint), progress=say)
        clock.finish(decision)
        manifest["runtime"]["compile_decision"] = decision.record()
        compiling.release(background=True)  # no compile after this: stop inductor's workers meanwhile
    if device.type == "cuda":
        manifest["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    store.write_json(run_dir / "manifest.json", manifest)  # the GPU work is done and checkpointed
    del inputs, buffer
    with phases("statistics"):
        d = stats.paired_differences(rms, plan)
        t = stats.paired_t(d)
        say(f"sign-flip null ({spec.null.method})")
        null = stats.sign_flip_null(d, spec.null.thresholds, spec.null.method, spec.null.flips, spec.null.seed,
                                    spec.null.quantile, device)
        say(f"per-unit inference and the {spec.axis.name} axis null")
        inf = inference.infer(d, null, np.asarray(spec.ranks()), spec.null.seed, device=device)
    with phases("write"):
        store.write_tensors(run_dir / "rms.safetensors", {"rms": rms, "d": d, "t": t},
                            {"passes_done": str(len(plan.passes)), "random_weights": str(plan.arch.random_weights)})
        res = null.result
        store.write_tensors(run_dir / "null.safetensors", {"count_hist": res.count_hist, "exceed": res.exceed,
                                                           "fwer_exceed": res.fwer_exceed, "max_hist": res.max_hist},
                            {"mode": res.mode, "n_flips": str(res.n_flips)})
        store.write_tensors(run_dir / "inference.safetensors", inf.arrays(),
                            {"axis_permutations": str(inf.axis.n_permutations), "axis_exact": str(inf.axis.exact),
                             "axis_seed": str(inf.axis.seed)})
        store.write_csv(run_dir / "units.csv", _unit_rows(plan, d, t, inf))
        summary = report_mod.summarise(plan, d, t, null, inf)
        summary["random_weights"] = plan.arch.random_weights
        store.write_json(run_dir / "summary.json", summary)
    manifest.update(status="complete", finished=store.now(), null={"method": null.method, "exact": null.exact,
                                                                     "flips": null.result.n_flips})
    store.write_json(run_dir / "manifest.json", manifest)
    with phases("report"):
        report_mod.write_report(run_dir, workers)
    store.write_json(run_dir / "manifest.json", manifest)
    say(f"report: {run_dir / 'report.md'}")
