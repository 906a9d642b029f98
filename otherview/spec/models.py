"""The spec's sections as pydantic v2 models: every key, its type, default, bounds and description.

``Spec`` is the whole spec; each section is a frozen, strict model that forbids unknown keys. Only
what one field can say about itself is checked here; rules across fields and sections are in
``otherview.spec.rules``, and reading a file into a ``Spec`` is ``otherview.spec.load``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
