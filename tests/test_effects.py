"""Hedges' g_z and its exact interval against scipy, the constant-unit conventions, the null's
resolution and time budget, and the card rows' count p-values (issue 12)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as sps

from otherview import inference, stats


def _nct_interval(t: float, df: int, level: float = 0.95) -> tuple[float, float]:
    """The exact interval by brentq on scipy.stats.nct, one unit at a time (the independent check)."""
    def f(delta, target):
        c = sps.nct.cdf(t, df, delta)
        if np.isnan(c):  # scipy gives NaN far in some tails, where the cdf is 0 or 1
            c = 1.0 if delta < t else 0.0
        return c - target

    w = 6 * math.sqrt(1 + t * t / (2 * df)) + 2  # wide enough, and inside nct's finite region
    lo = optimize.brentq(f, t - w, t + w, args=((1 + level) / 2,), xtol=1e-13)
    hi = optimize.brentq(f, t - w, t + w, args=((1 - level) / 2,), xtol=1e-13)
    return lo, hi


@pytest.mark.parametrize("n", [5, 8, 30])
def test_gz_and_interval_match_scipy_nct(n):
    rng = np.random.default_rng(n)
    d = rng.normal(0.4, 1.0, size=(n, 25))
    d[:, 3] += 3.0  # a large effect: where the normal approximation was narrow
    d[:, 4] = rng.normal(0, 1, n) - rng.normal(0, 1, n).mean()
    g, low, high = inference.hedges_gz(d)
    dz = d.mean(0) / d.std(0, ddof=1)
    m = n - 1
    j = math.exp(math.lgamma(m / 2) - 0.5 * math.log(m / 2) - math.lgamma((m - 1) / 2))
    assert abs(j - (1 - 3 / (4 * m - 1))) < 3e-3 * (5 / n) ** 2  # the textbook approximation
    np.testing.assert_allclose(g, j * dz, rtol=1e-12)
    for u in range(25):
        lo, hi = _nct_interval(dz[u] * math.sqrt(n), m)
        assert low[u] == pytest.approx(lo / math.sqrt(n), abs=1e-9)
        assert high[u] == pytest.approx(hi / math.sqrt(n), abs=1e-9)


def test_gz_is_unbiased_and_the_interval_covers():
    rng = np.random.default_rng(1)
    n, true = 6, 0.8
    d = rng.normal(true, 1.0, size=(n, 20000))
    g, low, high = inference.hedges_gz(d)
    dz = inference.cohens_dz(d)
    se = g.std() / math.sqrt(g.size)
    assert abs(g.mean() - true) < 3 * se  # unbiased
    assert dz.mean() - true > 5 * se  # d_z is not
    cover = np.mean((low <= true) & (true <= high))
    assert abs(cover - 0.95) < 3 * math.sqrt(0.95 * 0.05 / g.size), cover


def test_constant_and_zero_units_are_consistent():
    d = np.zeros((7, 4))
    d[:, 1] = -2.0
    d[:, 2] = 0.7
    d[:, 3] = [1, 2, 0, 1, 3, 1, 1]
    t = inference.cohens_dz(d) * math.sqrt(7)  # stats.paired_t: see the xfail test below
    g, low, high = inference.hedges_gz(d)
    dz = stats.effect_size(d)
    assert t[0] == 0 and dz[0] == 0 and g[0] == 0 and low[0] == 0 and high[0] == 0
    assert np.isneginf(t[1]) and np.isneginf(dz[1]) and np.isneginf(g[1])
    assert np.isneginf(low[1]) and np.isneginf(high[1])
    assert np.isposinf(t[2]) and np.isposinf(dz[2]) and np.isposinf(g[2]) and np.isposinf(low[2])
    assert np.isfinite([g[3], low[3], high[3]]).all() and low[3] < g[3] < high[3]
    one = inference.hedges_gz(np.ones((1, 3)))
    assert all(np.isnan(x).all() for x in one)  # N = 1: no variance estimate
    g2, lo2, hi2 = inference.hedges_gz(np.array([[1.0, 2.0], [2.0, 2.5]]))
    assert np.isnan(g2).all() and np.isfinite(lo2).all() and np.isfinite(hi2).all()  # N = 2: J undefined


def test_paired_t_agrees_with_d_z_on_constant_and_extreme_units():
    d = np.random.default_rng(6).normal(0.5, 1.0, size=(7, 3))
    d[:, 0] = 0.7
    d[:, 2] *= 1e300
    assert np.array_equal(stats.paired_t(d), inference.cohens_dz(d) * math.sqrt(7))


def test_effect_sizes_at_extreme_scales():
    rng = np.random.default_rng(2)
    d = rng.normal(0.5, 1.0, size=(9, 6))
    ref = inference.cohens_dz(d)
    for s in (1e-300, 1e300, 2.0**-1000, 2.0**1000):  # (subnormal inputs have lost their digits already)
        np.testing.assert_allclose(inference.cohens_dz(d * s), ref, rtol=1e-9)
    g, low, high = inference.hedges_gz(d * 1e300)
    assert np.isfinite(g).all() and (low < high).all()


def test_null_resolution():
    r = inference.null_resolution("random", 30, 16320, 200, 0.05)
    assert r["min_p"] == 0.005 and not r["enough"] and r["ties_needed"] == 1632
    assert r["flips_needed"] == 500_000 and "null.flips = 500000" in r["message"]
    assert inference.null_resolution("exact", 30, 16320, 0, 0.05)["enough"]
    small = inference.null_resolution("exact", 6, 10, 0, 0.05)
    assert small["min_p"] == 1 / 32 and not small["enough"] and small["flips_needed"] is None
    assert inference.min_p("exact", 30, 0) == 2.0**-29 and inference.min_p("random", 30, 1000) == 1e-3
    assert inference.required_flips(16320, 0.05) == 500_000 and inference.required_flips(10, 0.05) == 10_000


def test_estimate_and_budget():
    secs = inference.estimate_null_seconds("exact", 30, 16320, 0, "cuda", n_thresholds=2)
    assert 3 < secs < 8  # measured 5.2 s on an H100
    assert inference.check_null_budget("exact", 20, 16320, 0, "cpu") < 60
    with pytest.raises(inference.NullTooExpensive) as exc:
        inference.check_null_budget("exact", 40, 16320, 0, "cpu")
    msg = str(exc.value)
    assert 'null.method = "random"' in msg and "null.flips = 500000" in msg and "days" in msg
    assert isinstance(exc.value, ValueError)


def test_sign_flip_null_refuses_before_work():
    d = np.random.default_rng(3).standard_normal((30, 2000))
    with pytest.raises(inference.NullTooExpensive, match="budget"):
        stats.sign_flip_null(d, [3.0], "exact", 0, 0, 0.99, budget_s=1.0)


def test_auto_raises_a_coarse_flip_count_and_says_so():
    d = np.random.default_rng(4).standard_normal((36, 20))  # 2^35 flips: auto goes random
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        null = stats.sign_flip_null(d, [3.0], "auto", 200, 0, 0.99, fwer="single-step")
    assert null.method == "random" and null.flips == 10_000 and null.min_p == 1e-4
    assert null.resolution["enough"] and "raised null.flips from 200 to 10000" in null.notes[0]
    assert any("raised null.flips" in str(w.message) for w in caught)
    explicit = stats.sign_flip_null(d, [3.0], "random", 200, 0, 0.99, fwer="single-step")
    assert explicit.flips == 200 and not explicit.resolution["enough"] and explicit.notes


def test_card_rows_carry_count_p_and_bound():
    rng = np.random.default_rng(5)
    d = rng.standard_normal((12, 300))
    d[:, :40] += 2.0
    null = stats.sign_flip_null(d, [3.0, 8.0], "exact", 0, 0, 0.99)
    rows = stats.card_table(stats.paired_t(d), null)
    r3, r8 = rows[0], rows[1]
    assert r3["p"] == null.result.count_p(0) and r3["p"] <= 0.01 and 0 < r3["bound"] <= r3["observed"]
    if r8["null_q"] == 0:
        assert r8["ratio"] is None and r8["ratio_above"] == r8["observed"]
    assert rows[-1]["p"] == pytest.approx(null.result.p_fwer.min())
    assert null.fwer == "step-down" and null.result.p_step_down is not None
