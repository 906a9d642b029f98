"""What the command line does before it imports torch, so each new ``otherview`` process starts sooner.

Two costs every fresh process paid on the H100 machine the benchmarks use (``benchmarks/results``):

- **Source compiled on every import.** Python compiles a module's source on each import when no
  bytecode (``.pyc``) for it exists and none may be written beside it: an install made with
  ``pip install --no-compile``, a read-only folder, or ``PYTHONDONTWRITEBYTECODE=1`` (common in
  container images). That machine's torch and sympy (which ``torch._dynamo`` imports, and diffusers
  imports ``torch._dynamo``) have none: ``import torch._dynamo`` took 9.4 s in a fresh process.
  :func:`use_bytecode_cache` keeps bytecode for such modules in ``<otherview cache>/bytecode``:
  a module whose install has its own bytecode still reads that; one without it reads (and, the
  first time, writes) bytecode in the cache. Python checks each file's source size and modification
  time against the bytecode, so an upgraded package is compiled afresh. Nothing is written beside the
  installed packages. ``OTHERVIEW_BYTECODE_CACHE=off`` turns it off; a ``PYTHONPYCACHEPREFIX`` the
  user set is kept (Python then does the same for every module).
- **The installed-distribution scan, twice.** diffusers and transformers each call
  ``importlib.metadata.packages_distributions()`` at import, which reads every installed
  distribution's file list (~1 s each there). :func:`memoize_distributions` makes the second call
  reuse the first's answer (a fresh copy: callers may change it).

Only the command line does these (``cli.run``); ``import otherview`` as a library changes nothing.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

OFF = ("0", "off", "no", "false")
_FOLDER: Path | None = None  # the bytecode cache this process uses, once use_bytecode_cache set it up


def cache_root() -> Path:
    """Return otherview's cache folder: ``$OTHERVIEW_CACHE``, else ``$XDG_CACHE_HOME/otherview``, else ``~/.cache/otherview``."""
    if os.environ.get("OTHERVIEW_CACHE"):
        return Path(os.environ["OTHERVIEW_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "otherview"


def prepare() -> None:
    """Everything the command line does before importing torch (see the module docstring)."""
    use_bytecode_cache()
    memoize_distributions()


def bytecode_cache() -> str | None:
    """Return the bytecode cache folder this process uses (for the manifest), or None."""
    return str(_FOLDER) if _FOLDER is not None else None


def has_bytecode(module: str) -> bool | None:
    """Return whether ``module``'s source has current bytecode beside it (None: not installed, or no source).

    Finds the module without importing it.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    if spec is None or not origin or not origin.endswith(".py"):
        return None
    try:
        return _current(origin, _beside(origin))
    except NotImplementedError:  # an interpreter without bytecode files
        return None


def _beside(source: str) -> str:
    """Return where an install keeps ``source``'s bytecode (``__pycache__`` beside it), ignoring any prefix."""
    prefix, sys.pycache_prefix = sys.pycache_prefix, None
    try:
        return _ORIGINAL(source)
    finally:
        sys.pycache_prefix = prefix


def _current(source: str, pyc: str) -> bool:
    """Return whether ``pyc`` is bytecode Python will accept for ``source`` as it is now.

    Reads its 16-byte header as Python does: this interpreter's magic number, then either a hash
    (Python validates those itself) or the source's modification time and size. So a stale or
    foreign file is never chosen, and Python never has to recompile and rewrite it beside the
    install.
    """
    try:
        with open(pyc, "rb") as f:
            head = f.read(16)
        st = os.stat(source)
    except OSError:
        return False
    if len(head) < 16 or head[:4] != importlib.util.MAGIC_NUMBER:
        return False
    flags = int.from_bytes(head[4:8], "little")
    if flags & 0b1:  # hash-based bytecode
        return True
    return (flags == 0 and int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF)


def use_bytecode_cache(probe: str = "torch") -> Path | None:
    """Read and write bytecode in otherview's cache for modules installed without any, if ``probe`` is one.

    Returns the cache folder, or None where nothing changed: ``probe`` (torch) has bytecode or is not
    installed, the user set ``PYTHONPYCACHEPREFIX``, the folder cannot be written, or
    ``OTHERVIEW_BYTECODE_CACHE`` is ``off``.
    """
    global _FOLDER
    if _FOLDER is not None:
        return _FOLDER
    if os.environ.get("OTHERVIEW_BYTECODE_CACHE", "auto").strip().lower() in OFF or sys.pycache_prefix:
        return None
    if has_bytecode(probe) is not False:
        return None
    folder = cache_root() / "bytecode" / sys.implementation.cache_tag
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            return None
        import importlib._bootstrap_external as bootstrap  # where SourceLoader.get_code looks the function up
    except (OSError, ImportError):
        return None
    if getattr(bootstrap, "cache_from_source", None) is not _ORIGINAL:
        return None  # someone else replaced it: leave theirs alone

    def cache_from_source(path, debug_override=None, *, optimization=None):
        # sys.pycache_prefix is None here (checked above), so the original gives the place beside the source
        beside = _ORIGINAL(path, debug_override, optimization=optimization)
        if _current(path, beside):
            return beside  # the install's own bytecode
        head = os.path.splitdrive(os.path.dirname(os.path.abspath(path)))[1]  # as CPython's own prefix does
        return os.path.join(str(folder), head.lstrip(os.sep + (os.altsep or "")), os.path.basename(beside))

    bootstrap.cache_from_source = cache_from_source
    sys.dont_write_bytecode = False  # writes go to the cache folder (an install's own bytecode is only read)
    _FOLDER = folder
    return folder


def memoize_distributions() -> None:
    """Make ``importlib.metadata.packages_distributions`` scan the installed distributions once a process."""
    import importlib.metadata as metadata

    original = metadata.packages_distributions
    if getattr(original, "_otherview_memo", False):
        return
    memo = functools.cache(original)

    @functools.wraps(original)
    def packages_distributions():
        return {name: list(dists) for name, dists in memo().items()}

    packages_distributions._otherview_memo = True
    metadata.packages_distributions = packages_distributions


_ORIGINAL = importlib.util.cache_from_source
