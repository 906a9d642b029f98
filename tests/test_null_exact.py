"""Exactness of the sign-flip null against float64 brute force (issue 12).

Integer, rounded and tied data give every p-value and threshold count of the enumeration; scaled
copies of a unit tie exactly in the family-wise comparison; scales from 1e-300 to 1e300 and
subnormals are handled; outlier units stay exact on integer data and within the stated bound on
continuous data; step-down equals a brute-force step-down at the level it was run at; the count
p-values and the true-discovery bound equal the enumeration and the bound holds its level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from otherview import ops
from otherview.ops.fixedpoint import prepare
from otherview.ops.signflip import exact_signs, random_signs, signflip_null, signflip_null_ref, step_down
from test_signflip import _abs_t, assert_matches, brute_force

THRESHOLDS = [1.5, 2.9, 3.0]


def _data(kind: str, n: int, u: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "integer":
        d = rng.integers(-4, 5, size=(n, u)).astype(np.float64)
    elif kind == "rounded1":
        d = np.round(rng.normal(0.3, 1.0, size=(n, u)), 1)
    elif kind == "rounded2":
        d = np.round(rng.normal(0.3, 1.0, size=(n, u)), 2)
    else:  # tied: few distinct values, repeated across pairs and units
        d = rng.choice([-0.7, -0.2, 0.2, 0.5, 0.7, 1.2], size=(n, u))
    d[:, 0] = 0.0
    d[:, 1] = [1.0, 1.0] + [0.0] * (n - 2)  # |t| = 1.5 exactly when n = 10: on the threshold
    d[:, 2] = d[:, 3] * 3  # a scaled copy: ties across units
    return d


@pytest.mark.parametrize("kind", ["integer", "rounded1", "rounded2", "tied"])
@pytest.mark.parametrize("n", [6, 10, 12])
@pytest.mark.parametrize("impl", ["op", "ref"])
def test_every_p_and_count_equals_brute_force(kind, n, impl):
    rng = np.random.default_rng(n * 7 + len(kind))
    d = _data(kind, n, 24, rng)
    assert prepare(d, THRESHOLDS).exact_units.all()
    fn = signflip_null if impl == "op" else signflip_null_ref
    res = fn(torch.from_numpy(d), THRESHOLDS, "exact", n_max_bins=64)
    signs = exact_signs(n, np.arange(2 ** (n - 1))).numpy()
    want = brute_force(d, signs, THRESHOLDS, 64)
    assert_matches(res, want)
    t_obs = _abs_t(d[None])[0]
    assert res.observed_count.tolist() == [int((t_obs > c * (1 + 1e-9)).sum()) for c in THRESHOLDS]
    if n == 10:
        assert abs(t_obs[1] - 1.5) < 1e-12  # the tie with the threshold is there, and not counted
    assert res.exceed[2] == res.exceed[3] and res.fwer_exceed[2] == res.fwer_exceed[3]


def test_random_mode_is_exact_on_rounded_data():
    rng = np.random.default_rng(5)
    d = _data("rounded2", 40, 30, rng)
    signs = random_signs(77, np.arange(2000), 40).numpy()
    res = signflip_null(torch.from_numpy(d), THRESHOLDS, "random", n_flips=2000, seed=77, n_max_bins=50)
    assert_matches(res, brute_force(d, signs, THRESHOLDS, 50))


def test_scaled_copies_and_extreme_scales_tie_exactly():
    rng = np.random.default_rng(11)
    base = rng.integers(-5, 6, size=12).astype(np.float64)
    base[0] = 7.0
    scales = [1.0, 3.0, 0.1, 2.0**-1000, 2.0**1000, 1e-300, 1e300, 2.5e-308, 1e-310, 1.5e307]
    d = base[:, None] * np.array(scales)[None, :]
    assert np.isfinite(d).all() and (np.abs(d[:, 8][d[:, 8] != 0]) < 2.3e-308).all()  # subnormals
    res = signflip_null(torch.from_numpy(d), [1.0, 2.0], "exact")
    p = prepare(d, [1.0, 2.0])
    assert p.exact_units.all()
    for name in ("exceed", "fwer_exceed", "fwer_exceed_lo"):
        v = getattr(res, name).numpy()
        assert (v == v[0]).all(), (name, v)
    signs = exact_signs(12, np.arange(2048)).numpy()
    want = brute_force(base[:, None], signs, [1.0, 2.0], 16)
    assert res.exceed[0] == want["exceed"][0] and res.fwer_exceed[0] == want["fwer_exceed"][0]
    assert (res.count_hist.sum(1) == 2048).all()


def test_continuous_data_at_extreme_scales():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(14, 40, generator=g, dtype=torch.float64)
    d[:, 5] += 1.5
    ref = signflip_null(d, [2.0], "exact")
    for s in (2.0**-1060, 2.0**1000):
        same = signflip_null(d * s, [2.0], "exact")
        assert torch.equal(same.exceed, ref.exceed) and torch.equal(same.fwer_exceed, ref.fwer_exceed)
    for s in (1e-300, 1e300):
        other = signflip_null(d * s, [2.0], "exact")
        # not a power of two: rounding of d * s moves q by an ulp, so a flip or two may move
        assert (other.exceed - ref.exceed).abs().max() <= 2
        assert (other.fwer_exceed - ref.fwer_exceed).abs().max() <= 2


@pytest.mark.parametrize("outlier", [1e3, 1e6, 1e7])
def test_outlier_units_on_integer_data_are_exact(outlier):
    rng = np.random.default_rng(int(np.log10(outlier)))
    d = rng.integers(-9, 10, size=(12, 20)).astype(np.float64)
    d[0, :10] = outlier  # units 0-9 dominated by one pair
    d[3, 5] = -outlier
    res = signflip_null(torch.from_numpy(d), [1.0], "exact", n_max_bins=32)
    assert prepare(d, [1.0]).exact_units.all()
    signs = exact_signs(12, np.arange(2048)).numpy()
    assert_matches(res, brute_force(d, signs, [1.0], 32))


@pytest.mark.parametrize("outlier", [1e3, 1e6, 1e7])
def test_outlier_units_on_continuous_data_stay_within_the_bound(outlier):
    """Rounded units: only flips whose |S| is within N quanta of |S_obs| can change side."""
    rng = np.random.default_rng(20)
    d = rng.normal(0.5, 1.0, size=(12, 30))
    d[0, :15] *= outlier
    res = signflip_null(torch.from_numpy(d), [1.0], "exact")
    signs = exact_signs(12, np.arange(2048)).numpy()
    want = brute_force(d, signs, [1.0], 16)
    quantum = np.abs(d).sum(0) / prepare(d, []).q.double().abs().sum(0).numpy()  # d per q step
    s = np.abs(signs.astype(np.float64) @ d) / quantum
    near = (np.abs(s - s[0]) <= 12).sum(0) - 1  # each q is off by <= 1/2, so S by <= N/2
    assert (np.abs(res.exceed.numpy() - want["exceed"]) <= near).all()
    assert (np.abs(res.fwer_exceed.numpy() - want["fwer_exceed"]) <= near.sum() + 1).all()
    if outlier == 1e3:
        assert near.max() <= 1  # little outliers: the bound is tight


def test_family_wise_bracket_on_continuous_data():
    rng = np.random.default_rng(21)
    d = rng.standard_normal((13, 60))
    d[:, :6] += np.linspace(0.5, 2.0, 6)
    res = signflip_null(torch.from_numpy(d), [2.0], "exact")
    signs = exact_signs(13, np.arange(4096)).numpy()
    want = brute_force(d, signs, [2.0], 16)["fwer_exceed"]
    assert (res.fwer_exceed_lo.numpy() <= want).all() and (want <= res.fwer_exceed.numpy()).all()
    assert (res.fwer_exceed == res.fwer_exceed_lo).float().mean() > 0.9  # the bracket is mostly tight
    assert res.p_fwer_error.max() <= 2 / 4096


def _brute_step_down(t: np.ndarray, t_obs: np.ndarray) -> np.ndarray:
    """Westfall-Young step-down adjusted p from the full [flips, units] |t| matrix, as written."""
    u = t_obs.size
    order = np.argsort(-t_obs, kind="stable")
    p = np.empty(u)
    running = 0.0
    for j, v in enumerate(order):
        rest = order[j:]
        pj = (t[:, rest].max(1) >= t_obs[v] * (1 - 1e-9)).mean()
        running = max(running, pj)
        p[v] = running
    return p


@pytest.mark.parametrize("mode", ["exact", "random"])
@pytest.mark.parametrize("impl", ["op", "ref"])
def test_step_down_equals_brute_force(mode, impl):
    rng = np.random.default_rng(33)  # a seed where step-down rejects more than single-step
    n, u = 11, 40
    d = rng.integers(-3, 4, size=(n, u)).astype(np.float64) + 0.5 * rng.integers(0, 2, size=(n, u))
    d[:, :10] += np.linspace(1.0, 3.5, 10)  # graded effects: several passes
    if mode == "exact":
        signs = exact_signs(n, np.arange(2 ** (n - 1))).numpy()
        kw = dict(mode="exact")
    else:
        signs = random_signs(9, np.arange(3000), n).numpy()
        kw = dict(mode="random", n_flips=3000, seed=9)
    t = _abs_t(signs[:, :, None] * d[None])
    t_obs = _abs_t(d[None])[0]
    brute = _brute_step_down(t, t_obs)
    fn = signflip_null if impl == "op" else signflip_null_ref
    res = fn(torch.from_numpy(d), [2.0], **kw)
    single = res.p_fwer
    gained = 0
    for alpha in (0.01, 0.03, 0.05, 0.1, 0.2):
        sd = step_down(torch.from_numpy(d), res, alpha, seed=9, use_op=impl == "op")
        p = sd.p_step_down
        assert np.array_equal(p <= alpha, brute <= alpha), (alpha, np.flatnonzero(p <= alpha), np.flatnonzero(brute <= alpha))
        assert (p >= brute - 1e-12).all() and (p <= single + 1e-12).all()
        assert sd.step_down_passes >= 1
        gained += (p <= alpha).sum() - (single <= alpha).sum()
    assert gained > 0 or mode == "random"  # the exact data make step-down matter


def test_step_down_stops_when_nothing_is_rejected():
    rng = np.random.default_rng(31)
    d = torch.from_numpy(rng.standard_normal((8, 30)))
    res = signflip_null(d, [], "exact")
    sd = step_down(d, res, 0.05)
    assert sd.step_down_passes == 1 and np.array_equal(sd.p_step_down, res.p_fwer)


def test_count_p_and_bound_equal_enumeration():
    rng = np.random.default_rng(40)
    n, u = 10, 50
    d = rng.integers(-3, 4, size=(n, u)).astype(np.float64)
    d[:, :12] += 2
    res = signflip_null(torch.from_numpy(d), THRESHOLDS, "exact")
    signs = exact_signs(n, np.arange(2 ** (n - 1))).numpy()
    t = _abs_t(signs[:, :, None] * d[None])
    for k, c in enumerate(THRESHOLDS):
        counts = (t > c * (1 + 1e-9)).sum(1)
        obs = counts[0]  # flip 0 is the identity
        assert res.observed(k) == obs
        assert res.count_p(k) == pytest.approx((counts >= obs).mean(), abs=0)
        for alpha in (0.05, 0.1):
            q = int(np.sort(counts)[int(np.ceil((1 - alpha) * counts.size)) - 1])
            assert res.count_bound(k, alpha) == max(0, obs - q)
    assert res.min_p == 1 / 512


def test_true_discovery_bound_holds_its_level():
    """10 of 60 units respond: P(bound > true responders over c) <= alpha, within Monte Carlo error."""
    rng = np.random.default_rng(41)
    runs, alpha, misses, bounds = 300, 0.1, 0, []
    for _ in range(runs):
        d = rng.standard_normal((9, 60))
        d[:, :10] += 1.2
        res = signflip_null(torch.from_numpy(d), [2.0], "exact")
        t_obs = _abs_t(d[None])[0]
        true_over = int((t_obs[:10] > 2.0).sum())
        b = res.count_bound(0, alpha)
        misses += b > true_over
        bounds.append(b)
    assert misses / runs <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)
    assert np.mean(bounds) > 1  # and it says something


def test_step_down_family_wise_error_is_nominal_on_null_data():
    """No effect anywhere: P(step-down rejects any unit at 0.05) <= 0.05 within Monte Carlo error."""
    rng = np.random.default_rng(42)
    runs, hits = 400, 0
    for _ in range(runs):
        d = torch.from_numpy(rng.standard_normal((8, 40)))
        sd = step_down(d, signflip_null(d, [], "exact"), 0.05)
        hits += bool((sd.p_step_down <= 0.05).any())
    assert hits / runs <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / runs), hits / runs


HAS_CUDA = torch.cuda.is_available() and ops.compiled_available() and ops.has_kernel("signflip_null", "cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the compiled CUDA op")
@pytest.mark.parametrize("kind", ["integer", "rounded2", "tied"])
@pytest.mark.parametrize("mode,n", [("exact", 5), ("exact", 12), ("exact", 21), ("random", 30)])
def test_cuda_equals_cpu_on_tied_data_and_step_down(kind, mode, n):
    rng = np.random.default_rng(n)
    d = torch.from_numpy(_data(kind, n, 1500, rng))
    d[:, 100:140] += 2.0
    kw = dict(n_flips=20000 if mode == "random" else 0, seed=5, n_max_bins=999)
    cpu = signflip_null(d, THRESHOLDS, mode, **kw)
    gpu = signflip_null(d.cuda(), THRESHOLDS, mode, **kw)
    for name in ("count_hist", "exceed", "fwer_exceed", "fwer_exceed_lo", "max_hist"):
        assert torch.equal(getattr(cpu, name), getattr(gpu, name)), name
    sd_cpu = step_down(d, cpu, 0.05, seed=5)
    sd_gpu = step_down(d.cuda(), gpu, 0.05, seed=5)
    assert torch.equal(sd_cpu.step_down_exceed, sd_gpu.step_down_exceed)
    assert sd_cpu.step_down_passes == sd_gpu.step_down_passes
