"""Tests of the sign-flip null's flip range and of its split across processes (otherview/ops/signflip.py).

Every output of the null is a count over flips, so the counts over ranges that tile ``[0, n_flips)``
must add up to the whole null's, bitwise, whatever the cuts: empty ranges, the identity (flip 0)
alone, cuts inside the CPU op's 4096-flip chunks and inside the CUDA tree kernel's 8-flip steps.
"""

from __future__ import annotations

import threading

import pytest
import torch

from otherview import ops
from otherview.ops.fixedpoint import prepare
from otherview.ops.signflip import FlipSplit, NullResult, signflip_null, signflip_null_ref, step_down
from test_signflip import op_errors_in_child  # the compiled op in a child process

HAS_CPU_OP = ops.compiled_available() and ops.has_kernel("signflip_null", "cpu")
HAS_CUDA = torch.cuda.is_available() and ops.compiled_available() and ops.has_kernel("signflip_null", "cuda")
COUNTS = ("count_hist", "exceed", "fwer_exceed", "fwer_exceed_lo", "max_hist")
THRESHOLDS = [0.0, 0.5, 2.0, 3.0, 4.5]  # five: the CUDA op makes two launches (4 thresholds each)


def _data(n: int, u: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, u, generator=g)
    d[:, 1 % u] = 0.7  # constant
    d[:, 2 % u] = 0.0  # zero variance
    d[:, -1] += 1.5
    return d


