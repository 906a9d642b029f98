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
import warnings
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import torch
from scipy import special as sp_special
from scipy import stats as sp_stats

from . import stats
from .plan import Plan

ALPHA = 0.05
AXIS_PERMUTATIONS = 10_000  # random permutations of the axis null when N! is larger than this
CI_LEVEL = 0.95
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


def dz_interval(d_z: np.ndarray, n: int, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Return the normal-approximation interval of the paired Cohen's d_z.

    SE(d_z) = sqrt(1/N + d_z^2 / (2N)) (the large-sample variance of a standardised mean,
    Hedges & Olkin 1985, ch. 5; for d_z: Goulet-Pelletier & Cousineau 2018); the interval is
    d_z +- z_{(1+level)/2} SE. Close to the exact noncentral-t interval for N >= 20 and |d_z| <= 2;
    narrower than it for small N or large effects.

    Parameters
    ----------
    d_z : ndarray, shape (n_units,)
    n : int
        Number of pairs N (>= 2).
    level : float
        Coverage, in (0, 1).

    Returns
    -------
    low, high : ndarray, shape (n_units,)
    """
    d_z = np.asarray(d_z, dtype=np.float64)
    if n < 2:
        return np.full(d_z.shape, -np.inf), np.full(d_z.shape, np.inf)
    z = NormalDist().inv_cdf((1 + level) / 2)
    se = np.sqrt(1.0 / n + d_z**2 / (2.0 * n))
    return d_z - z * se, d_z + z * se


def cohens_dz(d: np.ndarray) -> np.ndarray:
    """Return the paired Cohen's d_z = mean(d) / sd(d) of every unit, at any scale.

    Each unit is first scaled by a power of two (exact) so that 1e-300 and 1e300 give the d_z of 1.

    Parameters
    ----------
    d : ndarray, shape (n_pairs, n_units), finite

    Returns
    -------
    d_z : ndarray, shape (n_units,), float64
        ``sign(mean) * inf`` where the differences are a nonzero constant (sd = 0, as t = +-inf),
        0 where they are all 0 (as t = 0), NaN for N < 2 (no variance estimate).
    """
    d = np.asarray(d, dtype=np.float64)
    n, u = d.shape
    if n < 2:
        return np.full(u, np.nan)
    amax = np.abs(d).max(0)
    _, e = np.frexp(np.where(amax > 0, amax, 1.0))
    x = np.ldexp(d, -e[None, :])
    mean = x.mean(0)
    sd = x.std(0, ddof=1)
    # a constant column can leave sd at a few ulps of |mean|: that is 0
    sd[sd <= 4 * np.finfo(np.float64).eps * np.abs(mean)] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        dz = mean / sd
    dz[(sd == 0) & (mean == 0)] = 0.0
    dz[(sd == 0) & (mean != 0)] = np.sign(mean[(sd == 0) & (mean != 0)]) * np.inf
    return dz


def hedges_j(n: int) -> float:
    """Return Hedges' exact small-sample correction J(m), m = N - 1 (NaN for N < 2).

    J(m) = Gamma(m/2) / (sqrt(m/2) Gamma((m-1)/2)) makes g = J d unbiased under normality (Hedges
    1981, eq. 6e); the familiar 1 - 3 / (4m - 1) approximates it (to 0.3% at N = 5, 0.003% at 30).
    NaN for N < 3: with two pairs d_z has no finite mean, so no multiple of it is unbiased.
    """
    m = n - 1
    if m < 2:
        return float("nan")
    return float(np.exp(sp_special.gammaln(m / 2) - 0.5 * np.log(m / 2) - sp_special.gammaln((m - 1) / 2)))


def _nct_delta(t: np.ndarray, df: int, target: float) -> np.ndarray:
    """Return delta with ``nct.cdf(t, df, delta) = target``, vectorised (cdf decreases in delta).

    A bracket around the normal approximation (grown where needed), then the Illinois variant of
    regula falsi on the units not yet converged (|cdf - target| < 1e-14 or a bracket of 1e-11).
    """
    def f(x, idx):
        c = sp_stats.nct.cdf(t[idx], df, x)
        # scipy returns NaN far in some tails, where the cdf (decreasing in delta) is 1 or 0
        c = np.where(np.isnan(c), np.where(x < t[idx], 1.0, 0.0), c)
        return c - target

    z = NormalDist().inv_cdf(1 - target)
    w = np.sqrt(1.0 + t * t / (2.0 * df))
    x0 = t + z * w
    lo, hi = x0 - 0.5 * w - 0.5, x0 + 0.5 * w + 0.5
    all_idx = np.arange(t.size)
    flo, fhi = f(lo, all_idx), f(hi, all_idx)
    for _ in range(200):  # grow until f(lo) > 0 > f(hi)
        bad = np.flatnonzero((flo <= 0) | (fhi >= 0))
        if not bad.size:
            break
        width = hi[bad] - lo[bad]
        lo[bad] = np.where(flo[bad] <= 0, lo[bad] - width, lo[bad])
        hi[bad] = np.where(fhi[bad] >= 0, hi[bad] + width, hi[bad])
        flo[bad], fhi[bad] = f(lo[bad], bad), f(hi[bad], bad)
    x = (lo + hi) / 2
    side = np.zeros(t.size, dtype=np.int8)
    active = all_idx
    for _ in range(300):
        xa = (lo[active] * fhi[active] - hi[active] * flo[active]) / (fhi[active] - flo[active])
        xa = np.where(np.isfinite(xa) & (xa > lo[active]) & (xa < hi[active]), xa, (lo[active] + hi[active]) / 2)
        fx = f(xa, active)
        x[active] = xa
        up = fx > 0  # the root lies above xa
        sa = side[active]
        lo[active] = np.where(up, xa, lo[active])
        flo[active] = np.where(up, fx, np.where(sa == -1, flo[active] / 2, flo[active]))
        hi[active] = np.where(up, hi[active], xa)
        fhi[active] = np.where(up, np.where(sa == 1, fhi[active] / 2, fhi[active]), fx)
        side[active] = np.where(up, 1, -1)
        done = (np.abs(fx) < 1e-14) | (hi[active] - lo[active] <= 1e-11 * np.maximum(1.0, np.abs(xa)))
        active = active[~done]
        if not active.size:
            break
    # scipy's nct.cdf returns NaN or 1 far in the tails at df = 1-2: such roots are not roots
    failed = ~(np.abs(sp_stats.nct.cdf(t, df, x) - target) <= 1e-8)
    if failed.any():
        warnings.warn(f"noncentral-t interval: scipy.stats.nct could not be inverted for {int(failed.sum())} "
                      f"unit(s) at N = {df + 1} (|t| up to {np.abs(t[failed]).max():.3g}); their bound is NaN",
                      RuntimeWarning, stacklevel=3)
        x[failed] = np.nan
    return x


def hedges_gz(d: np.ndarray, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return Hedges' g_z and the exact noncentral-t interval of the standardised effect, per unit.

    g_z = J(N - 1) d_z (:func:`hedges_j`, :func:`cohens_dz`). The interval inverts the noncentral t:
    t = d_z sqrt(N) has a noncentral t distribution with N - 1 degrees of freedom and noncentrality
    delta_z sqrt(N) (normal differences), so [low, high] = [delta_L, delta_H] / sqrt(N) with
    ``nct.cdf(t, N-1, delta_L) = (1 + level) / 2`` and ``nct.cdf(t, N-1, delta_H) = (1 - level) / 2``
    (Steiger & Fouladi 1997; Goulet-Pelletier & Cousineau 2018). It covers the population delta_z,
    which d_z and g_z both estimate, with exactly ``level`` under normality, at any N >= 2.

    Where sd(d) = 0 the interval collapses onto the estimate, as the limit of t -> +-inf does:
    a nonzero constant unit gives g_z = +-inf and [+-inf, +-inf]; an all-zero unit 0 and [0, 0].
    N < 2 gives NaN everywhere (no variance estimate); N = 2 gives g_z = NaN (no unbiased multiple of
    d_z exists, :func:`hedges_j`) and the interval. Nothing is clipped or replaced.

    Parameters
    ----------
    d : ndarray, shape (n_pairs, n_units), finite
    level : float
        Coverage, in (0, 1).

    Returns
    -------
    g, low, high : ndarray, shape (n_units,), float64
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    dz = cohens_dz(d)
    n = np.asarray(d).shape[0]
    g = hedges_j(n) * dz
    low, high = dz.copy(), dz.copy()  # the collapsed intervals (sd = 0) and N < 2's NaN
    if n >= 2:
        ok = np.isfinite(dz) & ~((dz == 0) & (np.abs(np.asarray(d)).max(0) == 0))
        if ok.any():
            t = dz[ok] * math.sqrt(n)
            low[ok] = _nct_delta(t, n - 1, (1 + level) / 2) / math.sqrt(n)
            high[ok] = _nct_delta(t, n - 1, (1 - level) / 2) / math.sqrt(n)
    return g, low, high


# --- What a null can resolve, and what it costs -------------------------------------------------

#: Seconds an exact null may be estimated to take before :func:`check_null_budget` refuses it.
NULL_BUDGET_S = 600.0
#: Measured unit-flip rates (unit-flips per second) of the compiled op, by device and mode, at one
#: threshold; each further threshold costs ``_THRESHOLD_COST`` of that. CUDA: H100, exact N = 30,
#: U = 16,320: 2.1e12 (one threshold) / 1.7e12 (two); random 1e6 flips in 68 ms (2.4e11, N = 30).
#: CPU (2-core host, commit of this change): exact N = 20, U = 16,320: 7.3e8 (none) / 5.2e8 (two);
#: random N = 30: 1.9e8 (none) / 1.5e8 (two). The plain-PyTorch reference (no compiled op): ~2e7.
_RATES = {("cuda", "exact"): 2.1e12, ("cuda", "random"): 2.4e11,
          ("cpu", "exact"): 7.3e8, ("cpu", "random"): 1.9e8, ("reference", "exact"): 2e7,
          ("reference", "random"): 2e7}
_THRESHOLD_COST = {"cuda": 0.2, "cpu": 0.2, "reference": 0.1}
#: Random mode rebuilds S from its N pairs per flip: its rate is the N = 30 one times 30 / N.
_RANDOM_RATE_PAIRS = 30


class NullTooExpensive(ValueError):
    """The null asked for would run longer than the budget; the message gives the way out."""


def min_p(method: str, n_pairs: int, flips: int) -> float:
    """Return the smallest p-value a sign-flip null can give: 1 / (number of flips, identity included).

    ``"exact"``: 2^-(N-1) (all flips, pair 0's sign held); ``"random"``: 1 / flips. Family-wise,
    step-down and count p-values share the floor.
    """
    if method == "exact":
        return 2.0 ** -max(n_pairs - 1, 0)
    if method == "random":
        return 1.0 / max(int(flips), 1)
    raise ValueError(f'method must be "exact" or "random", got "{method}"')


def required_flips(n_units: int, alpha: float) -> int:
    """Return the random-mode flip count whose floor lets one unit pass BH and Bonferroni at alpha.

    ``1 / flips <= alpha / n_units``, rounded up to 1, 2 or 5 times a power of ten, at least 10,000
    (16,320 units at 0.05: 500,000 flips, ~35 ms on an H100, ~1 min on a 2-core CPU).
    """
    need = max(10_000, math.ceil(n_units / alpha))
    mag = 10 ** (len(str(need)) - 1)
    for step in (1, 2, 5, 10):
        if step * mag >= need:
            return step * mag
    return 10 * mag  # pragma: no cover


def null_resolution(method: str, n_pairs: int, n_units: int, flips: int, alpha: float) -> dict:
    """Return whether a null's p-value floor is fine enough for the corrections at alpha.

    The floor must reach ``alpha / n_units``: below it a single unit can pass Benjamini-Hochberg's
    first step and Bonferroni; above it BH rejects nothing unless ``ceil(floor * n_units / alpha)``
    units tie at the floor (200 flips, 16,320 units: 1,632). Max-T family-wise p-values need only
    ``floor <= alpha`` but are then coarse.

    Returns
    -------
    dict
        ``min_p`` (the floor), ``needed_p`` (alpha / n_units), ``enough`` (bool), ``flips_needed``
        (random flips that would be enough; None in exact mode, whose floor is fixed by N),
        ``ties_needed`` (units BH needs tied at the floor to reject anything) and ``message``.
    """
    floor = min_p(method, n_pairs, flips)
    needed = alpha / max(n_units, 1)
    enough = floor <= needed * (1 + 1e-12)
    ties = max(1, math.ceil(floor * n_units / alpha - 1e-9))
    out = {"min_p": floor, "needed_p": needed, "enough": bool(enough),
           "flips_needed": None if method == "exact" else required_flips(n_units, alpha), "ties_needed": ties}
    if enough:
        out["message"] = f"smallest p {floor:.3g} <= alpha / units = {needed:.3g}: fine enough for BH and FWER"
    elif method == "exact":
        out["message"] = (f"exact null with {n_pairs} pairs: smallest p {floor:.3g} > alpha / units = {needed:.3g}; "
                          f"no flip count can do better with {n_pairs} pairs: BH rejects only when >= {ties} "
                          f"units tie at the floor, and family-wise p-values are "
                          f"{'coarse' if floor <= alpha else 'never <= alpha'}. More pairs lower the floor.")
    else:
        out["message"] = (f"random null with {flips} flips: smallest p {floor:.3g} > alpha / units = {needed:.3g}; "
                          f"BH rejects only when >= {ties} units tie at the floor. "
                          f"Use null.flips = {out['flips_needed']} (or method = \"exact\" where affordable).")
    return out


def estimate_null_seconds(mode: str, n_pairs: int, n_units: int, n_flips: int, device_type: str,
                          n_thresholds: int = 2, passes: int = 1) -> float:
    """Return the estimated seconds of a sign-flip null, from the measured rates of ``_RATES``.

    Parameters
    ----------
    mode : {"exact", "random"}
    n_pairs, n_units, n_flips : int
        ``n_flips`` is ignored in exact mode (2^(N-1)).
    device_type : {"cuda", "cpu", "reference"}
        ``"reference"``: no compiled op (the plain-PyTorch fallback).
    n_thresholds : int
        Rows of ``count_hist``.
    passes : int
        Passes over the flips (step-down may need more than one; each is at most the first's cost).
    """
    kind = device_type if device_type in ("cuda", "reference") else "cpu"
    flips = 2.0 ** max(n_pairs - 1, 0) if mode == "exact" else float(n_flips)
    rate = _RATES[(kind, mode)]
    if mode == "random" and kind != "reference":
        rate *= _RANDOM_RATE_PAIRS / max(n_pairs, 1)
    rate /= 1.0 + _THRESHOLD_COST[kind] * max(n_thresholds - 1, 0)
    return flips * n_units * passes / rate


def check_null_budget(mode: str, n_pairs: int, n_units: int, n_flips: int, device_type: str,
                      alpha: float = ALPHA, budget_s: float = NULL_BUDGET_S, n_thresholds: int = 2) -> float:
    """Return the estimated seconds of the null, or raise :class:`NullTooExpensive` past ``budget_s``.

    Called before any work (``otherview plan`` / ``exec``). The message gives the estimate and the
    way out: random mode with a flip count fine enough for alpha and the unit count, and its time.
    """
    secs = estimate_null_seconds(mode, n_pairs, n_units, n_flips, device_type, n_thresholds)
    if secs <= budget_s:
        return secs
    flips = required_flips(n_units, alpha)
    alt = estimate_null_seconds("random", n_pairs, n_units, flips, device_type, n_thresholds)
    what = f"2^{n_pairs - 1} flips" if mode == "exact" else f"{n_flips} flips"
    raise NullTooExpensive(
        f"null.method = \"{mode}\": {what} x {n_units} units is estimated at {_duration(secs)} on {device_type} "
        f"(budget {_duration(budget_s)}); use null.method = \"random\" with null.flips = {flips} "
        f"(~{_duration(alt)}, smallest p {1 / flips:.2g})" + ("" if device_type == "cuda" else ", or run on a GPU"))


def _duration(s: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.3g} {unit}"
    return f"{s:.3g} s"


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
        out = {"d_z": self.d_z, "d_z_low": self.d_z_low, "d_z_high": self.d_z_high, "q": self.q,
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
