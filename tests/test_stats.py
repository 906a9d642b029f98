"""The paired t against scipy, its edge cases, and the card table's arithmetic."""

import numpy as np
import pytest
from scipy import stats as sps

from otherview import stats


def test_paired_t_matches_scipy():
    rng = np.random.default_rng(0)
    for n, u in [(2, 5), (7, 31), (30, 200)]:
        a = rng.normal(size=(n, u))
        b = a + rng.normal(0.2, 1.0, size=(n, u))
        ref = sps.ttest_rel(a, b, axis=0).statistic
        np.testing.assert_allclose(stats.paired_t(a - b), ref, rtol=1e-12, atol=1e-12)


def test_zero_and_constant_units():
    d = np.zeros((5, 3))
    d[:, 1] = 0.5  # constant nonzero differences: t is infinite, as scipy says
    d[:, 2] = [1, -1, 2, 0, 1]
    t = stats.paired_t(d)
    assert t[0] == 0.0 and np.isposinf(t[1]) and np.isfinite(t[2])
    assert np.array_equal(stats.paired_t(np.ones((1, 4))), np.zeros(4))  # N = 1: no variance estimate


def test_nan_is_rejected_with_its_place():
    d = np.ones((4, 3))
    d[2, 1] = np.nan
    with pytest.raises(stats.StatsError, match="pair 2, unit 1"):
        stats.paired_t(d)


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(6, 10))
    copy = d.copy()
    stats.paired_t(d)
    stats.effect_size(d)
    assert np.array_equal(d, copy)


def test_effect_size_is_t_over_sqrt_n():
    rng = np.random.default_rng(2)
    d = rng.normal(0.3, 1, size=(12, 40))
    np.testing.assert_allclose(stats.effect_size(d) * np.sqrt(12), stats.paired_t(d), rtol=1e-12)


def test_card_table_null_excludes_the_observed_labelling():
    """The identity flip is in the null for p-values, but the card's null mean must not count it."""
    rng = np.random.default_rng(3)
    d = rng.normal(2.0, 1.0, size=(30, 400))  # every unit responds: the identity counts all 400
    null = stats.sign_flip_null(d, [3.0], "random", 200, 0, 0.99)
    rows = stats.card_table(stats.paired_t(d), null)
    assert rows[0]["observed"] == 400
    with_identity = null.result.count_mean(0)
    assert with_identity >= 400 / 200
    assert rows[0]["null_mean"] == pytest.approx((with_identity * 200 - 400) / 199)
    assert rows[0]["null_q"] < 400 and rows[1]["observed"] > rows[1]["null_q"]
