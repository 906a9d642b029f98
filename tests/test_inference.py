"""Per-unit inference: BH against the textbook and brute force, calibration of the family-wise and
false-discovery rates on null data, planted effects and axis trends found where planted and nowhere
else, the Spearman permutation null against scipy and enumeration, and d_z interval coverage."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats as sps

from otherview import inference, stats
from otherview.model import architecture
from otherview.ops.signflip import signflip_null
from otherview.plan import build_plan
from otherview.spec import load_spec
from conftest import SPECS

# Benjamini & Hochberg (1995), section 4: 15 p-values of a clinical trial; at FDR 0.05 BH rejects 4
# (Bonferroni rejects 3).
BH_1995 = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719,
           0.6528, 0.7590, 1.0000]


def _null(d: np.ndarray, thresholds=(3.0,)) -> stats.NullSummary:
    """The real sign-flip op, exact (all 2^(N-1) flips): small N keeps it cheap."""
    res = signflip_null(torch.as_tensor(d, dtype=torch.float64), list(thresholds), mode="exact")
    return stats.NullSummary(result=res, method="exact", exact=True, thresholds=list(thresholds), quantile=0.95)


def _bh_brute(p: np.ndarray, alpha: float) -> np.ndarray:
    """The step-up rule as written: reject the k smallest, k the largest i with p_(i) <= i alpha / m."""
    m = len(p)
    order = np.argsort(p, kind="stable")
    k = max([i for i in range(1, m + 1) if p[order[i - 1]] <= i * alpha / m], default=0)
    reject = np.zeros(m, dtype=bool)
    reject[order[:k]] = True
    return reject


def test_bh_textbook_example():
    q = inference.bh_fdr(np.array(BH_1995))
    assert np.flatnonzero(q <= 0.05).tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(q, sps.false_discovery_control(BH_1995), rtol=1e-12)
    assert np.count_nonzero(np.array(BH_1995) * 15 <= 0.05) == 3  # Bonferroni, as the paper says


def test_bh_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for m in (1, 2, 7, 50, 333):
        p = np.round(rng.beta(0.4, 1.0, size=m), 2)  # rounding makes ties
        p_copy = p.copy()
        q = inference.bh_fdr(p)
        assert np.array_equal(p, p_copy)
        brute = np.array([min(min(1.0, m * p[j] / (np.sum(p <= p[j]))) for j in range(m) if p[j] >= p[i])
                          for i in range(m)])
        np.testing.assert_allclose(q, brute, rtol=1e-12)
        for alpha in (0.01, 0.05, 0.2):
            assert np.array_equal(q <= alpha, _bh_brute(p, alpha))
        assert np.all(np.diff(q[np.argsort(p, kind="stable")]) >= 0)  # monotone in p


def test_bh_rejects_bad_input():
    assert inference.bh_fdr(np.array([])).size == 0
    for bad in ([0.1, np.nan], [0.1, 1.5], [-0.1]):
        with pytest.raises(stats.StatsError, match="p-values"):
            inference.bh_fdr(np.array(bad))


def test_family_wise_error_rate_is_nominal_on_null_data():
    """No effect anywhere: P(any unit has p_FWER <= 0.05) <= 0.05 within Monte Carlo error.

    N = 8 pairs gives 128 exact flips, so the max-|t| test rejects in floor(0.05 * 128) = 6 of 128
    labellings: the exact rate is 0.047.
    """
    rng = np.random.default_rng(1)
    runs, hits, unit_hits = 600, 0, 0
    for _ in range(runs):
        d = rng.standard_normal((8, 40))
        p_fwer = _null(d).result.p_fwer
        hits += bool((p_fwer <= 0.05).any())
        unit_hits += int((p_fwer <= 0.05).sum())
    se = np.sqrt(0.05 * 0.95 / runs)
    assert hits / runs <= 0.05 + 3 * se, hits / runs
    assert hits / runs >= 0.05 - 4 * se  # and not trivially conservative


def test_benjamini_hochberg_controls_the_false_discovery_rate():
    """20 of 100 units carry an effect; the mean false-discovery proportion stays <= 0.05 m0 / m."""
    rng = np.random.default_rng(2)
    runs, fdp, power = 300, [], []
    effect = np.zeros(100)
    effect[:20] = 1.5
    for _ in range(runs):
        d = rng.standard_normal((12, 100)) + effect
        q = inference.bh_fdr(_null(d).result.p_uncorrected)
        found = q <= 0.05
        fdp.append(found[20:].sum() / max(found.sum(), 1))
        power.append(found[:20].mean())
    se = np.std(fdp) / np.sqrt(runs)
    assert np.mean(fdp) <= 0.05 * 80 / 100 + 3 * se, np.mean(fdp)
    assert np.mean(power) > 0.5  # it finds effects too


def test_planted_effects_are_found_there_and_nowhere_else():
    rng = np.random.default_rng(3)
    d = rng.standard_normal((12, 300))
    planted = [5, 77, 150, 151, 298]
    d[:, planted] += 2.5
    d_copy = d.copy()
    inf = inference.infer(d, _null(d), np.arange(12.0), seed=0, n_perm=200)
    assert np.array_equal(d, d_copy)
    assert np.flatnonzero(inf.p_fwer <= 0.05).tolist() == planted
    assert np.flatnonzero(inf.q <= 0.05).tolist() == planted
    assert np.all(inf.d_z_low[planted] > 1.0)


@pytest.fixture(scope="module")
def tiny_plan():
    spec, _ = load_spec(SPECS / "pass" / "small.toml")
    return build_plan(spec, architecture("builtin:tiny"))


def test_group_summaries_count_planted_units_in_their_block_and_kind(tiny_plan):
    """Tiny model: D0 holds units 0-1 (attention), S0 units 2-9 (2-3 attention, 4-9 MLP)."""
    rng = np.random.default_rng(4)
    d = rng.standard_normal((6, tiny_plan.n_units)) * 0.1
    d[:, [6, 7]] += np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.0])[:, None]  # two single-stream MLP units
    t = stats.paired_t(d)
    inf = inference.infer(d, _null(d, (2.0, 4.0)), np.arange(6.0), seed=0)
    groups = inference.group_summaries(tiny_plan, t, inf)
    sites = {r["label"]: r for r in groups["sites"]}
    assert sites["S0"]["fwer"] == 2 and sites["D0"]["fwer"] == 0
    assert sites["S0"]["over_4"] == 2 and sites["S0"]["over_4_attention"] == 0
    kinds = {r["group"]: r for r in groups["stream_kinds"]}
    assert kinds["single mlp"]["fwer"] == 2 and kinds["single attention"]["fwer"] == 0
    # 32 exact flips: p >= 1/32, so BH over 10 units with 2 effects gives q >= 10/2 * 1/32 > 0.05.
    assert groups["all"][0]["units"] == tiny_plan.n_units and groups["all"][0]["fdr"] == 0
    assert inference.strongest_site(groups["sites"], [2.0, 4.0])["label"] == "S0"


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(5)
    d = rng.integers(0, 4, size=(9, 25)).astype(float)  # many ties in d
    d[:, 3] = 1.0  # no variance: rho 0, p 1
    cov = np.array([1, 2, 2, 3, 4, 5, 5, 5, 6.0])  # ties on the axis too
    axis = inference.axis_correlation(d, cov, n_perm=300, seed=0)
    ref = np.array([0.0 if i == 3 else sps.spearmanr(d[:, i], cov).statistic for i in range(25)])
    np.testing.assert_allclose(axis.rho, ref, atol=1e-12)
    assert axis.p_uncorrected[3] == 1.0 and axis.p_fwer[3] == 1.0
    np.testing.assert_allclose(inference.average_ranks(d), sps.rankdata(d, axis=0))


def test_axis_exact_null_matches_enumeration():
    """N = 6: all 720 permutations, each unit's p and the max-|rho| p against brute force."""
    rng = np.random.default_rng(6)
    d = rng.standard_normal((6, 5))
    cov = np.arange(1.0, 7.0)
    axis = inference.axis_correlation(d, cov)
    assert axis.exact and axis.n_permutations == 720
    rhos = np.array([[sps.spearmanr(d[:, u], cov[list(p)]).statistic for u in range(5)]
                     for p in itertools.permutations(range(6))])
    obs = np.abs(rhos[0])
    np.testing.assert_allclose(axis.rho, rhos[0], atol=1e-12)
    np.testing.assert_allclose(axis.p_uncorrected, (np.abs(rhos) >= obs - 1e-9).mean(axis=0))
    np.testing.assert_allclose(axis.p_fwer, (np.abs(rhos).max(axis=1)[:, None] >= obs - 1e-9).mean(axis=0))
    assert np.all(axis.p_uncorrected >= 1 / 720)  # the identity is in the null


