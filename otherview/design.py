"""The design: a validated spec as conditions x factors -> passes, and contrasts as weights over conditions.

A probe runs every condition for every item (filler) at every level of the replication factors:
reference scene, probe seed and wording. Each such cell is one probe pass; a pass shared by several
contrasts runs once. Contrasts are zero-sum weight vectors over conditions; a specificity test adds
the difference of its effect and control contrasts. Each contrast is analysed at each captured step
level (the steps' mean, or every step apart): that pair is an ``Analysis``.

The items are the unit of inference: an item's contrast value averages its weighted condition values
over scenes, seeds and wordings (Clark 1973; Judd, Westfall & Kenny 2012: this licenses claims about
new items for these scenes, seeds and wordings, not about new scenes or wordings, which the per-level
breakdown addresses descriptively).

Nothing here touches a model; ``Design`` is read by the plan, the interpreter, the statistics and the
report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .spec import Filler, Scene, Spec

FACTORS = ("scene", "seed", "wording")  # replication factors, in the axis order of the value array
MAX_PASSES = 200_000
EXACT_MAX_PAIRS = 40  # as ops.signflip: 2^39 flips


class DesignError(Exception):
    """A spec whose design cannot answer its question: ``(dotted path, message)`` per problem."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in problems))


@dataclass(frozen=True)
class ProbePass:
    """One transformer pass: a condition's prompt for one item, scene, seed and wording."""

    index: int
    condition: str
    item: int  # index into the axis fillers
    scene: int  # index into the scenes
    seed: int  # the probe seed's value
    seed_level: int  # its index among the probe seeds
    wording: int  # index of the condition's template
    prompt: str

    @property
    def filler_index(self) -> int:  # the name older callers use
        return self.item


@dataclass(frozen=True)
class ContrastDef:
    """A contrast: its name, how it reads, and its weight per condition (design order)."""

    name: str
    label: str
    weights: tuple[float, ...]
    derived_from: tuple[str, str] | None = None  # (effect, control) for a specificity difference
    path: str = ""  # where the spec defines it: "contrast" or "contrasts[i]"


@dataclass(frozen=True)
class SpecificityDef:
    """X beyond a control: ``effect`` and ``difference`` (= effect - control) both significant, same sign."""

    name: str
    effect: str
    control: str
    difference: str


@dataclass(frozen=True)
class Analysis:
    """One contrast at one captured step level (``step`` None: the mean over steps)."""

    contrast: str
    step: int | None
    key: str  # unique, file-safe: "<contrast>" or "<contrast>.step<k>"


