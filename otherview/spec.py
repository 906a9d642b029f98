"""The spec language: TOML text -> validated ``Spec`` (pydantic v2), with every user error collected.

A spec describes one paired-prompt probe: the model, a fixed reference image, prompt templates over
one slot axis (the fillers, each with covariates), the contrast that forms a pair, the probe-pass
settings, what to capture, the null, and where the run goes. Unknown keys are errors. Errors are
reported as ``file: dotted.path: message``, all at once (see ``SpecError``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import string
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SEGMENTS = ("all", "text", "image", "target", "reference")
DTYPES = ("auto", "bfloat16", "float16", "float32")


class SpecError(Exception):
    """A spec the user must fix: one ``(path, message)`` per problem, all of them at once."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__(self.format())

    def format(self) -> str:
        """Return one ``file: path: message`` line per problem."""
        return "\n".join(f"{self.source}: {p}: {m}" if p else f"{self.source}: {m}" for p, m in self.problems)


SEED_MAX = 2**63 - 1  # seeds travel as signed 64-bit integers
NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"  # condition, contrast and test names: identifiers (also file-safe)
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class _Strict(BaseModel):
    # strict: no true or "3" for an integer; no inf or nan for a float
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _one_of_keys(*keys: str) -> dict[str, Any]:
    """Return the JSON Schema rule "exactly one of ``keys`` is present" (``oneOf`` of ``required``)."""
    return {"oneOf": [{"required": [k]} for k in keys]}


class Experiment(_Strict):
    """What the experiment is called and what it asks."""

    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
                               description="The experiment's name: letters, digits, '_', '.' and '-' (it names the "
                                           "run folder through {name} in output.dir).")]
    description: str = Field("", description="One or two sentences on what the probe asks; printed at the top of "
                                             "the report.")


class ModelSpec(_Strict):
    """Where the weights come from: a hub id, a local folder, or ``builtin:tiny`` / ``builtin:klein-4b``."""

    source: str = Field("black-forest-labs/FLUX.2-klein-base-4B",
                        description="A hub id, a local folder written by save_pretrained, or a built-in random-weight "
                                    "model: builtin:tiny, builtin:klein-4b or builtin:klein-9b. `otherview sites "
                                    "--model SOURCE` lists what it can capture.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights and activations dtype; auto: bfloat16 on CUDA, float32 on the CPU.")
    device: str = Field("auto", json_schema_extra={"pattern": r"^(auto|cpu|cuda(:\d+)?|mps)$"},
                        description="'auto' (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    max_sequence_length: Annotated[int, Field(gt=0, le=4096)] = Field(
        512, description="Text tokens of every prompt (padded to this length); a prompt longer than this is an error.")
    text_encoder_out_layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Text-encoder hidden layers stacked into the prompt embedding; default: the architecture's.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError("should be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return v


_SCENE_PROMPT = "Generate the reference image from this prompt (with reference.steps and guidance_scale)."
_SCENE_IMAGE = "Read the reference image from this file; a relative path is relative to the spec file's folder."


class Scene(_Strict):
    """One reference scene: an image generated from ``prompt`` (with its own seed) or read from ``image``."""

    model_config = ConfigDict(json_schema_extra=_one_of_keys("prompt", "image"))

    name: Annotated[str, Field(pattern=NAME)] | None = Field(
        None, description="The scene's name (an identifier); default scene<k>.")
    prompt: Annotated[str, Field(min_length=1)] | None = Field(None, description=_SCENE_PROMPT)
    image: Annotated[str, Field(min_length=1)] | None = Field(None, description=_SCENE_IMAGE)
    seed: Seed | None = Field(None, description="Seed of this scene's generation; default: reference.seed.")


