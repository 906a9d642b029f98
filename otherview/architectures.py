"""FLUX.2 architecture knowledge: what each supported model's projections are, and what they see.

One place for every FLUX.2 fact the plan, the model loader, the capture and the report rely on (after
diffusers' per-architecture registries). A supported model is an entry: a config folder in
``otherview/configs/NAME`` (the diffusers / transformers configs, the hub ids of its released
variants) read into an :class:`Architecture`; what differs between FLUX.2 Klein models (block counts,
head count, text encoder, the KV variant's reference attention) is read from those configs, never
written into code. Nothing here imports torch or diffusers at import time or allocates weights.

Facts, checked against diffusers 0.42.1 (``models/transformers/transformer_flux2.py``,
``pipelines/flux2/pipeline_flux2_klein.py``, ``pipeline_flux2_klein_kv.py``) and its FLUX.2
conversion script (``scripts/convert_flux2_to_diffusers.py``: klein-4b 5 + 20 blocks, 24 heads,
joint_attention_dim 7680; klein-9b 8 + 24 blocks, 32 heads, joint_attention_dim 12288):

- Double-stream blocks run joint attention over ``[text | image]`` and project the two halves apart:
  ``attn.to_out.0`` sees only the image stream, ``attn.to_add_out`` only the text stream; both take
  ``heads x head_dim`` channels.
- The image stream is ``[target latents | reference latents]`` (``Flux2KleinPipeline`` concatenates
  the reference after the noisy target). ``Flux2KleinKVPipeline`` puts the reference first and, on its
  first step (``kv_cache_mode="extract"``), lets reference tokens attend only to themselves, modulated
  at a fixed timestep (0): text never reaches them, so they cannot differ between two prompts.
- Single-stream blocks see ``[text | image]``; the input of ``attn.to_out`` is
  ``[attention (heads x head_dim) | MLP hidden (mlp_ratio x hidden)]``.
- Every Klein pipeline stacks the Qwen3 hidden states (9, 18, 27) (``hidden_states[k]`` is the input
  of layer k): Qwen3-4B (hidden 2560) -> 7680 channels on 4B, Qwen3-8B (hidden 4096) -> 12288 on 9B.
- VAE scale ``2 ** (len(block_out_channels) - 1)`` (8 for AutoencoderKLFlux2's default), and latents
  are packed in 2 x 2 patches: one token per 16 x 16 pixels.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

KLEIN_PIPELINE = "Flux2KleinPipeline"
KLEIN_KV_PIPELINE = "Flux2KleinKVPipeline"  # reference tokens attend only to themselves
PIPELINES = (KLEIN_PIPELINE, KLEIN_KV_PIPELINE)

# The hidden states every Klein pipeline stacks (the default of ``text_encoder_out_layers`` in
# Flux2KleinPipeline and Flux2KleinKVPipeline; the same for 4B and 9B, both 36-layer Qwen3 encoders).
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
PATCH = 2  # latents are packed in 2 x 2 patches before the transformer

TOKEN_PARTS = ("text", "target", "reference")
TOKEN_SELECTIONS = {"all": ("text", "target", "reference"), "text": ("text",), "image": ("target", "reference"),
                    "target": ("target",), "reference": ("reference",),
                    # the text part, of which only each prompt's real (unpadded) tokens are counted
                    "prompt": ("text",)}  # capture.tokens -> parts counted


class ArchitectureError(ValueError):
    """A request does not fit the architecture (e.g. a site role or pattern that names nothing)."""


class TokenCounts(NamedTuple):
    """Tokens of each part of one probe pass."""

    text: int
    target: int
    reference: int


@dataclass(frozen=True)
class Role:
    """What one kind of projection is: where it sits, which stream it reads, what its input holds."""

    name: str  # the name a spec may use in capture.sites
    module: str  # fully qualified module name, ``{}`` standing for the block index
    stream: str  # "double" or "single"
    kind: str  # "image", "text" or "joint": the stream its input holds
    has_mlp: bool  # the input is [attention | MLP hidden]
    label: str  # short label, ``{}`` standing for the block index

    @property
    def pattern(self) -> str:
        """Return the fnmatch pattern matching this role in every block."""
        return self.module.replace("{}", "*")


ROLES = (
    Role("attention-out image", "transformer_blocks.{}.attn.to_out.0", "double", "image", False, "D{}"),
    Role("attention-out text", "transformer_blocks.{}.attn.to_add_out", "double", "text", False, "D{}t"),
    Role("single out", "single_transformer_blocks.{}.attn.to_out", "single", "joint", True, "S{}"),
)
ROLE_BY_NAME = {r.name: r for r in ROLES}
ROLE_BY_KIND = {r.kind: r for r in ROLES}


def role_names() -> list[str]:
    """Return the role names ``capture.sites`` accepts beside module patterns."""
    return [r.name for r in ROLES]


@dataclass(frozen=True)
class CandidateSite:
    """One capturable projection of a model: its module name, role and input channels."""

    name: str
    block: int
    role: Role
    width: int  # input channels
    attention_width: int  # leading channels that are attention output (heads x head_dim); the rest is MLP
    head_dim: int

    @property
    def stream(self) -> str:
        return self.role.stream

    @property
    def kind(self) -> str:
        return self.role.kind

    @property
    def heads(self) -> int:
        return self.attention_width // self.head_dim

    @property
    def label(self) -> str:
        return self.role.label.format(self.block)


@dataclass(frozen=True)
class Architecture:
    """One FLUX.2 Klein model as read from its configs (no weights): every fact a plan needs.

    ``transformer`` and ``text_encoder`` are the diffusers / transformers config dicts;
    ``pipeline_class`` is the diffusers pipeline the model's ``model_index.json`` names (the KV variant
    is ``Flux2KleinKVPipeline``); ``distilled`` is None where the configs do not say.
    """

    source: str
    transformer: dict[str, Any]
    text_encoder_out_layers: tuple[int, ...] = TEXT_ENCODER_OUT_LAYERS
    random_weights: bool = False
    resolution: int | None = None  # a built-in small model runs at this size, whatever the spec asks
    vae_scale_factor: int = 8
    description: str = ""
    pipeline_class: str = KLEIN_PIPELINE
    distilled: bool | None = None
    text_encoder: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # the shipped entry whose configs were used (klein-4b, klein-9b, tiny), if any

    # --- widths and counts ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Channels per attention head (``capture.unit_width = "head"`` resolves to this)."""
        return int(self.transformer["attention_head_dim"])

    @property
    def n_heads(self) -> int:
        return int(self.transformer["num_attention_heads"])

    @property
    def inner_dim(self) -> int:
        """Hidden width: heads x head_dim (3072 on Klein 4B, 4096 on 9B)."""
        return self.head_dim * self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """Single-stream MLP hidden width that feeds ``to_out`` (after SwiGLU): mlp_ratio x hidden."""
        return int(self.inner_dim * float(self.transformer.get("mlp_ratio", 3.0)))

    @property
    def n_double(self) -> int:
        return int(self.transformer["num_layers"])

    @property
    def n_single(self) -> int:
        return int(self.transformer["num_single_layers"])

    @property
    def token_multiple(self) -> int:
        """Pixels per token side: the image size must be a multiple of this."""
        return self.vae_scale_factor * PATCH

    # --- the reference -------------------------------------------------------------------------
    @property
    def reference_self_attention(self) -> bool:
        """True on the KV variant: reference tokens attend only to themselves (cannot differ by prompt)."""
        return self.pipeline_class == KLEIN_KV_PIPELINE

    @property
    def image_stream(self) -> tuple[str, str]:
        """Order of the image stream: ``(target, reference)``, or reference first on the KV variant."""
        return ("reference", "target") if self.reference_self_attention else ("target", "reference")

    def join_image_stream(self, target, reference):
        """Return the transformer's image-stream input (a tensor) from target and reference latents.

        Parameters
        ----------
        target : torch.Tensor, shape (batch, target_tokens, channels)
        reference : torch.Tensor, shape (batch, reference_tokens, channels)
            Latents, or their position ids (shape (batch, tokens, 4)): both follow the same order.
        """
        import torch

        first, second = (reference, target) if self.reference_self_attention else (target, reference)
        return torch.cat([first, second], dim=1)

    def probe_forward_kwargs(self, reference_tokens: int) -> dict[str, Any]:
        """Return the extra transformer keywords of a forward with the reference attached.

        The KV variant runs its first step in ``kv_cache_mode="extract"`` (reference tokens attend only
        to themselves and are modulated at the fixed timestep 0); its output then holds only the
        target's tokens, and ``return_dict=False`` returns ``(sample, kv_cache)``.
        """
        if self.reference_self_attention and reference_tokens > 0:
            return {"kv_cache_mode": "extract", "num_ref_tokens": reference_tokens}
        return {}

    # --- guidance ------------------------------------------------------------------------------
    def evaluations_per_step(self, guidance_scale: float) -> int:
        """Return transformer evaluations per denoising step at ``guidance_scale``.

        Two (real CFG) above 1 on a base model; one on a distilled model, whose pipeline ignores
        guidance > 1 with a warning, and on the KV variant, whose pipeline takes no guidance at all.
        A model whose configs do not say is taken as base (``is_distilled`` defaults to False).
        """
        return 2 if guidance_scale > 1 and not self.distilled else 1

    def generation_kwargs(self, guidance_scale: float) -> dict[str, Any]:
        """Return the guidance keyword of a pipeline call (none for ``Flux2KleinKVPipeline``)."""
        return {} if self.reference_self_attention else {"guidance_scale": guidance_scale}

    # --- sites and tokens ----------------------------------------------------------------------
    def sites(self) -> list[CandidateSite]:
        """Return every capturable projection, in the order the forward runs them."""
        out = []
        image, text, single = ROLE_BY_KIND["image"], ROLE_BY_KIND["text"], ROLE_BY_KIND["joint"]
        for i in range(self.n_double):
            for role in (image, text):
                out.append(CandidateSite(role.module.format(i), i, role, self.inner_dim, self.inner_dim, self.head_dim))
        for i in range(self.n_single):
            out.append(CandidateSite(single.module.format(i), i, single, self.inner_dim + self.mlp_hidden,
                                     self.inner_dim, self.head_dim))
        return out

    def token_parts(self, kind: str) -> tuple[str, ...]:
        """Return the token parts a site of ``kind`` sees, in the order of its input."""
        return {"image": self.image_stream, "text": ("text",), "joint": ("text",) + self.image_stream}[kind]

    def site_tokens(self, kind: str, counts: TokenCounts) -> int:
        """Return the number of tokens in the input of a site of ``kind``."""
        return sum(getattr(counts, p) for p in self.token_parts(kind))

    def segment(self, kind: str, tokens: str, counts: TokenCounts) -> tuple[int, int] | None:
        """Return the token range ``[start, end)`` of ``tokens`` in a site of ``kind``'s input.

        None when the site never sees those tokens (text tokens at an image-stream site). Every
        selection is contiguous in every layout (text leads; target and reference are adjacent).
        """
        wanted = set(TOKEN_SELECTIONS[tokens])
        start = end = None
        offset = 0
        for part in self.token_parts(kind):
            n = getattr(counts, part)
            if part in wanted:
                start = offset if start is None else start
                end = offset + n
            offset += n
        return None if start is None else (start, end)

    def counted_parts(self, kind: str, tokens: str) -> tuple[str, ...]:
        """Return the token parts a capture of ``tokens`` counts at a site of ``kind``."""
        return tuple(p for p in self.token_parts(kind) if p in TOKEN_SELECTIONS[tokens])

    # --- words ---------------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        """Return the variant in words: base / distilled / KV."""
        if self.reference_self_attention:
            return "KV (distilled; reference tokens attend only to themselves)"
        return {True: "distilled", False: "base (not step-distilled)", None: "variant not stated"}[self.distilled]

    def summary(self) -> str:
        """Return the architecture in one line (blocks, heads, widths, text encoder, reference)."""
        te = self.text_encoder
        encoder = (f"Qwen3 (hidden {te['hidden_size']}, {te['num_hidden_layers']} layers)"
                   if te else "text encoder")
        ref = "before" if self.reference_self_attention else "after"
        return (f"FLUX.2 Klein, {self.variant}: {self.n_double} double + {self.n_single} single blocks, "
                f"{self.n_heads} heads x {self.head_dim} (hidden {self.inner_dim}, MLP {self.mlp_hidden}); "
                f"{encoder} states {', '.join(map(str, self.text_encoder_out_layers))} stacked; "
                f"VAE /{self.vae_scale_factor}; reference {ref} the target in the image stream")


