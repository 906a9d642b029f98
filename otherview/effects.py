"""Effect sizes of paired differences: Cohen's d_z, Hedges' g_z and the exact noncentral-t interval.

Numpy and scipy (``scipy.stats.nct``, ``scipy.special.gammaln``); re-exported by
:mod:`otherview.inference`. Conventions where sd(d) = 0 follow the paired t's: a nonzero constant unit
is +-inf, an all-zero unit 0, and its interval collapses onto the estimate.
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist

import numpy as np

def _scipy():
    """Return scipy.special and scipy.stats, imported on first use (a second of start-up otherwise)."""
    from scipy import special, stats

    return special, stats

CI_LEVEL = 0.95


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
    return float(np.exp(_scipy()[0].gammaln(m / 2) - 0.5 * np.log(m / 2) - _scipy()[0].gammaln((m - 1) / 2)))


def _nct_delta(t: np.ndarray, df: int, target: float) -> np.ndarray:
    """Return delta with ``nct.cdf(t, df, delta) = target``, vectorised (cdf decreases in delta).

    A bracket around the normal approximation (grown where needed), then the Illinois variant of
    regula falsi on the units not yet converged (|cdf - target| < 1e-14 or a bracket of 1e-11).
    """
    def f(x, idx):
        c = _scipy()[1].nct.cdf(t[idx], df, x)
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
    failed = ~(np.abs(_scipy()[1].nct.cdf(t, df, x) - target) <= 1e-8)
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
