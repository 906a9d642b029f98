"""The sign-flip null's result: integer counts over flips, and the p-values, bounds and summaries
read from them (see :mod:`otherview.ops.signflip` for how the counts are made)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch


class NullResult(NamedTuple):
    """The sign-flip null of every unit, as integer counts over flips (identity included).

    Attributes
    ----------
    count_hist : Tensor, int64, shape (n_thresholds, n_units + 1)
        ``count_hist[k, j]``: flips in which exactly ``j`` units have ``|t| > thresholds[k]``.
    exceed : Tensor, int64, shape (n_units,)
        Flips whose ``|t_u|`` is >= the observed ``|t_u|`` (exact).
    fwer_exceed : Tensor, int64, shape (n_units,)
        Flips whose maximum over units of ``|t|`` possibly reaches the observed ``|t_u|``: the upper
        end of the bracket holding the exact count (see the module docstring).
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
    fwer_exceed_lo : Tensor, int64, shape (n_units,), or None
        Flips whose maximum certainly reaches the observed ``|t_u|`` (lower end of the bracket).
    observed_count : ndarray, int64, shape (n_thresholds,), or None
        Units over each threshold in the observed labelling, by the null's own exact rule.
    exact_units : ndarray of bool, shape (n_units,), or None
        Units whose differences the fixed point represents exactly (binary or decimal grid).
    step_down_exceed : Tensor, int64, shape (n_units,), or None
        Step-down (Westfall-Young) family-wise counts, from :func:`step_down`.
    step_down_alpha : float or None
        The level the step-down passes were run at.
    step_down_passes : int
        Passes over the flips the step-down used (1 = none beyond the single-step one).
    flip_ranges : tuple of (int, int)
        The flip ranges ``[start, stop)`` counted: () for the whole null counted in one piece; one
        range for a part (``signflip_null(..., flip_range=...)``, whose counts cover that range only);
        one per process, in rank order, for a null split across processes (whole-null counts).
    """

    count_hist: torch.Tensor
    exceed: torch.Tensor
    fwer_exceed: torch.Tensor
    max_hist: torch.Tensor
    n_flips: int
    mode: str
    n_pairs: int = 0
    thresholds: tuple = ()
    fwer_exceed_lo: torch.Tensor | None = None
    observed_count: np.ndarray | None = None
    exact_units: np.ndarray | None = None
    step_down_exceed: torch.Tensor | None = None
    step_down_alpha: float | None = None
    step_down_passes: int = 1
    flip_ranges: tuple = ()

    @property
    def min_p(self) -> float:
        """The smallest p-value this null can give, ``1 / n_flips`` (the identity alone)."""
        return 1.0 / self.n_flips

    @property
    def p_uncorrected(self) -> np.ndarray:
        """Per-unit p-values ``exceed / n_flips``, float64 array of shape (n_units,); never 0."""
        return self.exceed.numpy().astype(np.float64) / self.n_flips

    @property
    def p_fwer(self) -> np.ndarray:
        """Single-step family-wise (max-statistic) p-values, shape (n_units,); >= the exact p."""
        return self.fwer_exceed.numpy().astype(np.float64) / self.n_flips

    @property
    def p_fwer_error(self) -> np.ndarray:
        """Width of the bracket holding the exact single-step p, shape (n_units,); mostly 0."""
        if self.fwer_exceed_lo is None:
            return np.zeros(self.fwer_exceed.numel())
        return (self.fwer_exceed - self.fwer_exceed_lo).numpy().astype(np.float64) / self.n_flips

    @property
    def p_step_down(self) -> np.ndarray | None:
        """Step-down family-wise p-values, shape (n_units,), or None when not computed.

        ``p_step_down <= step_down_alpha`` exactly where the Westfall-Young step-down rejects at that
        level; every value is >= the textbook step-down adjusted p and <= ``p_fwer``.
        """
        if self.step_down_exceed is None:
            return None
        return self.step_down_exceed.numpy().astype(np.float64) / self.n_flips

    def observed(self, k: int) -> int:
        """Return the observed number of units over ``thresholds[k]`` (the null's exact rule)."""
        if self.observed_count is None:
            raise ValueError("this NullResult carries no observed counts")
        return int(self.observed_count[k])

    def count_p(self, k: int, observed: int | None = None) -> float:
        """Return the share of flips whose count over ``thresholds[k]`` reaches the observed one.

        A permutation p-value for "more units exceed c_k than chance gives" (identity included, so
        >= ``min_p``); ``observed`` defaults to :meth:`observed`.
        """
        obs = self.observed(k) if observed is None else int(observed)
        h = self.count_hist[k].numpy()
        return float(h[max(obs, 0):].sum() / h.sum())

    def count_bound(self, k: int, alpha: float, observed: int | None = None) -> int:
        """Return a 1 - alpha lower confidence bound on the truly responding units over ``thresholds[k]``.

        ``max(0, observed - q)``, ``q`` the (1 - alpha) quantile of the null count over the whole
        group of flips (identity included): Hemerik, Solari & Goeman (2019), Biometrika 106:635,
        "Permutation-based simultaneous confidence bounds for the false discovery proportion",
        the single-threshold case. The number of false positives among the units over ``c_k`` is
        <= q with probability >= 1 - alpha, for a threshold fixed before seeing the data. For
        several thresholds at once use alpha / n_thresholds.
        """
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        obs = self.observed(k) if observed is None else int(observed)
        return max(0, obs - hist_quantile(self.count_hist[k].numpy(), 1.0 - alpha))

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
    """Return the smallest bin whose cumulative share of histogram ``h`` is >= ``q``.

    On integer counts this is exact: the ``ceil(q * total)``-th smallest value.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    h = np.asarray(h).astype(np.int64)
    total = int(h.sum())
    rank = max(1, math.ceil(q * total - 1e-9 * q * total)) if q > 0 else 1
    return int(np.searchsorted(np.cumsum(h), rank, side="left"))
