"""Statistics: paired differences, the paired t per unit, and the sign-flip null (after MNE-Python).

The null goes through ``otherview.ops.signflip.signflip_null`` (compiled op, or its plain-PyTorch
reference). Under sign flips the sum of squares of each unit's differences is invariant, so a flipped
t is a monotone function of the flipped sum; the observed labelling is part of the null, so no
p-value is 0 (Good 2005; Nichols & Holmes 2002; Winkler et al. 2014, PALM).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import ops, resolution
from .effects import cohens_dz
from .ops import signflip as signflip_ops
from .plan import Plan


REFERENCE_EXACT_BUDGET = 1e9  # unit-flips the reference enumerates in seconds, CPU or GPU


class StatsError(ValueError):
    """The data cannot be tested as given (e.g. it contains NaN)."""


def paired_differences(rms: np.ndarray, plan: Plan, contrast: str | None = None) -> np.ndarray:
    """Return a contrast's value per item and unit (the first contrast by default).

    Parameters
    ----------
    rms : ndarray, shape (n_rows, n_units)
        Per-pass values in the design's row order (``passes.csv``).
    plan : Plan
    contrast : str, optional
        A contrast's name; the design's first contrast when omitted.

    Returns
    -------
    d : ndarray, shape (n_items, n_units), float64
        For the card's ``a - b`` contrast, d = a - b per item.
    """
    design = plan.design
    rms = np.asarray(rms, dtype=np.float64)
    if rms.shape != (design.n_rows, plan.n_units):
        raise StatsError(f"rms: expected shape {(design.n_rows, plan.n_units)}, got {rms.shape}")
    return design.contrast_d(rms, contrast or design.contrasts[0].name)


def _check_finite(d: np.ndarray) -> None:
    bad = ~np.isfinite(d)
    if bad.any():
        pairs, units = np.nonzero(bad)
        raise StatsError(f"d: {bad.sum()} non-finite values (first at pair {pairs[0]}, unit {units[0]}); "
                         "NaN or inf cannot be tested")


def paired_t(d: np.ndarray) -> np.ndarray:
    """Return the paired t of every unit.

    t = mean(d) / (sd(d) / sqrt(N)), sd with N - 1 degrees of freedom.

    Parameters
    ----------
    d : ndarray, shape (n_pairs, n_units)
        Paired differences; must be finite.

    Returns
    -------
    t : ndarray, shape (n_units,), float64
        0 where every difference is 0 or N < 2; +-inf where the differences are a nonzero constant
        (as scipy.stats.ttest_rel).
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2:
        raise StatsError(f"d: expected shape (n_pairs, n_units), got {d.shape}")
    _check_finite(d)
    n = d.shape[0]
    if n < 2:
        return np.zeros(d.shape[1])
    # t = d_z sqrt(N), with d_z computed on each unit rescaled by a power of two: exact constant units
    # (sd = 0) give +-inf, all-zero units 0, and 1e-300 or 1e300 neither underflows nor overflows.
    from .effects import cohens_dz

    return cohens_dz(d) * np.sqrt(n)


def effect_size(d: np.ndarray) -> np.ndarray:
    """Return the paired Cohen's d_z = mean(d) / sd(d) of every unit, shape (n_units,).

    Any scale (each unit is scaled by a power of two first). Conventions as t's: a nonzero constant
    unit gives +-inf, an all-zero unit 0; N < 2 gives NaN. Nothing is replaced by 0 (see
    ``effects.cohens_dz``, which this is, and ``effects.hedges_gz`` for g_z and its interval).
    """
    d = np.asarray(d, dtype=np.float64)
    _check_finite(d)
    return cohens_dz(d)


