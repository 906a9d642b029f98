"""Scale-out with accelerate on this CPU: several processes, two 'machines' on loopback, several specs.

The probes are shared by batch and every sign-flip null by flip range; either way the run's arrays,
null counts and statistics must be bitwise those of one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from otherview.store import read_tensors

SPECS = Path(__file__).resolve().parent / "specs"
SMALL = str(SPECS / "pass" / "small.toml")
# Equal threads per process on both sides: a CPU GEMM's summation order depends on its thread count.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _otherview(*args, cwd=None):
    out = subprocess.run([sys.executable, "-m", "otherview", *args], capture_output=True, text=True, env=ENV,
                         cwd=cwd, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _run_dirs(out: str) -> list[Path]:
    return [Path(line) for line in out.strip().splitlines() if line.startswith("/")]


def _same_run(a: Path, b: Path) -> None:
    for name in ("rms", "null", "inference"):  # per-pass values, null counts, per-unit statistics
        ra, rb = read_tensors(a / f"{name}.safetensors"), read_tensors(b / f"{name}.safetensors")
        assert ra.keys() == rb.keys(), name
        for key in ra:
            assert np.array_equal(ra[key], rb[key]), f"{name}.safetensors: {key}"
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["analyses"] == sb["analyses"]
    assert (a / "units.csv").read_text() == (b / "units.csv").read_text()


def _assert_null_split(run: Path, processes: int) -> None:
    """Every contrast's null was split into one flip range per process, tiling its flips."""
    nulls = json.loads((run / "manifest.json").read_text())["null"]
    assert nulls
    for key, record in nulls.items():
        if processes == 1:
            assert "split" not in record, key
            continue
        total = record["flips"]
        want = [[total * r // processes, total * (r + 1) // processes] for r in range(processes)]
        assert record["split"] == {"processes": processes, "flip_ranges": want}, key
        assert all(b > a for a, b in want), key  # each process counted some flips


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = _otherview("exec", SMALL, "--out", str(tmp_path_factory.mktemp("one")), "-q")
    return _run_dirs(out.stdout)[0]


def test_two_processes_give_the_same_run_as_one(one_process, tmp_path):
    out = _otherview("exec", SMALL, "--out", str(tmp_path), "--processes", "2", "-q")
    runs = _run_dirs(out.stdout)
    assert len(runs) == 1  # only the main process writes and prints
    _same_run(one_process, runs[0])
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["status"] == "complete" and "gather" in manifest["phases"]
    _assert_null_split(runs[0], 2)
    _assert_null_split(one_process, 1)


def test_two_machines_on_loopback_give_the_same_run(one_process, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                               "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                               "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
                               "-m", "otherview", "exec", SMALL, "--out", str(tmp_path), "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = _run_dirs(outs[0][0])
    assert len(runs) == 1 and not _run_dirs(outs[1][0])
    _same_run(one_process, runs[0])
    _assert_null_split(runs[0], 2)


def test_a_sweep_of_two_specs_writes_two_run_directories(one_process, tmp_path):
    text = Path(SMALL).read_text().replace('name = "small"', 'name = "small-again"')
    (tmp_path / "again.toml").write_text(text)
    out = _otherview("exec", SMALL, str(tmp_path / "again.toml"), "--out", str(tmp_path / "runs"))
    runs = _run_dirs(out.stdout)
    assert len(runs) == 2 and runs[0] != runs[1]
    assert out.stderr.count("loading builtin:tiny") == 1  # the second spec reuses the loaded model
    _same_run(one_process, runs[0])
    assert np.array_equal(read_tensors(runs[1] / "rms.safetensors")["rms"],
                          read_tensors(one_process / "rms.safetensors")["rms"])


# --- a killed multi-process run, resumed with any process count -----------------------------------------------
# Batches of 2: six probe batches, three per process (process 0 runs 0, 2, 4; process 1 runs 1, 3, 5).
BATCH2 = ("--batch-size", "2")
COMPARED = ("passes.csv", "reference.png", "rms.safetensors", "null.safetensors", "inference.safetensors", "units.csv",
            "summary.json")


def _stopped(*args, stop: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "otherview", *args], capture_output=True, text=True,
                         env={**ENV, "OTHERVIEW_TEST_STOP": stop}, timeout=600)
    assert out.returncode != 0, out.stdout + out.stderr
    return out


def _recorded(run: Path) -> dict[str, list[int]]:
    files = sorted((run / "shards").glob("*.safetensors"))
    return {p.name: [int(b) for b in read_tensors(p)["batches"]] for p in files}


def _same_files(a: Path, b: Path) -> None:
    for name in COMPARED:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not (b / "shards").exists()  # folded into rms.safetensors


@pytest.fixture(scope="module")
def one_process_b2(tmp_path_factory):
    out = _otherview("exec", SMALL, *BATCH2, "--out", str(tmp_path_factory.mktemp("one-b2")), "-q")
    return _run_dirs(out.stdout)[0]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A 2-process run whose second process was killed after its first batch (batch 1): 3 and 5 never ran."""
    out = tmp_path_factory.mktemp("killed")
    _stopped("exec", SMALL, *BATCH2, "--out", str(out), "--processes", "2", "-q", stop="probe:2")
    run = next(out.iterdir())
    recorded = _recorded(run)
    assert recorded["attempt-0-rank-1.safetensors"] == [1]
    assert set(recorded.get("attempt-0-rank-0.safetensors", [])) <= {0, 2, 4}  # as far as process 0 got when stopped
    assert not (run / "rms.safetensors").exists()
    return run


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, dest))


def test_a_killed_two_process_run_resumed_by_one_process_is_the_uninterrupted_run(one_process_b2, killed, tmp_path):
    from otherview.shards import ranges

    run = _copy(killed, tmp_path / "run")
    missing = sorted(set(range(6)) - {b for bs in _recorded(run).values() for b in bs})
    assert {3, 5} <= set(missing)
    out = _otherview("exec", "--resume", str(run))
    assert f"to run: {ranges(missing)}" in out.stderr
    assert out.stderr.count("probe batch ") == len(missing)  # only the missing batches ran
    resumed = json.loads((run / "manifest.json").read_text())["resumed"][-1]
    assert (resumed["processes_before"], resumed["processes"], resumed["batches_todo"]) == (2, 1, ranges(missing))
    _same_files(one_process_b2, run)


def test_a_killed_two_process_run_resumed_by_two_processes_is_the_uninterrupted_run(one_process_b2, killed,
                                                                                      tmp_path):
    run = _copy(killed, tmp_path / "run")
    missing = sorted(set(range(6)) - {b for bs in _recorded(run).values() for b in bs})
    # The missing batches shared afresh by two processes, each recording its own; stopped after they are gathered.
    _stopped("exec", "--resume", str(run), "--processes", "2", "-q", stop="gathered")
    recorded = _recorded(run)
    assert recorded["attempt-1-rank-0.safetensors"] == missing[0::2]
    assert recorded["attempt-1-rank-1.safetensors"] == missing[1::2]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] in ("running", "interrupted") and manifest["resumed"][-1]["processes"] == 2
    assert not (run / "rms.safetensors").exists()
    # Every batch is recorded (by four files of two attempts): the last resume needs no model, and its two
    # processes share only the statistics (each null's flips).
    out = _otherview("exec", "--resume", str(run), "--processes", "2")
    assert "to run: none" in out.stderr and "loading" not in out.stderr and "probe batch " not in out.stderr
    assert json.loads((run / "manifest.json").read_text())["processes"] == 2
    _assert_null_split(run, 2)
    _same_files(one_process_b2, run)


@pytest.mark.parametrize("tamper,message", [
    ("run_id", "belongs to another run"),
    ("batch_size", "was written in probe batches of 4, the manifest says 2"),
    ("overlap", "probe batch 1 is recorded twice with different values"),
])
def test_resume_refuses_shard_files_that_do_not_fit(killed, tmp_path, tamper, message):
    from click.testing import CliRunner

    from otherview.cli import main
    from otherview.store import tensors_metadata, write_tensors

    run = _copy(killed, tmp_path / "run")
    path = run / "shards" / "attempt-0-rank-1.safetensors"
    arrays, meta = read_tensors(path), tensors_metadata(path)
    if tamper == "overlap":  # another file says batch 1 came out differently
        path = path.with_name("attempt-7-rank-0.safetensors")
        arrays["rms"] = arrays["rms"] + 1
    else:
        meta[tamper] = "0" * 32 if tamper == "run_id" else "4"
    write_tensors(path, arrays, meta)
    before = (run / "manifest.json").read_bytes()
    result = CliRunner().invoke(main, ["exec", "--resume", str(run)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert (run / "manifest.json").read_bytes() == before  # a refused resume changes nothing
