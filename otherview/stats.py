"""Statistics: paired differences, the paired t per unit, and the sign-flip null (after MNE-Python).

The null goes through ``otherview.ops.signflip.signflip_null`` (compiled op, or its plain-PyTorch
reference). Under sign flips the sum of squares of each unit's differences is invariant, so a flipped
t is a monotone function of the flipped sum; the observed labelling is part of the null, so no
p-value is 0 (Good 2005; Nichols & Holmes 2002; Winkler et al. 2014, PALM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import ops
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
    mean = d.mean(axis=0)
    sd = d.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / (sd / np.sqrt(n))
    t[(sd == 0) & (mean == 0)] = 0.0
    t[(sd == 0) & (mean != 0)] = np.sign(mean[(sd == 0) & (mean != 0)]) * np.inf
    return t


def effect_size(d: np.ndarray) -> np.ndarray:
    """Return the paired Cohen's d_z = mean(d) / sd(d) of every unit, shape (n_units,)."""
    d = np.asarray(d, dtype=np.float64)
    sd = d.std(axis=0, ddof=1) if d.shape[0] > 1 else np.zeros(d.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        dz = d.mean(axis=0) / sd
    dz[~np.isfinite(dz)] = 0.0
    return dz


@dataclass
class NullSummary:
    """The sign-flip null of one run, with how it was made."""

    result: "signflip_ops.NullResult"
    method: str
    exact: bool
    thresholds: list[float]
    quantile: float


def choose_method(method: str, n_pairs: int, n_units: int, device: torch.device) -> str:
    """Return "exact" or "random" for a spec's null.method ("auto": exact where the device affords it)."""
    if method != "auto":
        return method
    if not ops.has_kernel("signflip_null", device):
        # Only the plain-PyTorch reference is there: exact only where it is quick for a GEMM.
        return "exact" if 2.0 ** max(n_pairs - 1, 0) * n_units <= REFERENCE_EXACT_BUDGET else "random"
    return signflip_ops.auto_mode(n_pairs, n_units, device)


def sign_flip_null(d: np.ndarray, thresholds: list[float], method: str, flips: int, seed: int,
                   quantile: float, device: torch.device | str = "cpu") -> NullSummary:
    """Return the sign-flip null of the paired t over ``d`` (shape (n_pairs, n_units))."""
    d = np.asarray(d, dtype=np.float64)
    _check_finite(d)
    device = torch.device(device)
    chosen = choose_method(method, d.shape[0], d.shape[1], device)
    dt = torch.as_tensor(d, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    result = signflip_ops.signflip_null(dt, list(thresholds), mode=chosen,
                                        n_flips=flips if chosen == "random" else 0, seed=seed)
    return NullSummary(result=result, method=chosen, exact=chosen == "exact", thresholds=list(thresholds),
                       quantile=quantile)


def _drop_identity(hist: np.ndarray, index: int) -> np.ndarray:
    """Return ``hist`` without the observed labelling's own flip, which sits in bin ``index``."""
    h = hist.astype(np.float64).copy()
    if 0 <= index < h.size and h[index] > 0 and h.sum() > 1:
        h[index] -= 1
    return h


def _hist_mean(h: np.ndarray, values: np.ndarray) -> float:
    return float((h * values).sum() / h.sum())


def card_table(t: np.ndarray, null: NullSummary) -> list[dict]:
    """Return the card's Results rows: per threshold, units over it observed vs the null; then max |t|.

    The null columns summarise the flips other than the observed labelling itself (the identity
    flip is part of the null for p-values, but counting it here would leak the observed count into
    the "null mean", by observed / flips: 60 units at the card's 12,091 and 200 flips).

    Returns
    -------
    rows : list of dict
        ``metric, observed, fraction, null_mean, null_q, ratio`` (ratio = observed / null quantile,
        None where the quantile is 0), and a last ``max |t|`` row with the null's mean and quantile of
        the maximum over units (at histogram-bin resolution).
    """
    abs_t = np.abs(t)
    res, q = null.result, null.quantile
    n = res.n_pairs
    rows = []
    for k, c in enumerate(null.thresholds):
        observed = int((abs_t > c).sum())
        h = _drop_identity(res.count_hist[k].numpy(), observed)
        nq = float(signflip_ops.hist_quantile(h, q))
        rows.append({"metric": f"units with |t|>{c:g}", "threshold": c, "observed": observed,
                     "fraction": observed / max(len(t), 1), "null_mean": _hist_mean(h, np.arange(h.size)), "null_q": nq,
                     "ratio": observed / nq if nq > 0 else None})
    max_t = float(abs_t.max()) if len(t) else 0.0
    bins = res.max_hist.numel()
    r_obs = max_t / np.sqrt(n - 1 + max_t**2) if n > 1 and np.isfinite(max_t) else 1.0
    h = _drop_identity(res.max_hist.numpy(), min(int(r_obs * bins), bins - 1))
    edges = (np.arange(bins) + 1) / bins
    with np.errstate(divide="ignore"):
        to_t = lambda r: r * np.sqrt((n - 1) / np.maximum(1.0 - r * r, 0.0)) if n > 1 else 0 * r  # noqa: E731
    mid = to_t((np.arange(bins) + 0.5) / bins)
    rows.append({"metric": "max |t|", "threshold": None, "observed": max_t, "fraction": None,
                 "null_mean": _hist_mean(h, mid), "null_q": float(to_t(edges[signflip_ops.hist_quantile(h, q)])), "ratio": None})
    return rows