@dataclass
class NullSummary:
    """The sign-flip null of one run, with how it was made.

    ``flips`` is the random flip count actually used (``auto`` may raise the spec's, see
    :func:`sign_flip_null`), ``min_p`` the smallest p this null can give, ``resolution`` the
    :func:`otherview.resolution.null_resolution` dict, ``fwer`` the family-wise procedure run
    ("single-step" or "step-down"; step-down's p-values are in ``result.p_step_down``), ``notes``
    what the report should say about how the null was chosen.
    """

    result: "signflip_ops.NullResult"
    method: str
    exact: bool
    thresholds: list[float]
    quantile: float
    fwer: str = "single-step"
    alpha: float = 0.05
    flips: int = 0
    min_p: float = 1.0
    resolution: dict = field(default_factory=dict)
    estimated_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def choose_method(method: str, n_pairs: int, n_units: int, device: torch.device) -> str:
    """Return "exact" or "random" for a spec's null.method ("auto": exact where the device affords it).

    ``auto`` takes exact mode where its estimated time is within the device's budget
    (``signflip.auto_mode``; the plain-PyTorch reference where no compiled op is built: 1e9
    unit-flips) -- exact mode's floor 2^-(N-1) is then the finest any null of N pairs can have.
    """
    if method != "auto":
        return method
    if not ops.has_kernel("signflip_null", device):
        # Only the plain-PyTorch reference is there: exact only where it is quick for a GEMM.
        if n_pairs > signflip_ops.EXACT_MAX_PAIRS:
            return "random"
        return "exact" if 2.0 ** max(n_pairs - 1, 0) * n_units <= REFERENCE_EXACT_BUDGET else "random"
    return signflip_ops.auto_mode(n_pairs, n_units, device)


def sign_flip_null(d: np.ndarray, thresholds: list[float], method: str, flips: int, seed: int,
                   quantile: float, device: torch.device | str = "cpu", *, fwer: str = "step-down",
                   alpha: float = 0.05, budget_s: float | None = None,
                   split: signflip_ops.FlipSplit | None = None) -> NullSummary:
    """Return the sign-flip null of the paired t over ``d`` (shape (n_pairs, n_units)).

    Parameters
    ----------
    d : ndarray, shape (n_pairs, n_units), finite
    thresholds : list of float
        The card's |t| thresholds (strict).
    method : {"auto", "exact", "random"}
    flips : int
        Random mode's flips (identity included). Under ``auto``, a random null gets at least
        ``resolution.required_flips(n_units, alpha)`` so that its floor stays fine enough for the
        corrections (raised with a note and a warning). An explicit ``random`` keeps ``flips`` and
        warns when the floor is too coarse.
    seed, quantile, device
        Random mode's key; the card's null quantile; where the null runs.
    fwer : {"step-down", "single-step"}
        Family-wise procedure. Step-down runs extra passes over the flips only while it rejects
        something new at ``alpha`` (``signflip.step_down``).
    alpha : float
        Level of the step-down passes and of the resolution check.
    budget_s : float, optional
        Refuse (``resolution.NullTooExpensive``, also ``inference.NullTooExpensive``) before any work when the estimate exceeds it;
        default ``resolution.NULL_BUDGET_S``.
    split : FlipSplit, optional
        Share the flips (and every step-down pass's) among processes that all make this call with the
        same ``d`` (``otherview.distributed``); each gets the whole null.
    """
    d = np.asarray(d, dtype=np.float64)
    _check_finite(d)
    if fwer not in ("step-down", "single-step"):
        raise StatsError(f'fwer must be "step-down" or "single-step", got "{fwer}"')
    device = torch.device(device)
    n, u = d.shape
    chosen = choose_method(method, n, u, device)
    notes: list[str] = []
    used = int(flips) if chosen == "random" else 0
    if chosen == "random":
        need = resolution.required_flips(u, alpha)
        res = resolution.null_resolution("random", n, u, used, alpha)
        if not res["enough"] and method == "auto":
            notes.append(f"auto chose random flips (exact 2^{n - 1} x {u} units is over this device's budget) "
                         f"and raised null.flips from {used} to {need} so the smallest p ({1 / need:.2g}) "
                         f"is <= alpha / units")
            used = need
        elif not res["enough"]:
            notes.append(res["message"])
    floor = resolution.null_resolution(chosen, n, u, used, alpha)
    if chosen == "exact" and not floor["enough"]:
        notes.append(floor["message"])
    for note in notes:
        warnings.warn("sign-flip null: " + note, RuntimeWarning, stacklevel=2)
    kind = device.type if ops.has_kernel("signflip_null", device) else "reference"
    secs = resolution.check_null_budget(chosen, n, u, used, kind, alpha,
                                       resolution.NULL_BUDGET_S if budget_s is None else budget_s, len(thresholds))
    dt = torch.as_tensor(d, dtype=torch.float64, device=device)
    result = signflip_ops.signflip_null(dt, list(thresholds), mode=chosen, n_flips=used, seed=seed, split=split)
    if fwer == "step-down":
        result = signflip_ops.step_down(dt, result, alpha, seed=seed, split=split)
    return NullSummary(result=result, method=chosen, exact=chosen == "exact", thresholds=list(thresholds),
                       quantile=quantile, fwer=fwer, alpha=alpha, flips=result.n_flips, min_p=result.min_p,
                       resolution=floor, estimated_seconds=secs, notes=notes)


