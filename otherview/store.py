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
import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
import time
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


NON_FINITE = "_non_finite"  # top-level key of a JSON file: JSON Pointer -> "Infinity" | "-Infinity" | "NaN"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (RFC 8259) atomically.

    JSON has no NaN or infinity: each non-finite float is written as null and listed under the
    top-level ``_non_finite`` key (JSON Pointer -> "Infinity", "-Infinity" or "NaN"), which
    :func:`read_json` restores, so the file stays standard and nothing is lost.
    """
    found: dict[str, str] = {}
    clean = _finite(json.loads(json.dumps(obj, default=_json_default)), "", found)
    if found:
        if not isinstance(clean, dict):
            raise ValueError(f"{path}: non-finite values outside a JSON object: {sorted(found)[:3]}")
        clean[NON_FINITE] = found
    atomic_write_text(path, json.dumps(clean, indent=2, allow_nan=False) + "\n")


def _finite(obj: Any, pointer: str, found: dict[str, str]) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        found[pointer] = "NaN" if obj != obj else ("Infinity" if obj > 0 else "-Infinity")
        return None
    if isinstance(obj, dict):
        return {k: _finite(v, f"{pointer}/{str(k).replace('~', '~0').replace('/', '~1')}", found) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v, f"{pointer}/{i}", found) for i, v in enumerate(obj)]
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def read_json(path: Path) -> Any:
    """Return a JSON file written by :func:`write_json`, its non-finite values restored; strict JSON only."""
    obj = json.loads(Path(path).read_text(), parse_constant=_reject_constant)
    if isinstance(obj, dict) and isinstance(obj.get(NON_FINITE), dict):
        for pointer, value in obj.pop(NON_FINITE).items():
            parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
            target = obj
            for p in parts[:-1]:
                target = target[int(p)] if isinstance(target, list) else target[p]
            last = parts[-1]
            target[int(last) if isinstance(target, list) else last] = float(value.replace("Infinity", "inf"))
    return obj


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


_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
              "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL"}


def safetensors_bytes(tensors: dict[str, Any], metadata_: dict[str, str] | None = None) -> bytes:
    """Return a safetensors file of ``tensors`` whose bytes depend only on its contents.

    The safetensors library keeps metadata in a hash map, so two identical runs could write their
    keys in different orders; here the header is canonical JSON (sorted keys) and the tensors are
    laid out in name order, 8-byte aligned, as the format specifies.
    """
    arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
              for k, v in tensors.items()}
    header: dict[str, Any] = {}
    if metadata_:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata_.items()}
    offset, blobs = 0, []
    for name in sorted(arrays):
        a = arrays[name]
        if a.dtype.name not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def write_tensors(path: Path, tensors: dict[str, Any], metadata_: dict[str, str] | None = None) -> None:
    """Write arrays (numpy or torch) to a safetensors file atomically, byte-identical for identical inputs."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata_))


def tensors_metadata(path: Path) -> dict[str, str]:
    """Return a safetensors file's metadata (its header only is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


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


def run_base(base: str | Path, name: str) -> Path:
    """Return the output directory of experiment ``name`` (``{name}`` in ``base`` replaced)."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ValueError(f"experiment name {name!r} would leave the output directory")
    return Path(str(base).replace("{name}", name))


def new_run_dir(base: str | Path, name: str) -> Path:
    """Create and return a fresh run directory ``base/<UTC timestamp>`` (never reusing one)."""
    base = run_base(base, name)
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


def sha256_file(path: Path) -> str:
    """Return the SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Return the SHA-256 of ``obj`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode()).hexdigest()


def process_id() -> dict[str, Any]:
    """Return what identifies this process later: host, pid and its start time (against pid reuse)."""
    return {"host": platform.node(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _start_time(pid: int) -> str | None:
    try:  # field 22 of /proc/PID/stat: start time in clock ticks since boot (after the command name)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(proc: dict[str, Any] | None) -> bool | None:
    """Return whether the process a manifest names is still running (None: another host, unknown)."""
    if not isinstance(proc, dict) or not isinstance(proc.get("pid"), int):
        return False
    if proc.get("host") != platform.node():
        return None
    try:
        os.kill(proc["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _start_time(proc["pid"])
    return start is None or proc.get("start") is None or start == proc["start"]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def process_seconds() -> float:
    """Return the seconds since this process started (from /proc where there is one, else since this import).

    The clock of ``exec``'s progress lines and of the manifest's ``model.load_clock``: imports included.
    """
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


# --- what produced a run, and whether its files are still what it wrote --------------------------------

#: The manifest fields a run's meaning rests on: sealed by ``record_sha256`` once the arrays are written.
RECORD_FIELDS = ("spec_text", "spec_text_sha256", "spec", "spec_hash", "random_weights", "model_override", "seeds",
                 "resolution", "fingerprints", "inputs", "files", "batch_size")
#: Files whose SHA-256 the manifest records (with the reference images).
RECORDED_FILES = ("passes.csv", "rms.safetensors", "null.safetensors", "inference.safetensors", "units.csv",
                  "summary.json")


def code_fingerprint() -> str:
    """Return a hash of the code that computes a run's numbers: otherview's sources and built ops, and versions."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.so"), *root.rglob("*.json")]):
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    v = versions()
    h.update(json.dumps({k: v.get(k) for k in ("python", "torch", "diffusers", "transformers", "numpy")},
                        sort_keys=True).encode())
    return h.hexdigest()


