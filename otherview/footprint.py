"""What a plan holds on the GPU, in bytes: weights from the configs' parameter counts, activations from its token counts.

The inputs of ``memory``'s estimate. Parameter counts are exact for the transformer
(``Flux2Transformer2DModel``) and the text encoder (Qwen3), checked against the built modules in
tests; the VAE's is scaled from the default one. Activation sizes are calibrated on two H100
measurements (see ``memory``'s docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
ACTIVATION_WIDTHS = {"compiled": 17.0, "eager": 24.0}  # bf16 hidden states live per token and sample
VAE_BYTES_PER_PIXEL_CHANNEL = 10.0  # x block_out_channels[0] x dtype bytes: the decoder's full-size stages
NULL_CHUNK = 8192  # sign patterns per step of the null's GEMM form (ops.signflip.signflip_null_ref)


@dataclass(frozen=True)
class Weights:
    """Parameter counts of a pipeline's components, from its configs (no weights allocated)."""

    transformer: int
    text_encoder: int
    vae: int
    transformer_block: int  # the largest transformer block (what block offload holds at once, twice)
    text_encoder_layer: int
    text_encoder_rest: int  # embeddings and final norm: onloaded as one group under block offload
    transformer_rest: int  # embedders, modulation, output layers: one group under block offload


def transformer_parameters(cfg: dict) -> tuple[int, int, int]:
    """Return (all, largest block, outside the blocks) parameters of a ``Flux2Transformer2DModel`` config.

    Bias-free linears throughout; RMSNorm q/k weights are ``head_dim`` each (diffusers 0.42).
    """
    hd, heads = cfg.get("attention_head_dim", 128), cfg.get("num_attention_heads", 48)
    d = hd * heads
    m = int(d * cfg.get("mlp_ratio", 3.0))
    t = cfg.get("timestep_guidance_channels", 256)
    out = cfg.get("out_channels") or cfg.get("in_channels", 128)
    p = cfg.get("patch_size", 1)
    embed = (t * d + d * d) * (2 if cfg.get("guidance_embeds", True) else 1)
    rest = (embed + 15 * d * d + cfg.get("in_channels", 128) * d + cfg.get("joint_attention_dim", 15360) * d
            + 2 * d * d + d * p * p * out)
    double = 8 * d * d + 6 * d * m + 4 * hd
    single = 4 * d * d + 3 * d * m + 2 * hd
    n_double, n_single = cfg.get("num_layers", 8), cfg.get("num_single_layers", 48)
    largest = max(double if n_double else 0, single if n_single else 0)
    return rest + n_double * double + n_single * single, largest, rest


def text_encoder_parameters(cfg: dict) -> tuple[int, int, int]:
    """Return (all, one layer, outside the layers) parameters of a Qwen3 causal-LM config."""
    h, v, i = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h + 2 * hd
    rest = v * h * (1 if cfg.get("tie_word_embeddings", True) else 2) + h
    return rest + cfg["num_hidden_layers"] * layer, layer, rest


DEFAULT_VAE_PARAMETERS = 84_046_115  # AutoencoderKLFlux2() in diffusers 0.42: channels (128, 256, 512, 512), 2 layers
DEFAULT_VAE_CHANNELS = (128, 256, 512, 512)


def _vae_config(arch) -> dict:
    """Return the VAE config beside ``arch``'s other configs ({} where there is none: the defaults)."""
    import json
    from pathlib import Path

    from . import model as model_mod

    candidates = [Path(arch.source).expanduser() / "vae" / "config.json"]
    if getattr(arch, "name", None):
        candidates.insert(0, Path(str(model_mod._builtin_dir(arch.name))) / "vae.json")
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def _vae_channels(arch) -> tuple[int, ...]:
    return tuple(_vae_config(arch).get("block_out_channels") or DEFAULT_VAE_CHANNELS)