@dataclass
class Design:
    """Conditions x items x scenes x seeds x wordings -> passes; contrasts as weights; analyses."""

    spec: Spec
    conditions: list[str]
    items: list[Filler]
    scenes: list[Scene]
    seeds: list[int]
    n_wordings: int
    steps: list[int | None]  # captured step levels: [None] (mean) or 0..S-1
    passes: list[ProbePass]
    contrasts: list[ContrastDef]
    specificity: list[SpecificityDef]
    cell: np.ndarray = field(repr=False)  # int (C, N, S, E, W): pass index of each cell

    @property
    def shape(self) -> tuple[int, ...]:
        """Return (conditions, items, scenes, seeds, wordings)."""
        return tuple(self.cell.shape)

    @property
    def n_rows(self) -> int:
        """Rows of the per-pass arrays: one per pass and captured step level."""
        return len(self.passes) * len(self.steps)

    def contrast(self, name: str) -> ContrastDef:
        """Return the contrast called ``name``."""
        for c in self.contrasts:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def analyses(self) -> list[Analysis]:
        """Return every (contrast, step level) analysed, contrasts first."""
        out = []
        for c in self.contrasts:
            for k in self.steps:
                key = c.name if k is None else f"{c.name}.step{k}"
                out.append(Analysis(c.name, k, key))
        return out

    def levels(self) -> dict[str, list[str]]:
        """Return the level labels of each replication factor."""
        return {"scene": [s.name for s in self.scenes], "seed": [str(s) for s in self.seeds],
                "wording": [f"wording{w}" for w in range(self.n_wordings)]}

    def row(self, pass_index: int, step_level: int) -> int:
        """Return the row of the per-pass arrays holding ``pass_index`` at captured step level ``step_level``."""
        return pass_index * len(self.steps) + step_level

    def values(self, rms: np.ndarray) -> np.ndarray:
        """Return the per-pass values arranged by cell.

        Parameters
        ----------
        rms : ndarray, shape (n_rows, n_units)
            Per-pass values, row ``pass * n_step_levels + step_level``.

        Returns
        -------
        values : ndarray, shape (C, N, S, E, W, K, n_units), float64
            Conditions, items, scenes, seeds, wordings, step levels.
        """
        rms = np.asarray(rms, dtype=np.float64)
        k = len(self.steps)
        if rms.ndim != 2 or rms.shape[0] != self.n_rows:
            raise ValueError(f"rms: expected {self.n_rows} rows (passes x step levels), got shape {rms.shape}")
        by_pass = rms.reshape(len(self.passes), k, rms.shape[1])
        return by_pass[self.cell]

    def contrast_d(self, rms: np.ndarray, contrast: str, step_level: int = 0,
                   only: dict[str, int] | None = None) -> np.ndarray:
        """Return the contrast's value per item and unit, averaged over the replication factors.

        d[i, u] = mean over scenes, seeds and wordings of sum_c w_c v[c, i, ...]. ``only`` restricts a
        factor to one level (``{"scene": 2}``): the per-level breakdown.

        Returns
        -------
        d : ndarray, shape (n_items, n_units), float64
        """
        v = self.values(rms)[:, :, :, :, :, step_level]  # (C, N, S, E, W, U)
        for axis, factor in enumerate(FACTORS, start=2):
            if only and factor in only:
                v = np.take(v, [only[factor]], axis=axis)
        w = np.asarray(self.contrast(contrast).weights)
        mixed = np.tensordot(w, v, axes=(0, 0))  # (N, S, E, W, U)
        return mixed.mean(axis=(1, 2, 3))


def _render_problems(spec: Spec, conditions: list[str], contrasts: list[ContrastDef], n_wordings: int) -> list:
    """Return a problem for each contrast whose conditions render identically for some item and wording."""
    problems = []
    for c in contrasts:
        if c.derived_from is not None:
            continue
        used = [(conditions[k], w) for k, w in enumerate(c.weights) if w != 0]
        for i, filler in enumerate(spec.axis.fillers):
            for wording in range(n_wordings):
                sums: dict[str, float] = {}
                for cond, w in used:
                    prompt = spec.prompt(cond, filler, wording)
                    sums[prompt] = sums.get(prompt, 0.0) + w
                if all(abs(s) < 1e-12 for s in sums.values()):
                    prompt = next(iter(sums))
                    where = f" (wording {wording})" if n_wordings > 1 else ""
                    problems.append((c.path, f"contrast '{c.name}': its conditions render identically for item "
                                     f"'{filler.value}'{where}: \"{prompt}\"; the contrast would be 0 by construction"))
                    break
            else:
                continue
            break
    return problems


def min_attainable_p(method: str, n_items: int, flips: int) -> float:
    """Return the smallest p-value a sign-flip null can give (uncorrected and max-statistic alike).

    Exact: 1 / 2^(N-1) (a pattern and its negation give the same |t|). Random: 1 / flips, but never
    below the exact floor (there are no more distinct patterns). ``auto`` is taken as exact, the
    finest it can resolve to.
    """
    exact = 2.0 ** -max(n_items - 1, 0)
    if method == "random":
        return max(exact, 1.0 / flips)
    return exact


