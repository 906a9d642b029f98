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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Experiment(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
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


class Reference(_Strict):
    """The fixed reference image every probe pass is conditioned on (generated once, or a file)."""

    prompt: str | None = None
    image: str | None = None
    steps: Annotated[int, Field(gt=0, le=1000)] = 14
    guidance_scale: Annotated[float, Field(ge=0)] = 4.0
    seed: Annotated[int, Field(ge=0)] = 0
    height: Annotated[int, Field(gt=0, le=4096)] = 1024
    width: Annotated[int, Field(gt=0, le=4096)] = 1024


class Filler(_Strict):
    """One value of the slot axis (a creature), with its covariates."""

    value: Annotated[str, Field(min_length=1)]
    rank: float | None = None
    group: str = ""
    source: str = ""


class Axis(_Strict):
    """An ordered axis of fillers for one slot of the prompt templates."""

    name: Annotated[str, Field(min_length=1)] = "filler"
    slot: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    fillers: Annotated[list[Filler], Field(min_length=1)]


class Contrast(_Strict):
    """The pair: d = a - b per filler."""

    a: str
    b: str


class Probe(_Strict):
    steps: Annotated[int, Field(gt=0, le=1000)] = 1
    guidance_scale: Annotated[float, Field(ge=0)] = 1.0
    seed: Annotated[int, Field(ge=0)] = 0
    batch_size: Literal["auto"] | Annotated[int, Field(gt=0)] = "auto"


class Capture(_Strict):
    """Which projections are hooked, how channels group into units, and which tokens count."""

    sites: Annotated[list[str], Field(min_length=1)] = [
        "transformer_blocks.*.attn.to_out.0",
        "single_transformer_blocks.*.attn.to_out",
    ]
    unit_width: Annotated[int, Field(gt=0)] = 16
    tokens: Literal["all", "text", "image", "target", "reference"] = "all"


class Null(_Strict):
    method: Literal["auto", "exact", "random"] = "auto"
    flips: Annotated[int, Field(gt=0)] = 10_000
    seed: Annotated[int, Field(ge=0)] = 0
    thresholds: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = [3.0, 5.0]
    quantile: Annotated[float, Field(gt=0, lt=1)] = 0.99


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
    conditions: Annotated[dict[str, str], Field(min_length=2)]
    contrast: Contrast
    probe: Probe = Probe()
    capture: Capture = Capture()
    null: Null = Null()
    runtime: Runtime = Runtime()
    output: Output = Output()

    def prompt(self, condition: str, filler: Filler) -> str:
        """Return the prompt of ``condition`` with the axis slot filled by ``filler``."""
        return self.conditions[condition].replace("{" + self.axis.slot + "}", filler.value)

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
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc})") from None


def _semantic_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Return the cross-field problems pydantic cannot see, reading the raw tables defensively."""
    problems: list[tuple[str, str]] = []
    conditions = raw.get("conditions") if isinstance(raw.get("conditions"), dict) else {}
    axis = raw.get("axis") if isinstance(raw.get("axis"), dict) else {}
    slot = axis.get("slot") if isinstance(axis.get("slot"), str) else None
    for name, template in conditions.items():
        if not isinstance(template, str):
            continue
        try:
            slots = _template_slots(template)
        except ValueError as exc:
            problems.append((f"conditions.{name}", str(exc)))
            continue
        if slot is not None and slot not in slots:
            problems.append((f"conditions.{name}", f"template never uses the axis slot {{{slot}}}"))
        for other in sorted(set(slots) - {slot}):
            if slot is not None:
                problems.append((f"conditions.{name}", f"unknown slot {{{other}}} (the axis slot is {{{slot}}})"))
    contrast = raw.get("contrast") if isinstance(raw.get("contrast"), dict) else {}
    for side in ("a", "b"):
        value = contrast.get(side)
        if isinstance(value, str) and conditions and value not in conditions:
            known = ", ".join(sorted(conditions))
            problems.append((f"contrast.{side}", f"unknown condition '{value}' (known: {known})"))
    if isinstance(contrast.get("a"), str) and contrast.get("a") == contrast.get("b"):
        problems.append(("contrast.b", "must differ from contrast.a"))
    fillers = axis.get("fillers") if isinstance(axis.get("fillers"), list) else []
    seen: dict[str, int] = {}
    for i, filler in enumerate(fillers):
        value = filler.get("value") if isinstance(filler, dict) else None
        if isinstance(value, str):
            if value in seen:
                problems.append((f"axis.fillers[{i}].value", f"'{value}' repeats axis.fillers[{seen[value]}]"))
            seen.setdefault(value, i)
    reference = raw.get("reference") if isinstance(raw.get("reference"), dict) else {}
    if reference and (reference.get("prompt") is None) == (reference.get("image") is None):
        problems.append(("reference", "give exactly one of 'prompt' (generate the image) or 'image' (a file)"))
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
        for err in exc.errors(include_url=False):
            message = err["msg"]
            if err["type"] == "missing":
                message = "required key is missing"
            elif err["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append((_loc(err["loc"]), message))
    problems += _semantic_problems(raw)
    if problems:
        raise SpecError(source, problems)
    assert spec is not None
    return spec


def load_spec(path: str | Path) -> tuple[Spec, str]:
    """Return the validated spec at ``path`` and its raw text."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), [("", "no such file")]) from None
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