class Reference(_Strict):
    """The fixed reference image(s) every probe pass is conditioned on (generated once, or a file).

    One scene (``prompt`` or ``image``) or several (``scenes``); scenes are a replication factor.
    """

    model_config = ConfigDict(json_schema_extra=_one_of_keys("prompt", "image", "scenes"))

    prompt: Annotated[str, Field(min_length=1)] | None = Field(None, description=_SCENE_PROMPT)
    image: Annotated[str, Field(min_length=1)] | None = Field(None, description=_SCENE_IMAGE)
    scenes: Annotated[list[Scene], Field(min_length=1, max_length=64)] | None = Field(
        None, description="Several reference scenes, each a prompt or an image: a replication factor of the design.")
    steps: Annotated[int, Field(gt=0, le=1000)] = Field(14, description="Denoising steps of a generated reference.")
    guidance_scale: Annotated[float, Field(ge=0, le=100)] = Field(
        4.0, description="Guidance scale of a generated reference (above 1 on a base model: two evaluations a step).")
    seed: Seed = Field(0, description="Seed of the reference's noise (each scene may set its own).")
    height: Annotated[int, Field(gt=0, le=4096)] = Field(
        1024, description="Image height in pixels (reference and probe); a multiple of the model's token size.")
    width: Annotated[int, Field(gt=0, le=4096)] = Field(
        1024, description="Image width in pixels (reference and probe); a multiple of the model's token size.")

    def scene_list(self) -> list[Scene]:
        """Return the scenes, each with its name and seed filled in (one scene for ``prompt``/``image``)."""
        if self.scenes is None:
            return [Scene(name="scene", prompt=self.prompt, image=self.image, seed=self.seed)]
        return [Scene(name=sc.name or f"scene{k}", prompt=sc.prompt, image=sc.image,
                      seed=self.seed if sc.seed is None else sc.seed) for k, sc in enumerate(self.scenes)]


class Filler(_Strict):
    """One value of the slot axis (a creature), with its covariates."""

    value: Annotated[str, Field(min_length=1)] = Field(
        description="The text put into the slot (e.g. \"a cat\"); unique along the axis.")
    rank: Annotated[float, Field(ge=-1e12, le=1e12)] | None = Field(
        None, description="The filler's position on the axis, for the rank-correlation test; default: its 1-based "
                          "position in the list.")
    group: str = Field("", description="A free label (e.g. \"mammal\"), carried into the run's tables.")
    source: str = Field("", description="Where the filler comes from (a free label, e.g. \"card\").")


class Axis(_Strict):
    """An ordered axis of fillers for one slot of the prompt templates: the items, the unit of inference."""

    name: Annotated[str, Field(min_length=1)] = Field(
        "filler", description="What one filler is, singular (e.g. \"creature\"); used in the report's labels.")
    slot: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = Field(
        description="The slot name every template uses as {slot}.")
    fillers: Annotated[list[Filler], Field(min_length=1, max_length=4096)] = Field(
        description="The items, in axis order: each is run in every condition; sign flips act on them.")


_CONTRAST_RULES = {"oneOf": [
    {"required": ["weights"], "not": {"anyOf": [{"required": ["a"]}, {"required": ["b"]}]}},
    {"required": ["a", "b"], "not": {"required": ["weights"]}},
]}


class Contrast(_Strict):
    """A contrast: a zero-sum weight per condition; d per item = sum of weight x condition value.

    Give ``weights`` (``{viewpoint = 1, mention = -1}``), or ``a`` and ``b`` as shorthand for
    ``{a = 1, b = -1}``. ``name`` is required in ``[[contrasts]]``; the single ``[contrast]`` table of
    the founding card may omit it.
    """

    model_config = ConfigDict(json_schema_extra=_CONTRAST_RULES)

    name: Annotated[str, Field(pattern=NAME)] | None = Field(
        None, description="The contrast's name (an identifier; required in [[contrasts]], default a_vs_b in "
                          "[contrast]); it names the analysis in every file of the run.")
    a: str | None = Field(None, description="Shorthand: the condition weighted +1 (give b too, not weights).")
    b: str | None = Field(None, description="Shorthand: the condition weighted -1 (give a too, not weights).")
    weights: dict[str, Annotated[float, Field(ge=-1e6, le=1e6)]] | None = Field(
        None, json_schema_extra={"minProperties": 2}, description="Condition name -> weight; at least two nonzero weights, summing to 0.")

    def weight_map(self) -> dict[str, float]:
        """Return the weight of each condition the contrast uses (zero weights dropped)."""
        if self.weights is not None:
            return {k: float(v) for k, v in self.weights.items() if v != 0}
        return {self.a: 1.0, self.b: -1.0}

    def label(self) -> str:
        """Return the contrast written out, e.g. ``viewpoint − mention``."""
        if self.weights is None:
            return f"{self.a} − {self.b}"
        return _weights_label(self.weight_map())


def _weights_label(weights: dict[str, float]) -> str:
    out = ""
    for k, (name, w) in enumerate(weights.items()):
        sign = "−" if w < 0 else "+"
        mag = "" if abs(w) == 1 else f"{abs(w):g} "
        out += (("−" if w < 0 else "") if k == 0 else f" {sign} ") + mag + name
    return out


