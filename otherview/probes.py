"""The probe passes' machinery: prompt encoding, the reference image, the probes' inputs and batches.

Shared by the interpreter (``exec``) and the causal follow-up (``causal_passes``): every distinct
prompt encoded once (``encode_prompts``); the reference generated from those embeddings
(``generate_reference``); the reference latents and each pass's noise prepared once
(``prepare_probe_inputs``); batches of passes run through the probe's steps with capture hooks
accumulating into a preallocated buffer (``run_probes``), each row with its own prompt, seed's noise and
scene's reference (``batch_inputs``, ``probe_timesteps``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import capture as capture_mod
from . import errors, offload
from . import memory as memory_mod
from . import model as model_mod
from .phases import stop_point
from .plan import Plan, PlanError
from .spec import Spec

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class ProbeInputs:
    """Everything a probe batch needs that does not depend on the batch."""

    prompt_embeds: torch.Tensor  # [n_prompts, text_tokens, joint_dim]
    text_ids: torch.Tensor  # [1, text_tokens, 4]
    latents: torch.Tensor  # [n_seeds, target_tokens, channels] the initial noise of each probe seed
    latent_ids: torch.Tensor  # [1, target_tokens, 4]
    image_latents: torch.Tensor  # [n_scenes, reference_tokens, channels]
    image_latent_ids: torch.Tensor  # [1, reference_tokens, 4]
    prompt_index: dict[str, int]
    text_masks: torch.Tensor | None = None  # [n_prompts, text_tokens] 1 at real tokens ("prompt" capture)
    negative: torch.Tensor | None = None  # [1, text_tokens, joint_dim] the empty prompt (real CFG)


@dataclass
class TextEmbeddings:
    """Every prompt a run needs, encoded before the text encoder leaves the GPU."""

    prompt_embeds: torch.Tensor  # [n_prompts, text_tokens, joint_dim] the probe prompts, in plan.prompts order
    text_ids: torch.Tensor  # [1, text_tokens, 4]
    single: dict[str, torch.Tensor]  # reference prompts and "" (CFG), each [1, text_tokens, joint_dim]


def _generator(seed: int) -> torch.Generator:
    # Seeded on the CPU so the same seed gives the same noise on every device.
    return torch.Generator(device="cpu").manual_seed(seed)


MAX_IMAGE_PIXELS = 64_000_000


def resolve_image(image: str, spec_path: str, where: str = "reference.image") -> Path:
    """Return a reference image file of a spec, checked to be a readable image of sane size.

    A relative path is relative to the spec's folder.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(image).expanduser()
    if not path.is_absolute():
        path = Path(spec_path).resolve().parent / path
    if not path.is_file():
        raise PlanError([(where, f"no such file '{path}'")])
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise PlanError([(where, f"'{path}' is {im.width}x{im.height}, more than {MAX_IMAGE_PIXELS:,} pixels")])
            im.verify()
    except PlanError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise PlanError([(where, f"'{path}' is not a readable image ({exc})")]) from None
    return path


def resolve_images(spec: Spec, spec_path: str) -> Spec:
    """Return ``spec`` with every reference image path resolved (relative to the spec) and checked."""
    ref = spec.reference
    if ref.image is not None:
        ref = ref.model_copy(update={"image": str(resolve_image(ref.image, spec_path))})
    if ref.scenes is not None:
        scenes = [sc.model_copy(update={"image": str(resolve_image(sc.image, spec_path, f"reference.scenes[{k}].image"))})
                  if sc.image is not None else sc for k, sc in enumerate(ref.scenes)]
        ref = ref.model_copy(update={"scenes": scenes})
    return spec.model_copy(update={"reference": ref})


class NonFiniteError(errors.NonFiniteError):
    """NaN or inf where values must be finite (reference image, activations): exit 3."""


def _prompt_kwargs(texts: TextEmbeddings | None, prompt: str, pipe=None) -> dict:
    """Return the pipeline's prompt arguments: the embeddings encoded up front where there are, else the text.

    The empty prompt goes along for real CFG where the pipeline takes it (``Flux2KleinKVPipeline`` does not).
    """
    import inspect

    if texts is None:
        return {"prompt": prompt}
    kwargs = {"prompt_embeds": texts.single[prompt]}
    if pipe is None or "negative_prompt_embeds" in inspect.signature(pipe.__call__).parameters:
        kwargs["negative_prompt_embeds"] = texts.single[""]
    return kwargs


