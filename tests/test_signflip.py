"""Tests of the sign-flip null (otherview/ops/signflip.py, csrc/*/signflip_null.*).

The independent implementation is a brute-force float64 enumeration of the paired t over every
sign pattern (scipy's formula). Its data are integers in {-1, 0, 1} per unit, which the op quantises
without error (q = d * M), so ties are exact ties in both and every output must match exactly.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from otherview import ops
from otherview.ops.signflip import (
    NullResult,
    auto_mode,
    exact_signs,
    random_signs,
    signflip_null,
    signflip_null_ref,
    step_down,
)
from otherview.ops.fixedpoint import prepare

HAS_CPU_OP = ops.compiled_available() and ops.has_kernel("signflip_null", "cpu")
HAS_CUDA = torch.cuda.is_available() and ops.compiled_available() and ops.has_kernel("signflip_null", "cuda")
THRESHOLDS = [0.0, 1.7, 2.9]


def _abs_t(x: np.ndarray) -> np.ndarray:
    """|paired t| per row of x [flips, N, U] in float64: 0/0 -> 0, c/0 -> inf (as scipy); < 1e-10 -> 0."""
    n = x.shape[1]
    mean = x.mean(1)
    sd = x.std(1, ddof=1) if n > 1 else np.zeros_like(mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(mean) / (sd / np.sqrt(n))
    t[np.abs(mean) == 0] = 0.0
    t[t < 1e-10] = 0.0  # decimal data summing to 0 leave float64 noise of ~1e-16 in the mean
    if n < 2:
        t[:] = 0.0
    return t


def brute_force(d: np.ndarray, signs: np.ndarray, thresholds, n_bins: int) -> dict:
    """Every output of the op, from the explicit [flips, units] matrix of |t| (float64).

    Ties within a relative 1e-9 are ties (integer and decimal data tie exactly; float64 rounding
    moves such t by ~1e-15). ``max_hist`` comes as two histograms, with exact bin edges put in the
    lower and in the upper bin: the op's cumulative histogram must lie between theirs.
    """
    n, u = d.shape
    t = _abs_t(signs[:, :, None] * d[None])  # [P, U]
    t_obs = _abs_t(d[None])[0]
    tol = 1e-9
    ge = lambda a, b: a >= b * (1 - tol)  # noqa: E731
    count_hist = np.zeros((len(thresholds), u + 1), np.int64)
    for k, c in enumerate(thresholds):
        np.add.at(count_hist[k], (t > c * (1 + tol)).sum(1), 1)
    tmax = t.max(1)
    q = np.sqrt((d * d).sum(0) * n)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(q > 0, np.abs(signs.astype(np.float64) @ d) / q, 0.0) if n > 1 else np.zeros_like(t)
    edges = [np.minimum(np.floor(r.max(1) * n_bins * (1 + s)), n_bins - 1).astype(np.int64) for s in (-1e-7, 1e-7)]
    return {
        "count_hist": count_hist,
        "exceed": ge(t, t_obs[None]).sum(0),
        "fwer_exceed": ge(tmax[:, None], t_obs[None]).sum(0),
        "max_hist": [np.bincount(e, minlength=n_bins) for e in edges],
    }


def ternary(n: int, u: int, rng: np.random.Generator) -> np.ndarray:
    """d [n, u] in {-1, 0, 1} with a zero unit, a constant unit and a max |d| of 1 elsewhere."""
    d = rng.integers(-1, 2, size=(n, u)).astype(np.float64)
    d[rng.integers(0, n, size=u), np.arange(u)] = 1.0
    d[:, 0] = 0.0
    d[:, 1] = 1.0
    return d


def assert_matches(res: NullResult, want: dict) -> None:
    """Every output equals the brute force; the family-wise bracket holds it and its top equals it."""
    for name, w in want.items():
        if name == "max_hist":
            got = np.cumsum(res.max_hist.numpy())
            low, high = (np.cumsum(h) for h in w)  # edges down: more mass early
            assert (got <= low).all() and (got >= high).all(), f"max_hist outside {low} .. {high}: {got}"
            continue
        got = getattr(res, name).numpy()
        bad = np.flatnonzero((got != w).ravel())
        assert bad.size == 0, f"{name}: {bad.size} of {got.size} differ, first at {bad[:5]}: {got.ravel()[bad[:5]]} vs {w.ravel()[bad[:5]]}"
    lo = res.fwer_exceed_lo.numpy()
    assert (lo <= want["fwer_exceed"]).all(), "fwer_exceed_lo above the exact count"


def assert_same(a: NullResult, b: NullResult) -> None:
    for name in ("count_hist", "exceed", "fwer_exceed", "fwer_exceed_lo", "max_hist"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype == torch.int64, name
        bad = torch.nonzero(x != y)
        assert bad.numel() == 0, f"{name}: {len(bad)} of {x.numel()} differ, first at {bad[:5].tolist()}"
    assert a.n_flips == b.n_flips and a.mode == b.mode


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("impl", ["op", "ref"])
def test_exact_matches_brute_force(n, impl):
    rng = np.random.default_rng(n)
    d = ternary(n, 9, rng)
    signs = exact_signs(n, np.arange(2 ** (n - 1))).numpy()
    assert len({tuple(s) for s in signs}) == 2 ** (n - 1) and (signs[:, 0] == 1).all()
    fn = signflip_null if impl == "op" else signflip_null_ref
    res = fn(torch.from_numpy(d), THRESHOLDS, "exact", n_max_bins=64)
    assert res.n_flips == 2 ** (n - 1)
    assert_matches(res, brute_force(d, signs, THRESHOLDS, 64))


@pytest.mark.parametrize("n", [1, 4, 11, 70])
def test_random_matches_brute_force(n):
    rng = np.random.default_rng(100 + n)
    d = ternary(n, 7, rng)
    signs = random_signs(1234, np.arange(300), n).numpy()
    assert (signs[0] == 1).all() and set(np.unique(signs)) <= {-1, 1}
    if n > 4:
        assert 0.35 < (signs[1:] == -1).mean() < 0.65
    res = signflip_null(torch.from_numpy(d), THRESHOLDS, "random", n_flips=300, seed=1234, n_max_bins=32)
    assert res.n_flips == 300
    assert_matches(res, brute_force(d, signs, THRESHOLDS, 32))


def test_random_signs_are_counter_based():
    a = random_signs(5, np.arange(50), 130).numpy()
    b = random_signs(5, np.array([49, 7]), 130).numpy()
    assert (a[[49, 7]] == b).all()
    assert (random_signs(6, np.arange(50), 130).numpy() != a).any()
    assert (random_signs(-3, [1], 10).numpy() == random_signs(2**64 - 3, [1], 10).numpy()).all()


@pytest.mark.skipif(not HAS_CPU_OP, reason="compiled CPU op not built")
@pytest.mark.parametrize("mode,n,u", [("exact", 13, 333), ("exact", 17, 40), ("random", 30, 517), ("random", 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_matches_reference(mode, n, u, dtype):
    g = torch.Generator().manual_seed(n * u)
    d = torch.randn(u, n, generator=g, dtype=dtype).t()  # a non-contiguous view
    d[:, 5] += 2.0
    d[:, 6] = 0.0
    ths = [0.5, 2.0, 3.0, 4.5]
    kw = dict(n_flips=3001, seed=99, n_max_bins=1000)
    assert_same(signflip_null(d, ths, mode, **kw), signflip_null_ref(d, ths, mode, **kw))


def test_quantisation_error_is_tiny():
    d = torch.randn(30, 200, dtype=torch.float64) * torch.logspace(-3, 3, 200, dtype=torch.float64)
    p = prepare(d, [])
    assert not p.exact_units.any()  # continuous data: rounded
    q = p.q.double()
    t_d = d.mean(0) / (d.std(0) / 30**0.5)
    t_q = q.mean(0) / (q.std(0) / 30**0.5)
    # the error is below 1e-7 of max(1, |t|): absolute near t = 0, relative for large t
    assert ((t_q - t_d).abs() / t_d.abs().clamp_min(1.0)).max() < 1e-7
    assert (p.q.long().abs().sum(0) <= 2**30 - 1).all() and (p.q.long().abs().sum(0) > 2**28).all()


def test_edge_cases():
    d = torch.zeros(6, 3, dtype=torch.float64)
    d[:, 1] = 2.5  # constant: |t| = inf under the identity, r = 1
    d[:, 2] = torch.tensor([1.0, -2, 3, 0.5, 1, 2])
    res = signflip_null(d, [3.0], "exact", n_max_bins=16)
    assert res.exceed[0] == 32 and res.p_uncorrected[0] == 1.0  # zero unit: t = 0 always, a tie
    assert res.exceed[1] == 1 and res.fwer_exceed[1] == 1  # only the identity reaches inf
    assert res.max_hist[-1] >= 1 and res.max_t_quantile(1.0) == float("inf")
    assert np.isfinite(res.max_t_mean())
    assert (res.p_uncorrected > 0).all() and (res.p_fwer > 0).all()
    one = signflip_null(torch.tensor([[1.5, 0.0]]), [0.0], "random", n_flips=10)
    assert one.count_hist[0, 0] == 10 and (one.exceed == 10).all() and one.max_hist[0] == 10


def test_null_result_summaries():
    rng = np.random.default_rng(3)
    d = ternary(10, 30, rng)
    d[0, 2:], d[1, 2:] = 0.0, 1.0  # no flip of units 2.. is constant, so their |t| stays finite
    res = signflip_null(torch.from_numpy(d), [2.0], "exact", n_max_bins=4096)
    signs = exact_signs(10, np.arange(512)).numpy()
    t = _abs_t(signs[:, :, None] * d[None])
    counts = (t > 2.0).sum(1)
    assert res.count_mean(0) == pytest.approx(counts.mean())
    for q in (0.0, 0.5, 0.9, 0.95, 1.0):
        want = int(np.sort(counts)[max(int(np.ceil(q * counts.size)) - 1, 0)])
        assert res.count_quantile(0, q) == want
    tmax = np.sort(t[:, 2:].max(1))  # drop the constant unit's inf for the quantile check
    res2 = signflip_null(torch.from_numpy(d[:, 2:]), [2.0], "exact", n_max_bins=4096)
    for q in (0.5, 0.95):
        exact = tmax[int(np.ceil(q * tmax.size)) - 1]
        got = res2.max_t_quantile(q)
        assert exact <= got * (1 + 1e-9) and got < exact * 1.05
    assert res2.max_t_mean() == pytest.approx(tmax.mean(), rel=0.01)


def test_planted_effect():
    g = torch.Generator().manual_seed(7)
    d = torch.randn(16, 200, generator=g)
    d[:, 17] += 3.0
    res = signflip_null(d, [3.0], "exact")
    assert res.p_uncorrected[17] == 1.0 / 2**15  # only the identity: the smallest p exact mode has
    assert res.p_fwer[17] < 0.01
    others = np.delete(res.p_fwer, 17)
    assert others.min() > 0.05
    assert (np.delete(res.p_uncorrected, 17) < 0.01).sum() <= 8


def test_inputs_not_mutated_and_errors():
    d = torch.randn(9, 20)
    before = d.clone()
    signflip_null(d, [1.0], "exact")
    signflip_null_ref(d, [1.0], "random", n_flips=20)
    assert torch.equal(d, before)
    with pytest.raises(ValueError, match='mode must be "exact" or "random"'):
        signflip_null(d, [1.0], "perm")
    with pytest.raises(ValueError, match="at most 40 pairs"):
        signflip_null(torch.randn(41, 3), [1.0], "exact")
    with pytest.raises(ValueError, match="n_flips >= 1"):
        signflip_null(d, [1.0], "random", n_flips=0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        signflip_null(d, [-1.0], "exact")
    with pytest.raises(TypeError, match="torch.float32 or torch.float64"):
        signflip_null(d.half(), [1.0], "exact")
    bad = d.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        signflip_null(bad, [1.0], "exact")


def op_errors_in_child(n_pairs: int, n_units: int, calls: list[tuple]) -> list[str]:
    """Call the compiled exact op once per argument tail in ``calls`` (after the 8 fixed arguments) in a
    child process, on random differences of that shape; return the ``ValueError: ...`` lines it printed.

    A child process: on the GPU machine's toolchain a C++ exception thrown out of the extension has
    been seen to crash the interpreter, which must not take the other tests along.
    """
    code = (
        "import torch, otherview.ops\n"
        "from otherview.ops.fixedpoint import prepare\n"
        f"p = prepare(torch.randn({n_pairs}, {n_units}), [1.0])\n"
        f"for extra in {calls!r}:\n"
        "    try:\n"
        "        torch.ops.otherview.signflip_null(p.q, p.thr, p.a_obs, p.kinv, 'exact', 0, 0, 16, *extra)\n"
        "    except ValueError as e:\n"
        "        print('ValueError:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


@pytest.mark.skipif(not HAS_CPU_OP, reason="compiled CPU op not built")
def test_compiled_op_raises_value_error():
    lines = op_errors_in_child(41, 3, [()])
    assert "ValueError: signflip_null: exact mode enumerates 2^(n_pairs-1) flips" in "\n".join(lines)


def test_auto_mode():
    assert auto_mode(30, 10, "cpu") == "exact"
    assert auto_mode(20, 16320, "cpu") == "exact"
    assert auto_mode(30, 16320, "cpu") == "random"
    assert auto_mode(30, 16320, "cuda") == "exact"
    assert auto_mode(41, 1, "cuda") == "random"


@pytest.mark.skipif(not HAS_CPU_OP, reason="compiled CPU op not built")
def test_opcheck():
    p = prepare(torch.randn(7, 11), [1.0, 2.0])
    torch.library.opcheck(torch.ops.otherview.signflip_null.default, (p.q, p.thr, p.a_obs, p.kinv, "exact", 0, 0, 32))
    p = prepare(torch.randn(7, 11).double(), [1.0])
    torch.library.opcheck(torch.ops.otherview.signflip_null.default, (p.q, p.thr, p.a_obs, p.kinv, "random", 50, 3, 8))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the compiled CUDA op")
@pytest.mark.parametrize(
    "mode,n,u,flips",
    [("exact", 2, 5, 0), ("exact", 9, 300, 0), ("exact", 16, 1000, 0), ("exact", 17, 2100, 0),
     ("exact", 22, 1500, 0), ("random", 30, 1111, 5000), ("random", 1, 3, 7), ("random", 100, 77, 999)],
)
def test_cuda_matches_cpu_bitwise(mode, n, u, flips):
    g = torch.Generator().manual_seed(n + u)
    d = torch.randn(n, u, generator=g)
    d[:, 1 % u] = 0.7  # constant
    d[:, 2 % u] = 0.0  # zero variance
    d[:, -1] += 1.5
    ths = [0.0, 2.0, 3.5]
    cpu = signflip_null(d, ths, mode, flips, 11, 777)
    cuda = signflip_null(d.cuda(), ths, mode, flips, 11, 777)
    assert_same(cuda, cpu)
    again = signflip_null(d.cuda(), ths, mode, flips, 11, 777)
    assert_same(again, cuda)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the compiled CUDA op")
def test_cuda_opcheck():
    p = prepare(torch.randn(18, 300), [1.0, 2.0])
    args = [x.cuda() for x in (p.q, p.thr, p.a_obs, p.kinv)]
    torch.library.opcheck(torch.ops.otherview.signflip_null.default, (*args, "exact", 0, 0, 32))
    torch.library.opcheck(torch.ops.otherview.signflip_null.default, (*args, "random", 100, 3, 8))
