"""Probe checkpoints by shard: what each process finished, so a resumed run redoes only the missing batches.

The unit of work is the probe batch: batch ``b`` holds passes ``b * batch_size`` up to ``(b + 1) *
batch_size`` (the batch size is recorded in the manifest and in every file here, so a batch's
passes never change). After each of its batches a process rewrites its own shard file,
``shards/attempt-A-rank-R.safetensors`` (A: 0 for the first run, k after the k-th resume; R: the
process's rank), atomically as the store writes every file:

- ``rms`` float32, shape (n_rows, n_units): the rows of its finished batches, batch after batch
  (each batch's passes x step levels, in ``rms.safetensors``'s row order);
- ``batches`` int64, shape (n_finished,): their batch indices, ascending;
- metadata ``run_id`` (the manifest's), ``batch_size``, ``passes``, ``step_levels``, ``units``,
  ``attempt``, ``rank``, ``processes``.

No two processes write the same file, so the finished batches are the union of every file, whoever
wrote it and however many processes there were. Once every batch is in, the main process writes
``rms.safetensors`` (every row; metadata ``passes_done``, ``batches_done``, ``batch_size``) and
removes ``shards/``. Workers on another machine write into the run directory path there: their
shards count on a resume only where that folder is shared.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import distributed, store
from .errors import OtherviewError, RunDirError
from .plan import Plan

SHARDS = "shards"


class ProcessLost(OtherviewError):
    """Another process of a multi-process run died (killed, out of memory): the run can be resumed."""


def n_batches(plan: Plan, batch_size: int) -> int:
    """Return the number of probe batches of ``plan`` at ``batch_size``."""
    return math.ceil(len(plan.passes) / batch_size)


def batch_rows(plan: Plan, batch_size: int, b: int) -> slice:
    """Return the rows of the per-pass array that probe batch ``b`` fills (its passes x step levels)."""
    levels = len(plan.design.steps)
    return slice(b * batch_size * levels, min((b + 1) * batch_size, len(plan.passes)) * levels)


def shard_path(run_dir: Path, attempt: int, rank: int) -> Path:
    """Return the shard file of process ``rank`` in attempt ``attempt`` (0: the first run, k: the k-th resume)."""
    return Path(run_dir) / SHARDS / f"attempt-{attempt}-rank-{rank}.safetensors"


def write_shard(path: Path, plan: Plan, rms: np.ndarray, batches: list[int], batch_size: int, run_id: str | None,
                attempt: int, rank: int, processes: int) -> None:
    """Write the rows of ``batches`` (finished by one process) from ``rms``, shape (n_rows, n_units), to ``path``."""
    batches = sorted(batches)
    rows = np.concatenate([rms[batch_rows(plan, batch_size, b)] for b in batches]) if batches \
        else np.zeros((0, plan.n_units), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_tensors(path, {"rms": rows, "batches": np.asarray(batches, dtype=np.int64)},
                        {"run_id": str(run_id), "batch_size": str(batch_size), "passes": str(len(plan.passes)),
                         "step_levels": str(len(plan.design.steps)), "units": str(plan.n_units),
                         "attempt": str(attempt), "rank": str(rank), "processes": str(processes)})


def read_complete(run_dir: Path, plan: Plan) -> np.ndarray | None:
    """Return ``rms.safetensors``'s per-pass array when it holds every pass (probes finished), else None."""
    path = Path(run_dir) / "rms.safetensors"
    if not path.is_file():
        return None
    if store.tensors_metadata(path).get("passes_done") != str(len(plan.passes)):
        return None
    return store.read_tensors(path)["rms"]


def recorded(run_dir: Path, plan: Plan, batch_size: int, run_id: str | None) -> tuple[np.ndarray, set[int]]:
    """Return the per-pass array with every finished batch's rows filled in (zeros elsewhere), and those batches.

    Read from ``rms.safetensors`` (a finished probe phase, or a one-process checkpoint of older
    versions: its first ``batches_done`` batches) and from every shard file. Raise ``RunDirError``
    for a file of another run, of another batch size or shape, or a batch recorded twice with
    different values.
    """
    run_dir = Path(run_dir)
    out = np.zeros((plan.design.n_rows, plan.n_units), dtype=np.float32)
    source: dict[int, str] = {}
    fail = lambda msg: RunDirError(msg, source=str(run_dir))  # noqa: E731
    path = run_dir / "rms.safetensors"
    if path.is_file():
        meta = store.tensors_metadata(path)
        if meta.get("passes_done") == str(len(plan.passes)):
            done = n_batches(plan, batch_size)
        elif meta.get("batch_size") != str(batch_size) or "batches_done" not in meta:
            raise fail(f"rms.safetensors was checkpointed in batches of {meta.get('batch_size')}, the manifest says "
                       f"{batch_size}")
        else:
            done = int(meta["batches_done"])
        rms = store.read_tensors(path)["rms"]
        out[: rms.shape[0]] = rms
        source.update((b, "rms.safetensors") for b in range(done))
    for name, batches, rows in _shards(run_dir, plan, batch_size, run_id):
        at = 0
        for b in batches:
            where = batch_rows(plan, batch_size, b)
            values = rows[at: at + where.stop - where.start]
            at += len(values)
            if b in source and not np.array_equal(out[where], values):
                raise fail(f"probe batch {b} is recorded twice with different values, in {source[b]} and {name}: "
                           "the shards come from different computations; start a new run")
            out[where] = values
            source.setdefault(b, name)
    return out, set(source)


