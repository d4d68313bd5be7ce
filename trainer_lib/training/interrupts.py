"""Ctrl-C and SIGTERM during training: the first lets the step finish and saves a checkpoint,
a second one later stops at once. Launchers forward one press to every process, some as
SIGTERM, so signals within `FOLD_SECONDS` of the first count as the same one; every process folds
its flag into the step's all-reduce, so all stop after the same step.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

FOLD_SECONDS = 1.0


def training_interrupted(message: str, checkpoint: Optional[Path] = None, trainer=None
                         ) -> KeyboardInterrupt:
    """The exception that ends an interrupted run: a plain KeyboardInterrupt, so that code which
    handles Ctrl-C keeps working, a script does not go on as if training had finished, and one
    that does not catch it exits with status 130 as Python does for Ctrl-C (Python gives that
    status to KeyboardInterrupt itself, not to subclasses). It carries `checkpoint`, the folder
    that resumes the run (None when a second interrupt stopped it at once), and `trainer`."""
    error = KeyboardInterrupt(message)
    error.checkpoint = checkpoint
    error.trainer = trainer
    error.from_trainer_lib = True
    return error


class InterruptGuard:
    """Catches SIGINT and SIGTERM while the loop runs (main thread only); restores the previous
    handlers on exit. `requested` tells the loop to stop after the current step."""

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.requested = False
        self._first_at = 0.0
        self._stopping = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self._first_at = True, now
            if self.announce:
                print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a "
                      "checkpoint; interrupt again to stop at once", file=sys.stderr, flush=True)
            return
        if now - self._first_at < FOLD_SECONDS or self._stopping:
            return  # the same press, forwarded by a launcher; or already stopping
        self._stopping = True
        raise training_interrupted("stopped at once by a second interrupt")


def quiet_interrupt_exit(error: KeyboardInterrupt) -> None:
    """Lets a script that does not catch `error` end without a traceback (the line that says
    what happened is printed already): only the default excepthook is replaced."""
    if sys.excepthook is not sys.__excepthook__:
        return  # IPython, a debugger or the user's own hook decides

    def hook(kind, value, tb):
        if value is error:
            return  # Python still exits as an interrupted process does (status 130)
        sys.__excepthook__(kind, value, tb)

    sys.excepthook = hook