class Specificity(_Strict):
    """X beyond a control: a unit passes when ``effect`` AND ``effect - control`` pass the family-wise
    correction with the same sign (the minimum-statistic conjunction, Nichols et al. 2005)."""

    name: Annotated[str, Field(pattern=NAME)] = Field(description="The test's name (an identifier, not a contrast's).")
    effect: str = Field(description="The name of the effect contrast (one of [[contrasts]]).")
    control: str = Field(description="The name of the control contrast (another of [[contrasts]]).")


class Probe(_Strict):
    """The probe passes: steps, guidance, seeds, batching and which steps are captured."""

    steps: Annotated[int, Field(gt=0, le=1000)] = Field(
        1, description="Denoising steps of a probe pass (1: a single evaluation from pure noise).")
    guidance_scale: Annotated[float, Field(ge=0, le=100)] = Field(
        1.0, description="Guidance scale of a probe pass; only the conditional evaluation is captured.")
    # One seed, or several (a replication factor): every pass of a seed starts from the same noise.
    seed: Seed | Annotated[list[Seed], Field(min_length=1, max_length=64, json_schema_extra={"uniqueItems": True})] = \
        Field(0, description="The probe noise's seed, or a list of distinct seeds (a replication factor).")
    batch_size: Literal["auto"] | Annotated[int, Field(gt=0, le=4096)] = Field(
        "auto", description="Passes per transformer call; auto: sized to the device's free memory.")
    # "mean": each unit's value averages the steps; "each": every step is captured apart and
    # analysed in its own section (a multi-step probe)
    capture_steps: Literal["mean", "each"] = Field(
        "mean", description="mean: a unit's value averages the steps; each: every step is captured and analysed apart.")

    def seeds(self) -> list[int]:
        """Return the probe seeds as a list."""
        return list(self.seed) if isinstance(self.seed, list) else [self.seed]


class Capture(_Strict):
    """Which projections are hooked, how channels group into units, and which tokens count."""

    sites: Annotated[list[str], Field(min_length=1)] = Field(
        ["transformer_blocks.*.attn.to_out.0", "single_transformer_blocks.*.attn.to_out"],
        description="Module-name patterns (fnmatch) or roles ('attention-out image', 'attention-out text', "
                    "'single out'); `otherview sites --model M` lists them.")
    # channels per unit, or "head": the model's head width (the rest of a single-stream input is
    # then labelled as MLP channel groups of the same width)
    unit_width: Literal["head"] | Annotated[int, Field(gt=0, le=65536)] = Field(
        16, description="Input channels per unit, or 'head' for the model's head width; must divide or be a multiple "
                        "of the head width.")
    tokens: Literal["all", "text", "prompt", "image", "target", "reference"] = Field(
        "all", description="Which tokens a unit's RMS is taken over: all, text, prompt (the text stream's real "
                           "tokens only: each prompt's own length, padding excluded), image (target + reference), "
                           "target (the noisy latents) or reference.")


class Null(_Strict):
    """The sign-flip null and the levels of the corrected tests."""

    method: Literal["auto", "exact", "random"] = Field(
        "auto", description="exact: all 2^(N-1) sign flips; random: null.flips seeded flips; auto: exact where the "
                            "device affords it.")
    flips: Annotated[int, Field(gt=0, le=10**9)] = Field(
        10_000, description="Random sign flips (the observed labelling included).")
    seed: Seed = Field(0, description="Seed of the random flips and of the axis test's permutations.")
    thresholds: Annotated[list[Annotated[float, Field(gt=0, le=1e6)]], Field(min_length=1, max_length=16)] = Field(
        [3.0, 5.0], description="|t| thresholds whose unit counts are compared with the null (the card's table).")
    quantile: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.99, description="The null quantile the card's table compares counts with.")
    alpha: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.05, description="Significance level of every corrected test (FWER, BH q, specificity).")
    fwer: Literal["step-down", "single-step"] = Field(
        "step-down", description="Family-wise p: Westfall & Young's max-|t| single-step, or step-down (rejects at "
                                 "least as many units; extra passes over the same flips).")


# runtime.memory: "auto", or a size greater than 0: "20GiB", "16 GB", "512MiB", "20" (GiB)
MEMORY_SIZE = r"^(auto|\s*(?=[\d.]*[1-9])\d+(\.\d+)?\s*([GgMm]i?[Bb]|[GgMm])?\s*)$"
_MemorySize = Annotated[str, Field(json_schema_extra={"pattern": MEMORY_SIZE})]  # the message is _memory's