def resolve_unit_width(value: int | str, arch: Architecture) -> int:
    """Return the unit width in channels: ``"head"`` is the architecture's head width."""
    return arch.head_dim if value == "head" else int(value)


def unit_counts(site: CandidateSite, unit_width: int) -> dict[str, int]:
    """Return a site's units per kind at ``unit_width``: ``{"attention": a, "mlp": m}``."""
    attention = site.attention_width // unit_width
    return {"attention": attention, "mlp": (site.width - site.attention_width) // unit_width}


def select_sites(arch: Architecture, entries: Iterable[str]) -> list[CandidateSite]:
    """Return the sites ``entries`` name (role names or fnmatch module patterns), in forward order.

    Raises
    ------
    ArchitectureError
        An entry with a space that is no role, or a pattern that matches no capturable projection;
        the message names the roles and example module names.
    """
    candidates = arch.sites()
    chosen: set[str] = set()
    for entry in entries:
        if entry in ROLE_BY_NAME:
            hits = [c.name for c in candidates if c.role.name == entry]
        elif " " in entry:  # module names have no spaces: this meant a role
            raise ArchitectureError(f"'{entry}' is no site role (roles: {_quoted(role_names())})")
        else:
            hits = [c.name for c in candidates if fnmatch.fnmatchcase(c.name, entry)]
        if not hits:
            raise ArchitectureError(f"'{entry}' matches no capturable projection of {arch.source} "
                                    f"(roles: {_quoted(role_names())}; patterns, e.g. "
                                    f"{_quoted(r.pattern for r in ROLES)}; a block: {ROLES[0].module.format(0)})")
        chosen.update(hits)
    return [c for c in candidates if c.name in chosen]


def reference_count_problem(arch: Architecture, tokens: str, sites: Iterable[CandidateSite]) -> str | None:
    """Return why counting ``tokens`` at ``sites`` cannot work on ``arch``, or None if it can.

    On the KV variant reference tokens attend only to themselves and are modulated at a fixed
    timestep: their activations are the same for both prompts of a pair, so a unit counted only on
    them has a difference of exactly 0, and counting them beside other tokens only dilutes a unit's RMS.
    """
    if not arch.reference_self_attention:
        return None
    counting = [s.name for s in sites if "reference" in arch.counted_parts(s.kind, tokens)]
    if not counting:
        return None
    why = (f"on {arch.source} ({KLEIN_KV_PIPELINE}) reference tokens attend only to themselves, "
           "so their activations are the same for both prompts of every pair")
    if tokens == "reference":
        return (f"capture.tokens = 'reference': {why}: every unit's difference would be exactly 0. "
                "Count 'target' or 'text' tokens instead")
    return (f"capture.tokens = '{tokens}' counts the reference tokens at {len(counting)} site(s) (e.g. "
            f"{counting[0]}): {why}, and counting them only dilutes each unit's RMS. Use capture.tokens = "
            "'target' (or 'text'), or capture only 'attention-out text' sites")


def units_by_role(sites: Iterable[Any]) -> list[dict[str, Any]]:
    """Return per-role totals of sites with ``role``, ``heads``, ``attention_units`` and ``mlp_units``.

    Rows: ``{"role", "sites", "heads", "attention_units", "mlp_units"}`` in role order, for printing
    heads (and MLP groups) per stream.
    """
    rows = []
    for role in ROLES:
        mine = [s for s in sites if s.role == role.name]
        if mine:
            rows.append({"role": role.name, "sites": len(mine), "heads": sum(s.heads for s in mine),
                         "attention_units": sum(s.attention_units for s in mine),
                         "mlp_units": sum(s.mlp_units for s in mine)})
    return rows


def pipeline_of(model_index: dict[str, Any]) -> tuple[str, bool | None]:
    """Return the pipeline class and the distilled flag a ``model_index.json`` states.

    ``Flux2KleinPipeline`` registers ``is_distilled`` in its config; ``Flux2KleinKVPipeline`` does not
    and is always distilled (it has no guidance at all).
    """
    cls = model_index.get("_class_name", KLEIN_PIPELINE)
    if cls not in PIPELINES:
        raise ArchitectureError(f"pipeline class '{cls}' is not a FLUX.2 Klein pipeline (known: {', '.join(PIPELINES)})")
    if cls == KLEIN_KV_PIPELINE:
        return cls, True
    distilled = model_index.get("is_distilled")
    return cls, None if distilled is None else bool(distilled)


def text_encoder_layers(text_encoder: dict[str, Any], joint_attention_dim: int) -> tuple[int, ...]:
    """Return the hidden states a Klein pipeline stacks for this text encoder config.

    The Klein pipelines stack (9, 18, 27) whatever the size; a smaller (test) encoder whose hidden
    size times 3 is the transformer's ``joint_attention_dim`` but has too few layers gets evenly
    spaced states ending at its last layer.
    """
    if not text_encoder:
        return TEXT_ENCODER_OUT_LAYERS
    n = int(joint_attention_dim) // int(text_encoder["hidden_size"])
    layers = int(text_encoder["num_hidden_layers"])
    if n == len(TEXT_ENCODER_OUT_LAYERS) and layers > max(TEXT_ENCODER_OUT_LAYERS):
        return TEXT_ENCODER_OUT_LAYERS
    return tuple(round(layers * (i + 1) / n) for i in range(n))


def vae_scale(vae_config: dict[str, Any]) -> int:
    """Return the VAE's downsampling factor (AutoencoderKLFlux2's default config: 8)."""
    return 2 ** (len(vae_config.get("block_out_channels", [128, 256, 512, 512])) - 1)


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)
