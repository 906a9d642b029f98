"""unit_sumsq_: the compiled CPU/CUDA kernels against the float64 reference.

Error rule (flash-attention's): the kernel's error against the float64 reference may be at most twice
the error of the same reference computed in the input dtype, plus a small floor for float32 rounding
of the accumulation and of the in-place add. ``out`` is accumulated, so it is filled with random
values first and the test checks ``after - before``.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

from otherview import ops
from otherview.ops import rms

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
COMPILED = pytest.mark.skipif(not ops.compiled_available(), reason="otherview._C is not built")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _assert_accumulated(after, before, x, unit_width, segments, times=1, label=""):
    """Assert ``after == before + times * ref`` within the error rule; say where it is not."""
    ref64 = rms.unit_sumsq_ref(x.cpu(), unit_width, segments, dtype=torch.float64)
    ref_low = rms.unit_sumsq_ref(x.cpu(), unit_width, segments, dtype=x.dtype).double()
    low_err = (ref_low - ref64).abs().max().item() if ref64.numel() else 0.0
    expected = before.cpu().double() + times * ref64
    got = after.cpu().double()
    tol = 2 * times * low_err + 1e-5 * expected.abs() + 1e-6
    bad = ~((got - expected).abs() <= tol)  # NaN counts as bad
    if bad.any():
        where = bad.nonzero().tolist()
        i = tuple(where[0])
        raise AssertionError(
            f"{label}: {len(where)} of {bad.numel()} elements of out [B, S, U] mismatch, first at "
            f"{where[:5]}: got {got[i].item():.8g}, expected {expected[i].item():.8g} "
            f"(tolerance {tol[i].item():.3g}; reference error in {x.dtype}: {low_err:.3g})"
        )


def _random_out(B, S, U, device, gen):
    return torch.rand(B, S, U, generator=gen).to(device)


def _x_views(B, T, C, dtype, device, gen):
    """Yield (name, x) for x contiguous and as several non-contiguous views of shape (B, T, C)."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    yield "contiguous", randn(B, T, C)
    yield "channel slice, aligned", randn(B, T, C + 64)[:, :, 32 : 32 + C]
    yield "channel slice, unaligned", randn(B, T, C + 3)[:, :, 1 : 1 + C]
    yield "token stride 2", randn(B, 2 * T, C)[:, ::2]
    yield "batch-major transposed", randn(T, B, C).transpose(0, 1)
    yield "transposed then viewed", randn(B, C, T).transpose(1, 2)