class Runtime(_Strict):
    """Speed settings. Defaults are the fastest that keep the numbers right (no fp8, no quantisation)."""

    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the transformer; auto: on CUDA only.")
    compile_backend: Annotated[str, Field(min_length=1)] = Field(
        "inductor", description="The torch.compile backend.")
    attention_backend: Annotated[str, Field(min_length=1)] = Field(
        "default", description="'default' or a diffusers AttentionBackendName.")
    capture_kernel: Literal["auto", "compiled", "reference"] = Field(
        "auto", description="The capture op: compiled (C++/CUDA), reference (plain PyTorch), auto (compiled when built).")
    # "auto": a CUDA side stream in eager mode (the reduction overlaps the projection), inline
    # under torch.compile (the capture op is part of the compiled graph)
    capture_stream: Literal["auto", "inline", "side"] = Field(
        "auto", description="Where the capture reduction runs on CUDA; auto: a side stream when eager, inline when "
                            "compiled.")
    memory: Annotated[float, Field(gt=0, le=1e6)] | _MemorySize = Field(
        "auto", description="GPU memory the run may use: 'auto' (the device's free memory, within any per-process "
        "cap set with torch.cuda.set_per_process_memory_fraction), a size such as '20GiB', '16GB' or '512MiB', or "
        "a number of GiB. Prompt-encoding chunks, the probe batch and where the weights live are sized to it.")

    @field_validator("memory")
    @classmethod
    def _memory(cls, v):
        if isinstance(v, str) and not re.match(MEMORY_SIZE, v):
            raise ValueError("should be 'auto', a size such as '20GiB', '16GB' or '512MiB', or a number of GiB")
        return v


OUTPUT_PLACEHOLDERS = ("name",)
_OUTPUT_DIR = r"^([^{}]|\{name\})*$"  # text and {name} only: an unknown {placeholder} is an error


class Output(_Strict):
    """Where runs go."""

    dir: Annotated[str, Field(min_length=1)] = Field(
        "runs/{name}", json_schema_extra={"pattern": _OUTPUT_DIR}, description="The folder that receives one run directory per run (<UTC time>); {name} is "
                                   "experiment.name. A relative path is relative to the spec file's folder.")

    @field_validator("dir")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        unknown = [m for m in re.findall(r"\{([^{}]*)\}", v) if m not in OUTPUT_PLACEHOLDERS]
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}} (known: "
                             + ", ".join("{" + k + "}" for k in OUTPUT_PLACEHOLDERS) + ")")
        if not re.fullmatch(_OUTPUT_DIR, v):
            raise ValueError("a lone '{' or '}': the only placeholder is {name}")
        return v


_SPEC_RULES = {"allOf": [
    _one_of_keys("contrast", "contrasts"),
    {"properties": {"contrasts": {"items": {"required": ["name"]}}}},
    # [contrast] names no contrast a specificity test could refer to
    {"if": {"required": ["contrast"]}, "then": {"properties": {"specificity": {"maxItems": 0}}}},
]}