def generate_reference(loaded: model_mod.LoadedModel, plan: Plan, scene=None, texts: TextEmbeddings | None = None):
    """Return a scene's reference image (PIL), generated from its prompt or loaded from its file.

    With ``texts`` (from ``encode_prompts``) the pipeline gets the prompt's embeddings, so the text
    encoder need not be on the GPU. A generated image is checked before it is quantised to 8 bits:
    NaN or inf (which PIL would save as black) raises ``NonFiniteError``.
    """
    from PIL import Image

    spec = plan.spec
    scene = scene or plan.design.scenes[0]
    if scene.image is not None:
        return Image.open(scene.image).convert("RGB")
    pixels = loaded.pipe(**_prompt_kwargs(texts, scene.prompt, loaded.pipe), height=plan.height, width=plan.width,
                         num_inference_steps=spec.reference.steps, guidance_scale=spec.reference.guidance_scale,
                         generator=_generator(scene.seed), max_sequence_length=plan.text_tokens,
                         text_encoder_out_layers=plan.arch.text_encoder_out_layers, output_type="np").images[0]
    if not np.isfinite(pixels).all():
        raise NonFiniteError(f"the reference image of scene '{scene.name}' came out NaN or inf "
                             f"({int((~np.isfinite(pixels)).sum()):,} values): check reference.guidance_scale "
                             "and the model's weights")
    return Image.fromarray((pixels * 255).round().astype("uint8"))


@torch.no_grad()
def encode_prompts(loaded: model_mod.LoadedModel, plan: Plan, chunk: int | None = None) -> TextEmbeddings:
    """Return every prompt the run needs, encoded: the probe prompts in chunks, the reference prompts and "" alone.

    Prompts are padded to max_sequence_length, so a chunk of 32 is 16k tokens through the text
    encoder; ``chunk`` comes from the memory estimate. The reference prompts and the empty (CFG)
    prompt are encoded one at a time, as the pipeline encodes them, so their embeddings are bitwise
    what ``pipe(prompt=...)`` would use.
    """
    pipe, dev, layers = loaded.pipe, loaded.device, plan.arch.text_encoder_out_layers
    chunk = chunk or memory_mod.MAX_CHUNK
    prompts = plan.prompts
    embeds, single = [], {}
    encode = lambda texts: pipe.encode_prompt(prompt=texts, device=dev, max_sequence_length=plan.text_tokens,  # noqa: E731
                                              text_encoder_out_layers=layers)
    with model_mod.only_needed_layers(pipe.text_encoder, max(layers)), offload.without_logits(pipe.text_encoder):
        for i in range(0, len(prompts), chunk):
            e, text_ids = encode(prompts[i:i + chunk])
            embeds.append(e)
        for prompt in [sc.prompt for sc in plan.design.scenes if sc.prompt is not None] + [""]:
            single[prompt] = encode([prompt])[0]
    return TextEmbeddings(prompt_embeds=torch.cat(embeds).to(loaded.dtype), text_ids=text_ids[:1], single=single)


