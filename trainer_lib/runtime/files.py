"""Folders written and removed atomically, with Ctrl-C held back while a folder is committed.

A folder is written under a temporary name beside the target and renamed into place only when
complete, so a crash never leaves a half-written folder where a good one was (an interrupted swap
leaves the previous one under `<name>.previous-*`). Deleting renames the folder out of sight
first, so an interrupted deletion leaves no folder under its name.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def held_interrupts():
    """Delays SIGINT and SIGTERM to the end of the block (main thread; elsewhere a no-op): one
    that arrives meanwhile is recorded and raised again, to the handler in place before, on exit.
    Done with Python handlers rather than a signal mask, which would hold the signal back from the
    main thread only while any other thread (torch's, for one) could still take it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in _HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # None: a handler not set from Python, which cannot be put back; the default then
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


@contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yields a temporary folder; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        with held_interrupts():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    with held_interrupts():
        try:
            _fsync_tree(tmp)
            if path.exists():
                old = path.parent / f"{path.name}.previous-{tag}"
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def discard_directory(path: str | os.PathLike) -> None:
    """Removes a folder: renamed to a hidden `.<name>.deleting-*` first, so that an interrupted
    deletion never leaves a partial folder under its own name."""
    path = Path(path)
    gone = path.parent / f".{path.name}.deleting-{uuid.uuid4().hex[:8]}"
    with held_interrupts():
        os.rename(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