class Spec(_Strict):
    """A paired-prompt probe of a FLUX.2 Klein model's attention units (otherview's spec, TOML)."""

    model_config = ConfigDict(json_schema_extra=_SPEC_RULES, title="otherview spec")

    experiment: Experiment = Field(description="The experiment's name and description.")
    model: ModelSpec = Field(ModelSpec(), description="The model: weights source, dtype, device, text length.")
    reference: Reference = Field(description="The reference image(s) every probe pass is conditioned on.")
    axis: Axis = Field(description="The slot axis: its fillers are the items.")
    # condition name -> one template, or several wordings (paired by position across conditions)
    conditions: Annotated[dict[str, str | Annotated[list[str], Field(min_length=1, max_length=64,
                                                                     json_schema_extra={"uniqueItems": True})]],
                          Field(min_length=2, max_length=64)] = Field(
        json_schema_extra={"propertyNames": {"pattern": NAME}}, description="Condition name -> prompt template using {slot}, or a list of wordings (paired by position "
                    "across conditions; every condition has the same number).")
    contrast: Contrast | None = Field(None, description="One contrast, a/b shorthand (the founding card's form); "
                                                        "give this or [[contrasts]].")
    contrasts: Annotated[list[Contrast], Field(min_length=1, max_length=64)] | None = Field(
        None, description="Named contrasts, each with weights (or a/b); give this or [contrast].")
    specificity: Annotated[list[Specificity], Field(max_length=64)] = Field(
        [], description="Specificity tests: units that respond to an effect contrast beyond a control contrast.")
    probe: Probe = Field(Probe(), description="The probe passes.")
    capture: Capture = Field(Capture(), description="What is captured: sites, unit width, tokens.")
    null: Null = Field(Null(), description="The sign-flip null and significance level.")
    runtime: Runtime = Field(Runtime(), description="Speed settings; they never change the numbers' meaning.")
    output: Output = Field(Output(), description="Where the run directories go (output.dir).")

    def templates(self, condition: str) -> list[str]:
        """Return the wordings (templates) of ``condition``."""
        value = self.conditions[condition]
        return [value] if isinstance(value, str) else list(value)

    def prompt(self, condition: str, filler: Filler, wording: int = 0) -> str:
        """Return the prompt of ``condition`` (its ``wording``-th template) with the slot filled by ``filler``."""
        return self.templates(condition)[wording].replace("{" + self.axis.slot + "}", filler.value)

    def contrast_list(self) -> list[Contrast]:
        """Return the named contrasts (the ``[contrast]`` shorthand becomes one named ``a_vs_b``)."""
        if self.contrasts is not None:
            return list(self.contrasts)
        c = self.contrast
        return [c.model_copy(update={"name": c.name or f"{c.a}_vs_{c.b}"})]

    def ranks(self) -> list[float]:
        """Return each filler's rank on the axis (its 1-based position where none is given)."""
        return [f.rank if f.rank is not None else float(i + 1) for i, f in enumerate(self.axis.fillers)]


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _template_slots(template: str) -> list[str]:
    """Return the slot names of ``template``; raise ValueError for anything but plain ``{name}`` slots."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc})") from None
    slots = []
    for literal, name, spec, conversion in parts:
        if "{" in literal or "}" in literal:
            raise ValueError("literal braces ('{{' or '}}') are not supported in a template")
        if name is None:
            continue
        if conversion or spec:
            raise ValueError(f"slot {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} has a "
                             f"conversion or format spec; write the plain slot {{{name}}}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"slot {{{name}}} is not a plain name; write {{slot}}")
        slots.append(name)
    return slots


def _table(raw: Any, key: str) -> dict:
    value = raw.get(key) if isinstance(raw, dict) else None
    return value if isinstance(value, dict) else {}


def _condition_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    conditions = _table(raw, "conditions")
    slot = _table(raw, "axis").get("slot")
    slot = slot if isinstance(slot, str) else None
    counts = {}
    for name, value in conditions.items():
        if not re.fullmatch(NAME, str(name)):
            problems.append((f"conditions.{name}", "a condition name must be an identifier (letters, digits, _ and -)"))
        templates = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        counts[name] = len(templates)
        for k, template in enumerate(templates):
            where = f"conditions.{name}" + (f"[{k}]" if isinstance(value, list) else "")
            if not isinstance(template, str):
                continue
            try:
                slots = _template_slots(template)
            except ValueError as exc:
                problems.append((where, str(exc)))
                continue
            if slot is not None and slot not in slots:
                problems.append((where, f"template never uses the axis slot {{{slot}}}"))
            for other in sorted(set(slots) - {slot}):
                if slot is not None:
                    problems.append((where, f"unknown slot {{{other}}} (the axis slot is {{{slot}}})"))
        if isinstance(value, list) and len(set(v for v in value if isinstance(v, str))) < len(value):
            problems.append((f"conditions.{name}", "repeats a wording"))
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
        problems.append(("conditions", f"every condition needs the same number of wordings, paired by position ({listed})"))
    return problems


def _contrast_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    conditions = _table(raw, "conditions")
    has_one, many = "contrast" in raw, raw.get("contrasts")
    if has_one and many is not None:
        return [("contrasts", "give either [contrast] (one contrast) or [[contrasts]] (several), not both")]
    if not has_one and many is None:
        return [("contrasts", "required: at least one contrast ([contrast] a/b, or [[contrasts]] with name and weights)")]
    entries = [("contrast", raw["contrast"])] if has_one else \
        [(f"contrasts[{i}]", c) for i, c in enumerate(many)] if isinstance(many, list) else []
    names: dict[str, str] = {}
    used: set[str] = set()
    for where, c in entries:
        if not isinstance(c, dict):
            continue
        name = c.get("name")
        if where != "contrast" and name is None:
            problems.append((f"{where}.name", "required key is missing"))
        if isinstance(name, str):
            if name in names:
                problems.append((f"{where}.name", f"'{name}' repeats {names[name]}"))
            names.setdefault(name, where)
        has_ab = "a" in c or "b" in c
        if has_ab == ("weights" in c):
            problems.append((where, "give either 'weights' or 'a' and 'b'"))
            continue
        if has_ab:
            for side in ("a", "b"):
                if side not in c:
                    problems.append((f"{where}.{side}", "required key is missing"))
            weights = {c.get("a"): 1.0, c.get("b"): -1.0} if c.get("a") != c.get("b") else {}
            if isinstance(c.get("a"), str) and c.get("a") == c.get("b"):
                problems.append((f"{where}.b", f"must differ from {where}.a"))
            keys = [(f"{where}.{side}", c.get(side)) for side in ("a", "b")]
        else:
            weights = c.get("weights") if isinstance(c.get("weights"), dict) else {}
            keys = [(f"{where}.weights.{k}", k) for k in weights]
            values = [v for v in weights.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(values) == len(weights):
                nonzero = [v for v in values if v != 0]
                if len(nonzero) < 2:
                    problems.append((f"{where}.weights", "needs at least two conditions with nonzero weights"))
                elif abs(sum(values)) > 1e-9 * max(abs(v) for v in values):
                    problems.append((f"{where}.weights", f"weights must sum to 0 (they sum to {sum(values):g}): a "
                                                         "contrast compares conditions"))
        for path, key in keys:
            if isinstance(key, str) and conditions and key not in conditions:
                problems.append((path, f"unknown condition '{key}' (known: {', '.join(sorted(conditions))})"))
        used |= {k for k, v in weights.items() if isinstance(k, str) and v != 0}
    unknown = any(m.startswith("unknown condition") for _, m in problems)
    for name in conditions:
        if entries and not unknown and name not in used:
            problems.append((f"conditions.{name}", "no contrast uses this condition: every condition runs, so "
                                                   "use it in a contrast or remove it"))
    specs = raw.get("specificity")
    for i, t in enumerate(specs if isinstance(specs, list) else []):
        if not isinstance(t, dict):
            continue
        for key in ("effect", "control"):
            value = t.get(key)
            if isinstance(value, str) and value not in names:
                known = ", ".join(names) if names else "none named"
                problems.append((f"specificity[{i}].{key}", f"unknown contrast '{value}' (contrasts: {known})"))
        if isinstance(t.get("effect"), str) and t.get("effect") == t.get("control"):
            problems.append((f"specificity[{i}].control", "must differ from effect"))
        if isinstance(t.get("name"), str) and t["name"] in names:
            problems.append((f"specificity[{i}].name", f"'{t['name']}' is already a contrast's name"))
    if isinstance(specs, list) and has_one:
        for i, t in enumerate(specs):
            problems.append((f"specificity[{i}]", "a specificity test compares two named contrasts: use [[contrasts]]"))
    return problems


def _semantic_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Return the cross-field problems pydantic cannot see, reading the raw tables defensively."""
    problems = _condition_problems(raw) + _contrast_problems(raw)
    axis = _table(raw, "axis")
    fillers = axis.get("fillers") if isinstance(axis.get("fillers"), list) else []
    seen: dict[str, int] = {}
    for i, filler in enumerate(fillers):
        value = filler.get("value") if isinstance(filler, dict) else None
        if isinstance(value, str):
            if value in seen:
                problems.append((f"axis.fillers[{i}].value", f"'{value}' repeats axis.fillers[{seen[value]}]"))
            seen.setdefault(value, i)
    reference = _table(raw, "reference")
    given = [k for k in ("prompt", "image", "scenes") if reference.get(k) is not None]
    if reference and len(given) != 1:
        problems.append(("reference", "give exactly one of 'prompt' (generate the image), 'image' (a file) or "
                                      "'scenes' (several)"))
    scenes = reference.get("scenes") if isinstance(reference.get("scenes"), list) else []
    names: dict[str, int] = {}
    for k, scene in enumerate(scenes):
        if not isinstance(scene, dict):
            continue
        if (scene.get("prompt") is None) == (scene.get("image") is None):
            problems.append((f"reference.scenes[{k}]", "give exactly one of 'prompt' or 'image'"))
        name = scene.get("name", f"scene{k}")
        if name in names:
            problems.append((f"reference.scenes[{k}].name", f"'{name}' repeats reference.scenes[{names[name]}]"))
        names.setdefault(name, k)
    seeds = _table(raw, "probe").get("seed")
    if isinstance(seeds, list) and len(set(map(str, seeds))) < len(seeds):
        problems.append(("probe.seed", "repeats a seed (each seed is a level of the seed factor)"))
    return problems