@torch.no_grad()
def prepare_probe_inputs(loaded: model_mod.LoadedModel, plan: Plan, images: list, chunk: int | None = None,
                         texts: TextEmbeddings | None = None) -> ProbeInputs:
    """Return prompt embeddings (each distinct prompt once), each seed's noise and each scene's reference latents.

    ``texts`` are the embeddings from ``encode_prompts`` (encoded here, in chunks of ``chunk``, when not given).
    """
    pipe, dev = loaded.pipe, loaded.device
    texts = texts or encode_prompts(loaded, plan, chunk)
    prompts = plan.prompts
    prompt_embeds, text_ids = texts.prompt_embeds, texts.text_ids
    channels = pipe.transformer.config.in_channels // 4
    noise = []
    for seed in plan.design.seeds:
        latents, latent_ids = pipe.prepare_latents(batch_size=1, num_latents_channels=channels, height=plan.height,
                                                   width=plan.width, dtype=loaded.dtype, device=dev,
                                                   generator=_generator(seed))
        noise.append(latents)
    refs = []
    for image in images:
        pixels = pipe.image_processor.preprocess(image, height=plan.height, width=plan.width, resize_mode="crop")
        # The VAE encoder's sampling uses the first probe seed's generator, as before scenes existed.
        ref, image_latent_ids = pipe.prepare_image_latents(images=[pixels], batch_size=1,
                                                           generator=_generator(plan.design.seeds[0]),
                                                           device=dev, dtype=pipe.vae.dtype)
        refs.append(ref)
    latents, image_latents = torch.cat(noise), torch.cat(refs)
    if image_latents.shape[1] != plan.reference_tokens or latents.shape[1] != plan.target_tokens:
        raise RuntimeError(f"token counts differ from the plan: target {latents.shape[1]} vs {plan.target_tokens}, "
                           f"reference {image_latents.shape[1]} vs {plan.reference_tokens}")
    masks = prompt_masks(pipe.tokenizer, prompts, plan.text_tokens).to(dev) if plan.spec.capture.tokens == "prompt" \
        else None
    return ProbeInputs(prompt_embeds=prompt_embeds, text_ids=text_ids[:1], latents=latents, latent_ids=latent_ids,
                       image_latents=image_latents.to(loaded.dtype), image_latent_ids=image_latent_ids,
                       prompt_index={p: i for i, p in enumerate(prompts)}, text_masks=masks,
                       negative=texts.single[""].to(loaded.dtype))


def prompt_masks(tokenizer, prompts: list[str], text_tokens: int) -> torch.Tensor:
    """Return [n_prompts, text_tokens] float: 1 where a prompt has a real token, 0 at padding.

    Tokenised exactly as the Klein pipeline does (chat template, padding to ``text_tokens``), so
    the mask follows the tokenizer's padding side.
    """
    rows = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True, enable_thinking=False)
        enc = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=text_tokens)
        rows.append(enc["attention_mask"][0].float())
    return torch.stack(rows)


def auto_batch_size(plan: Plan, device: torch.device, est: memory_mod.Estimate | None = None) -> int:
    """Return a probe batch size: the largest the memory budget affords (``memory.estimate``).

    ``est`` is ``memory.plan_memory``'s estimate (made here when not given).
    """
    return (est or memory_mod.plan_memory(plan, device)).batch_size


def _check_batch_finite(rms: np.ndarray, plan: Plan, batch, step: int | None) -> None:
    bad = ~np.isfinite(rms)
    if not bad.any():
        return
    row, unit = (int(x[0]) for x in np.nonzero(bad))
    p, u = batch[row], plan.units[unit]
    where = "" if step is None else f", step {step}"
    raise NonFiniteError(f"non-finite activations ({int(bad.sum())} values) at site {u.site} (unit {u.index}), pass "
                         f"{p.index}{where}: condition '{p.condition}', item '{plan.design.items[p.item].value}', "
                         f"scene '{plan.design.scenes[p.scene].name}', seed {p.seed}, wording {p.wording}; the model "
                         "produced NaN or inf (check its weights, dtype and guidance)")


def batch_inputs(inputs: ProbeInputs, rows: list, dev: torch.device) -> tuple:
    """Return one probe batch's tensors, each row its own prompt, seed's noise and scene's reference.

    Returns ``(prompt index, embeddings, text ids, latents, image ids, reference latents)``, the
    first dimension ``len(rows)``; shared by the probe passes and the causal follow-up.
    """
    b = len(rows)
    idx = torch.tensor([inputs.prompt_index[p.prompt] for p in rows], device=dev)
    embeds = inputs.prompt_embeds.index_select(0, idx)
    text_ids = inputs.text_ids.expand(b, -1, -1)
    latents = inputs.latents.index_select(0, torch.tensor([p.seed_level for p in rows], device=dev))
    img_ids = torch.cat([inputs.latent_ids, inputs.image_latent_ids], dim=1).expand(b, -1, -1)
    ref = inputs.image_latents.index_select(0, torch.tensor([p.scene for p in rows], device=dev))
    return idx, embeds, text_ids, latents, img_ids, ref