def _shards(run_dir: Path, plan: Plan, batch_size: int, run_id: str | None):
    """Yield ``(name, batch indices, rows)`` of every shard file, each checked against this run."""
    folder = run_dir / SHARDS
    fail = lambda msg: RunDirError(msg, source=str(run_dir))  # noqa: E731
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise fail(f"{SHARDS} is not a folder of the run's own: refusing to read it")
    want = {"batch_size": str(batch_size), "passes": str(len(plan.passes)),
            "step_levels": str(len(plan.design.steps)), "units": str(plan.n_units)}
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        name = f"{SHARDS}/{path.name}"
        if path.is_symlink():
            raise fail(f"{name} is a symbolic link: a run directory's files are its own")
        try:
            meta, arrays = store.tensors_metadata(path), store.read_tensors(path)
            batches, rows = [int(b) for b in arrays["batches"]], arrays["rms"]
        except Exception as exc:  # noqa: BLE001  any parse failure of a file is corruption here
            raise fail(f"{name} cannot be read ({exc}): delete it to redo its batches") from None
        if run_id is not None and meta.get("run_id") != run_id:
            raise fail(f"{name} belongs to another run (run id {meta.get('run_id')}, this run's is {run_id})")
        if meta.get("batch_size") != want["batch_size"]:
            raise fail(f"{name} was written in probe batches of {meta.get('batch_size')}, the manifest says "
                       f"{batch_size}")
        bad = [k for k, v in want.items() if meta.get(k) != v]
        n = n_batches(plan, batch_size)
        expected = sum(batch_rows(plan, batch_size, b).stop - batch_rows(plan, batch_size, b).start
                       for b in batches if 0 <= b < n)
        if bad or any(not 0 <= b < n for b in batches) or rows.shape != (expected, plan.n_units):
            raise fail(f"{name} does not fit this run's probes ({', '.join(bad) or 'batch indices or rows'} "
                       "differ): delete it to redo its batches")
        yield name, batches, rows


def write_probes(run_dir: Path, plan: Plan, rms: np.ndarray, batch_size: int) -> None:
    """Write the finished probe phase to ``rms.safetensors``, shape (n_rows, n_units), and drop the shard files."""
    store.write_tensors(Path(run_dir) / "rms.safetensors", {"rms": rms},
                        {"passes_done": str(len(plan.passes)), "batches_done": str(n_batches(plan, batch_size)),
                         "batch_size": str(batch_size)})
    folder = Path(run_dir) / SHARDS
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)


def ranges(batches) -> str:
    """Return batch indices as ranges, ``[0, 1, 2, 5]`` -> ``"0-2,5"`` ("" for none)."""
    out, run = [], []
    for b in sorted(batches):
        if run and b != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(b)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


@dataclass
class Work:
    """The probe batches of one attempt, decided by the main process and the same on every process."""

    batch_size: int
    todo: list[int]  # the batches not recorded yet, ascending; process r runs todo[r::processes]
    attempt: int  # 0: the first run, k: the k-th resume (names the shard files)
    run_id: str | None
    processes: int

    def mine(self, rank: int) -> list[int]:
        """Return the batches process ``rank`` runs: every ``processes``-th missing batch (round robin)."""
        return self.todo[rank::self.processes]


def gather(ctx: distributed.Context, plan: Plan, rms: np.ndarray | None, work: Work) -> np.ndarray | None:
    """Return, on the main process, every row: its own ``rms`` (recorded rows included) with each process's batches.

    ``rms`` is a process's per-pass array, shape (n_rows, n_units), holding the batches it ran (on
    the main process also those recorded before); a worker gets None.
    """
    mine = work.mine(ctx.rank)
    try:
        parts = ctx.gather([(b, rms[batch_rows(plan, work.batch_size, b)]) for b in mine])
    except RuntimeError as exc:  # gloo / NCCL: a peer is gone
        raise ProcessLost(f"a process of the run stopped before the probes were gathered ({exc}); every batch "
                          "finished is recorded in shards/: `otherview exec --resume` redoes only the others") from None
    if not ctx.is_main:
        return None
    missing = set(work.todo)
    for part in parts:
        for b, values in part:
            rms[batch_rows(plan, work.batch_size, b)] = values
            missing.discard(b)
    if missing:
        raise RuntimeError(f"probe batches {ranges(missing)} missing after gathering from {ctx.world} processes")
    return rms