def test_axis_random_null_is_seeded_and_chunk_independent():
    rng = np.random.default_rng(7)
    d = rng.standard_normal((15, 60))
    a = inference.axis_correlation(d, np.arange(15.0), n_perm=400, seed=3)
    b = inference.axis_correlation(d, np.arange(15.0), n_perm=400, seed=3, chunk_elements=61)
    c = inference.axis_correlation(d, np.arange(15.0), n_perm=400, seed=4)
    assert not a.exact and a.n_permutations == 400
    assert np.array_equal(a.p_uncorrected, b.p_uncorrected) and np.array_equal(a.p_fwer, b.p_fwer)
    np.testing.assert_allclose(a.max_null, b.max_null, rtol=1e-12)  # GEMM blocking moves the last bits
    assert not np.array_equal(a.max_null, c.max_null)
    assert np.all(a.p_uncorrected >= 1 / 400)


def test_axis_finds_a_planted_monotone_trend_and_nothing_else():
    rng = np.random.default_rng(8)
    n = 30
    d = rng.standard_normal((n, 400))
    planted = [10, 200, 333]
    trend = np.log1p(np.arange(n))  # monotone, not linear
    d[:, planted] += 3.0 * ((trend - trend.mean()) / trend.std())[:, None]
    d[:, 333] *= -1  # a falling trend is found as well
    axis = inference.axis_correlation(d, np.arange(1.0, n + 1), n_perm=2000, seed=0)
    assert np.flatnonzero(axis.p_fwer <= 0.05).tolist() == planted
    assert axis.rho[10] > 0.5 and axis.rho[333] < -0.5