def probe_timesteps(pipe, plan: Plan, dev: torch.device):
    """Return the probe's timesteps (sigmas 1 .. 1/steps, the pipeline's shift), the scheduler reset to step 0."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    steps = plan.spec.probe.steps
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = compute_empirical_mu(image_seq_len=plan.target_tokens, num_steps=steps)
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, dev, sigmas=sigmas, mu=mu)
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(0)
    return timesteps


@torch.no_grad()
def run_probes(loaded: model_mod.LoadedModel, plan: Plan, inputs: ProbeInputs, cap: capture_mod.Capture,
               batch_size: int, on_batch: Callable[[int, np.ndarray], None] | None = None,
               progress: Progress | None = None, max_batches: int | None = None, start_batch: int = 0,
               out: np.ndarray | None = None, batches: list[int] | None = None) -> np.ndarray:
    """Return the per-pass, per-unit RMS, shape (n_passes x n_step_levels, n_units), running passes in batches.

    Row ``pass * n_step_levels + k``: the mean over steps (k = 0) or step k (``probe.capture_steps =
    "each"``). Each row of a batch gets its own prompt embedding, noise (its seed's) and reference
    latents (its scene's). A short last batch is padded by repeating its last pass (results dropped)
    so every batch has one shape and a compiled graph is reused rather than recompiled.
    ``max_batches`` stops early (the compile warm-up runs one batch); ``start_batch`` and ``out``
    resume from a checkpoint; ``batches`` runs only those batch indices (this process's share of the
    batches not recorded yet), each exactly as a single process would. ``on_batch(k, out)`` is
    called as batch ``k`` (0-based) is in ``out``.
    """
    pipe, dev, spec, design = loaded.pipe, loaded.device, plan.spec, plan.design
    transformer = pipe.transformer
    dtype = transformer.dtype
    guidance = spec.probe.guidance_scale
    each = design.steps != [None]
    k_levels = len(design.steps)
    cfg = guidance > 1 and not pipe.config.is_distilled
    if out is None:
        out = np.zeros((design.n_rows, plan.n_units), dtype=np.float32)
    negative = inputs.negative
    if cfg and negative is None:  # the empty prompt is encoded with the others unless inputs predate that
        negative, _ = pipe.encode_prompt(prompt=[""], device=dev, max_sequence_length=plan.text_tokens,
                                         text_encoder_out_layers=plan.arch.text_encoder_out_layers)
        negative = negative.to(loaded.dtype)
    n_batches = math.ceil(len(plan.passes) / batch_size)
    stop = n_batches if max_batches is None else min(start_batch + max_batches, n_batches)
    todo = [k for k in batches if start_batch <= k < stop] if batches is not None else range(start_batch, stop)
    for k in todo:
        batch = plan.passes[k * batch_size:(k + 1) * batch_size]
        real = len(batch)
        b = batch_size if n_batches > 1 else real
        rows = batch + [batch[-1]] * (b - real)
        idx, embeds, text_ids, latents, img_ids, ref = batch_inputs(inputs, rows, dev)
        timesteps = probe_timesteps(pipe, plan, dev)
        cap.reset(b)
        if inputs.text_masks is not None:
            cap.token_mask[:b].copy_(inputs.text_masks.index_select(0, idx))
        per_step = []
        for step, t in enumerate(timesteps):
            timestep = t.expand(b).to(latents.dtype) / 1000
            model_input = torch.cat([latents, ref], dim=1).to(dtype)
            cap.active = True
            cap.evaluations += 1
            noise = transformer(hidden_states=model_input, timestep=timestep, guidance=None, encoder_hidden_states=embeds,
                                txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0][:, : latents.shape[1]]
            if each:  # this step's values, then a fresh accumulator for the next
                per_step.append(cap.rms().numpy()[:real])
                cap.reset(b)
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
        values = np.stack(per_step, axis=1) if each else cap.rms().numpy()[:real][:, None]  # [real, K, U]
        for level in range(k_levels):
            _check_batch_finite(values[:, level], plan, batch, design.steps[level])
        start = batch[0].index
        out[start * k_levels:(start + real) * k_levels] = values.reshape(real * k_levels, -1)
        if on_batch is not None:
            on_batch(k, out)
        if progress is not None:
            progress(f"probe batch {k + 1}/{n_batches}: passes {start + 1}-{start + real} of {len(plan.passes)}")
        if on_batch is not None:
            stop_point(f"probe:{k + 1}")
    return out
