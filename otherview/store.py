"""The run store: one directory per run, every file written atomically.

A run directory holds ``manifest.json`` (what produced the run: raw spec, resolved spec, hash, seeds,
versions, device, git sha, whether weights are random, status and phase timings),
``reference.png``, ``rms.safetensors`` (per-pass, per-unit RMS), ``units.csv`` (one row per unit,
readable by pandas), ``summary.json`` and ``report.md``. A file is written to a temporary name in
the same directory and renamed into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

PACKAGES = ("otherview", "torch", "diffusers", "transformers", "numpy", "pydantic", "safetensors", "click")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run files are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_tensors(path: Path, tensors: dict[str, Any], metadata_: dict[str, str] | None = None) -> None:
    """Write arrays (numpy or torch) to a safetensors file atomically."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in tensors.items()}
    atomic_write_bytes(path, save(arrays, metadata=metadata_))


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with the same keys) as CSV atomically."""
    buf = io.StringIO()
    if rows:
        # csv writes floats with repr (shortest round-trip; inf and nan as such), so no formatting here
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(rows[0].keys())
        writer.writerows(row.values() for row in rows)
    atomic_write_text(path, buf.getvalue())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def git_sha(cwd: Path | None = None) -> str | None:
    """Return the git commit of otherview's source tree (with ``-dirty`` if modified), or None."""
    if os.environ.get("OTHERVIEW_GIT_SHA"):  # a copy of the tree without .git (e.g. a GPU machine)
        return os.environ["OTHERVIEW_GIT_SHA"]
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def new_run_dir(base: str | Path, name: str) -> Path:
    """Create and return a fresh run directory ``base/<UTC timestamp>`` (never reusing one)."""
    base = Path(str(base).replace("{name}", name))
    base.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a fresh run directory under {base}")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
