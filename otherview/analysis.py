"""The analyses of a run: every contrast at every captured step level, specificity tests, and replication.

Input: the design and the per-pass values (rows labelled by ``passes.csv``). Each analysis gets the
full per-unit treatment (paired t over items, the sign-flip null, family-wise and FDR p-values,
effect sizes, the axis test) through the same functions, not a copy per contrast. A specificity test
combines two analyses per unit (the minimum-statistic conjunction). The replication breakdown
repeats the paired t, and a sign-flip family-wise p, within each level of each factor.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import inference, stats
from .design import FACTORS, Analysis, Design, SpecificityDef
from .ops.signflip import FlipSplit

# Per-level nulls are many (factor levels x analyses): exact where cheap, else random flips.
LEVEL_EXACT_BUDGET = 1e8  # unit-flips
LEVEL_MIN_FLIPS = 1000


@dataclass
class ContrastResult:
    """One analysis (a contrast at a step level): its differences, t, null and per-unit inference."""

    analysis: Analysis
    label: str
    d: np.ndarray  # (n_items, n_units)
    t: np.ndarray  # (n_units,)
    null: stats.NullSummary
    inf: inference.UnitInference

    @property
    def key(self) -> str:
        return self.analysis.key


@dataclass
class SpecificityResult:
    """Units where the effect AND effect-minus-control pass the family-wise correction with the same sign."""

    test: SpecificityDef
    step: int | None
    key: str
    effect_key: str
    control_key: str
    difference_key: str
    passed: np.ndarray  # (n_units,) bool
    sign: np.ndarray  # (n_units,) int8: +1 where the effect is positive, -1 negative, 0 zero


@dataclass
class LevelResult:
    """One analysis within one level of one replication factor."""

    analysis: str
    factor: str
    level: int
    label: str
    t: np.ndarray  # (n_units,)
    p_fwer: np.ndarray  # (n_units,)
    method: str
    flips: int


@dataclass
class Results:
    contrasts: list[ContrastResult]
    specificity: list[SpecificityResult]
    levels: list[LevelResult]

    def get(self, key: str) -> ContrastResult:
        return next(c for c in self.contrasts if c.key == key)


def conjunction(p_effect: np.ndarray, t_effect: np.ndarray, p_diff: np.ndarray, t_diff: np.ndarray,
                alpha: float) -> np.ndarray:
    """Return the units where both tests pass at ``alpha`` with the same sign (Nichols et al. 2005).

    The minimum-statistic conjunction: a unit is declared when the smaller of its two evidences
    passes, i.e. each test passes its own family-wise threshold. Valid for the conjunction null
    (at least one effect absent), with no assumption of independence between the tests.

    Parameters
    ----------
    p_effect, p_diff : ndarray, shape (n_units,)
        Family-wise p-values of the effect contrast and of effect minus control.
    t_effect, t_diff : ndarray, shape (n_units,)
    alpha : float

    Returns
    -------
    passed : ndarray of bool, shape (n_units,)
    """
    same = np.sign(t_effect) == np.sign(t_diff)
    return (np.asarray(p_effect) <= alpha) & (np.asarray(p_diff) <= alpha) & same & (np.sign(t_effect) != 0)


def fwer_p(inf: inference.UnitInference) -> np.ndarray:
    """Return the family-wise p-values the spec asked for: step-down where it ran, else single-step."""
    return inf.p_step_down if inf.p_step_down is not None else inf.p_fwer


def _contrast(design: Design, rms: np.ndarray, a: Analysis, device: torch.device,
              say: Callable[[str], None], split: FlipSplit | None) -> ContrastResult:
    spec = design.spec
    step_level = design.steps.index(a.step)
    d = design.contrast_d(rms, a.contrast, step_level)
    t = stats.paired_t(d)
    with warnings.catch_warnings():  # the null's notes go to the report and the progress, not to stderr as warnings
        warnings.simplefilter("ignore", RuntimeWarning)
        null = stats.sign_flip_null(d, spec.null.thresholds, spec.null.method, spec.null.flips, spec.null.seed,
                                    spec.null.quantile, device, fwer=spec.null.fwer, alpha=spec.null.alpha,
                                    split=split)
    for note in null.notes:
        say(f"note ({a.key}): {note}")
    inf = inference.infer(d, null, np.asarray(spec.ranks()), spec.null.seed, device=device)
    return ContrastResult(a, design.contrast(a.contrast).label, d, t, null, inf)


def _levels(design: Design, rms: np.ndarray, a: Analysis, device: torch.device,
            split: FlipSplit | None) -> list[LevelResult]:
    spec, out = design.spec, []
    step_level = design.steps.index(a.step)
    for factor, labels in design.levels().items():
        if len(labels) < 2:
            continue
        for level, label in enumerate(labels):
            d = design.contrast_d(rms, a.contrast, step_level, only={factor: level})
            n, u = d.shape
            exact = 2.0 ** max(n - 1, 0) * u <= LEVEL_EXACT_BUDGET
            flips = max(spec.null.flips, LEVEL_MIN_FLIPS)
            with warnings.catch_warnings():  # the per-level floors are stated in the report's table
                warnings.simplefilter("ignore", RuntimeWarning)
                null = stats.sign_flip_null(d, spec.null.thresholds, "exact" if exact else "random", flips,
                                            spec.null.seed, spec.null.quantile, device, fwer="single-step",
                                            alpha=spec.null.alpha, split=split)
            out.append(LevelResult(a.key, factor, level, label, stats.paired_t(d), null.result.p_fwer, null.method,
                                   int(null.result.n_flips)))
    return out


def analyse(design: Design, rms: np.ndarray, device: torch.device | str = "cpu",
            progress: Callable[[str], None] | None = None, split: FlipSplit | None = None) -> Results:
    """Return every analysis of ``design`` on per-pass values ``rms`` (shape (n_rows, n_units)).

    ``split``: every sign-flip null's flips are shared among processes that all call this with the
    same ``rms`` (``otherview.distributed``); each gets the same, whole-null results.
    """
    device = torch.device(device)
    say = progress or (lambda _: None)
    contrasts, levels = [], []
    for a in design.analyses:
        say(f"contrast {a.key}: sign-flip null ({design.spec.null.method}) and per-unit inference")
        contrasts.append(_contrast(design, rms, a, device, say, split))
        if design.contrast(a.contrast).derived_from is None:
            levels += _levels(design, rms, a, device, split)
    by_key = {c.key: c for c in contrasts}
    tests = []
    alpha = design.spec.null.alpha
    for t in design.specificity:
        for step in design.steps:
            suffix = "" if step is None else f".step{step}"
            e, diff = by_key[t.effect + suffix], by_key[t.difference + suffix]
            passed = conjunction(fwer_p(e.inf), e.t, fwer_p(diff.inf), diff.t, alpha)
            tests.append(SpecificityResult(t, step, t.name + suffix, e.key, t.control + suffix, diff.key, passed,
                                           np.sign(e.t).astype(np.int8)))
    return Results(contrasts, tests, levels)


def consistency(levels: list[LevelResult], result: ContrastResult, factor: str, alpha: float) -> dict:
    """Return how consistent ``result``'s units are across the levels of ``factor``.

    ``sign_agreement``: among units significant overall (family-wise), the share whose t has the
    same sign in every level; ``significant_in_every_level``: units with family-wise p <= alpha
    within every level and the same sign as overall.
    """
    rows = [lv for lv in levels if lv.analysis == result.key and lv.factor == factor]
    if not rows:
        return {}
    sig = fwer_p(result.inf) <= alpha
    signs = np.stack([np.sign(lv.t) for lv in rows])
    same = (signs == np.sign(result.t)[None]).all(axis=0)
    every = ((np.stack([lv.p_fwer for lv in rows]) <= alpha).all(axis=0)) & same
    return {"factor": factor, "levels": [lv.label for lv in rows], "significant_overall": int(sig.sum()),
            "sign_agreement": float(same[sig].mean()) if sig.any() else None,
            "significant_in_every_level": int(every.sum()),
            "per_level_significant": [int((lv.p_fwer <= alpha).sum()) for lv in rows],
            "per_level_max_abs_t": [float(np.abs(lv.t).max()) for lv in rows],
            "per_level_flips": [lv.flips for lv in rows], "per_level_method": [lv.method for lv in rows]}


__all__ = ["FACTORS", "ContrastResult", "LevelResult", "Results", "SpecificityResult", "analyse", "conjunction",
           "consistency"]
