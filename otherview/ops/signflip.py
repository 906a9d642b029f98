"""The sign-flip null of the paired t statistic, for every unit at once.

For paired differences ``d[i, u]`` (pair ``i``, unit ``u``) the paired t of unit ``u`` is
``t = mean(d) / (sd(d) / sqrt(N))``. Under the null of a distribution symmetric about 0 every sign
pattern ``s`` in ``{+1, -1}^N`` is equally likely (a randomisation test; Diaconis & Holmes 1994,
Winkler et al. 2014 "Permutation inference for the general linear model", PALM). The sum of squares
``Q = sum_i d_i^2`` does not change under a flip, so the flipped t depends only on
``S = sum_i s_i d_i``::

    t^2 = S^2 (N - 1) / (N Q - S^2),   |t| > c  <=>  |S| / sqrt(N Q) > c / sqrt(N - 1 + c^2).

``r = |S| / sqrt(N Q)`` in ``[0, 1]`` is the same increasing function of ``|t|`` for every unit
(``|t| = r sqrt((N - 1) / (1 - r^2))``), which is what makes a max-statistic (family-wise) null cheap.

Exactness. ``d`` is quantised once per unit to integers ``q = round(d * M / max_i |d_iu|)`` with
``M = floor((2^31 - 1) / max(N, 2))``, so every flipped sum fits int32 and the whole null is integer
arithmetic: this changes each t by at most about 1e-7 of ``max(1, |t|)`` (the quantisation step is
``max |d| / M``, ~1.4e-8 of the unit's largest |d| for N = 30), and makes the result bitwise
identical on the CPU and CUDA and from run to run. Threshold ``k`` is exceeded when
``|S| > T_uk = floor(c'_k sqrt(N Q_u))`` (``c' = c / sqrt(N - 1 + c^2)``, strict); a flip counts
toward unit ``u``'s p-value when ``|S| >= |S_obs|`` (ties with the observed value count); ``r`` is kept
in 24-bit fixed point ``r_fix = (|S| * K_u) >> 32`` with ``K_u = floor(2^56 / sqrt(N Q_u))``. The
per-unit integers come from one preparation step (float64, correctly rounded on every backend).

Edge cases: a unit whose ``d`` is all zero has t = 0 under every flip (never above a threshold,
p = 1, r = 0); with one pair (N = 1) t is 0 everywhere; a constant nonzero unit has |t| = inf
(as scipy) under the identity and its negation, i.e. r = 1. The observed labelling (flip 0, the
identity) is part of the null, so no p-value is 0.

Modes. ``"exact"`` enumerates all ``2^(N-1)`` patterns with pair 0's sign held at +1 (a pattern
and its negation give the same |t|), in Gray-code order so that each step changes one sign.
``"random"`` draws ``n_flips`` patterns, flip 0 being the identity, from a counter-based generator
keyed by ``(seed, flip, pair)`` (:func:`random_signs`), so the result does not depend on the
launch configuration or the number of threads.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from otherview import ops

__all__ = [
    "EXACT_MAX_PAIRS",
    "MAX_PAIRS",
    "UNIT_FLIP_BUDGET",
    "NullResult",
    "auto_mode",
    "exact_signs",
    "random_signs",
    "signflip_null",
    "signflip_null_ref",
]

_OP = "signflip_null"
#: The op accepts at most this many pairs: beyond, the quantisation step grows (M ~ 2^31 / N) and
#: the fixed-point ``K_u`` would no longer fit 32 bits.
MAX_PAIRS = 4096
#: Exact mode accepts at most this many pairs (2^39 flips): at 16,320 units that is ~5 hours on an
#: H100 and years on a CPU, so :func:`auto_mode` switches to random long before.
EXACT_MAX_PAIRS = 40
#: Unit-flips (2^(N-1) * U) under which :func:`auto_mode` picks exact enumeration, per device
#: type. Calibrated on measured rates: the CUDA kernel does 1.7e12 (two thresholds) to 2.1e12 (one)
#: unit-flips/s on an H100, so 1e13 is ~5-6 s; the CPU op 0.6e9-1.7e9 unit-flips/s at U = 16,320 and
#: 0.24e9-0.56e9 at U = 10 on a 2-core host, so 1e10 is ~6-40 s.
UNIT_FLIP_BUDGET = {"cuda": 1e13, "cpu": 1e10}
_MAX_BINS = 1 << 20
_R_BITS = 24
_MASK64 = (1 << 64) - 1


class NullResult(NamedTuple):
    """The sign-flip null of every unit, as integer counts over flips (identity included).

    Attributes
    ----------
    count_hist : Tensor, int64, shape (n_thresholds, n_units + 1)
        ``count_hist[k, j]``: flips in which exactly ``j`` units have ``|t| > thresholds[k]``.
    exceed : Tensor, int64, shape (n_units,)
        Flips whose ``|t_u|`` is >= the observed ``|t_u|``.
    fwer_exceed : Tensor, int64, shape (n_units,)
        Flips whose maximum over units of ``|t|`` is >= the observed ``|t_u|``.
    max_hist : Tensor, int64, shape (n_max_bins,)
        Histogram over flips of ``max_u r_u``, bin ``min(floor(r * n_max_bins), n_max_bins - 1)``.
    n_flips : int
        Flips in the null, the identity included (``2^(N-1)`` in exact mode).
    mode : str
        ``"exact"`` or ``"random"``.
    n_pairs : int
        N, needed to turn ``r`` back into ``|t|``.
    thresholds : tuple of float
        The ``c_k`` of ``count_hist``'s rows.
    """

    count_hist: torch.Tensor
    exceed: torch.Tensor
    fwer_exceed: torch.Tensor
    max_hist: torch.Tensor
    n_flips: int
    mode: str
    n_pairs: int = 0
    thresholds: tuple = ()

    @property
    def p_uncorrected(self) -> np.ndarray:
        """Per-unit p-values ``exceed / n_flips``, float64 array of shape (n_units,); never 0."""
        return self.exceed.numpy().astype(np.float64) / self.n_flips

    @property
    def p_fwer(self) -> np.ndarray:
        """Family-wise (max-statistic) p-values ``fwer_exceed / n_flips``, shape (n_units,)."""
        return self.fwer_exceed.numpy().astype(np.float64) / self.n_flips

    def count_mean(self, k: int) -> float:
        """Return the mean over flips of the number of units with ``|t| > thresholds[k]``."""
        h = self.count_hist[k].numpy().astype(np.float64)
        return float((h * np.arange(h.size)).sum() / h.sum())

    def count_quantile(self, k: int, q: float) -> int:
        """Return the smallest unit count ``j`` whose null CDF ``P(count <= j)`` is >= ``q``."""
        return hist_quantile(self.count_hist[k].numpy(), q)

    def _r_to_t(self, r: np.ndarray) -> np.ndarray:
        if self.n_pairs < 2:
            return np.zeros_like(r)
        with np.errstate(divide="ignore"):
            return r * np.sqrt((self.n_pairs - 1) / np.maximum(1.0 - r * r, 0.0))

    def max_t_quantile(self, q: float) -> float:
        """Return the ``q`` quantile of the null's max over units of ``|t|``, at bin resolution.

        The value is the upper edge of the first max-histogram bin whose CDF is >= ``q``, turned
        into ``|t|``: an upper bound on the quantile, off by at most one bin width in ``r``. The
        top bin's upper edge is ``r = 1``, which is ``|t| = inf`` (returned as such).
        """
        b = hist_quantile(self.max_hist.numpy(), q)
        return float(self._r_to_t(np.array([(b + 1) / self.max_hist.numel()]))[0])

    def max_t_mean(self) -> float:
        """Return the mean over flips of the max over units of ``|t|``, from bin midpoints.

        Midpoints are below 1, so the value is finite even when some flip had ``r = 1``.
        """
        h = self.max_hist.numpy().astype(np.float64)
        mid = (np.arange(h.size) + 0.5) / h.size
        return float((h * self._r_to_t(mid)).sum() / h.sum())


def hist_quantile(h: np.ndarray, q: float) -> int:
    """Return the smallest bin whose cumulative share of histogram ``h`` is >= ``q``."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    cdf = np.cumsum(h.astype(np.float64)) / h.sum()
    return int(np.searchsorted(cdf, q - 1e-12 * (q > 0), side="left"))


