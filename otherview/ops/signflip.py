"""The sign-flip null of the paired t statistic, for every unit at once.

For paired differences ``d[i, u]`` (pair ``i``, unit ``u``) the paired t of unit ``u`` is
``t = mean(d) / (sd(d) / sqrt(N))``. Under the null of a distribution symmetric about 0 every sign
pattern ``s`` in ``{+1, -1}^N`` is equally likely (a randomisation test; Diaconis & Holmes 1994,
Winkler et al. 2014 "Permutation inference for the general linear model", PALM). The sum of squares
``Q = sum_i d_i^2`` does not change under a flip, so the flipped t depends only on
``S = sum_i s_i d_i``::

    t^2 = S^2 (N - 1) / (N Q - S^2),   |t| > c  <=>  S^2 (N - 1 + c^2) > c^2 N Q.

``r = |S| / sqrt(N Q)`` in ``[0, 1]`` is the same increasing function of ``|t|`` for every unit
(``|t| = r sqrt((N - 1) / (1 - r^2))``), which is what makes a max-statistic (family-wise) null cheap.

Exactness. ``d`` is turned once into integers (:mod:`otherview.ops.fixedpoint`: a power-of-two
scale, or the data's decimal grid, exact for integer, dyadic and rounded data; else rounding that
moves t by less than 1e-7 of ``max(1, |t|)``), and the whole null is then integer arithmetic, bitwise
identical on the CPU and CUDA and from run to run. Per unit, the p-value counts flips with
``|S| >= |S_obs|`` (ties count) and threshold ``k`` is exceeded when ``|S| > T_uk`` (the exact
integer form of ``|t| > c_k``): both exact. The family-wise count compares units through ``r`` in
28-bit fixed point and comes as a bracket: ``fwer_exceed`` (flips whose max possibly reaches the
unit's observed r; the p uses it, so it is never below the exact p) and ``fwer_exceed_lo`` (flips
whose max certainly does). The two differ only where a flip's max is within ~5e-9 of an observed r.

Edge cases: a unit whose ``d`` is all zero has t = 0 under every flip (never above a threshold,
p = 1, r = 0); with one pair (N = 1) t is 0 everywhere; a constant nonzero unit has |t| = inf
(as scipy) under the identity and its negation, i.e. r = 1. The observed labelling (flip 0, the
identity) is part of the null, so no p-value is 0.

Modes. ``"exact"`` enumerates all ``2^(N-1)`` patterns with pair 0's sign held at +1 (a pattern
and its negation give the same |t|), in Gray-code order so that each step changes one sign.
``"random"`` draws ``n_flips`` patterns, flip 0 being the identity, from a counter-based generator
keyed by ``(seed, flip, pair)`` (:func:`random_signs`), so the result does not depend on the
launch configuration, the number of threads or which units are passed (what step-down relies on).

Splitting. Every output is a count over flips, so a null can be cut into flip ranges: ``flip_range
= (start, stop)`` counts only flips ``start <= f < stop`` of the indexing above (exact: the Gray
index, flip 0 the identity; random: the generator's counter), and the counts of ranges tiling
``[0, n_flips)`` add up to the whole null's, bitwise. :class:`FlipSplit` does this across processes
(``otherview.distributed``): each process counts its share and the counts are summed.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from otherview import ops
from otherview.ops.fixedpoint import R_BITS, Prepared, prepare, r_fix
from otherview.ops.null_result import NullResult, hist_quantile

__all__ = [
    "EXACT_MAX_PAIRS",
    "MAX_PAIRS",
    "UNIT_FLIP_BUDGET",
    "FlipSplit",
    "NullResult",
    "Prepared",
    "auto_mode",
    "exact_signs",
    "hist_quantile",
    "prepare",
    "random_signs",
    "signflip_null",
    "signflip_null_ref",
    "step_down",
]

_OP = "signflip_null"
#: The op accepts at most this many pairs (the fixed point's K_u < 2^32 needs N <= 4096).
MAX_PAIRS = 4096
#: Exact mode accepts at most this many pairs (2^39 flips): at 16,320 units that is ~5 hours on an
#: H100 and years on a CPU; :func:`otherview.inference.check_null_budget` refuses long before.
EXACT_MAX_PAIRS = 40
#: Unit-flips (2^(N-1) * U) under which :func:`auto_mode` picks exact enumeration, per device
#: type. Calibrated on measured rates: the CUDA kernel does 1.7e12 (two thresholds) to 2.1e12 (one)
#: unit-flips/s on an H100, so 1e13 is ~5-6 s; the CPU op 0.6e9-1.7e9 unit-flips/s at U = 16,320 and
#: 0.24e9-0.56e9 at U = 10 on a 2-core host, so 1e10 is ~6-40 s.
UNIT_FLIP_BUDGET = {"cuda": 1e13, "cpu": 1e10}
_MAX_BINS = 1 << 20
_MASK64 = (1 << 64) - 1


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


class FlipSplit(NamedTuple):
    """One null's flips shared among ``world`` processes: process ``rank`` counts its range.

    ``sum`` takes an int64 tensor and returns the elementwise sum of every process's tensor, on
    every process (an all-reduce). Integer sums are exact in any order, so a split null is bitwise
    the one-process null; every process gets the same counts, so every process takes the same
    step-down decisions (each step-down pass is split alike).
    """

    rank: int
    world: int
    sum: Callable[[torch.Tensor], torch.Tensor]

    def ranges(self, total: int) -> tuple[tuple[int, int], ...]:
        """Return every process's flip range ``(start, stop)``, in rank order: near-equal shares of ``total``."""
        return tuple((total * r // self.world, total * (r + 1) // self.world) for r in range(self.world))


def _total_flips(mode: str, n_pairs: int, n_flips: int) -> int:
    """Return the flips of the whole null: ``2^(n_pairs-1)`` in exact mode, ``n_flips`` in random mode."""
    return 1 << (n_pairs - 1) if mode == "exact" else int(n_flips)


def _check_args(d, thresholds, mode, n_flips, n_max_bins, flip_range=None) -> None:
    """Raise the checks of :func:`signflip_null` on ``d`` and the settings (ValueError / TypeError)."""

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
    _check_settings(n, thresholds, mode, n_flips, n_max_bins, flip_range)


def _check_settings(n, thresholds, mode, n_flips, n_max_bins, flip_range=None) -> None:
    """The checks the C++ ``check_signflip_args`` repeats word for word (same class and text)."""

    def fail(msg: str) -> None:
        raise ValueError(f"{_OP}: {msg}")

    if mode not in ("exact", "random"):
        fail(f'mode must be "exact" or "random", got "{mode}"')
    if mode == "exact" and n > EXACT_MAX_PAIRS:
        fail(f"exact mode enumerates 2^(n_pairs-1) flips and accepts at most {EXACT_MAX_PAIRS} pairs, "
             f'got {n}; use mode="random"')
    if mode == "random" and n_flips < 1:
        fail(f"random mode needs n_flips >= 1 (flip 0 is the identity), got {n_flips}")
    for k, c in enumerate(thresholds):
        if not (math.isfinite(c) and c >= 0):
            fail(f"thresholds must be finite and >= 0, got thresholds[{k}] = {c}")
    if not 1 <= n_max_bins <= _MAX_BINS:
        fail(f"n_max_bins must be in [1, {_MAX_BINS}], got {n_max_bins}")
    total = _total_flips(mode, n, n_flips)
    start, stop = _range(flip_range, total)
    if not 0 <= start <= stop <= total:
        fail(f"flip range [{start}, {stop}) must satisfy 0 <= flip_start <= flip_stop <= {total}, the null's flips")


def _range(flip_range, total: int) -> tuple[int, int]:
    """Return ``flip_range`` as ints ``(start, stop)``; None is the whole null, a stop of None its end."""
    if flip_range is None:
        return 0, total
    start, stop = flip_range
    return int(start), total if stop is None else int(stop)


def _fwer_from_max(flip_max: torch.Tensor, r_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (hi, lo) family-wise counts from every flip's max ``r_fix`` (int64 [F]).

    hi: flips with ``max >= r_obs - 1`` (the max possibly reaches the unit's observed r); lo: flips
    with ``max >= r_obs + 2`` (certainly reaches it), the true r * 2^28 being in [r_fix, r_fix + 1.25).
    """
    srt = torch.sort(flip_max).values
    total = srt.numel()  # flips counted here: counts of disjoint sets of flips add
    hi = total - torch.searchsorted(srt, r_obs - 1, side="left")
    lo = total - torch.searchsorted(srt, r_obs + 2, side="left")
    return hi, lo


def _null_ref(p: Prepared, mode: str, n_flips: int, seed: int, n_max_bins: int, device, chunk: int,
              start: int, stop: int):
    """Return the op's five tensors over flips [start, stop) from prepared integers, in plain PyTorch."""
    n, u = p.q.shape
    k_count = p.thr.shape[0]
    qf = p.q.to(device, torch.float64)
    thr, a_obs, kinv = p.thr.to(device).long(), p.a_obs.to(device).long(), p.kinv.to(device)
    count_hist = torch.zeros(k_count, u + 1, dtype=torch.long, device=device)
    exceed = torch.zeros(u, dtype=torch.long, device=device)
    max_hist = torch.zeros(n_max_bins, dtype=torch.long, device=device)
    flip_max = [torch.zeros(0, dtype=torch.long, device=device)]
    for f0 in range(start, stop, chunk):
        idx = np.arange(f0, min(stop, f0 + chunk))
        signs = exact_signs(n, idx) if mode == "exact" else random_signs(seed, idx, n)
        a = (signs.to(device, torch.float64) @ qf).long().abs()  # [P, U], exact: |S| < 2^30
        exceed += (a >= a_obs).sum(0)
        for k in range(k_count):
            count_hist[k] += torch.bincount((a > thr[k]).sum(1), minlength=u + 1)
        mx = r_fix(a, kinv).amax(1)
        max_hist += torch.bincount(torch.clamp((mx * n_max_bins) >> R_BITS, max=n_max_bins - 1),
                                   minlength=n_max_bins)
        flip_max.append(mx)
    hi, lo = _fwer_from_max(torch.cat(flip_max), r_fix(a_obs, kinv))
    return count_hist, exceed, hi, lo, max_hist


def _result(out, p: Prepared, mode: str, n_flips: int, thresholds, flip_ranges=()) -> NullResult:
    count_hist, exceed, hi, lo, max_hist = (t.cpu() for t in out)
    n = p.q.shape[0]
    return NullResult(count_hist, exceed, hi, max_hist, _total_flips(mode, n, n_flips), mode, n, tuple(thresholds), lo,
                      p.observed_count, p.exact_units, flip_ranges=tuple(flip_ranges))


def _flip_ranges(p: Prepared, mode: str, n_flips: int, flip_range, split: FlipSplit | None) -> tuple:
    """Return the NullResult's ``flip_ranges``: () for the whole null in one process."""
    total = _total_flips(mode, p.q.shape[0], n_flips)
    if split is not None:
        return split.ranges(total)
    return () if flip_range is None else (_range(flip_range, total),)


def _run(p: Prepared, mode: str, n_flips: int, seed: int, n_max_bins: int, device, use_op: bool,
         flip_range=None, split: FlipSplit | None = None, chunk: int = 8192):
    """Return the op's five tensors: over ``flip_range``, or this process's share summed over ``split``."""
    total = _total_flips(mode, p.q.shape[0], n_flips)
    start, stop = split.ranges(total)[split.rank] if split is not None else _range(flip_range, total)
    if use_op:
        dev = torch.device(device)
        out = torch.ops.otherview.signflip_null(p.q.to(dev), p.thr.to(dev), p.a_obs.to(dev), p.kinv.to(dev),
                                                mode, int(n_flips), int(seed), int(n_max_bins), start, stop)
    else:
        out = _null_ref(p, mode, n_flips, seed, n_max_bins, torch.device(device), chunk, start, stop)
    return out if split is None else _sum_counts(out, split)


def _sum_counts(out, split: FlipSplit) -> tuple:
    """Return the five count tensors summed over the processes of ``split`` (one all-reduce)."""
    flat = split.sum(torch.cat([t.reshape(-1) for t in out]))
    return tuple(x.view(t.shape) for x, t in zip(flat.split([t.numel() for t in out]), out))


def signflip_null_ref(
    d: torch.Tensor,
    thresholds,
    mode: str = "exact",
    n_flips: int = 0,
    seed: int = 0,
    n_max_bins: int = 4096,
    *,
    chunk: int = 8192,
    flip_range: tuple[int, int | None] | None = None,
    split: FlipSplit | None = None,
) -> NullResult:
    """Return the sign-flip null in plain PyTorch: the specification of the compiled op.

    The GEMM form: a chunk of sign patterns ``[chunk, N]`` times the quantised ``q [N, U]`` gives
    every flipped sum ``S`` (float64 matmul, exact since ``|S| < 2^30``), then the integer
    comparisons of the module docstring. Arguments and result are those of :func:`signflip_null`.
    """
    return _null(d, thresholds, mode, n_flips, seed, n_max_bins, flip_range, split, False, chunk)


def _null(d, thresholds, mode, n_flips, seed, n_max_bins, flip_range, split, use_op: bool | None,
          chunk: int = 8192) -> NullResult:
    """The body of :func:`signflip_null` (``use_op`` None: the op where built) and of the reference."""
    thresholds = [float(c) for c in thresholds]
    _check_args(d, thresholds, mode, n_flips, n_max_bins, flip_range)
    if flip_range is not None and split is not None:
        raise ValueError(f"{_OP}: give flip_range or split, not both")
    _check_finite(d)
    p = prepare(d, thresholds)
    use_op = ops.has_kernel(_OP, d.device) if use_op is None else use_op
    out = _run(p, mode, n_flips, seed, n_max_bins, d.device, use_op, flip_range, split, chunk)
    return _result(out, p, mode, n_flips, thresholds, _flip_ranges(p, mode, n_flips, flip_range, split))


def _check_finite(d: torch.Tensor) -> None:
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"{_OP}: d contains NaN or inf; drop or impute those pairs first")


def signflip_null(
    d: torch.Tensor,
    thresholds,
    mode: str = "exact",
    n_flips: int = 0,
    seed: int = 0,
    n_max_bins: int = 4096,
    *,
    flip_range: tuple[int, int | None] | None = None,
    split: FlipSplit | None = None,
) -> NullResult:
    """Return the sign-flip null of the paired t of every unit of ``d``.

    Parameters
    ----------
    d : Tensor, shape (n_pairs, n_units), float32 or float64, finite
        Paired differences (viewpoint - mention) per pair and unit; 1 <= n_pairs <= 4096. Any
        scale (1e-300 to 1e300 alike: the fixed point takes a power of two per unit).
    thresholds : sequence of float, length K
        Thresholds ``c_k >= 0`` on ``|t|`` for ``count_hist`` (strict: ``|t| > c_k``), read as the
        decimals they were written as.
    mode : {"exact", "random"}
        ``"exact"``: all ``2^(N-1)`` flips (N <= 40, ``n_flips`` ignored); ``"random"``: ``n_flips``
        flips (identity included) from :func:`random_signs` with ``seed``. See :func:`auto_mode`.
    n_flips, seed : int
        Random mode's flip count (>= 1) and generator key.
    n_max_bins : int
        Bins of ``max_hist`` over ``r`` in [0, 1], 1 to 2^20.
    flip_range : (int, int or None), optional
        Count only flips ``start <= f < stop`` (stop None: to the last); default all. The result's
        counts are then those of the range (``n_flips`` stays the whole null's, ``flip_ranges``
        says which were counted); ranges tiling ``[0, n_flips)`` add up to the whole null.
    split : FlipSplit, optional
        Share the flips among processes (every process calls this with the same ``d``); each counts
        its range and every process gets the summed, whole-null counts.

    Returns
    -------
    NullResult
        Counts on the CPU. The integers are prepared on the host (:func:`prepare`); the compiled op
        (CPU or CUDA, by ``d``'s device) runs where it was built, else :func:`signflip_null_ref`;
        both give identical integers.
    """
    return _null(d, thresholds, mode, n_flips, seed, n_max_bins, flip_range, split, None)


def step_down(
    d: torch.Tensor,
    result: NullResult,
    alpha: float,
    seed: int = 0,
    max_passes: int = 8,
    use_op: bool | None = None,
    split: FlipSplit | None = None,
) -> NullResult:
    """Return ``result`` with step-down (Westfall & Young 1993) family-wise counts added.

    Step-down max-T at level alpha: reject every unit whose single-step p is <= alpha, then redo the
    max over the units not yet rejected and reject again, until nothing new is rejected (MNE's
    ``step_down_p``, PALM, permuco). Each extra pass is the same null (same flips: the generator is
    keyed by flip and pair, not unit) over the remaining units' columns, without thresholds.
    The passes stop after ``max_passes`` (the counts then stay those of the last pass: valid,
    conservative) or when nothing new is rejected; no pass is run when nothing is rejected at alpha,
    or when no remaining unit's uncorrected p is <= alpha (its family-wise count cannot be lower).

    The counts: a unit rejected in pass i keeps the count of pass i (its max over a superset of the
    units ranked at or below it), the rest the last pass's; then a running max in order of decreasing
    observed r makes them monotone. So ``p_step_down <= alpha`` exactly where step-down rejects at
    alpha, and every value lies between the textbook step-down adjusted p and ``p_fwer``.

    Parameters
    ----------
    d : Tensor, shape (n_pairs, n_units)
        The differences ``result`` was computed from.
    result : NullResult
        The single-step null of ``d`` (any thresholds).
    alpha : float
        Level in (0, 1).
    seed : int
        The seed ``result`` used (random mode).
    max_passes : int
        Passes over the flips in all, the first (``result``'s) included.
    split : FlipSplit, optional
        Share each pass's flips among processes, as :func:`signflip_null` does (every process calls
        this with the same arguments and gets the same result).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if len(result.flip_ranges) == 1 and result.flip_ranges[0] != (0, result.n_flips):
        raise ValueError(f"step_down needs the whole null, got the counts of flips {list(result.flip_ranges[0])} only")
    p = prepare(d, [])
    if use_op is None:
        use_op = ops.has_kernel(_OP, d.device)
    counts = result.fwer_exceed.clone()
    remaining = np.ones(counts.numel(), dtype=bool)
    limit = alpha * result.n_flips
    passes = 1
    while True:
        rejected = remaining & (counts.numpy() <= limit)
        if not rejected.any() or rejected.sum() == remaining.sum() or passes >= max_passes:
            break
        remaining &= ~rejected
        # A unit's own flips reach its observed r, so its count never drops below `exceed`: when no
        # remaining unit's uncorrected count is <= alpha * n_flips, another pass cannot reject.
        if result.exceed.numpy()[remaining].min() > limit:
            break
        idx = np.flatnonzero(remaining)
        out = _run(p.columns(idx), result.mode, result.n_flips if result.mode == "random" else 0,
                   seed, 1, d.device, use_op, split=split)
        counts[torch.from_numpy(idx)] = out[2].cpu()
        passes += 1
    order = torch.argsort(r_fix(p.a_obs, p.kinv), descending=True, stable=True)
    adjusted = torch.empty_like(counts)
    adjusted[order] = torch.cummax(counts[order], 0).values
    return result._replace(step_down_exceed=adjusted, step_down_alpha=float(alpha), step_down_passes=passes)


if ops.compiled_available():

    @torch.library.register_fake("otherview::signflip_null")
    def _signflip_null_fake(q, thr, a_obs, kinv, mode, n_flips, seed, n_max_bins, flip_start=0, flip_stop=None):
        _check_prepared(q, thr, a_obs, kinv)
        _check_settings(q.shape[0], [], mode, n_flips, n_max_bins, (flip_start, flip_stop))
        u = q.shape[1]
        i64 = torch.long
        return (
            q.new_empty((thr.shape[0], u + 1), dtype=i64),
            q.new_empty((u,), dtype=i64),
            q.new_empty((u,), dtype=i64),
            q.new_empty((u,), dtype=i64),
            q.new_empty((n_max_bins,), dtype=i64),
        )


def _check_prepared(q, thr, a_obs, kinv) -> None:
    """The shape and dtype checks of the C++ op on prepared integers (same class and text)."""
    if q.dim() != 2 or q.dtype != torch.int32:
        raise ValueError(f"{_OP}: q must be 2-d int32 [n_pairs, n_units], got {q.dtype} {list(q.shape)}")
    n, u = q.shape
    if not (1 <= n <= MAX_PAIRS and u >= 1):
        raise ValueError(f"{_OP}: q must have 1 to {MAX_PAIRS} pairs and at least one unit, got {list(q.shape)}")
    if thr.dim() != 2 or thr.dtype != torch.int32 or thr.shape[1] != u:
        raise ValueError(f"{_OP}: thr must be int32 [n_thresholds, {u}], got {thr.dtype} {list(thr.shape)}")
    if a_obs.dtype != torch.int32 or list(a_obs.shape) != [u]:
        raise ValueError(f"{_OP}: a_obs must be int32 [{u}], got {a_obs.dtype} {list(a_obs.shape)}")
    if kinv.dtype != torch.int64 or list(kinv.shape) != [u]:
        raise ValueError(f"{_OP}: kinv must be int64 [{u}], got {kinv.dtype} {list(kinv.shape)}")