def model_fingerprint(source: str) -> str:
    """Return a hash that changes when a model source's configs or weights change (weights: headers and sizes).

    Reading only the safetensors headers keeps this quick for 8 GB of weights; a header lists every
    tensor's name, dtype, shape and byte offsets.
    """
    h = hashlib.sha256(source.encode())
    if source.startswith("builtin:"):
        from importlib import resources

        folder = Path(str(resources.files("otherview") / "configs" / source.split(":", 1)[1]))
    else:
        folder = Path(source).expanduser()
    if not folder.is_dir():
        return h.hexdigest()
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(folder)).encode()
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                h.update(rel + str(path.stat().st_size).encode() + f.read(min(n, 1 << 26)))
        elif path.suffix in (".json", ".txt", ".jinja", ".model"):
            h.update(rel + path.read_bytes())
    return h.hexdigest()


def seal(run_dir: Path, manifest: dict) -> None:
    """Record the SHA-256 of every written array and table, and of the manifest's record, in ``manifest``."""
    run_dir = Path(run_dir)
    names = [n for n in RECORDED_FILES if (run_dir / n).exists()]
    names += sorted(p.name for p in run_dir.glob("reference*.png"))
    manifest["files"] = {n: sha256_file(run_dir / n) for n in names}
    manifest["record_sha256"] = sha256_json({k: manifest.get(k) for k in RECORD_FIELDS})


def read_manifest(run_dir: Path) -> dict:
    """Return a run directory's manifest; raise ``RunDirError`` for a missing, corrupt or linked one."""
    from .errors import RunDirError

    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory", source=str(run_dir))
    if path.is_symlink():
        raise RunDirError("manifest.json is a symbolic link: a run directory's files are its own", source=str(run_dir))
    if not path.exists():
        raise RunDirError("no manifest.json: not a run directory of otherview (run `otherview exec` to make one)",
                          source=str(run_dir))
    try:
        manifest = read_json(path)
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise RunDirError(f"manifest.json is corrupt ({exc})", source=str(run_dir)) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("status"), str):
        raise RunDirError("manifest.json is corrupt (no status)", source=str(run_dir))
    return manifest


def check_status(run_dir: Path, manifest: dict) -> None:
    """Raise ``RunDirError`` unless the run is complete; a ``running`` run whose process is gone is marked ``interrupted``."""
    from .errors import RunDirError

    status = manifest["status"]
    resume = f"`otherview exec --resume {run_dir}` continues it"
    if status == "running":
        alive = process_alive(manifest.get("process"))
        if alive:
            raise RunDirError(f"still running (process {manifest['process']['pid']})", source=str(run_dir))
        if alive is None:
            raise RunDirError(f"says running on host {manifest['process'].get('host')}: wait for it there, or "
                              f"{resume} if it died", source=str(run_dir))
        manifest.update(status="interrupted", error=f"the process that ran it ({manifest.get('process', {}).get('pid')}) "
                        f"ended during phase '{manifest.get('phase')}' without a word (killed)")
        write_json(Path(run_dir) / "manifest.json", manifest)
        status = "interrupted"
    if status == "interrupted":
        raise RunDirError(f"the run was interrupted ({manifest.get('error', 'no reason recorded')}); {resume}",
                          source=str(run_dir))
    if status == "failed":
        raise RunDirError(f"the run failed: {manifest.get('error', 'no reason recorded')}", source=str(run_dir))
    if status != "complete":
        raise RunDirError(f"manifest.json has an unknown status '{status}'", source=str(run_dir))


def verify_run(run_dir: Path, manifest: dict) -> None:
    """Raise ``RunDirError`` if a run's recorded content does not match its hashes, or a path is a link.

    Checked: the manifest's record (spec text, resolved spec, model, random-weights flag, seeds, file
    hashes) against ``record_sha256``; every recorded file against its SHA-256; the random-weights
    flag against the one in ``rms.safetensors``; ``figures`` and every file being a plain file or folder.
    """
    from .errors import RunDirError

    run_dir = Path(run_dir)
    fail = lambda msg: RunDirError(msg, source=str(run_dir))  # noqa: E731
    if "record_sha256" not in manifest or not isinstance(manifest.get("files"), dict):
        raise fail("manifest.json records no content hashes: it predates this otherview version or the run never "
                   "wrote its arrays (re-run `otherview exec`)")
    if sha256_json({k: manifest.get(k) for k in RECORD_FIELDS}) != manifest["record_sha256"]:
        raise fail("manifest.json was changed after the run: its spec, model, random-weights flag or file hashes no "
                   "longer match their recorded hash; refusing to report it")
    inside = [*(run_dir / "figures").iterdir()] if (run_dir / "figures").is_dir() and not \
        (run_dir / "figures").is_symlink() else []
    for path in [run_dir / "figures", run_dir / "report.md", *run_dir.iterdir(), *inside]:
        if path.is_symlink():
            raise fail(f"{path.relative_to(run_dir)} is a symbolic link: a run directory's files are its own, "
                       "refusing to follow it")
    if (run_dir / "figures").exists() and not (run_dir / "figures").is_dir():
        raise fail("figures is not a directory")
    for name, digest in manifest["files"].items():
        path = run_dir / str(name)
        if path.parent != run_dir:
            raise fail(f"manifest.json names a file outside the run directory: {name!r}")
        if not path.is_file():
            raise fail(f"{name} is missing (the manifest records it)")
        if sha256_file(path) != digest:
            raise fail(f"{name} does not match its recorded SHA-256: it was changed or is corrupt")
    try:
        meta = tensors_metadata(run_dir / "rms.safetensors")
    except Exception as exc:  # noqa: BLE001  any parse failure of a file is corruption here
        raise fail(f"rms.safetensors cannot be read ({exc})") from None
    if meta.get("random_weights") != str(manifest.get("random_weights")):
        raise fail("the random-weights flag of manifest.json and rms.safetensors disagree")
