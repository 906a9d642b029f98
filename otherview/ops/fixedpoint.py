"""The integers the sign-flip null compares: exact per-unit fixed point of paired differences.

Every backend of ``signflip_null`` (compiled CPU, compiled CUDA, the plain-PyTorch reference) works
on the integers made here, once, on the host, in numpy and Python integers, so they agree bitwise.

Quantisation. Unit ``u``'s differences become integers ``q[:, u]`` with ``sum_i |q_iu| <= 2^30 - 1``
(so every flipped sum ``S``, every partial sum and ``2 q`` fit int32), by the first that applies:

1. binary: ``q = d * 2^k`` for the largest power of two that keeps the sum in range (``ldexp``, so
   exact for any float64 scale from subnormal to 1.8e308). When every ``d * 2^k`` is an integer --
   integer data, halves, float32 values within a factor ~2^(30 - log2 N) of the unit's largest --
   ``q`` is ``d`` exactly up to a power of two, and every comparison below is exact.
2. decimal: ``d`` lies on a decimal grid (``d * 10^j`` within 1e-13 relative of integers ``m``,
   at most 16 digits below the unit's largest, the float64 representation error being ~3e-16):
   ``q = m * 2^p``. Data rounded to
   ``j`` decimals are then tested as those decimals, so a tie of decimals (0.1 + 0.2 = 0.3) is a tie,
   as in exact arithmetic and in a float64 computation with a relative tolerance.
3. otherwise ``q = round(d * 2^k)``: each value moves by at most half a step of
   ``sum_i |d_iu| / 2^29``, i.e. t moves by less than 1e-7 of ``max(1, |t|)`` (3.5e-8 measured at
   N = 30 over 200 normal units); the null is then exact for
   these integers (``exact_units`` records which units went this way).

Thresholds are exact. ``|t| > c`` is ``S^2 (N - 1 + c^2) > c^2 N Q`` (``Q = sum_i q_i^2``, unchanged
by flips), an integer inequality once ``c`` is read as the decimal it was written as (``2.9`` is
29/10, from its shortest repr): ``T_uk`` is the largest ``|S|`` not over threshold ``k``, so
``|S| > T_uk`` is the strict ``|t| > c_k`` with no rounding, and ``|t| = c`` exactly is not over.

The family-wise comparison sets units against each other through ``r = |S| / sqrt(N Q)`` (the same
increasing function of ``|t|`` in every unit). It is kept in 28-bit fixed point,
``r_fix = (|S| * K_u) >> 32`` with ``K_u = floor(2^60 / sqrt(N Q_u))`` (exact integer square root),
and the true ``r * 2^28`` lies in ``[r_fix, r_fix + 1.25)``. The op therefore returns two counts per
unit: flips whose max certainly reaches the unit's observed r (``max r_fix >= r_fix_obs + 2``) and
flips whose max possibly does (``max r_fix >= r_fix_obs - 1``); the exact count lies between them,
and the family-wise p uses the upper one (conservative, never below the exact p).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

#: Upper bound on ``sum_i |q_iu|``: flipped sums, partial sums and ``2 q`` all fit int32.
Q_SUM_LIMIT = (1 << 30) - 1
#: Fixed-point bits of ``r``: ``r_fix`` lies in ``[0, 2^R_BITS]``.
R_BITS = 28
_INT32_MAX = (1 << 31) - 1
_DECIMAL_DIGITS = 15
_DECIMAL_RTOL = 1e-13


class Prepared(NamedTuple):
    """The integers every backend of ``signflip_null`` compares (all on the CPU).

    Attributes
    ----------
    q : Tensor, int32, shape (n_pairs, n_units)
        Quantised differences, ``sum_i |q_iu| <= 2^30 - 1``.
    thr : Tensor, int32, shape (n_thresholds, n_units)
        Flip ``s`` has ``|t_u| > c_k`` iff ``|S_u| > thr[k, u]``.
    a_obs : Tensor, int32, shape (n_units,)
        ``|S|`` of the observed labelling.
    kinv : Tensor, int64, shape (n_units,)
        ``K_u = floor(2^60 / sqrt(N Q_u))`` (< 2^32; 0 for an all-zero unit or N = 1).
    exact_units : ndarray of bool, shape (n_units,)
        Whether ``q`` represents ``d`` exactly (binary or decimal grid) rather than rounded.
    observed_count : ndarray of int64, shape (n_thresholds,)
        Units with ``|t| > c_k`` in the observed labelling (exact, same rule as the null).
    """

    q: torch.Tensor
    thr: torch.Tensor
    a_obs: torch.Tensor
    kinv: torch.Tensor
    exact_units: np.ndarray
    observed_count: np.ndarray

    def columns(self, idx: np.ndarray) -> "Prepared":
        """Return the same integers for the units ``idx`` only (each unit's integers are its own)."""
        t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        thr = self.thr[:, t].contiguous()
        a = self.a_obs[t].contiguous()
        count = (a.long()[None] > thr.long()).sum(1).numpy()
        return Prepared(self.q[:, t].contiguous(), thr, a, self.kinv[t].contiguous(),
                        self.exact_units[np.asarray(idx)], count)


def _binary(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (q int64 [N, U], exact bool [U]) for the power-of-two scaling of every unit."""
    amax = np.abs(d).max(0)
    _, e = np.frexp(np.where(amax > 0, amax, 1.0))
    dn = np.ldexp(d, -e[None, :])  # |dn| < 1, exact unless far below the unit's max
    _, es = np.frexp(np.maximum(np.abs(dn).sum(0), 1e-300))
    k = (30 - es).astype(np.int64)  # sum |dn| * 2^k < 2^30
    while True:
        scaled = np.ldexp(dn, k[None, :])
        q = np.rint(scaled)
        over = np.abs(q).sum(0) > Q_SUM_LIMIT
        if not over.any():
            break
        k = k - over  # rounding pushed the sum over: one power of two less for those units
    return q.astype(np.int64), (q == scaled).all(0)


def _decimal(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (m int64 [N, U], found bool [U]): the coarsest decimal grid each unit lies on.

    Grids ``10^-j`` with ``j`` from ``-floor(log10(max |d|))`` up 15 digits, so integers times
    1e300 are found as well as values rounded to 2 decimals.
    """
    n, u = d.shape
    m = np.zeros((n, u), dtype=np.int64)
    found = np.zeros(u, dtype=bool)
    amax = np.abs(d).max(0)
    with np.errstate(divide="ignore"):
        j0 = -np.floor(np.log10(np.where(amax > 0, amax, 1.0))).astype(np.int64)
    for offset in range(_DECIMAL_DIGITS + 1):
        j = j0 + offset
        todo = ~found & (amax > 0) & (np.abs(j) <= 340)
        half = j // 2  # 10^j in two factors, each a normal float64, for j down to -340 (subnormals)
        todo &= amax * 10.0 ** half * 10.0 ** (j - half) * n <= Q_SUM_LIMIT
        if not todo.any():
            continue
        y = d[:, todo] * 10.0 ** half[todo][None, :] * 10.0 ** (j - half)[todo][None, :]
        r = np.rint(y)
        ok = ((y == 0) | ((r != 0) & (np.abs(y - r) <= _DECIMAL_RTOL * np.abs(y)))).all(0)
        ok &= np.abs(r).sum(0) <= Q_SUM_LIMIT
        cols = np.flatnonzero(todo)[ok]
        m[:, cols] = r[:, ok].astype(np.int64)
        found[cols] = True
    return m, found


def _fill(m: np.ndarray) -> np.ndarray:
    """Scale integer columns by the largest power of two keeping ``sum |q| <= Q_SUM_LIMIT``."""
    s = np.abs(m).sum(0)
    p = np.zeros(m.shape[1], dtype=np.int64)
    nz = s > 0
    p[nz] = np.floor(np.log2(Q_SUM_LIMIT / s[nz])).astype(np.int64)
    p = np.maximum(p, 0)
    p -= (s << p) > Q_SUM_LIMIT  # log2 rounding
    return m << p[None, :]


def quantise(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (q int64 [N, U], exact bool [U]): the module docstring's fixed point of ``d``.

    Parameters
    ----------
    d : ndarray, shape (n_pairs, n_units), float64, finite

    Returns
    -------
    q : ndarray, int64, shape (n_pairs, n_units)
        ``sum_i |q_iu| <= 2^30 - 1``; a unit with max |q| > 0 has ``sum_i |q_iu| > 2^28``.
    exact : ndarray of bool, shape (n_units,)
        True where ``q`` is ``d`` times a constant exactly (binary), or on ``d``'s decimal grid.
    """
    q, exact = _binary(d)
    rest = np.flatnonzero(~exact)
    if rest.size:
        m, found = _decimal(d[:, rest])
        if found.any():
            cols = rest[found]
            q[:, cols] = _fill(m[:, found])
            exact[cols] = True
    return q, exact


def _threshold_fraction(c: float) -> Fraction:
    """Return threshold ``c`` as the decimal it was written as (2.9 -> 29/10)."""
    return Fraction(repr(float(c)))


def prepare(d: torch.Tensor | np.ndarray, thresholds) -> Prepared:
    """Return the integers of ``signflip_null`` for differences ``d`` (shape (n_pairs, n_units)).

    ``d`` must be finite (checked by the callers). See the module docstring for the rules.
    """
    d64 = d.detach().cpu().double().numpy() if isinstance(d, torch.Tensor) else np.asarray(d, np.float64)
    n, u = d64.shape
    q, exact = quantise(d64)
    s_obs = q.sum(0)
    a_obs = np.abs(s_obs)
    nq = [int(v) * n for v in (q * q).sum(0)]  # N Q < 2^72: Python integers
    thr = np.full((len(thresholds), u), _INT32_MAX, dtype=np.int64)
    kinv = np.zeros(u, dtype=np.int64)
    if n >= 2:
        for k, c in enumerate(thresholds):
            f = _threshold_fraction(c)
            num, den = f.numerator * f.numerator, (n - 1) * f.denominator**2 + f.numerator**2
            # largest a with a^2 (N - 1 + c^2) <= c^2 N Q: |S| > a  <=>  |t| > c
            thr[k] = [min(math.isqrt(num * x // den), _INT32_MAX) for x in nq]
        kinv[:] = [math.isqrt((1 << 120) // x) if x else 0 for x in nq]
    if (kinv >= 1 << 32).any():  # excluded by sum |q| > 2^28 (Cauchy-Schwarz: sqrt(N Q) >= sum |q|)
        raise AssertionError("signflip_null: fixed-point reciprocal out of range")
    observed = (a_obs[None, :] > thr).sum(1)
    return Prepared(torch.from_numpy(q.astype(np.int32)), torch.from_numpy(thr.astype(np.int32)),
                    torch.from_numpy(a_obs.astype(np.int32)), torch.from_numpy(kinv), exact,
                    observed.astype(np.int64))


def r_fix(a: torch.Tensor, kinv: torch.Tensor) -> torch.Tensor:
    """Return ``(a * kinv) >> 32`` (int64): the fixed-point ``r * 2^28`` of sums ``|S| = a``."""
    return torch.div(a.long() * kinv, 1 << 32, rounding_mode="floor")
