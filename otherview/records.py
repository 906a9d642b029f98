"""Typed records of a run directory's JSON files: ``manifest.json`` and ``summary.json``.

The writers (``interpreter``, ``summary``) produce plain dicts; these pydantic models say what those
dicts hold and check it when a run is loaded (``otherview.load_run``), so the Python API, the report
and the figures can rely on one structure. Records accept keys they do not know (a newer writer may
add some) but reject missing or mistyped ones. ``summary.json`` carries ``schema_version``; a run of
another version is refused with a message that says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .summary import SCHEMA_VERSION


class RunFormatError(Exception):
    """A run directory whose files are missing, unreadable or not of this otherview's format."""

    def __init__(self, path: str | Path, problems: list[tuple[str, str]]):
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}: {m}" if p else f"{self.path}: {m}" for p, m in problems))


class _Record(BaseModel):
    # extra keys pass (a newer writer may add some); what is declared must be there and typed
    model_config = ConfigDict(extra="allow", frozen=True)


# --- manifest.json ----------------------------------------------------------------------------------
class ManifestRecord(_Record):
    """What produced a run: the spec (raw and resolved), seeds, versions, device, status and timings."""

    status: Literal["running", "failed", "complete"]
    started: str
    finished: str | None = None
    error: str | None = None
    spec_path: str | None = None
    spec_text: str
    spec: dict[str, Any] = Field(description="The resolved spec (every default filled, paths absolute).")
    spec_hash: str
    overrides: list[str] = Field([], description="The --set assignments applied before validation.")
    layout_id: str | None = None
    random_weights: bool
    model: dict[str, Any]
    seeds: dict[str, Any]
    resolution: list[int]
    resolution_note: str = ""
    versions: dict[str, str | None]
    git_sha: str | None = None
    device: dict[str, Any]
    phases: dict[str, float] = {}
    batch_size: int | None = None
    runtime: dict[str, Any] | None = None
    null: dict[str, Any] | None = None
    peak_gpu_memory_gib: float | None = None
    memory: dict[str, Any] | None = Field(None, description="The memory plan: placement, budget, encode chunk, probe "
                                          "batch, estimated and (on CUDA) measured peak.")


# --- summary.json -----------------------------------------------------------------------------------
class SiteRecord(_Record):
    """One captured projection of the layout."""

    name: str
    label: str
    stream: Literal["double", "single"]
    block: int
    stream_kind: Literal["image", "text", "joint"]
    unit_offset: int
    n_units: int
    attention_units: int
    counted_tokens: int
    tokens: int


class LayoutRecord(_Record):
    """The unit layout; ``id`` is equal for two runs exactly when their units match index by index."""

    id: str
    architecture: str
    unit_width: int
    tokens: str
    text_tokens: int
    target_tokens: int
    reference_tokens: int
    sites: list[SiteRecord]


class UnitRecord(_Record):
    """One unit with its statistics in one analysis (channels half-open, head None for MLP units)."""

    unit: int
    site: str
    label: str
    stream_kind: Literal["image", "text", "joint"]
    kind: Literal["attention", "mlp"]
    head: int | None
    subgroup: int
    channel_start: int
    channel_end: int
    channels: str
    t: float
    mean_d: float
    d_z: float
    d_z_low: float
    d_z_high: float
    p_uncorrected: float
    p_fwer: float
    q: float
    axis_rho: float
    axis_p: float
    axis_p_fwer: float
    axis_q: float


class CardRow(_Record):
    """One row of the card's table (a threshold count, or the last row: max |t|)."""

    metric: str
    threshold: float | None
    observed: float
    fraction: float | None
    null_mean: float
    null_q: float
    ratio: float | None


class GroupRow(_Record):
    """Counts over a group of units (a site, a stream, a kind, all); ``over_<c>`` per threshold c."""

    group: str
    units: int
    fwer: int
    fdr: int
    axis_fwer: int
    axis_fdr: int
    max_abs_t: float
    top_unit: int | None = None


class SiteGroupRow(GroupRow):
    """A site's group row, with where the site sits."""

    site: str
    label: str
    stream: str
    block: int
    stream_kind: Literal["image", "text", "joint"]
    attention_units: int


class Groups(_Record):
    sites: list[SiteGroupRow]
    streams: list[GroupRow]
    kinds: list[GroupRow]
    stream_kinds: list[GroupRow]
    all: list[GroupRow]