def parse_spec(text: str, source: str = "<spec>", sets: Sequence[str] = ()) -> Spec:
    """Return the validated ``Spec`` of TOML ``text``; raise ``SpecError`` naming every problem.

    ``sets`` are ``dotted.path=value`` overrides (``--set``) applied to the parsed TOML before
    validation (see ``apply_sets``). Relative paths stay as written: ``load_spec`` resolves them
    against the spec file's folder.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        where = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        if where:
            body = msg[: where.start()].strip()
            raise SpecError(f"{source}:{where.group(1)}:{where.group(2)}", [("", f"TOML syntax error: {body}")]) from None
        raise SpecError(source, [("", f"TOML syntax error: {msg}")]) from None
    return validate_raw(apply_sets(raw, sets, source), source)


def validate_raw(raw: dict[str, Any], source: str = "<spec>") -> Spec:
    """Return the validated ``Spec`` of parsed TOML ``raw``; raise ``SpecError`` naming every problem."""
    problems: list[tuple[str, str]] = []
    spec = None
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        problems += _pydantic_problems(exc)
    problems += _semantic_problems(raw)
    if problems:
        raise SpecError(source, list(dict.fromkeys(problems)))
    assert spec is not None
    return spec


_TYPE_WORDS = {"model_type": "should be a table", "dict_type": "should be a table", "model_attributes_type":
               "should be a table", "list_type": "should be an array", "int_type": "should be an integer",
               "string_type": "should be a string", "float_type": "should be a number", "bool_type":
               "should be true or false", "literal_error": None}


def _is_union_tag(part: Any) -> bool:
    # pydantic names the member of a union it tried: 'str', 'list[str]', 'int', "literal['auto']", ...
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part
                                      or part.startswith(("literal", "constrained", "function-")))


def _pydantic_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """Return pydantic's errors as ``(dotted path, message)``, one per path, in plain TOML words."""
    by_path: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        message = err["msg"]
        if err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] == "extra_forbidden":
            message = "unknown key"
        elif _TYPE_WORDS.get(err["type"]):
            message = _TYPE_WORDS[err["type"]]
        message = re.sub(r"^Input should", "should", message).replace("Value error, ", "")
        message = re.sub(r" or instance of \w+", "", message)
        by_path.setdefault(_loc(loc), [])
        if message not in by_path[_loc(loc)]:
            by_path[_loc(loc)].append(message)
    out = []
    for path, msgs in by_path.items():
        text = msgs[0] + "".join(" or " + re.sub(r"^should be ", "", m) for m in msgs[1:3])
        out.append((path, text))
    return out