def auto_mode(n_pairs: int, n_units: int, device: torch.device | str) -> str:
    """Return ``"exact"`` when ``2^(n_pairs-1) * n_units`` is within the device's budget.

    The budgets are :data:`UNIT_FLIP_BUDGET` (CUDA: 1e13 unit-flips, ~5 s on an H100 and enough for
    N = 30 at 16,320 units; CPU: 1e10, enough for N = 30 at 10 units or N = 20 at 16,320 units).
    Exact mode is never chosen above :data:`EXACT_MAX_PAIRS` pairs.
    """
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    if n_pairs > EXACT_MAX_PAIRS:
        return "random"
    return "exact" if 2.0 ** max(n_pairs - 1, 0) * n_units <= UNIT_FLIP_BUDGET[kind] else "random"


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic), as in the C++ and CUDA ops."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_signs(seed: int, flip_indices, n: int) -> torch.Tensor:
    """Return random mode's sign patterns, int8 tensor of shape (len(flip_indices), n) in {+1, -1}.

    Flip ``f > 0`` negates pair ``i`` when bit ``i % 64`` of
    ``mix64(mix64(mix64(seed) ^ f) ^ (i // 64))`` is set (``mix64``: splitmix64's step, uint64
    wrap-around, ``seed`` taken modulo 2^64); flip 0 is the identity (all +1).
    """
    f = np.asarray(flip_indices, dtype=np.int64).reshape(-1)
    with np.errstate(over="ignore"):
        key = _mix64(np.array([int(seed) & _MASK64], dtype=np.uint64))[0]
        n_words = max((n + 63) // 64, 1)
        words = _mix64(_mix64(key ^ f.astype(np.uint64))[:, None] ^ np.arange(n_words, dtype=np.uint64))
    i = np.arange(n)
    bits = (words[:, i // 64] >> (i % 64).astype(np.uint64)) & np.uint64(1)
    bits[f == 0] = 0
    return torch.from_numpy(1 - 2 * bits.astype(np.int8))


def exact_signs(n: int, flip_indices) -> torch.Tensor:
    """Return exact mode's patterns, int8 tensor of shape (len(flip_indices), n) in {+1, -1}.

    Flip ``j`` in ``[0, 2^(n-1))`` is the Gray code ``g = j ^ (j >> 1)``: pair ``i >= 1`` is negated
    when bit ``i - 1`` of ``g`` is set, pair 0 is always +1. The compiled kernels visit the same set
    of patterns (in another order, which no output depends on).
    """
    j = np.asarray(flip_indices, dtype=np.int64).reshape(-1)
    g = j ^ (j >> 1)
    i = np.arange(1, n)
    bits = (g[:, None] >> (i - 1)) & 1
    out = np.ones((j.size, n), dtype=np.int8)
    out[:, 1:] = 1 - 2 * bits.astype(np.int8)
    return torch.from_numpy(out)


def _check_args(d, thresholds, mode, n_flips, n_max_bins) -> None:
    """Raise the C++ checks' errors (``check_signflip_args``), same class and text."""

    def fail(exc: type[Exception], msg: str) -> None:
        raise exc(f"{_OP}: {msg}")

    if d.dim() != 2:
        fail(ValueError, f"d must be 2-d [n_pairs, n_units], got shape {list(d.shape)}")
    if d.dtype not in (torch.float32, torch.float64):
        fail(TypeError, f"d must be torch.float32 or torch.float64, got {d.dtype}")
    n = d.shape[0]
    if not 1 <= n <= MAX_PAIRS:
        fail(ValueError, f"d must have 1 to {MAX_PAIRS} pairs (rows), got {n}")
    if d.shape[1] < 1:
        fail(ValueError, f"d must have at least one unit (column), got {d.shape[1]}")
    if mode not in ("exact", "random"):
        fail(ValueError, f'mode must be "exact" or "random", got "{mode}"')
    if mode == "exact" and n > EXACT_MAX_PAIRS:
        fail(
            ValueError,
            f"exact mode enumerates 2^(n_pairs-1) flips and accepts at most {EXACT_MAX_PAIRS} pairs, "
            f'got {n}; use mode="random"',
        )
    if mode == "random" and n_flips < 1:
        fail(ValueError, f"random mode needs n_flips >= 1 (flip 0 is the identity), got {n_flips}")
    for k, c in enumerate(thresholds):
        if not (math.isfinite(c) and c >= 0):
            fail(ValueError, f"thresholds must be finite and >= 0, got thresholds[{k}] = {c}")
    if not 1 <= n_max_bins <= _MAX_BINS:
        fail(ValueError, f"n_max_bins must be in [1, {_MAX_BINS}], got {n_max_bins}")


def _prep(d: torch.Tensor, thresholds: list[float]):
    """Return (q int64 [N, U], T int64 [K, U], a_obs, kinv, r_obs int64 [U]): the C++ prep step."""
    n = d.shape[0]
    m = float(((1 << 31) - 1) // max(n, 2))
    d64 = d.double()
    amax = d64.abs().amax(0)
    scale = torch.where(amax > 0, torch.full_like(amax, m).div(amax), torch.zeros_like(amax))
    q = (d64 * scale).round().clamp(-m, m).long()
    qq = (q * q).sum(0)
    a_obs = q.sum(0).abs()
    sq = (qq * n).double().sqrt()
    if n < 2:
        t_int = torch.full((len(thresholds), d.shape[1]), (1 << 31) - 1, dtype=torch.long, device=d.device)
        kinv = torch.zeros(d.shape[1], dtype=torch.long, device=d.device)
    else:
        cp = torch.tensor([c / math.sqrt(float(n - 1) + c * c) for c in thresholds], dtype=torch.float64)
        t_int = (cp.to(d.device).unsqueeze(1) * sq.unsqueeze(0)).floor().long()
        inv = torch.full_like(sq, 2.0**56).div(sq).floor().clamp_max(4294967295.0)
        kinv = torch.where(sq > 0, inv, torch.zeros_like(sq)).long()
    r_obs = torch.div(a_obs * kinv, 1 << 32, rounding_mode="floor")
    return q, t_int, a_obs, kinv, r_obs


def signflip_null_ref(
    d: torch.Tensor,
    thresholds,
    mode: str = "exact",
    n_flips: int = 0,
    seed: int = 0,
    n_max_bins: int = 4096,
    *,
    chunk: int = 8192,
) -> NullResult:
    """Return the sign-flip null in plain PyTorch: the specification of the compiled op.

    The GEMM form: a chunk of sign patterns ``[chunk, N]`` times the quantised ``q [N, U]`` gives
    every flipped sum ``S`` (float64 matmul, exact since ``|S| < 2^31``), then the integer
    comparisons of the module docstring. Arguments and result are those of :func:`signflip_null`.
    """
    thresholds = [float(c) for c in thresholds]
    _check_args(d, thresholds, mode, n_flips, n_max_bins)
    n, u = d.shape
    q, t_int, a_obs, kinv, r_obs = _prep(d, thresholds)
    total = 1 << (n - 1) if mode == "exact" else int(n_flips)
    dev = d.device
    qf = q.double()
    count_hist = torch.zeros(len(thresholds), u + 1, dtype=torch.long, device=dev)
    exceed = torch.zeros(u, dtype=torch.long, device=dev)
    max_hist = torch.zeros(n_max_bins, dtype=torch.long, device=dev)
    flip_max = []
    for f0 in range(0, total, chunk):
        idx = np.arange(f0, min(total, f0 + chunk))
        signs = exact_signs(n, idx) if mode == "exact" else random_signs(seed, idx, n)
        a = (signs.to(dev, torch.float64) @ qf).long().abs()  # [P, U]
        exceed += (a >= a_obs).sum(0)
        for k in range(len(thresholds)):
            cnt = (a > t_int[k]).sum(1)
            count_hist[k] += torch.bincount(cnt, minlength=u + 1)
        mx = torch.div(a * kinv, 1 << 32, rounding_mode="floor").amax(1)
        max_hist += torch.bincount(
            torch.clamp((mx * n_max_bins) >> _R_BITS, max=n_max_bins - 1), minlength=n_max_bins
        )
        flip_max.append(mx)
    mx = torch.cat(flip_max)
    # fwer: flips whose max r_fix >= r_obs[u]; sorted maxima + searchsorted, no [flips x units].
    mx_sorted = torch.sort(mx).values
    fwer = total - torch.searchsorted(mx_sorted, r_obs, side="left")
    return NullResult(
        count_hist.cpu(), exceed.cpu(), fwer.cpu(), max_hist.cpu(), total, mode, n, tuple(thresholds)
    )


def signflip_null(
    d: torch.Tensor,
    thresholds,
    mode: str = "exact",
    n_flips: int = 0,
    seed: int = 0,
    n_max_bins: int = 4096,
) -> NullResult:
    """Return the sign-flip null of the paired t of every unit of ``d``.

    Parameters
    ----------
    d : Tensor, shape (n_pairs, n_units), float32 or float64, finite
        Paired differences (viewpoint - mention) per pair and unit; 1 <= n_pairs <= 4096.
    thresholds : sequence of float, length K
        Thresholds ``c_k >= 0`` on ``|t|`` for ``count_hist`` (strict: ``|t| > c_k``).
    mode : {"exact", "random"}
        ``"exact"``: all ``2^(N-1)`` flips (N <= 40, ``n_flips`` ignored); ``"random"``: ``n_flips``
        flips (identity included) from :func:`random_signs` with ``seed``. See :func:`auto_mode`.
    n_flips, seed : int
        Random mode's flip count (>= 1) and generator key.
    n_max_bins : int
        Bins of ``max_hist`` over ``r`` in [0, 1], 1 to 2^20.

    Returns
    -------
    NullResult
        Counts on the CPU. The compiled op (CPU or CUDA, by ``d``'s device) is used where it was
        built, else :func:`signflip_null_ref`; both give identical integers.
    """
    thresholds = [float(c) for c in thresholds]
    _check_args(d, thresholds, mode, n_flips, n_max_bins)
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"{_OP}: d contains NaN or inf; drop or impute those pairs first")
    if not ops.has_kernel(_OP, d.device):
        return signflip_null_ref(d, thresholds, mode, n_flips, seed, n_max_bins)
    out = torch.ops.otherview.signflip_null(d, thresholds, mode, int(n_flips), int(seed), int(n_max_bins))
    total = 1 << (d.shape[0] - 1) if mode == "exact" else int(n_flips)
    return NullResult(*(t.cpu() for t in out), total, mode, d.shape[0], tuple(thresholds))


if ops.compiled_available():

    @torch.library.register_fake("otherview::signflip_null")
    def _signflip_null_fake(d, thresholds, mode, n_flips, seed, n_max_bins):
        _check_args(d, thresholds, mode, n_flips, n_max_bins)
        u = d.shape[1]
        i64 = torch.long
        return (
            d.new_empty((len(thresholds), u + 1), dtype=i64),
            d.new_empty((u,), dtype=i64),
            d.new_empty((u,), dtype=i64),
            d.new_empty((n_max_bins,), dtype=i64),
        )
