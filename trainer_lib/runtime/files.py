"""Folders written and removed atomically, with Ctrl-C held back while a folder is committed, and
a failed write said in the user's terms.

A folder is written under a temporary name beside the target and renamed into place only when
complete, so a crash never leaves a half-written folder where a good one was (an interrupted swap
leaves the previous one under `<name>.previous-*`). Deleting renames the folder out of sight
first, so an interrupted deletion leaves no folder under its name.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from trainer_lib.errors import CheckpointWriteError

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


# --------------------------------------------------------------------------- failed writes

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_error(error: BaseException, what: str, path: Path, needed: tuple[str, int],
                advice: str, kept: str) -> BaseException:
    """`error`, raised while writing `what` (e.g. "the checkpoint ckpts/step_4 at step 4") to
    `path`, as a CheckpointWriteError in the user's terms. For a full disk it says how much is
    needed (`needed`: what, e.g. "a checkpoint of this run", and its bytes) and free, then
    `advice` (how else to make room); then `kept` (what is intact). An error that is neither about
    the disk nor an OSError (a mistake in code) is returned as it is."""
    if isinstance(error, CheckpointWriteError):
        return error  # said already, where it happened
    free = free_space(path)
    code = getattr(error, "errno", None)
    # torch's zip writer reports a full disk as "unexpected pos", safetensors as an IoError
    # without an errno: little space left is what they have in common
    no_space = code in _NO_SPACE or "No space left" in str(error) or free < needed[1]
    if not no_space and not isinstance(error, OSError):
        return error
    if no_space:
        why = (f"the disk is full: {needed[0]} takes about {size_in_words(needed[1])} and "
               f"{size_in_words(free)} are free there. Free some space, or {advice}")
    else:
        why = f"{type(error).__name__}: {error}"
    result = CheckpointWriteError(f"could not write {what}: {why}. {kept}")
    result.errno = errno.ENOSPC if no_space else code
    return result


def free_space(path: Path) -> int:
    """Free bytes on the disk `path` is (or would be) on."""
    where = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    return shutil.disk_usage(where).free


def size_in_words(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} bytes"
