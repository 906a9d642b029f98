"""Per-unit sums of squares over token segments: the capture op behind every unit's RMS.

``unit_sumsq_(x, unit_width, segments, out)`` adds, for every batch row ``b``, segment ``s`` and
unit ``u`` (``unit_width`` contiguous channels), the sum of ``x[b, t, c] ** 2`` over the segment's
tokens ``t`` and the unit's channels ``c`` into ``out[b, s, u]``, in float32. A unit's RMS is then
``sqrt(out / (n_tokens * unit_width))``. ``out`` is accumulated in place so that callers can share
one buffer across sites, steps and batches (``buf[:, :, u0:u1]``).

The compiled kernels (``csrc/cpu/unit_sumsq.cpp``, ``csrc/cuda/unit_sumsq.cu``) are used where they
were built; otherwise :func:`unit_sumsq_ref`, the specification, is added into ``out``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from otherview import ops

__all__ = ["unit_sumsq_", "unit_sumsq_ref"]

_OP = "unit_sumsq_"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _flat_segments(segments: Sequence[int] | Sequence[Sequence[int]]) -> list[int]:
    """Return ``segments`` as the op's flat ``[start0, end0, start1, end1, ...]`` list of ints."""
    flat: list[int] = []
    for item in segments:
        if isinstance(item, (tuple, list)):
            flat.extend(int(v) for v in item)
        else:
            flat.append(int(item))
    return flat


def _check_args(x: torch.Tensor, unit_width: int, segments: list[int], out: torch.Tensor | None) -> None:
    """Raise the C++ checks' errors (``csrc/checks.h``), same class and text, for bad arguments."""

    def fail(exc: type[Exception], msg: str) -> None:
        raise exc(f"{_OP}: {msg}")

    if x.dim() != 3:
        fail(ValueError, f"x must be 3-d [B, T, C], got shape {list(x.shape)}")
    if x.dtype not in _DTYPES:
        fail(TypeError, f"x must be torch.bfloat16, torch.float16 or torch.float32, got {x.dtype}")
    if unit_width <= 0:
        fail(ValueError, f"unit_width must be positive, got {unit_width}")
    B, T, C = x.shape
    if C % unit_width:
        fail(ValueError, f"x.shape[2] = {C} channels is not a multiple of unit_width = {unit_width}")
    if len(segments) % 2:
        fail(
            ValueError,
            f"segments must be flat [start0, end0, start1, end1, ...] pairs, got {len(segments)} values",
        )
    for i in range(0, len(segments), 2):
        start, end = segments[i], segments[i + 1]
        if not 0 <= start <= end <= T:
            fail(ValueError, f"segment {i // 2} = [{start}, {end}) must satisfy 0 <= start <= end <= T = {T}")
    if out is None:
        return
    if out.dtype != torch.float32:
        fail(TypeError, f"out must be torch.float32, got {out.dtype}")
    want = [B, len(segments) // 2, C // unit_width]
    if list(out.shape) != want:
        fail(ValueError, f"out must have shape [B, S, C / unit_width] = {want}, got {list(out.shape)}")
    if x.device != out.device:
        fail(ValueError, f"x and out must be on one device, got {x.device} and {out.device}")
    if torch._debug_has_internal_overlap(out) == 1:  # 1: MemOverlap::Yes
        fail(ValueError, "out must not have overlapping memory (an expanded view, say): it is accumulated in place")


def unit_sumsq_ref(
    x: torch.Tensor,
    unit_width: int,
    segments: Sequence[int] | Sequence[Sequence[int]],
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return the per-unit sums of squares over each token segment: the op's specification.

    Parameters
    ----------
    x : Tensor, shape (B, T, C)
        Activations, bfloat16, float16 or float32, any strides.
    unit_width : int
        Channels per unit; ``C`` must be a multiple of it.
    segments : sequence of int, or sequence of (start, end)
        Token ranges ``[start, end)`` with ``0 <= start <= end <= T``, flat
        (``[start0, end0, start1, end1, ...]``) or as pairs. Ranges may be empty or overlap.
    dtype : torch.dtype, optional
        Precision of the arithmetic and of the result (float32, the op's, by default; tests pass
        float64 for an exact reference and ``x.dtype`` for the error yardstick).

    Returns
    -------
    Tensor, shape (B, S, C // unit_width), dtype ``dtype``
        ``[b, s, u]`` is the sum over tokens of segment ``s`` and channels of unit ``u`` of
        ``x[b, t, c] ** 2``. Not accumulated: a fresh tensor.
    """
    flat = _flat_segments(segments)
    _check_args(x, unit_width, flat, None)
    B, T, C = x.shape
    U = C // unit_width
    sq = x.to(dtype).square().reshape(B, T, U, unit_width).sum(-1)  # (B, T, U)
    parts = [sq[:, flat[i] : flat[i + 1]].sum(1) for i in range(0, len(flat), 2)]
    if not parts:
        return torch.zeros(B, 0, U, dtype=dtype, device=x.device)
    return torch.stack(parts, 1)


def unit_sumsq_(
    x: torch.Tensor,
    unit_width: int,
    segments: Sequence[int] | Sequence[Sequence[int]],
    out: torch.Tensor,
) -> None:
    """Add each unit's sum of squares over each token segment into ``out``, in place.

    Runs ``torch.ops.otherview.unit_sumsq_`` where a kernel for ``x``'s device was built; otherwise
    adds :func:`unit_sumsq_ref` into ``out`` (``otherview.ops`` warns once that the build is
    missing). Neither path synchronises the device.

    Parameters
    ----------
    x : Tensor, shape (B, T, C)
        Activations, bfloat16, float16 or float32; any strides (the CUDA kernel's fast path wants
        the channel stride to be 1 and 16-byte aligned rows, and reads ``x`` exactly once when the
        segments are at most 32).
    unit_width : int
        Channels per unit; ``C`` must be a multiple of it.
    segments : sequence of int, or sequence of (start, end)
        Token ranges ``[start, end)``, flat or as pairs; may be empty or overlap.
    out : Tensor, shape (B, S, C // unit_width), float32
        Accumulated in place; any strides without self-overlap (a slice of a larger buffer, say).

    Raises
    ------
    ValueError, TypeError
        For a bad shape, dtype, device or segment, naming the argument and what was expected.
    """
    flat = _flat_segments(segments)
    if ops.has_kernel(_OP, x.device):
        torch.ops.otherview.unit_sumsq_(x, unit_width, flat, out)
        return
    _check_args(x, unit_width, flat, out)
    out += unit_sumsq_ref(x, unit_width, flat)


if ops.compiled_available():

    @torch.library.register_fake("otherview::unit_sumsq_")
    def _unit_sumsq_fake(x: torch.Tensor, unit_width: int, segments: list[int], out: torch.Tensor) -> None:
        """Check the arguments as the kernels do; the op returns nothing and only mutates ``out``."""
        _check_args(x, unit_width, list(segments), out)
