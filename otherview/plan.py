"""The plan: a validated spec compiled against a model architecture into passes, sites and units.

Nothing here allocates weights; ``otherview plan`` prints this, ``otherview exec`` runs it.

What each site sees (its token layout, whether its input holds MLP channels, the KV variant's
reference) is ``architectures``' knowledge; this module turns it into sites, units and segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .architectures import (Architecture, ArchitectureError, CandidateSite, TokenCounts, reference_count_problem,
                            resolve_unit_width, select_sites, unit_counts)
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
    role: str = ""  # "attention-out image", "attention-out text" or "single out" (architectures.ROLES)
    heads: int = 0  # attention heads whose outputs the input holds
    attention_units: int = 0  # units over attention channels (the first ones)
    mlp_units: int = 0  # units over MLP hidden channels (single-stream only), after them


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


def _candidate_sites(arch: Architecture, entries: list[str]) -> list[CandidateSite]:
    """Return the sites ``capture.sites`` names (roles or module patterns), in forward order."""
    try:
        return select_sites(arch, entries)
    except ArchitectureError as exc:
        raise PlanError(f"capture.sites: {exc}") from None


def _segment(arch: Architecture, site: CandidateSite, tokens: str, counts: TokenCounts) -> tuple[int, int]:
    """Return the token range of ``tokens`` in ``site``'s input; raise if the site never sees them."""
    segment = arch.segment(site.kind, tokens, counts)
    if segment is None:
        raise PlanError(f"capture.tokens: {site.name} never sees '{tokens}' tokens "
                        f"(its input holds the {site.kind} stream); narrow capture.sites or change capture.tokens")
    return segment


def _check_unit_width(g: int, arch: Architecture, width: int, attention_width: int, name: str) -> None:
    if width % g:
        raise PlanError(f"capture.unit_width: {g} does not divide the {width} input channels of {name}")
    if attention_width % g or (g < arch.head_dim and arch.head_dim % g) or (g > arch.head_dim and g % arch.head_dim):
        raise PlanError(f"capture.unit_width: {g} must divide or be a multiple of the head width "
                        f"{arch.head_dim} and divide the attention width {attention_width}, so no unit "
                        "straddles two heads or attention and MLP channels")


def _units_of(site: Site, g: int, head_dim: int) -> list[Unit]:
    """Return ``site``'s units: attention-head channel groups first, then (single-stream) MLP groups.

    A unit past the attention width is an MLP channel group (head -1, ``subgroup`` its index within
    the MLP hidden); with head-wide units (g = head_dim) each attention unit is one head.
    """
    units = []
    for k in range(site.n_units):
        c0, c1 = k * g, (k + 1) * g
        if c0 < site.attention_width:
            kind, head, sub = "attention", c0 // head_dim, (c0 % head_dim) // g
        else:
            kind, head, sub = "mlp", -1, (c0 - site.attention_width) // g
        units.append(Unit(site.unit_offset + k, site.name, site.block, site.stream, c0, c1, kind, head, sub))
    return units


def _sites(spec: Spec, arch: Architecture, counts: TokenCounts) -> tuple[list[Site], int]:
    """Return the plan's sites (with unit offsets and token segments) and the resolved unit width."""
    g = resolve_unit_width(spec.capture.unit_width, arch)
    chosen = _candidate_sites(arch, list(spec.capture.sites))
    problem = reference_count_problem(arch, spec.capture.tokens, chosen)
    if problem is not None:
        raise PlanError(problem)
    sites: list[Site] = []
    offset = 0
    for c in chosen:
        segment = _segment(arch, c, spec.capture.tokens, counts)
        _check_unit_width(g, arch, c.width, c.attention_width, c.name)
        per_kind = unit_counts(c, g)
        sites.append(Site(c.name, c.block, c.stream, c.kind, c.width, c.attention_width, offset, c.width // g,
                          segment, arch.site_tokens(c.kind, counts), role=c.role.name, heads=c.heads,
                          attention_units=per_kind["attention"], mlp_units=per_kind["mlp"]))
        offset += c.width // g
    return sites, g


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
    multiple = arch.token_multiple
    if height % multiple or width % multiple:
        raise PlanError(f"reference.height/width: {height}x{width} must be multiples of {multiple} for this model")
    n_target = (height // multiple) * (width // multiple)
    n_ref = n_target  # the reference is generated (or resized) at the probe's size
    n_text = spec.model.max_sequence_length
    sites, g = _sites(spec, arch, TokenCounts(n_text, n_target, n_ref))
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