SEGMENT_CASES = {
    "whole": lambda T: [0, T],
    "disjoint": lambda T: [0, T // 3, T // 3, T - 1],
    "overlapping": lambda T: [0, T, 2, T // 2, T // 4, T],
    "empty and duplicate": lambda T: [5, 5, 1, T - 2, 1, T - 2, T, T],
}


@COMPILED
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("unit_width,C", [(16, 96), (128, 256), (4, 24), (24, 72), (256, 512)])
def test_matches_reference(device, dtype, unit_width, C):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{device} {dtype} {unit_width}".encode()))
    B, T = 3, 37
    for view, x in _x_views(B, T, C, dtype, device, gen):
        for name, make in SEGMENT_CASES.items():
            segments = make(T)
            out = _random_out(B, len(segments) // 2, C // unit_width, device, gen)
            before = out.clone()
            torch.ops.otherview.unit_sumsq_(x, unit_width, segments, out)
            _assert_accumulated(out, before, x, unit_width, segments, label=f"{view}, {name}")


@COMPILED
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_tokens_strided_out_and_accumulation(device, dtype):
    """Enough tokens to split rows across blocks; out a strided slice; two calls add up."""
    gen = torch.Generator().manual_seed(7)
    B, T, C, g = 2, 1031, 384, 16
    x = torch.randn(B, T, C, generator=gen).to(dtype=dtype, device=device)
    segments = [0, 512, 512, T, 100, 900]
    buf = torch.rand(B, 5, C // g + 7, generator=gen).to(device)
    out = buf[:, 1:4, 3 : 3 + C // g]
    before = out.clone()
    untouched = buf.clone()
    for _ in range(2):
        rms.unit_sumsq_(x, g, segments, out)
    _assert_accumulated(out, before, x, g, segments, times=2, label="two calls into a strided view")
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[:, 1:4, 3 : 3 + C // g] = False
    assert torch.equal(buf[mask], untouched[mask]), "wrote outside the out view"

    transposed = torch.rand(C // g, 3, B, generator=gen).to(device).permute(2, 1, 0)
    before = transposed.clone()
    rms.unit_sumsq_(x, g, segments, transposed)
    _assert_accumulated(transposed, before, x, g, segments, label="out with reversed strides")


@COMPILED
@pytest.mark.parametrize("device", DEVICES)
def test_many_segments(device):
    """More segments than one CUDA launch takes (32) still land in the right rows of out."""
    gen = torch.Generator().manual_seed(3)
    B, T, C, g = 2, 91, 64, 16
    x = torch.randn(B, T, C, generator=gen).to(device=device, dtype=torch.bfloat16)
    segments = []
    for i in range(45):
        a = (i * 7) % T
        segments += [a, min(T, a + 1 + i % 9)]
    out = _random_out(B, 45, C // g, device, gen)
    before = out.clone()
    torch.ops.otherview.unit_sumsq_(x, g, segments, out)
    _assert_accumulated(out, before, x, g, segments, label="45 segments")


@COMPILED
@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_shapes(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 32, generator=gen).to(device)
    out = _random_out(2, 0, 2, device, gen)
    torch.ops.otherview.unit_sumsq_(x, 16, [], out)  # no segments
    empty_b = torch.empty(0, 9, 32, device=device)
    torch.ops.otherview.unit_sumsq_(empty_b, 16, [0, 9], torch.empty(0, 1, 2, device=device))
    no_tokens = torch.empty(2, 0, 32, device=device)
    out = _random_out(2, 1, 2, device, gen)
    before = out.clone()
    torch.ops.otherview.unit_sumsq_(no_tokens, 16, [0, 0], out)
    assert torch.equal(out, before)


@COMPILED
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 19, 48, generator=gen).to(device=device, dtype=torch.bfloat16)
    out = torch.zeros(2, 2, 3, device=device)
    torch.library.opcheck(torch.ops.otherview.unit_sumsq_.default, (x, 16, [0, 19, 4, 11], out))


def _bad_cases(device):
    x = torch.randn(2, 10, 32, device=device)
    out = torch.zeros(2, 1, 2, device=device)
    other = "cpu" if device != "cpu" else "meta"
    return [
        ((x[0], 16, [0, 10], out), ValueError, r"x must be 3-d \[B, T, C\], got shape \[10, 32\]"),
        ((x.double(), 16, [0, 10], out), TypeError, r"x must be torch.bfloat16, torch.float16 or "
         r"torch.float32, got torch.float64"),
        ((x, 0, [0, 10], out), ValueError, "unit_width must be positive, got 0"),
        ((x, 12, [0, 10], out), ValueError, "x.shape\\[2\\] = 32 channels is not a multiple of "
         "unit_width = 12"),
        ((x, 16, [0, 10, 3], out), ValueError, "segments must be flat .* got 3 values"),
        ((x, 16, [4, 2], out), ValueError, r"segment 0 = \[4, 2\) must satisfy 0 <= start <= end "
         r"<= T = 10"),
        ((x, 16, [0, 11], out), ValueError, r"segment 0 = \[0, 11\)"),
        ((x, 16, [0, 10], out.half()), TypeError, "out must be torch.float32, got torch.float16"),
        ((x, 16, [0, 10], torch.zeros(2, 2, 2, device=device)), ValueError,
         r"out must have shape \[B, S, C / unit_width\] = \[2, 1, 2\], got \[2, 2, 2\]"),
        ((x, 16, [0, 10], torch.zeros(2, 1, 2, device=other)), ValueError,
         "x and out must be on one device"),
        ((x, 16, [0, 10], torch.zeros(2, 1, 1, device=device).expand(2, 1, 2)), ValueError,
         "out must not have overlapping memory"),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["op", "fallback"])
def test_bad_arguments_raise_clearly(device, path, monkeypatch):
    if path == "op" and not ops.compiled_available():
        pytest.skip("otherview._C is not built")
    if path == "fallback":
        monkeypatch.setattr(ops, "has_kernel", lambda name, dev: False)
    for args, exc, pattern in _bad_cases(device):
        if path == "op" and args[3].device != args[0].device and args[3].device.type == "meta":
            continue  # the dispatcher, not our check, rejects mixing meta and real tensors
        with pytest.raises(exc, match="unit_sumsq_: " + pattern):
            rms.unit_sumsq_(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_reference_fallback_accumulates(device, monkeypatch):
    monkeypatch.setattr(ops, "has_kernel", lambda name, dev: False)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 15, 32, generator=gen).to(device=device, dtype=torch.float16)
    out = _random_out(2, 2, 2, device, gen)
    before = out.clone()
    rms.unit_sumsq_(x, 16, [(0, 15), (3, 8)], out)  # pairs are accepted as well as a flat list
    _assert_accumulated(out, before, x, 16, [0, 15, 3, 8], label="reference fallback")


@COMPILED
@pytest.mark.parametrize("device", DEVICES)
def test_hooked_then_unhooked_model_is_bitwise_unchanged(device):
    """A read-only capture changes nothing: hooked, unhooked and never-hooked outputs are equal."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 96), nn.Linear(96, 32))
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(3, 41, 64, device=device, dtype=dtype)
    segments = [0, 20, 20, 41]
    sites = {"2": (0, 6), "3": (6, 12)}  # module name -> unit range in the shared buffer
    buf = torch.zeros(3, 2, 12, device=device)

    def make_hook(u0, u1):
        def hook(module, args):
            rms.unit_sumsq_(args[0], 16, segments, buf[:, :, u0:u1])

        return hook

    with torch.no_grad():
        never = model(x)
        handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(*r)) for n, r in sites.items()]
        try:
            hooked = model(x)
        finally:
            for h in handles:
                h.remove()
        unhooked = model(x)
        h2 = model[1](model[0](x))
    assert torch.equal(hooked, never) and torch.equal(unhooked, never)
    assert not model[2]._forward_pre_hooks and not model[3]._forward_pre_hooks
    _assert_accumulated(buf[:, :, 0:6], torch.zeros(3, 2, 6), h2, 16, segments, label="site 2")


@COMPILED
@CUDA
def test_cuda_bitwise_repeatable():
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 3001, 1536, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    for unit_width, segments in [(16, [0, 1500, 1500, 3001]), (128, [0, 3001, 7, 2000]), (8, [0, 3001])]:
        results = []
        for _ in range(3):
            out = torch.zeros(2, len(segments) // 2, 1536 // unit_width, device="cuda")
            torch.ops.otherview.unit_sumsq_(x, unit_width, segments, out)
            results.append(out)
        assert all(torch.equal(results[0], r) for r in results[1:]), f"unit_width {unit_width}"
    torch.cuda.synchronize()