def weights_of(arch) -> Weights:
    """Return the parameter counts of ``arch``'s transformer, text encoder and VAE.

    Transformer and text encoder exactly (tests check them against the built modules); the VAE
    scaled from the default one by its channels squared and layers per block (it is small).
    """
    tr, block, tr_rest = transformer_parameters(arch.transformer)
    te, layer, te_rest = text_encoder_parameters(arch.text_encoder) if arch.text_encoder else (0, 0, 0)
    cfg = _vae_config(arch)
    channels = tuple(cfg.get("block_out_channels") or DEFAULT_VAE_CHANNELS)
    scale = sum(c * c for c in channels) / sum(c * c for c in DEFAULT_VAE_CHANNELS)
    vae = int(DEFAULT_VAE_PARAMETERS * scale * (cfg.get("layers_per_block", 2) + 1) / 3)
    return Weights(tr, te, vae, block, layer, te_rest, tr_rest)


@dataclass(frozen=True)
class Sizes:
    """Bytes of each thing a run holds on the GPU, for one plan."""

    weights: Weights
    dtype_bytes: int
    probe_sample: int  # activations of one probe sample (text + target + reference tokens)
    reference_sample: int  # one reference-generation evaluation (text + target tokens)
    encode_prompt: int  # text-encoder activations per prompt in a chunk
    embeddings: int  # every encoded prompt, kept for the whole run
    vae: int  # the VAE decoding (or encoding) one image at the plan's size
    null: int  # the sign-flip null's working set (its plain-PyTorch GEMM form; the compiled op needs less)

    def w(self, n: int) -> int:
        return n * self.dtype_bytes


def sizes(plan, dtype_bytes: int = 2, compiled: bool = True) -> Sizes:
    """Return what ``plan`` holds on the GPU, in bytes, at ``dtype_bytes`` per value.

    Parameters
    ----------
    plan : Plan
        The compiled spec: token counts (text ``L``, target, reference), prompts, units, image size.
    dtype_bytes : int
        Bytes per value of the weights and activations (2 for bf16).
    compiled : bool
        Whether the transformer runs under torch.compile (17 hidden-state widths a token and sample,
        against 24 eager: ``ACTIVATION_WIDTHS``).

    Returns
    -------
    Sizes
        ``probe_sample = widths x (L + target + reference) x inner_dim x s + L x joint_dim x s``;
        ``reference_sample = widths x (L + target) x inner_dim x s``; ``encode_prompt = L x s x ((last
        stacked layer + 2) x hidden + 3 x intermediate + 6 x hidden)``; ``embeddings = (prompts +
        scenes + 1) x L x joint_dim x s``; ``vae = 10 x H x W x block_out_channels[0] x s``; ``null =
        8192 x units x 16``.
    """
    arch, s = plan.arch, dtype_bytes
    d = arch.inner_dim
    alpha = ACTIVATION_WIDTHS["compiled" if compiled else "eager"]
    joint = arch.transformer.get("joint_attention_dim", 0)
    tokens = plan.text_tokens + plan.target_tokens + plan.reference_tokens
    probe = int(alpha * tokens * d * s) + plan.text_tokens * joint * s  # + the gathered prompt embeddings
    reference = int(alpha * (plan.text_tokens + plan.target_tokens) * d * s)
    te = arch.text_encoder or {}
    h, inter = te.get("hidden_size", 0), te.get("intermediate_size", 0)
    used = max(arch.text_encoder_out_layers) + 1
    # hidden_states of every layer run (output_hidden_states), the MLP's three intermediates, the
    # stacked output and its dtype copy; the logits are skipped (see ``without_logits``)
    encode = plan.text_tokens * s * ((used + 1) * h + 3 * inter + 2 * len(arch.text_encoder_out_layers) * h)
    n_embeds = len(plan.prompts) + len(plan.design.scenes) + 1  # probe prompts, reference prompts, ""
    vae = int(VAE_BYTES_PER_PIXEL_CHANNEL * plan.height * plan.width * _vae_channels(arch)[0] * s)
    # signflip_null_ref: a chunk of 8192 flipped float64 sums per unit and their comparison, at once
    null = NULL_CHUNK * plan.n_units * 8 * 2
    return Sizes(weights_of(arch), s, probe, reference, encode, n_embeds * plan.text_tokens * joint * s, vae, null)
