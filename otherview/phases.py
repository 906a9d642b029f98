"""Honest run status: phases recorded in the manifest as they start and end, signals, and a test hook.

The manifest says ``running`` (with the process that runs it), the phase now under way and the
phases done; SIGTERM and SIGINT end a run as ``interrupted``; ``complete`` is written last. A run
killed outright (SIGKILL, power loss) still says ``running``, with a process that no longer exists:
``otherview report`` then says ``interrupted`` and ``otherview exec --resume`` continues it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import store
from .errors import Interrupted

#: Test hook: ``PHASE[:BATCH][:SIGNAL]`` sends SIGNAL (KILL by default) to this process as PHASE starts
#: (``probe:2``: after the second probe batch is checkpointed, by whichever process ran it;
#: ``gathered``: once every process's batches are with the main process, before rms.safetensors is
#: written), so tests stop a run at a chosen point. Under accelerate every process that reaches the point stops.
STOP_ENV = "OTHERVIEW_TEST_STOP"


def stop_point(point: str) -> None:
    """Send the signal the test hook asks for when ``point`` (a phase, or ``probe:K``) is reached."""
    want = os.environ.get(STOP_ENV)
    if not want:
        return
    parts = want.split(":")
    sig = parts[-1] if parts[-1] in ("KILL", "TERM", "INT") else "KILL"
    where = ":".join(p for p in parts if p not in ("KILL", "TERM", "INT"))
    if where == point:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
        time.sleep(5)  # the signal is delivered at once; a handler raises before this returns


@dataclass
class Phases:
    """Wall-clock seconds of each phase, in the order they ran; each start and end saved in the manifest."""

    seconds: dict[str, float] = field(default_factory=dict)
    manifest: dict | None = None
    run_dir: Path | None = None

    def save(self) -> None:
        if self.manifest is not None and self.run_dir is not None:
            store.write_json(self.run_dir / "manifest.json", self.manifest)

    def done(self, name: str) -> bool:
        return self.manifest is not None and name in self.manifest.get("phases_done", [])

    @contextmanager
    def __call__(self, name: str, device: torch.device | None = None):
        if self.manifest is not None:
            self.manifest.update(phase=name, phase_started=store.now())
            self.save()
        stop_point(name)
        start = time.perf_counter()
        yield
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[name] = round(time.perf_counter() - start, 4)
        if self.manifest is not None:
            done = self.manifest.setdefault("phases_done", [])
            if name not in done:
                done.append(name)
            self.manifest.update(phase=None, phase_started=None)
            self.save()


def _raise(signum, frame):  # noqa: ARG001
    raise Interrupted(signum)


@contextmanager
def interruptible():
    """Turn SIGTERM and SIGINT into ``Interrupted`` while a run is under way (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