def _drop_identity(hist: np.ndarray, index: int) -> np.ndarray:
    """Return ``hist`` without the observed labelling's own flip, which sits in bin ``index``."""
    h = hist.astype(np.float64).copy()
    if 0 <= index < h.size and h[index] > 0 and h.sum() > 1:
        h[index] -= 1
    return h


def _hist_mean(h: np.ndarray, values: np.ndarray) -> float:
    return float((h * values).sum() / h.sum())


def card_table(t: np.ndarray, null: NullSummary, alpha: float | None = None) -> list[dict]:
    """Return the card's Results rows: per threshold, units over it observed vs the null; then max |t|.

    Per threshold the row has a test and a bound, both over the whole group of flips (identity
    included, as a permutation test must): ``p`` = share of flips whose count reaches the observed
    one, and ``bound`` = a 1 - alpha lower confidence bound on the truly responding units over the
    threshold (Hemerik, Solari & Goeman 2019; ``NullResult.count_bound``), valid per threshold.
    The null columns (``null_mean``, ``null_q``, ``ratio``) are a description and summarise the
    flips other than the observed labelling itself (counting it would leak the observed count into
    the "null mean", by observed / flips: 60 units at the card's 12,091 and 200 flips).

    Parameters
    ----------
    t : ndarray, shape (n_units,)
    null : NullSummary
    alpha : float, optional
        Level of ``bound``; default ``null.alpha``.

    Returns
    -------
    rows : list of dict
        ``metric, threshold, observed, fraction, null_mean, null_q, ratio, ratio_above, p, bound,
        alpha``. ``observed`` is counted by the null's exact rule (the same integers as its flips).
        ``ratio`` = observed / null quantile, None where the quantile is 0; then ``ratio_above`` =
        observed (the ratio exceeds observed / 1: print "> {ratio_above}" with ``p``), else None.
        A last ``max |t|`` row has the null's mean and quantile of the maximum over units (at
        histogram-bin resolution) and ``p`` = the single-step family-wise p of the largest |t|.
    """
    abs_t = np.abs(t)
    res, q = null.result, null.quantile
    alpha = null.alpha if alpha is None else alpha
    n = res.n_pairs
    rows = []
    for k, c in enumerate(null.thresholds):
        observed = res.observed(k) if res.observed_count is not None else int((abs_t > c).sum())
        h = _drop_identity(res.count_hist[k].numpy(), observed)
        nq = float(signflip_ops.hist_quantile(h, q))
        rows.append({"metric": f"units with |t|>{c:g}", "threshold": c, "observed": observed,
                     "fraction": observed / max(len(t), 1), "null_mean": _hist_mean(h, np.arange(h.size)), "null_q": nq,
                     "ratio": observed / nq if nq > 0 else None, "ratio_above": observed if nq == 0 else None,
                     "p": res.count_p(k, observed), "bound": res.count_bound(k, alpha, observed), "alpha": alpha})
    max_t = float(abs_t.max()) if len(t) else 0.0
    bins = res.max_hist.numel()
    r_obs = max_t / np.sqrt(n - 1 + max_t**2) if n > 1 and np.isfinite(max_t) else 1.0
    h = _drop_identity(res.max_hist.numpy(), min(int(r_obs * bins), bins - 1))
    edges = (np.arange(bins) + 1) / bins
    with np.errstate(divide="ignore"):
        to_t = lambda r: r * np.sqrt((n - 1) / np.maximum(1.0 - r * r, 0.0)) if n > 1 else 0 * r  # noqa: E731
    mid = to_t((np.arange(bins) + 0.5) / bins)
    p_max = float(res.p_fwer.min()) if len(t) else 1.0
    rows.append({"metric": "max |t|", "threshold": None, "observed": max_t, "fraction": None,
                 "null_mean": _hist_mean(h, mid), "null_q": float(to_t(edges[signflip_ops.hist_quantile(h, q)])),
                 "ratio": None, "ratio_above": None, "p": p_max, "bound": None, "alpha": alpha})
    return rows