def _null_problems(spec: Spec) -> list[tuple[str, str]]:
    n, alpha = len(spec.axis.fillers), spec.null.alpha
    problems = []
    floor = min_attainable_p(spec.null.method, n, spec.null.flips)
    if floor > alpha:
        exact = 2.0 ** -max(n - 1, 0)
        if exact > alpha:
            problems.append(("axis.fillers", f"{n} item(s) give at most 2^{max(n - 1, 0)} = {2 ** max(n - 1, 0):,} "
                             f"distinct sign flips: the smallest attainable p is {exact:.3g} > alpha {alpha:g}, so "
                             f"nothing could ever be significant; add items (at least "
                             f"{int(np.ceil(np.log2(1 / alpha))) + 1})"))
        else:
            problems.append(("null.flips", f"{spec.null.flips:,} random flips give a smallest p of {floor:.3g} > "
                             f"alpha {alpha:g}; use at least {int(np.ceil(1 / alpha)):,} flips"))
    if spec.null.method == "exact" and n > EXACT_MAX_PAIRS:
        problems.append(("null.method", f"exact enumerates 2^(N-1) flips and accepts at most {EXACT_MAX_PAIRS} "
                         f"items; this design has {n}: use method = \"random\" (or \"auto\")"))
    return problems


def _contrast_defs(spec: Spec, conditions: list[str]) -> tuple[list[ContrastDef], list[SpecificityDef]]:
    contrasts = []
    for i, c in enumerate(spec.contrast_list()):
        weights = c.weight_map()
        path = "contrast" if spec.contrasts is None else f"contrasts[{i}]"
        contrasts.append(ContrastDef(c.name, c.label(), tuple(float(weights.get(k, 0.0)) for k in conditions),
                                     path=path))
    tests = []
    by_name = {c.name: c for c in contrasts}
    for t in spec.specificity:
        e, c = by_name[t.effect], by_name[t.control]
        diff = tuple(a - b for a, b in zip(e.weights, c.weights))
        same = next((x for x in contrasts if x.weights == diff), None)
        if same is None:
            name = f"{t.effect}_minus_{t.control}"
            while name in by_name:
                name += "_"
            same = ContrastDef(name, f"({e.label}) − ({c.label})", diff, derived_from=(t.effect, t.control))
            contrasts.append(same)
            by_name[name] = same
        tests.append(SpecificityDef(t.name, t.effect, t.control, same.name))
    return contrasts, tests


def build_design(spec: Spec) -> Design:
    """Return the design of ``spec``; raise ``DesignError`` naming every problem that makes it unable to answer.

    Checks what the spec's schema cannot: a contrast whose conditions render identically for some
    item (it is 0 by construction), a null that cannot reach p <= alpha, a specificity test whose
    effect and control are the same contrast, and the design's size.
    """
    conditions = list(spec.conditions)
    n_wordings = len(spec.templates(conditions[0]))
    scenes = spec.reference.scene_list()
    seeds = spec.probe.seeds()
    steps: list[int | None] = list(range(spec.probe.steps)) if spec.probe.capture_steps == "each" else [None]
    contrasts, tests = _contrast_defs(spec, conditions)
    problems = _render_problems(spec, conditions, contrasts, n_wordings) + _null_problems(spec)
    for t in tests:
        if not any(contrasts[[c.name for c in contrasts].index(t.difference)].weights):
            problems.append(("specificity", f"'{t.name}': effect '{t.effect}' and control '{t.control}' have the same "
                             "weights: their difference is 0"))
    n = len(spec.axis.fillers)
    shape = (len(conditions), n, len(scenes), len(seeds), n_wordings)
    total = int(np.prod(shape))
    if total > MAX_PASSES:
        problems.append(("", f"the design has {total:,} probe passes ({' x '.join(map(str, shape))} conditions x items "
                         f"x scenes x seeds x wordings), more than {MAX_PASSES:,}: split it into several specs"))
    if problems:
        raise DesignError(problems)
    cell = np.empty(shape, dtype=np.int64)
    passes = []
    for ci, cond in enumerate(conditions):
        for i, filler in enumerate(spec.axis.fillers):
            for si in range(len(scenes)):
                for ei, seed in enumerate(seeds):
                    for w in range(n_wordings):
                        cell[ci, i, si, ei, w] = len(passes)
                        passes.append(ProbePass(len(passes), cond, i, si, seed, ei, w, spec.prompt(cond, filler, w)))
    return Design(spec=spec, conditions=conditions, items=list(spec.axis.fillers), scenes=scenes, seeds=seeds,
                  n_wordings=n_wordings, steps=steps, passes=passes, contrasts=contrasts, specificity=tests, cell=cell)
