"""Per-unit inference beyond the t: effect sizes with intervals, FDR q-values, the graded axis, summaries,
and what a null can resolve and costs.

``stats`` gives each unit's paired t and the sign-flip null (uncorrected, single-step and step-down
max-|t| family-wise p-values). This module adds, per unit, Cohen's d_z and Hedges' g_z with the exact
noncentral-t interval (scipy), the Benjamini-Hochberg q of the sign-flip p-value, and the rank
correlation of the unit's differences with the fillers' position on the axis, tested against its own
permutation null; per site, stream and kind, the units over each |t| threshold and significant after
correction; and, for the plan, the smallest p a null can give (:func:`null_resolution`) and its
estimated time (:func:`estimate_null_seconds`, :func:`check_null_budget`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import stats
from .effects import CI_LEVEL, cohens_dz, dz_interval, hedges_gz, hedges_j  # noqa: F401  (public here too)
from .plan import Plan
from .resolution import (  # noqa: F401  (public here too: the plan and the CLI call them as inference.*)
    ALPHA,
    NULL_BUDGET_S,
    NullTooExpensive,
    check_null_budget,
    estimate_null_seconds,
    min_p,
    null_resolution,
    required_flips,
)

AXIS_PERMUTATIONS = 10_000  # random permutations of the axis null when N! is larger than this
# Permuted statistics equal to the observed one up to rounding count as "at least as extreme": a
# GEMM over a permuted covariate may differ from the identity's product in the last bits.
_TIE_TOL = 1e-10


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Return Benjamini-Hochberg adjusted p-values (q-values), in the order of ``p``.

    q_(i) = min_{j >= i} min(1, m p_(j) / j) over the sorted p-values (the step-up procedure:
    rejecting every q <= alpha is BH at level alpha). Controls the false discovery rate at
    alpha m0/m for independent or positively dependent (PRDS) tests (Benjamini & Hochberg 1995;
    Benjamini & Yekutieli 2001).

    Parameters
    ----------
    p : ndarray, shape (m,)
        p-values in [0, 1]; NaN is rejected.

    Returns
    -------
    q : ndarray, shape (m,), float64
        Monotone in p: p_i <= p_j implies q_i <= q_j.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise stats.StatsError(f"p: expected shape (m,), got {p.shape}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise stats.StatsError("p: p-values must lie in [0, 1] (no NaN)")
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    q = np.empty(m)
    q[order] = q_sorted
    return q


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Return 1-based ranks along axis 0, ties given their average rank (as scipy.stats.rankdata).

    Parameters
    ----------
    x : ndarray, shape (n,) or (n, n_columns)

    Returns
    -------
    ranks : ndarray, same shape as ``x``, float64
    """
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[0]
    order = np.argsort(flat, axis=0, kind="stable")
    xs = np.take_along_axis(flat, order, axis=0)
    pos = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None], xs.shape)
    starts = np.ones(xs.shape, dtype=bool)
    starts[1:] = xs[1:] != xs[:-1]
    ends = np.ones(xs.shape, dtype=bool)
    ends[:-1] = starts[1:]
    first = np.maximum.accumulate(np.where(starts, pos, 0.0), axis=0)
    last = np.minimum.accumulate(np.where(ends, pos, n)[::-1], axis=0)[::-1]
    ranks = np.empty_like(xs)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=0)
    return ranks.reshape(x.shape)


def _unit_vectors(r: np.ndarray) -> np.ndarray:
    """Centre columns and scale them to unit norm (zero columns stay zero)."""
    c = r - r.mean(axis=0)
    norm = np.sqrt((c * c).sum(axis=0))
    return np.divide(c, norm, out=np.zeros_like(c), where=norm > 0)


@dataclass
class AxisNull:
    """Spearman correlation of each unit's differences with the axis, and its permutation null."""

    rho: np.ndarray  # (n_units,) observed Spearman correlation
    p_uncorrected: np.ndarray  # (n_units,) two-sided permutation p
    p_fwer: np.ndarray  # (n_units,) max-|rho| family-wise p
    max_null: np.ndarray  # (n_permutations,) max over units of |rho| per permutation (identity first)
    n_permutations: int
    exact: bool
    seed: int

    @property
    def min_p(self) -> float:
        """The smallest p this permutation null can give, 1 / n_permutations (the identity alone)."""
        return 1.0 / self.n_permutations