def _ranges(total: int) -> list[tuple[int, int]]:
    """Uneven ranges tiling [0, total): empty ones, flip 0 alone, cuts off every block size."""
    inner = (1, 3, 8, 13, 4095, 4099, total // 3, total // 2 + 5, total - 9, total - 1)
    edges = [0, *sorted({c for c in inner if 0 < c < total}), total]
    return [(0, 0), *zip(edges[:-1], edges[1:]), (1, 1), (total, total)]


def _assert_sum(parts: list[NullResult], whole: NullResult, what: str) -> None:
    for name in COUNTS:
        got = sum(getattr(p, name) for p in parts)
        want = getattr(whole, name)
        bad = torch.nonzero(got != want)
        assert bad.numel() == 0, f"{what}: {name}: {len(bad)} of {want.numel()} differ, first at {bad[:5].tolist()}"


def _assert_same(a: NullResult, b: NullResult, what: str) -> None:
    _assert_sum([a], b, what)


CASES = [("exact", 14, 37, 0), ("exact", 7, 5, 0), ("random", 30, 53, 10007), ("random", 70, 9, 5003)]


@pytest.mark.parametrize("mode,n,u,flips", CASES)
@pytest.mark.parametrize("impl", ["op", "ref"])
def test_ranges_add_up_to_the_whole_null(mode, n, u, flips, impl):
    if impl == "op" and not HAS_CPU_OP:
        pytest.skip("compiled CPU op not built")
    fn = signflip_null if impl == "op" else signflip_null_ref
    d = _data(n, u, n * u)
    kw = dict(n_flips=flips, seed=7, n_max_bins=100)
    whole = fn(d, THRESHOLDS, mode, **kw)
    assert whole.flip_ranges == ()
    ranges = _ranges(whole.n_flips)
    assert sum(b - a for a, b in ranges) == whole.n_flips and (0, 1) in ranges and any(a == b for a, b in ranges)
    parts = [fn(d, THRESHOLDS, mode, flip_range=r, **kw) for r in ranges]
    for r, part in zip(ranges, parts):
        assert part.flip_ranges == (r,) and part.n_flips == whole.n_flips
        assert int(part.max_hist.sum()) == r[1] - r[0]  # one max per flip counted
    _assert_sum(parts, whole, f"{impl} {mode} over {ranges}")
    # the reference is the specification of every range, and the identity alone is the observed labelling
    _assert_same(parts[1], signflip_null_ref(d, THRESHOLDS, mode, flip_range=ranges[1], **kw), "flip 0")
    assert (parts[1].exceed == 1).all()
    _assert_same(fn(d, THRESHOLDS, mode, flip_range=(0, None), **kw), whole, "(0, None)")


@pytest.mark.skipif(not HAS_CPU_OP, reason="compiled CPU op not built")
def test_op_takes_a_flip_range_and_defaults_to_all():
    p = prepare(_data(11, 20, 3), THRESHOLDS)
    args = (p.q, p.thr, p.a_obs, p.kinv, "exact", 0, 0, 32)
    whole = torch.ops.otherview.signflip_null(*args)
    same = torch.ops.otherview.signflip_null(*args, 0, 1024)
    assert all(torch.equal(a, b) for a, b in zip(whole, same))
    parts = [torch.ops.otherview.signflip_null(*args, flip_start=a, flip_stop=b) for a, b in ((0, 333), (333, 1024))]
    assert all(torch.equal(a + b, w) for a, b, w in zip(*parts, whole))
    torch.library.opcheck(torch.ops.otherview.signflip_null.default, (*args, 5, 700))
    torch.library.opcheck(torch.ops.otherview.signflip_null.default, (p.q, p.thr, p.a_obs, p.kinv, "random", 50, 3, 8, 7))


BAD = [((5, 3), "[5, 3)"), ((-1, 4), "[-1, 4)"), ((0, 1025), "[0, 1025)"), ((1025, None), "[1025, 1024)")]


@pytest.mark.parametrize("flip_range,shown", BAD)
def test_bad_ranges_raise(flip_range, shown):
    d = _data(11, 4, 1)
    msg = f"signflip_null: flip range {shown} must satisfy 0 <= flip_start <= flip_stop <= 1024, the null's flips"
    for fn in (signflip_null, signflip_null_ref):
        with pytest.raises(ValueError) as err:
            fn(d, [1.0], "exact", flip_range=flip_range)
        assert str(err.value) == msg
    with pytest.raises(ValueError, match=r"flip range \[0, 11\) must satisfy .* <= 10, the null's flips"):
        signflip_null(d, [1.0], "random", n_flips=10, flip_range=(0, 11))
    for fn in (signflip_null, signflip_null_ref):
        with pytest.raises(ValueError, match="flip_range or split, not both"):
            fn(d, [1.0], "exact", flip_range=(0, 4), split=FlipSplit(0, 1, lambda t: t))


@pytest.mark.skipif(not HAS_CPU_OP, reason="compiled CPU op not built")
def test_compiled_op_repeats_the_range_message():
    # (the range is the op's 9th and 10th arguments)
    want = [f"ValueError: signflip_null: flip range {shown} must satisfy 0 <= flip_start <= flip_stop <= 1024, "
            "the null's flips" for _, shown in BAD]
    assert op_errors_in_child(11, 4, [(5, 3), (-1, 4), (0, 1025), (1025, None)]) == want


def test_split_ranges_tile_the_flips():
    for world in (1, 2, 3, 7):
        for total in (0, 1, 5, 1024, 10007):
            r = FlipSplit(0, world, lambda t: t).ranges(total)
            assert len(r) == world and r[0][0] == 0 and r[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(r, r[1:])) and all(a <= b for a, b in r)


def _threads(world: int, fn) -> list:
    """Run ``fn(split)`` for every rank in threads, with an in-process all-reduce; return the results by rank."""
    barrier, box, out, errors = threading.Barrier(world), [None] * world, [None] * world, []

    def all_sum(rank: int, t: torch.Tensor) -> torch.Tensor:
        box[rank] = t.clone()
        barrier.wait()
        total = sum(box)
        barrier.wait()  # every rank has read the boxes before the next sum fills them
        return total

    def run(rank: int) -> None:
        try:
            out[rank] = fn(FlipSplit(rank, world, lambda t: all_sum(rank, t)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("mode,n,flips", [("exact", 12, 0), ("random", 25, 4001)])
@pytest.mark.parametrize("use_op", [True, False])
def test_split_null_and_step_down_equal_one_process(mode, n, flips, use_op):
    if use_op and not HAS_CPU_OP:
        pytest.skip("compiled CPU op not built")
    g = torch.Generator().manual_seed(5)
    d = torch.randn(n, 60, generator=g, dtype=torch.float64)
    d[:, :6] += torch.linspace(0.6, 1.6, 6, dtype=torch.float64)  # graded effects: step-down has passes to make
    one = signflip_null(d, THRESHOLDS, mode, flips, 3, 64) if use_op else signflip_null_ref(d, THRESHOLDS, mode, flips, 3, 64)
    one = step_down(d, one, 0.05, seed=3, use_op=use_op)
    assert one.step_down_passes >= 2

    def rank_null(split: FlipSplit) -> NullResult:
        fn = signflip_null if use_op else signflip_null_ref
        res = fn(d, THRESHOLDS, mode, flips, 3, 64, split=split)
        return step_down(d, res, 0.05, seed=3, use_op=use_op, split=split)

    for world in (2, 3):
        results = _threads(world, rank_null)
        for res in results:  # every process has the whole null
            _assert_same(res, one, f"{world} processes")
            assert torch.equal(res.step_down_exceed, one.step_down_exceed)
            assert res.step_down_passes == one.step_down_passes
            assert res.flip_ranges == FlipSplit(0, world, None).ranges(one.n_flips)


def test_step_down_refuses_a_part():
    d = _data(9, 6, 2)
    part = signflip_null(d, [1.0], "exact", flip_range=(0, 100))
    with pytest.raises(ValueError, match="step_down needs the whole null"):
        step_down(d, part, 0.05)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the compiled CUDA op")
@pytest.mark.parametrize(
    "mode,n,u,flips",
    [("exact", 3, 5, 0), ("exact", 5, 300, 0), ("exact", 6, 77, 0), ("exact", 9, 300, 0), ("exact", 16, 1000, 0),
     ("exact", 21, 2100, 0), ("random", 30, 1111, 50003), ("random", 100, 77, 9999)],
)
def test_cuda_ranges_match_cpu_bitwise(mode, n, u, flips):
    d = _data(n, u, n + u)
    kw = dict(n_flips=flips, seed=11, n_max_bins=777)
    whole = signflip_null(d, THRESHOLDS, mode, **kw)
    total = whole.n_flips
    # cuts inside the tree kernel's 8-flip steps and its blocks of up to 512 steps, plus whole halves
    ranges = _ranges(total) + [(0, total // 2), (total // 2, total), (5, total - 3), (total // 8 + 1, total // 4 + 7)]
    for r in ranges:
        if not 0 <= r[0] <= r[1] <= total:
            continue
        cpu = signflip_null(d, THRESHOLDS, mode, flip_range=r, **kw)
        cuda = signflip_null(d.cuda(), THRESHOLDS, mode, flip_range=r, **kw)
        _assert_same(cuda, cpu, f"cuda {mode} n={n} range {r}")
    parts = [signflip_null(d.cuda(), THRESHOLDS, mode, flip_range=r, **kw) for r in _ranges(total)]
    _assert_sum(parts, whole, f"cuda {mode} n={n}")
    _assert_same(signflip_null(d.cuda(), THRESHOLDS, mode, **kw), whole, "cuda whole")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the compiled CUDA op")
def test_cuda_opcheck_with_range():
    p = prepare(torch.randn(18, 300), [1.0, 2.0])
    args = [x.cuda() for x in (p.q, p.thr, p.a_obs, p.kinv)]
    torch.library.opcheck(torch.ops.otherview.signflip_null.default, (*args, "exact", 0, 0, 32, 13, 70001))
    torch.library.opcheck(torch.ops.otherview.signflip_null.default, (*args, "random", 100, 3, 8, 1, 99))
