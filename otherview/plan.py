"""The plan: a validated spec compiled against a model architecture into passes, sites and units.

Nothing here allocates weights; ``otherview plan`` prints this, ``otherview exec`` runs it.

FLUX.2 token layout, which decides what each site sees. The image stream is
``[target latents | reference latents]`` (the pipeline concatenates the reference after the noisy
target). In double-stream blocks ``attn.to_out.0`` sees only the image stream and ``attn.to_add_out``
only the text stream; single-stream blocks see ``[text | target | reference]``, and the input of their
``attn.to_out`` is ``[attention (heads x head_dim) | MLP hidden]``, so every unit there is labelled
attention head or MLP.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .model import Architecture
from .spec import Spec


class PlanError(Exception):
    """The spec cannot be run on this model (e.g. a site pattern matches nothing)."""


@dataclass(frozen=True)
class Site:
    """One hooked projection: its module name, where it sits and what its input holds."""

    name: str
    block: int
    stream: str  # "double" or "single"
    kind: str  # "image" (double to_out.0), "text" (double to_add_out) or "joint" (single to_out)
    width: int  # input channels
    attention_width: int  # leading channels that are attention output; the rest is MLP hidden
    unit_offset: int  # index of this site's first unit in the run's unit axis
    n_units: int
    segment: tuple[int, int]  # token range [start, end) of the counted tokens in this site's input
    tokens: int  # tokens in this site's input


@dataclass(frozen=True)
class Unit:
    """One unit: ``unit_width`` contiguous input channels of one site."""

    index: int
    site: str
    block: int
    stream: str
    channel_start: int
    channel_end: int
    kind: str  # "attention" or "mlp"
    head: int  # attention head (-1 for MLP channels)
    subgroup: int  # which group of unit_width channels within the head (or within the MLP hidden)


@dataclass(frozen=True)
class ProbePass:
    index: int
    condition: str
    filler_index: int
    prompt: str


@dataclass
class Plan:
    """Everything ``exec`` will do, in order, and everything a report needs to label it."""

    spec: Spec
    arch: Architecture
    height: int
    width: int
    resolution_note: str
    text_tokens: int
    target_tokens: int
    reference_tokens: int
    sites: list[Site]
    units: list[Unit]
    passes: list[ProbePass]
    batch_size: int | None  # None: sized to the device's memory at run time
    reference_evaluations: int
    probe_evaluations_per_pass: int
    flips: dict = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def prompts(self) -> list[str]:
        """Return the distinct probe prompts in first-use order (each is encoded once)."""
        return list(dict.fromkeys(p.prompt for p in self.passes))


def _candidate_sites(arch: Architecture) -> list[tuple[str, int, str, str, int, int]]:
    out = []
    for i in range(arch.n_double):
        out.append((f"transformer_blocks.{i}.attn.to_out.0", i, "double", "image", arch.inner_dim, arch.inner_dim))
        out.append((f"transformer_blocks.{i}.attn.to_add_out", i, "double", "text", arch.inner_dim, arch.inner_dim))
    width = arch.inner_dim + arch.mlp_hidden
    for i in range(arch.n_single):
        out.append((f"single_transformer_blocks.{i}.attn.to_out", i, "single", "joint", width, arch.inner_dim))
    return out


def _segment(kind: str, tokens: str, n_text: int, n_target: int, n_ref: int) -> tuple[int, int] | None:
    """Return the token range of ``tokens`` in a site of ``kind``, or None if the site never sees them."""
    layout = {"image": {"target": (0, n_target), "reference": (n_target, n_target + n_ref),
                        "image": (0, n_target + n_ref), "all": (0, n_target + n_ref)},
              "text": {"text": (0, n_text), "all": (0, n_text)},
              "joint": {"text": (0, n_text), "target": (n_text, n_text + n_target),
                        "reference": (n_text + n_target, n_text + n_target + n_ref),
                        "image": (n_text, n_text + n_target + n_ref), "all": (0, n_text + n_target + n_ref)}}
    return layout[kind].get(tokens)


def _check_unit_width(g: int, arch: Architecture, width: int, attention_width: int, name: str) -> None:
    if width % g:
        raise PlanError(f"capture.unit_width: {g} does not divide the {width} input channels of {name}")
    if attention_width % g or (g < arch.head_dim and arch.head_dim % g) or (g > arch.head_dim and g % arch.head_dim):
        raise PlanError(f"capture.unit_width: {g} must divide or be a multiple of the head width "
                        f"{arch.head_dim} and divide the attention width {attention_width}, so no unit "
                        "straddles two heads or attention and MLP channels")


def _units_of(site: Site, g: int, head_dim: int) -> list[Unit]:
    units = []
    for k in range(site.n_units):
        c0, c1 = k * g, (k + 1) * g
        if c0 < site.attention_width:
            kind, head, sub = "attention", c0 // head_dim, (c0 % head_dim) // g
        else:
            kind, head, sub = "mlp", -1, (c0 - site.attention_width) // g
        units.append(Unit(site.unit_offset + k, site.name, site.block, site.stream, c0, c1, kind, head, sub))
    return units


def _resolution(spec: Spec, arch: Architecture) -> tuple[int, int, str]:
    h, w = spec.reference.height, spec.reference.width
    if arch.resolution is not None and (h, w) != (arch.resolution, arch.resolution):
        note = (f"{arch.source} runs at {arch.resolution}x{arch.resolution} "
                f"(the spec asks {h}x{w}, which the built-in small model does not need)")
        return arch.resolution, arch.resolution, note
    return h, w, ""


def build_plan(spec: Spec, arch: Architecture) -> Plan:
    """Return the plan of ``spec`` on ``arch``; raise ``PlanError`` when the two do not fit."""
    height, width, note = _resolution(spec, arch)
    multiple = arch.vae_scale_factor * 2
    if height % multiple or width % multiple:
        raise PlanError(f"reference.height/width: {height}x{width} must be multiples of {multiple} for this model")
    n_target = (height // multiple) * (width // multiple)
    n_ref = n_target  # the reference is generated (or resized) at the probe's size
    n_text = spec.model.max_sequence_length
    g = spec.capture.unit_width
    sites: list[Site] = []
    offset = 0
    candidates = _candidate_sites(arch)
    for pattern in spec.capture.sites:
        if not any(fnmatch.fnmatchcase(c[0], pattern) for c in candidates):
            raise PlanError(f"capture.sites: '{pattern}' matches no capturable projection of {arch.source} "
                            f"(e.g. {candidates[0][0]}, {candidates[-1][0]})")
    for name, block, stream, kind, w, attn_w in candidates:
        if not any(fnmatch.fnmatchcase(name, p) for p in spec.capture.sites):
            continue
        segment = _segment(kind, spec.capture.tokens, n_text, n_target, n_ref)
        if segment is None:
            raise PlanError(f"capture.tokens: {name} never sees '{spec.capture.tokens}' tokens "
                            f"(its input holds the {kind} stream); narrow capture.sites or change capture.tokens")
        _check_unit_width(g, arch, w, attn_w, name)
        n_tokens = {"image": n_target + n_ref, "text": n_text, "joint": n_text + n_target + n_ref}[kind]
        sites.append(Site(name, block, stream, kind, w, attn_w, offset, w // g, segment, n_tokens))
        offset += w // g
    units = [u for s in sites for u in _units_of(s, g, arch.head_dim)]
    passes = []
    for c in (spec.contrast.a, spec.contrast.b):
        for i, filler in enumerate(spec.axis.fillers):
            passes.append(ProbePass(len(passes), c, i, spec.prompt(c, filler)))
    cfg = lambda scale: 2 if scale > 1 else 1  # noqa: E731  (the base model runs real CFG above 1)
    n = len(spec.axis.fillers)
    flips = {"method": spec.null.method, "pairs": n, "exact_flips": 2 ** max(n - 1, 0),
             "random_flips": spec.null.flips}
    return Plan(spec=spec, arch=arch, height=height, width=width, resolution_note=note, text_tokens=n_text,
                target_tokens=n_target, reference_tokens=n_ref, sites=sites, units=units, passes=passes,
                batch_size=None if spec.probe.batch_size == "auto" else spec.probe.batch_size,
                reference_evaluations=spec.reference.steps * cfg(spec.reference.guidance_scale)
                if spec.reference.prompt is not None else 0,
                probe_evaluations_per_pass=spec.probe.steps * cfg(spec.probe.guidance_scale), flips=flips)


def describe(plan: Plan) -> str:
    """Return the plan as the text ``otherview plan`` prints."""
    s, a = plan.spec, plan.arch
    lines = [f"experiment {s.experiment.name}: model {a.source}" + (" (RANDOM WEIGHTS)" if a.random_weights else ""),
             f"resolution {plan.height}x{plan.width}" + (f"  [{plan.resolution_note}]" if plan.resolution_note else "")]
    if s.reference.prompt is not None:
        lines.append(f"reference image: generate, {s.reference.steps} steps, guidance {s.reference.guidance_scale}, "
                     f"seed {s.reference.seed}: {plan.reference_evaluations} transformer evaluations at "
                     f"{plan.text_tokens} text + {plan.target_tokens} image tokens")
    else:
        lines.append(f"reference image: file {s.reference.image}")
    per = plan.text_tokens + plan.target_tokens + plan.reference_tokens
    batch = plan.batch_size if plan.batch_size is not None else "auto (sized to device memory)"
    lines += [f"probe passes: {len(plan.passes)} ({len(s.axis.fillers)} {s.axis.name} x 2 conditions "
              f"'{s.contrast.a}' - '{s.contrast.b}'), {s.probe.steps} step(s), guidance {s.probe.guidance_scale}, "
              f"{plan.probe_evaluations_per_pass} evaluation(s) each, batch {batch}",
              f"distinct prompts encoded once each: {len(plan.prompts)}",
              f"tokens per probe pass: {per} ({plan.text_tokens} text + {plan.target_tokens} target + "
              f"{plan.reference_tokens} reference); counted: {s.capture.tokens}",
              f"capture sites: {len(plan.sites)}, unit width {s.capture.unit_width} channels, units: {plan.n_units}"]
    for stream in ("double", "single"):
        sites = [x for x in plan.sites if x.stream == stream]
        if not sites:
            continue
        attn = sum(1 for u in plan.units if u.stream == stream and u.kind == "attention")
        mlp = sum(1 for u in plan.units if u.stream == stream and u.kind == "mlp")
        lines.append(f"  {stream}-stream: {len(sites)} sites x {sites[0].n_units} units = "
                     f"{sum(x.n_units for x in sites)} ({attn} attention, {mlp} MLP)")
    for site in plan.sites:
        lines.append(f"    {site.name}: width {site.width}, units {site.unit_offset}..{site.unit_offset + site.n_units - 1}, "
                     f"tokens {site.segment[0]}..{site.segment[1]} of {site.tokens}")
    f = plan.flips
    lines.append(f"null: sign-flip, method {f['method']}: exact = 2^{max(f['pairs'] - 1, 0)} = {f['exact_flips']:,} flips, "
                 f"random = {f['random_flips']:,} flips (seed {s.null.seed}); thresholds |t| > "
                 f"{', '.join(f'{c:g}' for c in s.null.thresholds)}; quantile {s.null.quantile:g}")
    lines.append(f"unit-flips (exact): {f['exact_flips'] * plan.n_units:.3g}")
    return "\n".join(lines)