def _permutations(n: int, n_perm: int, seed: int) -> tuple[np.ndarray, bool]:
    """Return permutations of range(n), identity first: all n! when n! <= n_perm, else seeded random."""
    if math.factorial(n) <= n_perm:
        return np.array(list(itertools.permutations(range(n))), dtype=np.int64).reshape(-1, n), True
    rng = np.random.default_rng(seed)
    rest = rng.permuted(np.tile(np.arange(n), (n_perm - 1, 1)), axis=1)
    return np.vstack([np.arange(n)[None], rest]), False


def axis_correlation(d: np.ndarray, covariate: np.ndarray, n_perm: int = AXIS_PERMUTATIONS, seed: int = 0,
                     chunk_elements: int = 1 << 23, device: "torch.device | str" = "cpu") -> AxisNull:
    """Return each unit's Spearman correlation with the axis and its permutation p-values.

    rho_u is the Pearson correlation of the ranks of d[:, u] with the ranks of the covariate (ties
    averaged). Under H0 (the differences do not depend on the filler's position) the covariate's
    ranks are exchangeable across pairs, so permuting them gives the null (Pitman 1937; Nichols &
    Holmes 2002). With both rank vectors centred and scaled to unit norm, the permuted correlations
    of every unit are one GEMM, [P, N] @ [N, U]. The identity is the first permutation, so no p is
    0; p_fwer compares each |rho_u| with the per-permutation maximum over units (Westfall & Young
    1993). Exact (all N! permutations) when N! <= ``n_perm``; otherwise ``n_perm`` - 1 seeded
    random ones plus the identity.

    Parameters
    ----------
    d : ndarray, shape (n_pairs, n_units)
        Paired differences; finite.
    covariate : ndarray, shape (n_pairs,)
        Each pair's position on the axis (``Spec.ranks()``).
    n_perm : int
        Permutations (including the identity) when not exact.
    seed : int
        Seed of numpy's default generator for the random permutations.
    chunk_elements : int
        Bound on the [permutations, units] block held at once.
    device : torch.device or str
        Where the permuted correlations are computed (float64 either way, so ties compare alike).

    Returns
    -------
    AxisNull
        rho = 0 and p = 1 for units (or covariates) without variance, and for N < 3.
    """
    d = np.asarray(d, dtype=np.float64)
    covariate = np.asarray(covariate, dtype=np.float64)
    if d.ndim != 2 or covariate.shape != (d.shape[0],):
        raise stats.StatsError(f"d, covariate: expected shapes (N, U) and (N,), got {d.shape}, {covariate.shape}")
    n, u = d.shape
    if not np.isfinite(d).all() or not np.isfinite(covariate).all():
        raise stats.StatsError("d, covariate: non-finite values cannot be ranked")
    if n < 3:
        return AxisNull(np.zeros(u), np.ones(u), np.ones(u), np.zeros(1), 1, True, seed)
    rd = _unit_vectors(average_ranks(d))
    rx = _unit_vectors(average_ranks(covariate)[:, None])[:, 0]
    rho = rx @ rd
    perms, exact = _permutations(n, n_perm, seed)
    threshold = np.abs(rho) - _TIE_TOL
    dev = torch.device(device)
    rd_t, thr_t = torch.as_tensor(rd, device=dev), torch.as_tensor(threshold, device=dev)
    permuted = torch.as_tensor(rx[perms], device=dev)  # [P, N]: the covariate's ranks, permuted
    exceed_t = torch.zeros(u, dtype=torch.int64, device=dev)
    max_parts = []
    step = max(1, chunk_elements // max(u, 1))
    for start in range(0, len(perms), step):
        block = (permuted[start:start + step] @ rd_t).abs_()
        exceed_t += (block >= thr_t).sum(dim=0)
        max_parts.append(block.amax(dim=1))
    exceed = exceed_t.cpu().numpy()
    max_null = torch.cat(max_parts).cpu().numpy()
    # Permutations whose max |rho| reaches each unit's |rho|: a search in the sorted maxima.
    fwer = len(max_null) - np.searchsorted(np.sort(max_null), threshold, side="left")
    return AxisNull(rho, exceed / len(perms), fwer / len(perms), max_null, len(perms), exact, seed)


@dataclass
class UnitInference:
    """Every per-unit statistic beyond t, for the unit table, the summary and the figures.

    ``d_z_low`` / ``d_z_high`` now hold the exact noncentral-t interval (the same as ``g_z_low`` /
    ``g_z_high``: one interval for the population delta_z, which d_z and g_z both estimate).
    ``p_step_down`` is None where the null was run single-step only.
    """

    d_z: np.ndarray  # (n_units,)
    d_z_low: np.ndarray  # (n_units,) exact noncentral-t interval (was: normal approximation)
    d_z_high: np.ndarray  # (n_units,)
    p_uncorrected: np.ndarray  # (n_units,) sign-flip
    p_fwer: np.ndarray  # (n_units,) single-step max-|t| sign-flip (upper end of its bracket)
    q: np.ndarray  # (n_units,) BH of p_uncorrected
    axis: AxisNull
    axis_q: np.ndarray  # (n_units,) BH of the axis p
    g_z: np.ndarray | None = None  # (n_units,) Hedges' g_z = J(N-1) d_z
    g_z_low: np.ndarray | None = None  # (n_units,)
    g_z_high: np.ndarray | None = None  # (n_units,)
    p_step_down: np.ndarray | None = None  # (n_units,) step-down max-|t| sign-flip
    p_fwer_error: np.ndarray | None = None  # (n_units,) width of the single-step p's bracket
    ci_level: float = CI_LEVEL

    def arrays(self) -> dict[str, np.ndarray]:
        """Return the arrays to store in the run directory (``inference.safetensors``)."""
        out = {"d_z": self.d_z, "d_z_low": self.d_z_low, "d_z_high": self.d_z_high,
               "p_uncorrected": self.p_uncorrected, "p_fwer": self.p_fwer, "q": self.q,
               "axis_rho": self.axis.rho, "axis_p": self.axis.p_uncorrected, "axis_p_fwer": self.axis.p_fwer,
               "axis_q": self.axis_q, "axis_max_null": self.axis.max_null}
        for name in ("g_z", "g_z_low", "g_z_high", "p_step_down", "p_fwer_error"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def infer(d: np.ndarray, null: stats.NullSummary, covariate: np.ndarray, seed: int,
          n_perm: int = AXIS_PERMUTATIONS, device: "torch.device | str" = "cpu",
          level: float = CI_LEVEL) -> UnitInference:
    """Return the per-unit inference of differences ``d`` (shape (n_pairs, n_units)) given their null.

    Effect sizes: :func:`cohens_dz` and :func:`hedges_gz` (exact interval at ``level``); p-values from
    ``null`` (single-step, and step-down where ``null`` ran it); BH q of the uncorrected p; the axis.
    """
    d = np.asarray(d, dtype=np.float64)
    d_z = cohens_dz(d)
    g, low, high = hedges_gz(d, level)
    res = null.result
    p = np.asarray(res.p_uncorrected, dtype=np.float64)
    p_fwer = np.asarray(res.p_fwer, dtype=np.float64)
    p_sd = res.p_step_down
    axis = axis_correlation(d, covariate, n_perm=n_perm, seed=seed, device=device)
    return UnitInference(d_z, low, high, p, p_fwer, bh_fdr(p), axis, bh_fdr(axis.p_uncorrected), g, low.copy(),
                         high.copy(), None if p_sd is None else np.asarray(p_sd, dtype=np.float64),
                         res.p_fwer_error, level)


def _group_row(name: str, idx: np.ndarray, t: np.ndarray, inf: UnitInference, thresholds: list[float],
               alpha: float) -> dict:
    abs_t = np.abs(t[idx])
    n = len(idx)
    row: dict = {"group": name, "units": n}
    for c in thresholds:
        row[f"over_{c:g}"] = int((abs_t > c).sum())
    row["fwer"] = int((inf.p_fwer[idx] <= alpha).sum())
    if inf.p_step_down is not None:
        row["fwer_step_down"] = int((inf.p_step_down[idx] <= alpha).sum())
    row["fdr"] = int((inf.q[idx] <= alpha).sum())
    row["axis_fwer"] = int((inf.axis.p_fwer[idx] <= alpha).sum())
    row["axis_fdr"] = int((inf.axis_q[idx] <= alpha).sum())
    row["max_abs_t"] = float(abs_t.max()) if n else 0.0
    row["top_unit"] = int(idx[np.argmax(abs_t)]) if n else -1
    return row


def site_label(stream: str, block: int, kind: str) -> str:
    """Return a site's short label: D2 (double, image stream), D2t (double, text stream), S7 (single)."""
    return f"S{block}" if stream == "single" else f"D{block}" + ("t" if kind == "text" else "")


def group_summaries(plan: Plan, t: np.ndarray, inf: UnitInference, alpha: float = ALPHA) -> dict[str, list[dict]]:
    """Return per-site, per-stream, per-kind and per stream-and-kind counts of responding units.

    Each row (``all`` holds one, over every unit): ``group, units, over_<c>`` (|t| > c, per threshold),
    ``fwer`` (single-step sign-flip max-|t| p <= alpha), ``fwer_step_down`` (step-down p <= alpha; only
    where the null ran step-down), ``fdr`` (BH q <= alpha), ``axis_fwer``, ``axis_fdr``,
    ``max_abs_t``, ``top_unit``; site rows add ``site, label, stream, block, kind, attention_units`` and
    ``over_<c>_attention`` (the attention-channel part of ``over_<c>``).

    Parameters
    ----------
    plan : Plan
    t : ndarray, shape (n_units,)
    inf : UnitInference
    alpha : float
        Significance level of the corrected p-values and q-values.

    Returns
    -------
    groups : dict
        ``sites``, ``streams``, ``kinds``, ``stream_kinds`` and ``all``, each a list of rows.
    """
    thresholds = list(plan.spec.null.thresholds)
    stream_of = np.array([u.stream for u in plan.units])
    kind_of = np.array([u.kind for u in plan.units])
    sites = []
    for s in plan.sites:
        idx = np.arange(s.unit_offset, s.unit_offset + s.n_units)
        row = _group_row(s.name, idx, t, inf, thresholds, alpha)
        row.update(site=s.name, label=site_label(s.stream, s.block, s.kind), stream=s.stream, block=s.block,
                   kind=s.kind, attention_units=int((kind_of[idx] == "attention").sum()))
        for c in thresholds:  # attention / MLP split of the threshold counts, for the per-block bars
            row[f"over_{c:g}_attention"] = int((np.abs(t[idx]) > c)[kind_of[idx] == "attention"].sum())
        sites.append(row)
    groups: dict[str, list[dict]] = {"sites": sites, "streams": [], "kinds": [], "stream_kinds": [],
                                     "all": [_group_row("all", np.arange(plan.n_units), t, inf, thresholds, alpha)]}
    for stream in ("double", "single"):
        if (stream_of == stream).any():
            groups["streams"].append(_group_row(stream, np.flatnonzero(stream_of == stream), t, inf, thresholds, alpha))
    for kind in ("attention", "mlp"):
        if (kind_of == kind).any():
            groups["kinds"].append(_group_row(kind, np.flatnonzero(kind_of == kind), t, inf, thresholds, alpha))
    for stream, kind in itertools.product(("double", "single"), ("attention", "mlp")):
        idx = np.flatnonzero((stream_of == stream) & (kind_of == kind))
        if len(idx):
            groups["stream_kinds"].append(_group_row(f"{stream} {kind}", idx, t, inf, thresholds, alpha))
    return groups


def strongest_site(sites: list[dict], thresholds: list[float]) -> dict | None:
    """Return the site row with the largest share of family-wise significant units.

    Ties (e.g. every unit significant) go to the larger share over the highest threshold, then to
    the larger max |t|.
    """
    if not sites:
        return None
    top = f"over_{thresholds[-1]:g}"
    return max(sites, key=lambda r: (r["fwer"] / r["units"], r[top] / r["units"], r["max_abs_t"]))
