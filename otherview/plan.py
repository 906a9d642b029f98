"""The plan: a validated spec compiled against a model architecture into passes, sites and units.

Nothing here allocates weights; ``otherview plan`` prints this, ``otherview exec`` runs it.

What each site sees (its token layout, whether its input holds MLP channels, the KV variant's
reference) is ``architectures``' knowledge; this module turns it into sites, units and segments.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

from .architectures import (Architecture, ArchitectureError, CandidateSite, TokenCounts, reference_count_problem,
                            resolve_unit_width, select_sites, unit_counts, units_by_role)
from .design import Design, ProbePass, build_design
from .spec import Spec


class PlanError(Exception):
    """The spec cannot be run on this model: ``(dotted path, message)`` per problem, all at once."""

    def __init__(self, problems: "list[tuple[str, str]] | str"):
        if isinstance(problems, str):
            path, _, msg = problems.partition(": ")
            problems = [(path, msg)] if msg and " " not in path else [("", problems)]
        self.problems = problems
        super().__init__("\n".join(f"{p}: {m}" if p else m for p, m in problems))


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


@dataclass
class Plan:
    """Everything ``exec`` will do, in order, and everything a report needs to label it."""

    spec: Spec
    arch: Architecture
    design: Design
    unit_width: int  # channels per unit (``capture.unit_width``, "head" resolved to the head width)
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
    token_counts: dict[str, int] | None = None  # real (unpadded) tokens of each distinct prompt, if known
    warnings: list[str] = field(default_factory=list)

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


def build_plan(spec: Spec, arch: Architecture, design: Design | None = None) -> Plan:
    """Return the plan of ``spec`` on ``arch``; raise ``PlanError`` when the two do not fit.

    ``design`` is ``build_design(spec)`` (made here when not given; it raises ``DesignError``).
    """
    design = design or build_design(spec)
    height, width, note = _resolution(spec, arch)
    multiple = arch.token_multiple
    if height % multiple or width % multiple:
        raise PlanError(f"reference.height/width: {height}x{width} must be multiples of {multiple} for this model")
    n_target = (height // multiple) * (width // multiple)
    n_ref = n_target  # the reference is generated (or resized) at the probe's size
    n_text = spec.model.max_sequence_length
    sites, g = _sites(spec, arch, TokenCounts(n_text, n_target, n_ref))
    units = [u for s in sites for u in _units_of(s, g, arch.head_dim)]
    cfg = arch.evaluations_per_step  # real CFG (two evaluations) above guidance 1 on a base model
    n = len(spec.axis.fillers)
    flips = {"method": spec.null.method, "pairs": n, "exact_flips": 2 ** max(n - 1, 0),
             "random_flips": spec.null.flips}
    generated = sum(1 for sc in design.scenes if sc.prompt is not None)
    plan = Plan(spec=spec, arch=arch, design=design, unit_width=g, height=height, width=width, resolution_note=note,
                text_tokens=n_text, target_tokens=n_target, reference_tokens=n_ref, sites=sites, units=units,
                passes=design.passes, batch_size=None if spec.probe.batch_size == "auto" else spec.probe.batch_size,
                reference_evaluations=generated * spec.reference.steps * cfg(spec.reference.guidance_scale),
                probe_evaluations_per_pass=spec.probe.steps * cfg(spec.probe.guidance_scale), flips=flips)
    _check_tokens(plan)
    return plan


def _tokenizer(arch: Architecture):
    """Return the tokenizer of ``arch``'s model where it can be had without weights or network, else None."""
    from pathlib import Path

    from . import model as model_mod

    if arch.source.startswith(model_mod.BUILTIN_PREFIX):
        return model_mod.byte_tokenizer()
    folder = Path(arch.source).expanduser() / "tokenizer"
    if folder.is_dir():
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(folder))
        except Exception:  # a broken tokenizer folder: loading the model will say so
            return None
    return None


def prompt_token_count(tokenizer, prompt: str) -> int:
    """Return the tokens ``prompt`` takes once wrapped in the pipeline's chat template, before padding."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    return len(tokenizer(text)["input_ids"])


def _check_tokens(plan: Plan) -> None:
    """Refuse prompts that ``max_sequence_length`` would cut; warn where a contrast's prompts differ in length."""
    tokenizer = _tokenizer(plan.arch)
    if tokenizer is None:
        plan.warnings.append("prompt token counts unknown (no tokenizer without the weights): prompts longer than "
                             f"{plan.text_tokens} tokens would be cut")
        return
    counts = {p: prompt_token_count(tokenizer, p) for p in plan.prompts}
    plan.token_counts = counts
    long = [(p, n) for p, n in counts.items() if n > plan.text_tokens]
    if long:
        raise PlanError([("model.max_sequence_length", f"the prompt \"{p}\" takes {n} tokens (chat template "
                          f"included), more than max_sequence_length {plan.text_tokens}: it would be cut; shorten it "
                          "or raise model.max_sequence_length") for p, n in long])
    design = plan.design
    for c in design.contrasts:
        used = [design.conditions[k] for k, w in enumerate(c.weights) if w != 0]
        differ = 0
        for i in range(len(design.items)):
            for w in range(design.n_wordings):
                lengths = {counts[design.spec.prompt(cond, design.items[i], w)] for cond in used}
                differ += len(lengths) > 1
        if differ:
            plan.warnings.append(f"contrast {c.name}: its prompts differ in token length for {differ} of "
                                 f"{len(design.items) * design.n_wordings} item-wordings, so padding starts at "
                                 "different positions (pad tokens take part in joint attention)")


