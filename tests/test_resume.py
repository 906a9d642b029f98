"""Honest status and resume: a run killed in each phase resumes to bitwise the files of an uninterrupted run.

``OTHERVIEW_TEST_STOP=PHASE[:BATCH][:SIGNAL]`` makes ``otherview exec`` signal itself as PHASE starts,
so each kill lands in a chosen phase deterministically.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otherview.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "tests" / "specs" / "pass" / "small.toml"
COMPARED = ("passes.csv", "reference.png", "rms.safetensors", "null.safetensors", "inference.safetensors", "units.csv",
            "summary.json")
# Every phase of a run on the tiny model, two points inside the probes (after batches 1 and 2 of 3),
# and the moment between the report and ``complete``.
STOPS = ["load_model", "reference", "encode", "probe:1", "probe:2", "statistics", "write", "report", "complete"]


def _otherview(*args, stop: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("OTHERVIEW_TEST_STOP", None)
    if stop:
        env["OTHERVIEW_TEST_STOP"] = stop
    return subprocess.run([sys.executable, "-m", "otherview", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def _survivors(marker: str) -> list[int]:
    """Return the pids of processes whose command line holds ``marker`` (forked workers share the parent's)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("whole")
    result = CliRunner().invoke(main, ["exec", str(SMALL), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return Path(result.output.strip().splitlines()[-1])


def test_killed_in_every_phase_then_resumed_is_bitwise_an_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    first = _otherview("exec", str(SMALL), "--out", str(out), "-q", stop=STOPS[0])
    assert first.returncode == -signal.SIGKILL, first.stderr
    run = next(out.iterdir())
    for k, stop in enumerate(STOPS):
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "running" and manifest["phase"] == (stop.split(":")[0] if stop != "complete"
                                                                         else None), (stop, manifest)
        deadline = time.time() + 10
        while _survivors(str(out)) and time.time() < deadline:  # figure workers die with their parent
            time.sleep(0.2)
        assert not _survivors(str(out)), f"processes outlived their parent killed at {stop}"
        if stop == "report":  # a run found running with no live process is reported as interrupted
            told = _otherview("report", str(run))
            assert told.returncode == 2 and "interrupted" in told.stderr and "--resume" in told.stderr, told.stderr
            assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
        nxt = STOPS[k + 1] if k + 1 < len(STOPS) else None
        again = _otherview("exec", "--resume", str(run), "-q", stop=nxt)
        if nxt is None:
            assert again.returncode == 0, again.stderr
        else:
            assert again.returncode == -signal.SIGKILL, (nxt, again.stderr)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["resumed"]) == len(STOPS)
    for name in COMPARED:
        assert (run / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert (run / "report.md").exists()


def test_sigterm_marks_the_run_interrupted_and_resume_finishes_it(uninterrupted, tmp_path):
    out = tmp_path / "term"
    result = _otherview("exec", str(SMALL), "--out", str(out), stop="probe:1:TERM")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "interrupted by SIGTERM" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    run = next(out.iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and "SIGTERM" in manifest["error"]
    from click.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(main, ["exec", "--resume", str(run), "-q"])
    assert result.exit_code == 0, result.output
    for name in COMPARED:
        assert (run / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    refused = runner.invoke(main, ["exec", "--resume", str(run)])
    assert refused.exit_code == 2 and "already complete" in refused.output


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest, symlinks=True)
    return dest


def test_resume_refuses_another_spec_or_model(runner, uninterrupted, tmp_path):
    run = _copy(uninterrupted, tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["status"] = "failed"
    (run / "manifest.json").write_text(json.dumps(manifest))
    other = tmp_path / "other.toml"
    other.write_text(SMALL.read_text().replace("seed = 1", "seed = 2"))
    result = runner.invoke(main, ["exec", str(other), "--resume", str(run)])
    assert result.exit_code == 2 and "the spec given differs" in result.output
    result = runner.invoke(main, ["exec", "--resume", str(run), "--model", "builtin:klein-4b"])
    assert result.exit_code == 2 and "keeps the settings it was started with" in result.output
    manifest["fingerprints"]["model"] = "0" * 64
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(main, ["exec", "--resume", str(run)])
    assert result.exit_code == 2 and "differs from the one that made this run's checkpoints" in result.output
    manifest["fingerprints"]["code"] = "0" * 64
    manifest["fingerprints"]["model"] = json.loads((uninterrupted / "manifest.json").read_text())["fingerprints"]["model"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(main, ["exec", "--resume", str(run)])
    assert result.exit_code == 2 and "otherview's code" in result.output


@pytest.mark.parametrize("tamper,message", [
    ("random_weights", "manifest.json was changed after the run"),
    ("spec_text", "manifest.json was changed after the run"),
    ("rms", "rms.safetensors does not match its recorded SHA-256"),
    ("summary_truncated", "summary.json does not match its recorded SHA-256"),
    ("manifest_garbage", "manifest.json is corrupt"),
    ("figures_symlink", "figures is a symbolic link"),
    ("missing_units", "units.csv is missing"),
])
def test_report_refuses_a_tampered_run_directory(runner, uninterrupted, tmp_path, tamper, message):
    run = _copy(uninterrupted, tmp_path / "run")
    manifest_path = run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if tamper in ("random_weights", "spec_text"):
        manifest[tamper] = False if tamper == "random_weights" else manifest[tamper] + "\n# edited\n"
        manifest_path.write_text(json.dumps(manifest))
    elif tamper == "rms":
        data = bytearray((run / "rms.safetensors").read_bytes())
        data[-1] ^= 1
        (run / "rms.safetensors").write_bytes(bytes(data))
    elif tamper == "summary_truncated":
        (run / "summary.json").write_bytes((run / "summary.json").read_bytes()[:100])
    elif tamper == "manifest_garbage":
        manifest_path.write_text('{"status": "complete", ')
    elif tamper == "figures_symlink":
        import shutil

        shutil.rmtree(run / "figures")
        (tmp_path / "elsewhere").mkdir()
        (run / "figures").symlink_to(tmp_path / "elsewhere")
    elif tamper == "missing_units":
        (run / "units.csv").unlink()
    result = runner.invoke(main, ["report", str(run)])
    assert result.exit_code == 2, result.output
    assert message in result.output and str(run) in result.output and "Traceback" not in result.output
    if tamper == "figures_symlink":
        assert not list((tmp_path / "elsewhere").iterdir())  # nothing written through the link


def test_sigint_in_process_marks_the_run_interrupted(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("OTHERVIEW_TEST_STOP", "statistics:INT")
    result = runner.invoke(main, ["exec", str(SMALL), "--out", str(tmp_path), "-q"])
    assert result.exit_code == 130, result.output
    assert "interrupted by SIGINT" in result.output and "Traceback" not in result.output
    manifest = json.loads((next(tmp_path.iterdir()) / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["phase"] == "statistics"
    assert "probe" in manifest["phases_done"]
