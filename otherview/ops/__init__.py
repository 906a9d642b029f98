"""Compiled ops (``torch.ops.otherview.*``) with their plain-PyTorch references.

Importing this package loads ``otherview._C`` when it was built. Without it every op falls back to
its reference implementation, with one warning saying so and how to build the extension; it never
raises ImportError.
"""

from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger(__name__)

_LOAD_ERROR: str | None = None
try:
    from otherview import _C  # noqa: F401  (registers torch.ops.otherview.*)
except ImportError as exc:  # the extension was not built: fall back to the references
    _LOAD_ERROR = str(exc)

_WARNED = False


def compiled_available() -> bool:
    """Return whether the compiled extension loaded (so ``torch.ops.otherview`` has the ops)."""
    return _LOAD_ERROR is None


def has_kernel(op_name: str, device: torch.device | str) -> bool:
    """Return whether a compiled kernel of ``op_name`` exists for ``device``'s backend."""
    if not compiled_available():
        _warn_once()
        return False
    device = torch.device(device)
    key = "CUDA" if device.type == "cuda" else "CPU"
    op = getattr(torch.ops.otherview, op_name)
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), key)


def _warn_once() -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            "otherview's compiled ops are not built (" + str(_LOAD_ERROR) + "); using the plain-PyTorch "
            "references, which are correct but slower. Build them with "
            "`pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=3,
        )
