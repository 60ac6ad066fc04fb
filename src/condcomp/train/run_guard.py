"""Guards of a training run's life: one process per run folder, and a clean stop on Ctrl-C / SIGTERM.

RunLock: an exclusive ``flock`` on ``<run_dir>/.lock`` for as long as the run trains. The operating
system drops it when the process exits or dies, so a lock left by a killed process never blocks a
resume; a second training into the same folder is refused at once, before it writes anything.

StopRequest: the first SIGINT or SIGTERM only asks the loop to stop after the step in flight (it then
saves a checkpoint and says how to resume); a second one interrupts at once.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from pathlib import Path


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fh = None

    def acquire(self, error: type[Exception]) -> None:
        """Take the lock or raise ``error`` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise error(f"run folder {self.path.parent} is in use by a training process ({holder}); wait for it to "
                        "finish, or choose another run_dir (nothing was written)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class StopRequest:
    """Catches SIGINT/SIGTERM while active (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # the second request: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""