def describe_design(plan: Plan) -> list[str]:
    """Return the lines that say what the design runs: conditions, factors, contrasts, tests."""
    s, d = plan.spec, plan.design
    c, n, sc, se, w = d.shape
    lines = [f"conditions: {c} ({', '.join(d.conditions)}), {w} wording(s) each; items: {n} {s.axis.name}",
             f"replication: {sc} scene(s) ({', '.join(x.name for x in d.scenes)}), {se} probe seed(s) "
             f"({', '.join(map(str, d.seeds))}), {w} wording(s); each item's contrast value averages them",
             f"probe passes: {len(plan.passes)} = {c} conditions x {n} items x {sc} scenes x {se} seeds x {w} wordings"
             f" (each pass runs once, whichever contrasts use it)"]
    for con in d.contrasts:
        extra = f" (specificity difference of {con.derived_from[0]} and {con.derived_from[1]})" if con.derived_from else ""
        lines.append(f"contrast {con.name}: d = {con.label}{extra}")
    for t in d.specificity:
        lines.append(f"specificity {t.name}: units where {t.effect} AND {t.difference} pass family-wise correction "
                     "with the same sign (minimum-statistic conjunction)")
    steps = ("the mean over steps" if d.steps == [None] else f"each of the {len(d.steps)} steps apart")
    lines.append(f"analyses: {len(d.analyses)} ({len(d.contrasts)} contrasts x {steps})")
    return lines


def describe(plan: Plan, prompts: bool = False) -> str:
    """Return the plan as the text ``otherview plan`` prints (``prompts``: every rendered prompt too)."""
    s, a = plan.spec, plan.arch
    lines = [f"experiment {s.experiment.name}: model {a.source}" + (" (RANDOM WEIGHTS)" if a.random_weights else ""),
             f"resolution {plan.height}x{plan.width}" + (f"  [{plan.resolution_note}]" if plan.resolution_note else "")]
    for scene in plan.design.scenes:
        if scene.prompt is not None:
            lines.append(f"reference {scene.name}: generate, {s.reference.steps} steps, guidance "
                         f"{s.reference.guidance_scale}, seed {scene.seed}: {plan.reference_evaluations // max(1, sum(x.prompt is not None for x in plan.design.scenes))} "
                         f"transformer evaluations at {plan.text_tokens} text + {plan.target_tokens} image tokens")
        else:
            lines.append(f"reference {scene.name}: file {scene.image}")
    lines += describe_design(plan)
    per = plan.text_tokens + plan.target_tokens + plan.reference_tokens
    batch = plan.batch_size if plan.batch_size is not None else "auto (sized to device memory)"
    sigma = "sigma = 1 (pure noise: only the reference tokens carry the scene)" if s.probe.steps == 1 else \
        f"sigmas from 1 down to {1 / s.probe.steps:.3g}"
    lines += [f"probe: {s.probe.steps} step(s), {sigma}, guidance {s.probe.guidance_scale}, "
              f"{plan.probe_evaluations_per_pass} evaluation(s) per pass, batch {batch}",
              f"distinct prompts encoded once each: {len(plan.prompts)}",
              f"tokens per probe pass: {per} ({plan.text_tokens} text + {plan.target_tokens} target + "
              f"{plan.reference_tokens} reference); counted: {s.capture.tokens}",
              f"capture sites: {len(plan.sites)}, unit width {plan.unit_width} channels"
              + (" (head width)" if s.capture.unit_width == "head" else "") + f", units: {plan.n_units}"]
    for stream in ("double", "single"):
        sites = [x for x in plan.sites if x.stream == stream]
        if not sites:
            continue
        attn = sum(1 for u in plan.units if u.stream == stream and u.kind == "attention")
        mlp = sum(1 for u in plan.units if u.stream == stream and u.kind == "mlp")
        lines.append(f"  {stream}-stream: {len(sites)} sites, {sum(x.n_units for x in sites)} units "
                     f"({attn} attention, {mlp} MLP)")
    for row in units_by_role(plan.sites):
        lines.append(f"  {row['role']}: {row['sites']} sites, {row['heads']} heads; units: "
                     f"{row['attention_units']} attention, {row['mlp_units']} MLP")
    for site in plan.sites:
        lines.append(f"    {site.name}: width {site.width}, units {site.unit_offset}..{site.unit_offset + site.n_units - 1}, "
                     f"tokens {site.segment[0]}..{site.segment[1]} of {site.tokens}")
    f = plan.flips
    exact = f"{f['exact_flips']:,}" if f['exact_flips'] < 2**63 else f"{float(f['pairs'] - 1) * 0.30103:.0f}-digit number of"
    lines.append(f"null: sign-flip over items, method {f['method']}: exact = 2^{max(f['pairs'] - 1, 0)} = "
                 f"{exact} flips, random = {f['random_flips']:,} flips (seed {s.null.seed}); thresholds "
                 f"|t| > {', '.join(f'{c:g}' for c in s.null.thresholds)}; quantile {s.null.quantile:g}; alpha "
                 f"{s.null.alpha:g}")
    # 2^(N-1) x U overflows a float from N ~ 1,000 fillers: print it from its logarithm
    log10 = max(f['pairs'] - 1, 0) * math.log10(2) + math.log10(max(plan.n_units, 1))
    lines.append(f"unit-flips (exact, per analysis): {10 ** (log10 % 1):.3g}e+{int(log10):02d}")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    if prompts:
        lines.append("prompts (pass: condition, item, scene, seed, wording, tokens: prompt):")
        for p in plan.passes:
            n = plan.token_counts.get(p.prompt) if plan.token_counts else None
            lines.append(f"  {p.index}: {p.condition}, {plan.design.items[p.item].value}, "
                         f"{plan.design.scenes[p.scene].name}, seed {p.seed}, wording {p.wording}, "
                         f"{n if n is not None else '?'} tokens: {p.prompt}")
    return "\n".join(lines)