MAX_SPEC_BYTES = 1 << 20


def load_spec(path: str | Path, sets: Sequence[str] = ()) -> tuple[Spec, str]:
    """Return the validated spec at ``path`` (``sets`` applied, paths resolved) and its raw text.

    Every relative path in a spec (``output.dir``, ``reference.image``, ``reference.scenes[k].image``)
    is relative to the spec file's folder, wherever otherview is run from; the returned spec holds
    them absolute (see ``resolve_paths``).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(str(path), [("", "no such file")]) from None
    except IsADirectoryError:
        raise SpecError(str(path), [("", "is a directory, not a spec file")]) from None
    except OSError as exc:
        raise SpecError(str(path), [("", f"cannot be read ({exc.strerror or exc})")]) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(str(path), [("", f"larger than {MAX_SPEC_BYTES // 1024} KiB: not a spec")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(str(path), [("", "not UTF-8 text")]) from None
    return resolve_paths(parse_spec(text, str(path), sets), path.parent), text


def _resolve(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_paths(spec: Spec, base: str | Path) -> Spec:
    """Return ``spec`` with ``output.dir`` and every reference image made absolute against folder ``base``.

    Nothing is checked here: an image is opened and checked when the run starts.
    """
    base = Path(base).resolve()
    ref = spec.reference
    update: dict[str, Any] = {}
    if ref.image is not None:
        update["image"] = _resolve(ref.image, base)
    if ref.scenes is not None:
        update["scenes"] = [sc.model_copy(update={"image": _resolve(sc.image, base)}) if sc.image is not None else sc
                            for sc in ref.scenes]
    output = spec.output.model_copy(update={"dir": _resolve(spec.output.dir, base)})
    return spec.model_copy(update={"reference": ref.model_copy(update=update), "output": output})


_SET = re.compile(r"^\s*([A-Za-z0-9_-]+(?:\[\d+\])*(?:\.[A-Za-z0-9_-]+(?:\[\d+\])*)*)\s*=(.*)$", re.S)


def parse_set(assignment: str) -> tuple[list[str | int], Any]:
    """Return the path (keys and array indices) and the value of one ``dotted.path=value`` override.

    The value is read as a TOML literal (``8`` an integer, ``"8"`` a string, ``[2.0, 4.0]`` an array,
    ``true`` a boolean); text that is no TOML literal (``builtin:tiny``) is taken as a string.
    Raise ``ValueError`` for a malformed path.
    """
    m = _SET.match(assignment)
    if not m:
        raise ValueError("should be dotted.path=value (e.g. probe.batch_size=8 or axis.fillers[0].value=\"a cat\")")
    path: list[str | int] = []
    for part in m.group(1).split("."):
        key, *indices = re.split(r"\[", part)
        path.append(key)
        path += [int(i.rstrip("]")) for i in indices]
    text = m.group(2).strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return path, value


def apply_sets(raw: dict[str, Any], sets: Sequence[str | tuple[str, Any]], source: str = "<spec>") -> dict[str, Any]:
    """Return a copy of the parsed TOML ``raw`` with each override of ``sets`` applied, in order.

    An override is ``"dotted.path=value"`` (the value read by ``parse_set``) or a pair
    ``("dotted.path", value)`` whose value is used as given. Missing tables on the way are created;
    array items must exist. Raise ``SpecError`` naming each malformed override (``--set <it>: message``).
    """
    raw = copy.deepcopy(raw)
    problems = []
    for item in sets:
        assignment = item if isinstance(item, str) else f"{item[0]}={item[1]!r}"
        try:
            path, value = parse_set(assignment)
            if not isinstance(item, str):
                path, value = parse_set(f"{item[0]}=0")[0], item[1]
            node: Any = raw
            for k, key in enumerate(path[:-1]):
                nxt = path[k + 1]
                if isinstance(key, int):
                    if not isinstance(node, list) or not -len(node) <= key < len(node):
                        raise ValueError(f"{_loc(tuple(path[:k + 1]))} is not an existing array item")
                elif not isinstance(node, dict):
                    raise ValueError(f"{_loc(tuple(path[:k]))} is not a table")
                elif key not in node:
                    node[key] = [] if isinstance(nxt, int) else {}
                node = node[key]
            last = path[-1]
            if isinstance(last, int):
                if not isinstance(node, list) or not -len(node) <= last < len(node):
                    raise ValueError(f"{_loc(tuple(path))} is not an existing array item")
            elif not isinstance(node, dict):
                raise ValueError(f"{_loc(tuple(path[:-1]))} is not a table")
            node[last] = value
        except ValueError as exc:
            problems.append((f"--set {assignment.strip()}", str(exc)))
    if problems:
        raise SpecError(source, problems)
    return raw


def with_sets(spec: Spec, sets: Sequence[str | tuple[str, Any]], source: str = "<spec>") -> Spec:
    """Return ``spec`` with overrides applied (as ``apply_sets``) and validated again, every check included."""
    if not sets:
        return spec
    return validate_raw(apply_sets(spec.model_dump(mode="json", exclude_none=True), sets, source), source)


def spec_hash(spec: Spec) -> str:
    """Return the SHA-256 of the resolved spec (canonical JSON), the id a run is traced by."""
    canon = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def with_overrides(spec: Spec, overrides: dict[str, Any]) -> Spec:
    """Return ``spec`` with ``{"section.key": value}`` overrides applied (None values are skipped)."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".")
        part = getattr(spec, section).model_copy(update={key: value})
        spec = spec.model_copy(update={section: part})
    return spec


SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of a spec, for editors and validators.

    Generated from the same models as validation, with a description on every field, strict types
    and the cross-field rules a schema can express (exactly one of ``reference.prompt``/``image``/
    ``scenes`` and of a scene's ``prompt``/``image``; ``[contrast]`` or ``[[contrasts]]``; a contrast's
    ``weights`` or ``a`` and ``b``; names in ``[[contrasts]]``; no specificity test with ``[contrast]``;
    condition names; distinct seeds and wordings; known placeholders in ``output.dir``). What only
    ``otherview validate`` checks is listed in the README (and tested in ``tests/test_schema_cli.py``).
    """
    schema = Spec.model_json_schema()
    return {"$schema": SCHEMA_DIALECT, **schema}

