"""What the command line does before importing torch (otherview.startup): bytecode cache, one distribution scan."""

import compileall
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package(site: Path, name: str, compiled: bool) -> Path:
    pkg = site / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import part\nVALUE = part.VALUE\n")
    (pkg / "part.py").write_text("VALUE = 42\n")
    if compiled:
        assert compileall.compile_dir(str(pkg), quiet=1)
    return pkg


def _run(tmp_path: Path, probe: str, imports: list[str], extra_env: dict | None = None) -> str:
    code = textwrap.dedent(f"""
        from otherview import startup
        folder = startup.use_bytecode_cache(probe={probe!r})
        for name in {imports!r}:
            assert __import__(name).VALUE == 42
        print(folder, startup.bytecode_cache())
    """)
    env = {**os.environ, "OTHERVIEW_CACHE": str(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.pop("OTHERVIEW_BYTECODE_CACHE", None)
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _cached(tmp_path: Path) -> dict[str, int]:
    root = tmp_path / "cache" / "bytecode"
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.pyc")} if root.exists() else {}


def test_modules_without_bytecode_get_it_in_the_cache_and_compiled_ones_keep_theirs(tmp_path):
    bare = _package(tmp_path / "site", "bare_pkg", compiled=False)
    _package(tmp_path / "site", "built_pkg", compiled=True)
    folder = tmp_path / "cache" / "bytecode" / sys.implementation.cache_tag
    assert _run(tmp_path, "bare_pkg", ["bare_pkg", "built_pkg"]) == f"{folder} {folder}"
    cached = _cached(tmp_path)
    assert any("bare_pkg" in k and "part." in k for k in cached)
    assert not any("built_pkg" in k for k in cached)  # its own bytecode was read, not copied
    assert not list(bare.rglob("*.pyc"))  # nothing written beside the installed package
    # a second process reads what the first wrote: nothing is written again
    assert _run(tmp_path, "bare_pkg", ["bare_pkg", "built_pkg"]) == f"{folder} {folder}"
    assert _cached(tmp_path) == cached
    # a changed source is compiled afresh (Python checks size and time)
    (bare / "part.py").write_text("VALUE = 42  # changed\n")
    os.utime(bare / "part.py", ns=(cached_time := max(cached.values()) + 10**9, cached_time))
    _run(tmp_path, "bare_pkg", ["bare_pkg"])
    after = _cached(tmp_path)
    changed = [k for k in after if "bare_pkg" in k and "part." in k]
    assert changed and after[changed[0]] != cached[changed[0]]


def test_an_install_with_bytecode_is_left_alone(tmp_path):
    _package(tmp_path / "site", "built_pkg", compiled=True)
    assert _run(tmp_path, "built_pkg", ["built_pkg"]) == "None None"
    assert not (tmp_path / "cache" / "bytecode").exists()


def test_it_can_be_turned_off_and_a_users_prefix_is_kept(tmp_path):
    _package(tmp_path / "site", "bare_pkg", compiled=False)
    assert _run(tmp_path, "bare_pkg", ["bare_pkg"], {"OTHERVIEW_BYTECODE_CACHE": "off"}) == "None None"
    assert _run(tmp_path, "bare_pkg", ["bare_pkg"], {"PYTHONPYCACHEPREFIX": str(tmp_path / "mine")}) == "None None"
    assert not (tmp_path / "cache" / "bytecode").exists()


def test_missing_modules_are_not_a_reason():
    from otherview import startup

    assert startup.has_bytecode("no_such_module_anywhere_123") is None
    assert startup.has_bytecode("sys") is None  # built in: no source


def test_the_distribution_scan_runs_once_and_hands_out_copies(monkeypatch):
    import importlib.metadata as metadata

    from otherview import startup

    calls = []

    def scan():
        calls.append(1)
        return {"pkg": ["dist"]}

    monkeypatch.setattr(metadata, "packages_distributions", scan)
    startup.memoize_distributions()
    first = metadata.packages_distributions()
    first["pkg"].append("changed by a caller")
    assert metadata.packages_distributions() == {"pkg": ["dist"]} and calls == [1]
    startup.memoize_distributions()  # a second call does not wrap it again
    assert metadata.packages_distributions() == {"pkg": ["dist"]} and calls == [1]


def test_stale_bytecode_beside_a_module_is_neither_used_nor_rewritten(tmp_path):
    _package(tmp_path / "site", "bare_pkg", compiled=False)  # the probe: no bytecode, so the cache is on
    stale = _package(tmp_path / "site", "stale_pkg", compiled=True)
    beside = {p: p.read_bytes() for p in stale.rglob("*.pyc")}
    (stale / "part.py").write_text("VALUE = 42  # edited after it was compiled\n")  # another size: stale
    _run(tmp_path, "bare_pkg", ["bare_pkg", "stale_pkg"])
    assert {p: p.read_bytes() for p in stale.rglob("*.pyc")} == beside  # not rewritten beside the install
    assert any("stale_pkg" in k and "part." in k for k in _cached(tmp_path))  # compiled into the cache
    assert not any("stale_pkg" in k and "__init__." in k for k in _cached(tmp_path))  # its current one was read