class TopCluster(_Record):
    label: str | None
    count: int
    of: int
    expected: float


class AxisRecord(_Record):
    """The axis test of one analysis: Spearman's rho of d with the fillers' ranks, and its null."""

    name: str
    fillers: list[str]
    ranks: list[float]
    n_permutations: int
    exact: bool
    seed: int
    max_null_q: float
    top_units: list[UnitRecord]


class NullRecord(_Record):
    method: str
    exact: bool
    flips: int
    seed: int
    quantile: float
    thresholds: list[float]


class AnalysisRecord(_Record):
    """One analysis: a contrast at one captured step level (``step`` None: the steps' mean)."""

    key: str
    contrast: str
    label: str
    step: int | None
    derived_from: list[str] | None
    card_table: list[CardRow]
    groups: Groups
    strongest_block: SiteGroupRow | None
    top_cluster: TopCluster
    top_units: list[UnitRecord]
    axis: AxisRecord
    null: NullRecord


class SpecificityUnit(UnitRecord):
    t_control: float
    t_difference: float
    p_fwer_difference: float


class SpecificityRecord(_Record):
    """One specificity test: units responding to the effect beyond the control (conjunction)."""

    name: str
    key: str
    step: int | None
    effect: str
    control: str
    difference: str
    effect_label: str
    control_label: str
    difference_label: str
    passed: int
    positive: int
    negative: int
    effect_significant: int
    control_significant: int
    effect_not_specific: int
    sites: list[dict[str, Any]]
    top_units: list[SpecificityUnit]


class ContrastRecord(_Record):
    name: str
    label: str
    weights: dict[str, float]
    derived_from: list[str] | None


class SceneRecord(_Record):
    name: str
    prompt: str | None
    image: str | None
    seed: int


class DesignRecord(_Record):
    conditions: list[str]
    templates: dict[str, list[str]]
    contrasts: list[ContrastRecord]
    scenes: list[SceneRecord]
    seeds: list[int]
    wordings: int
    steps: list[int | None]
    passes: int


class ReplicationRecord(_Record):
    analysis: str
    label: str
    factors: list[dict[str, Any]]


class SummaryRecord(_Record):
    """``summary.json``: the run's results as data (what the report renders)."""

    schema_version: int
    experiment: str
    n_pairs: int
    n_items: int
    n_units: int
    alpha: float
    ci_level: float
    layout: LayoutRecord
    design: DesignRecord
    analyses: list[AnalysisRecord]
    specificity: list[SpecificityRecord]
    replication: list[ReplicationRecord]
    warnings: list[str]
    random_weights: bool = False

    def analysis(self, key: str) -> AnalysisRecord:
        """Return the analysis ``key`` (a contrast name, or ``<contrast>.step<k>``)."""
        for a in self.analyses:
            if a.key == key:
                return a
        raise KeyError(f"no analysis '{key}' (analyses: {', '.join(a.key for a in self.analyses)})")


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        path = ""
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else ("." if path else "") + str(part)
        out.append((path, err["msg"]))
    return out


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFormatError(path.parent, [(path.name, "missing: is this a run directory?")]) from None
    except (OSError, ValueError) as exc:
        raise RunFormatError(path.parent, [(path.name, f"unreadable ({exc})")]) from None


def read_manifest(run_dir: str | Path) -> ManifestRecord:
    """Return the run's ``manifest.json`` as a checked record; raise ``RunFormatError`` naming what is wrong."""
    path = Path(run_dir) / "manifest.json"
    try:
        return ManifestRecord.model_validate(_read(path))
    except ValidationError as exc:
        raise RunFormatError(run_dir, [(f"manifest.json: {p}", m) for p, m in _problems(exc)]) from None


def read_summary(run_dir: str | Path) -> SummaryRecord:
    """Return the run's ``summary.json`` as a checked record (this schema version only)."""
    path = Path(run_dir) / "summary.json"
    raw = _read(path)
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise RunFormatError(run_dir, [("summary.json", f"schema version {version}, this otherview reads "
                                        f"{SCHEMA_VERSION}: re-run `otherview exec` to write this version")])
    try:
        return SummaryRecord.model_validate(raw)
    except ValidationError as exc:
        raise RunFormatError(run_dir, [(f"summary.json: {p}", m) for p, m in _problems(exc)]) from None