def test_axis_family_wise_error_rate_is_nominal_on_null_data():
    rng = np.random.default_rng(9)
    runs, hits = 300, 0
    for seed in range(runs):
        d = rng.standard_normal((10, 30))
        hits += bool((inference.axis_correlation(d, np.arange(10.0), n_perm=200, seed=seed).p_fwer <= 0.05).any())
    assert hits / runs <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / runs), hits / runs


def test_axis_degenerate_inputs():
    axis = inference.axis_correlation(np.ones((2, 4)), np.array([1.0, 2.0]))
    assert np.all(axis.rho == 0) and np.all(axis.p_fwer == 1)
    flat = inference.axis_correlation(np.random.default_rng(0).standard_normal((5, 3)), np.ones(5))
    assert np.all(flat.rho == 0) and np.all(flat.p_uncorrected == 1)
    with pytest.raises(stats.StatsError, match="non-finite"):
        inference.axis_correlation(np.array([[1.0], [np.nan], [2.0]]), np.arange(3.0))
    with pytest.raises(stats.StatsError, match="shapes"):
        inference.axis_correlation(np.ones((4, 2)), np.arange(3.0))


@pytest.mark.parametrize("n", [10, 30])
def test_dz_interval_coverage(n):
    """95% normal-approximation intervals cover the true d_z in 93-96.5% of simulated units."""
    rng = np.random.default_rng(10 + n)
    for true in (0.0, 0.5, 1.0):
        d = rng.normal(true, 1.0, size=(n, 6000))
        low, high = inference.dz_interval(stats.effect_size(d), n)
        coverage = np.mean((low <= true) & (true <= high))
        assert 0.93 <= coverage <= 0.965, (n, true, coverage)
