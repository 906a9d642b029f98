"""The spec language: TOML text -> validated ``Spec`` (pydantic v2), with every user error collected.

A spec describes one paired-prompt probe: the model, a fixed reference image, prompt templates over
one slot axis (the fillers, each with covariates), the contrast that forms a pair, the probe-pass
settings, what to capture, the null, and where the run goes. Unknown keys are errors. Errors are
reported as ``file: dotted.path: message``, all at once (see ``SpecError``).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

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


class Experiment(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
    description: str = ""


class ModelSpec(_Strict):
    """Where the weights come from: a hub id, a local folder, or ``builtin:tiny`` / ``builtin:klein-4b``."""

    source: str = "black-forest-labs/FLUX.2-klein-base-4B"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = "auto"
    max_sequence_length: Annotated[int, Field(gt=0, le=4096)] = 512
    text_encoder_out_layers: list[Annotated[int, Field(ge=0)]] | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError("should be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return v


class Scene(_Strict):
    """One reference scene: an image generated from ``prompt`` (with its own seed) or read from ``image``."""

    name: Annotated[str, Field(pattern=NAME)] | None = None
    prompt: Annotated[str, Field(min_length=1)] | None = None
    image: Annotated[str, Field(min_length=1)] | None = None
    seed: Seed | None = None  # default: reference.seed


class Reference(_Strict):
    """The fixed reference image(s) every probe pass is conditioned on (generated once, or a file).

    One scene (``prompt`` or ``image``) or several (``scenes``); scenes are a replication factor.
    """

    prompt: Annotated[str, Field(min_length=1)] | None = None
    image: Annotated[str, Field(min_length=1)] | None = None
    scenes: Annotated[list[Scene], Field(min_length=1, max_length=64)] | None = None
    steps: Annotated[int, Field(gt=0, le=1000)] = 14
    guidance_scale: Annotated[float, Field(ge=0, le=100)] = 4.0
    seed: Seed = 0
    height: Annotated[int, Field(gt=0, le=4096)] = 1024
    width: Annotated[int, Field(gt=0, le=4096)] = 1024

    def scene_list(self) -> list[Scene]:
        """Return the scenes, each with its name and seed filled in (one scene for ``prompt``/``image``)."""
        if self.scenes is None:
            return [Scene(name="scene", prompt=self.prompt, image=self.image, seed=self.seed)]
        return [Scene(name=sc.name or f"scene{k}", prompt=sc.prompt, image=sc.image,
                      seed=self.seed if sc.seed is None else sc.seed) for k, sc in enumerate(self.scenes)]


class Filler(_Strict):
    """One value of the slot axis (a creature), with its covariates."""

    value: Annotated[str, Field(min_length=1)]
    rank: Annotated[float, Field(ge=-1e12, le=1e12)] | None = None
    group: str = ""
    source: str = ""


class Axis(_Strict):
    """An ordered axis of fillers for one slot of the prompt templates."""

    name: Annotated[str, Field(min_length=1)] = "filler"
    slot: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    fillers: Annotated[list[Filler], Field(min_length=1, max_length=4096)]


class Contrast(_Strict):
    """A contrast: a zero-sum weight per condition; d per item = sum of weight x condition value.

    Give ``weights`` (``{viewpoint = 1, mention = -1}``), or ``a`` and ``b`` as shorthand for
    ``{a = 1, b = -1}``. ``name`` is required in ``[[contrasts]]``; the single ``[contrast]`` table of
    the founding card may omit it.
    """

    name: Annotated[str, Field(pattern=NAME)] | None = None
    a: str | None = None
    b: str | None = None
    weights: dict[str, Annotated[float, Field(ge=-1e6, le=1e6)]] | None = None

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

    name: Annotated[str, Field(pattern=NAME)]
    effect: str
    control: str


class Probe(_Strict):
    steps: Annotated[int, Field(gt=0, le=1000)] = 1
    guidance_scale: Annotated[float, Field(ge=0, le=100)] = 1.0
    # One seed, or several (a replication factor): every pass of a seed starts from the same noise.
    seed: Seed | Annotated[list[Seed], Field(min_length=1, max_length=64)] = 0
    batch_size: Literal["auto"] | Annotated[int, Field(gt=0, le=4096)] = "auto"
    # "mean": each unit's value averages the steps; "each": every step is captured apart and
    # analysed in its own section (a multi-step probe)
    capture_steps: Literal["mean", "each"] = "mean"

    def seeds(self) -> list[int]:
        """Return the probe seeds as a list."""
        return list(self.seed) if isinstance(self.seed, list) else [self.seed]


class Capture(_Strict):
    """Which projections are hooked, how channels group into units, and which tokens count."""

    sites: Annotated[list[str], Field(min_length=1)] = [
        "transformer_blocks.*.attn.to_out.0",
        "single_transformer_blocks.*.attn.to_out",
    ]
    # channels per unit, or "head": the model's head width (the rest of a single-stream input is
    # then labelled as MLP channel groups of the same width)
    unit_width: Literal["head"] | Annotated[int, Field(gt=0, le=65536)] = 16
    # "prompt": the text stream's real tokens only (each prompt's own length, padding excluded)
    tokens: Literal["all", "text", "prompt", "image", "target", "reference"] = "all"


class Null(_Strict):
    method: Literal["auto", "exact", "random"] = "auto"
    flips: Annotated[int, Field(gt=0, le=10**9)] = 10_000
    seed: Seed = 0
    thresholds: Annotated[list[Annotated[float, Field(gt=0, le=1e6)]], Field(min_length=1, max_length=16)] = [3.0, 5.0]
    quantile: Annotated[float, Field(gt=0, lt=1)] = 0.99
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05  # significance level of every corrected test
    # family-wise p: Westfall & Young's max-|t| single-step, or step-down (rejects at least as much;
    # extra passes over the same flips)
    fwer: Literal["step-down", "single-step"] = "step-down"


class Runtime(_Strict):
    """Speed settings. Defaults are the fastest that keep the numbers right (no fp8, no quantisation)."""

    compile: Literal["auto", "on", "off"] = "auto"  # auto: torch.compile the transformer on CUDA
    compile_backend: Annotated[str, Field(min_length=1)] = "inductor"  # a torch.compile backend
    attention_backend: Annotated[str, Field(min_length=1)] = "default"  # a diffusers AttentionBackendName
    capture_kernel: Literal["auto", "compiled", "reference"] = "auto"
    # "auto": a CUDA side stream in eager mode (the reduction overlaps the projection), inline
    # under torch.compile (the capture op is part of the compiled graph)
    capture_stream: Literal["auto", "inline", "side"] = "auto"


class Output(_Strict):
    dir: str = "runs/{name}"


class Spec(_Strict):
    """A validated probe spec."""

    experiment: Experiment
    model: ModelSpec = ModelSpec()
    reference: Reference
    axis: Axis
    # condition name -> one template, or several wordings (paired by position across conditions)
    conditions: Annotated[dict[str, str | Annotated[list[str], Field(min_length=1, max_length=64)]],
                          Field(min_length=2, max_length=64)]
    contrast: Contrast | None = None  # the founding card's single contrast (shorthand)
    contrasts: Annotated[list[Contrast], Field(min_length=1, max_length=64)] | None = None
    specificity: Annotated[list[Specificity], Field(max_length=64)] = []
    probe: Probe = Probe()
    capture: Capture = Capture()
    null: Null = Null()
    runtime: Runtime = Runtime()
    output: Output = Output()

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


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    """Return the validated ``Spec`` of TOML ``text``; raise ``SpecError`` naming every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        where = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        if where:
            body = msg[: where.start()].strip()
            raise SpecError(f"{source}:{where.group(1)}:{where.group(2)}", [("", f"TOML syntax error: {body}")]) from None
        raise SpecError(source, [("", f"TOML syntax error: {msg}")]) from None
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


def load_spec(path: str | Path) -> tuple[Spec, str]:
    """Return the validated spec at ``path`` and its raw text."""
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
    return parse_spec(text, str(path)), text


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


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema of the spec, for editors."""
    return Spec.model_json_schema()
