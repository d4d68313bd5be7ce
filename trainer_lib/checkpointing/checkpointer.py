"""Writing checkpoints a run can be resumed from exactly, keeping the last N and the best one.

Each folder is written under a temporary name and renamed when complete, and never over another
run's checkpoint, so a crash or a second run in the same folder loses nothing already saved. With
several processes, each writing phase ends with one collective where they agree on its outcome:
a write that fails on one process raises CheckpointWriteError on every process, and none waits.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import warnings
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import yaml
from accelerate.utils import gather_object

from trainer_lib.checkpointing.layout import STATE_FILE, find_checkpoints, owner
from trainer_lib.checkpointing.manifest import (
    load_plain,
    own_checksums,
    read_manifest,
    write_manifest,
)
from trainer_lib.checkpointing.resume import follow_configured_lr, plan_start
from trainer_lib.errors import CheckpointError
from trainer_lib.model.saving import save_pretrained
from trainer_lib.runtime.deepspeed import save_failures_deferred
from trainer_lib.runtime.files import (
    atomic_directory,
    discard_directory,
    held_interrupts,
    write_error,
)
from trainer_lib.runtime.processes import all_or_none, on_main_process

# --------------------------------------------------------------------------- writing


@contextmanager
def _said(failed: Callable[[Exception], BaseException]) -> Iterator[None]:
    """An error raised in the block, as `failed` says it (a CheckpointWriteError naming the
    checkpoint, for a failed write)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - said in the user's terms, or raised as it is
        said = failed(e)
        if said is e:
            raise
        raise said from e


@contextmanager
def _agreed(accelerator, failed: Callable[[Exception], BaseException]) -> Iterator[None]:
    """A writing phase every process runs; when it fails on any process, every process raises
    (`all_or_none`), the error said by `failed` where it happened."""
    with all_or_none(accelerator), _said(failed):
        yield


@contextmanager
def _shared_atomic_directory(accelerator, path: Path,
                             failed: Callable[[Exception], BaseException]) -> Iterator[Path]:
    """`atomic_directory` that every process writes into: the main process makes the temporary
    folder and renames it once every process is done; a failure anywhere, the rename included,
    is raised on every process."""
    with _agreed(accelerator, failed), ExitStack() as stack:
        def make() -> Path:
            with _said(failed):
                tmp = stack.enter_context(atomic_directory(path))
                (tmp / "accelerate").mkdir()  # made here, where a failure is shared at once
                return tmp

        yield Path(on_main_process(accelerator, make))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class Checkpointer:
    """Saves `step_<N>` checkpoints, keeps the last `keep_last_n` and the best, and resumes."""

    def __init__(self, config):
        self.config = config
        self.dir = Path(config.train.checkpoint_dir)
        self.best_value: Optional[float] = None
        self.best_step: Optional[int] = None
        self.last_saved: Optional[Path] = None
        self.last_size: Optional[int] = None
        self.resume_path: Optional[Path] = None
        self.run_id = uuid.uuid4().hex[:12]
        self.identity: Optional[dict] = None
        self._noted_step: Optional[int] = None
        self._improved = False
        self._written_at: Optional[str] = None

    # ------------------------------------------------------------------ before the model loads

    def choose_start(self, trainer, identity: dict) -> None:
        """Before the model loads: cleans up after interrupted saves and picks the checkpoint to
        resume, checked (`trainer_lib.resume`). Main process; the outcome is shared. A resumed
        run continues the run of the checkpoint it resumes (its run id)."""
        self.identity = identity

        def start() -> tuple[Optional[str], str]:
            path, run_id = plan_start(self.config, identity)
            return path, run_id or self.run_id

        path, self.run_id = on_main_process(trainer.accelerator, start)
        self.resume_path = Path(path) if path else None

    # ------------------------------------------------------------------ saving

    def save(self, trainer, position: tuple[int, int]) -> Path:
        """Writes `step_<N>` (all processes must call this) and applies `keep_last_n`."""
        path = self.dir / f"step_{trainer.step}"
        self._note_best(trainer)
        if self.last_saved == path and path.exists():
            return path
        acc = trainer.accelerator
        with _agreed(acc, self._failure(path, trainer)):
            if acc.is_main_process:
                self._move_aside(path)
        self._write(trainer, path, position)
        self.last_saved = path
        if self.config.train.keep_last_n:
            with all_or_none(acc):  # a deletion that fails stops every process
                if acc.is_main_process:
                    # this run's checkpoints up to this step: one above it (left from before a
                    # resume of an earlier step) is not newer than what was just written
                    own = [f.path for f in find_checkpoints(self.dir)
                           if f.step <= trainer.step and f.run_id == self.run_id]
                    for old in own[:-self.config.train.keep_last_n]:
                        discard_directory(old)
        return path

    def _move_aside(self, path: Path) -> None:
        """Never writes over another run's checkpoint: it is renamed `<name>.run-<its run id>`
        first (main process), and the run says so. This run's own (written again after falling
        back past it, damaged or not) is replaced."""
        if not path.exists():
            return
        run = owner(path)
        if run == self.run_id:
            return
        aside = path.parent / f"{path.name}.run-{run or 'unknown'}"
        n = 1
        while aside.exists():
            n += 1
            aside = path.parent / f"{path.name}.run-{run or 'unknown'}-{n}"
        with held_interrupts():
            os.rename(path, aside)
        print(f"{path} held a checkpoint of another run: kept as {aside.name}", flush=True)

    def _write(self, trainer, path: Path, position: tuple[int, int]) -> None:
        """Writes the checkpoint in three phases, each agreed on by every process: the
        accelerate state (every process writes its own files and hashes them), the Hugging Face
        folder (gathered, written by the main process), then the rest and the manifest,
        assembled from every process's checksums."""
        acc = trainer.accelerator
        failed = self._failure(path, trainer)
        with _shared_atomic_directory(acc, path, failed) as tmp:
            with _agreed(acc, failed):
                with save_failures_deferred(acc, trainer.model):
                    acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
                own = own_checksums(tmp, acc.process_index)
            save_pretrained(acc, trainer.model, trainer.tokenizer, tmp / "hf_model",
                            failure=failed, card=trainer.model_card(path / "hf_model"))
            hashed = gather_object([own]) if acc.num_processes > 1 else [own]
            with _agreed(acc, failed):
                if acc.is_main_process:
                    self._written_at = _now()
                    torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
                    (tmp / "config.yaml").write_text(_config_yaml(trainer.config),
                                                     encoding="utf-8")
                    (tmp / STATE_FILE).write_text(json.dumps(
                        self._state(trainer, position), indent=1, default=_json_default))
                    # written last: its presence marks a complete checkpoint
                    known = {name: entry for entries in hashed for name, entry in entries.items()}
                    self.last_size = write_manifest(tmp, self._header(trainer.step),
                                                    known=known)

    def _header(self, step: int) -> dict:
        return {"run_id": self.run_id, "step": step, "written_at": self._written_at,
                "identity": self.identity}

    def _failure(self, path: Path, trainer) -> Callable[[Exception], BaseException]:
        """How a failed write of `path` is said: a CheckpointWriteError naming it, the space it
        needs and the checkpoint that is intact."""
        acc = trainer.accelerator
        where = f" on process {acc.process_index}" if acc.num_processes > 1 else ""

        def failed(error: Exception) -> BaseException:
            if isinstance(error, CheckpointError):
                return error
            previous = (f"the previous checkpoint {self.last_saved} is intact; resume from it "
                        f"with train.resume_from_checkpoint={self.last_saved}" if self.last_saved
                        else "no earlier checkpoint of this run exists")
            return write_error(
                error, f"the checkpoint {path} at step {trainer.step}{where}", self.dir,
                ("a checkpoint of this run", self.last_size or _estimated_size(trainer)),
                "use another train.checkpoint_dir (train.keep_last_n keeps fewer checkpoints)",
                f"Nothing of it was kept; {previous}")

        return failed

    def _state(self, trainer, position: tuple[int, int]) -> dict:
        # the run and the time again, so a checkpoint that loses its manifest is still known
        return {"run_id": self.run_id, "written_at": self._written_at, "step": trainer.step,
                "epoch": position[0], "steps_in_epoch": position[1],
                "num_tokens": getattr(trainer, "num_tokens", 0),
                "total_steps": trainer.total_steps,
                "skipped_steps": trainer.nonfinite_steps.skipped,
                "best_metric": self.config.train.save_best, "best_value": self.best_value,
                "best_step": self.best_step, "callbacks": trainer.callbacks.state_dict(),
                "log_history": trainer.log_history}

    def _note_best(self, trainer) -> bool:
        """Whether this step's `train.save_best` value beats the best so far (noted once per
        step, before this step's checkpoint is written, so that checkpoint knows the best)."""
        if self._noted_step == trainer.step:
            return self._improved
        self._noted_step, self._improved = trainer.step, False
        name = self.config.train.save_best
        entry = trainer.log_history[-1] if trainer.log_history else {}
        if not name or entry.get("step") != trainer.step or name not in entry:
            return False
        value = float(entry[name])
        if not math.isfinite(value):
            return False
        if (self.best_value is None
                or (value < self.best_value if self.config.train.save_best_mode == "min"
                    else value > self.best_value)):
            self.best_value, self.best_step, self._improved = value, trainer.step, True
        return self._improved

    def maybe_save_best(self, trainer, position: tuple[int, int]) -> Optional[Path]:
        """Keeps `best/` when this step's `train.save_best` value beats the best so far."""
        if not self._note_best(trainer):
            return None
        best = self.dir / "best"
        step_dir = self.dir / f"step_{trainer.step}"
        acc = trainer.accelerator
        if self.last_saved == step_dir and step_dir.exists():
            # this step's checkpoint is already on disk: copy it rather than gather again
            with _agreed(acc, self._failure(best, trainer)):
                if acc.is_main_process:
                    self._move_aside(best)
                    self._written_at = _now()
                    with atomic_directory(best) as tmp:
                        shutil.copytree(step_dir, tmp, dirs_exist_ok=True)
                        (tmp / STATE_FILE).write_text(json.dumps(
                            self._state(trainer, position), indent=1, default=_json_default))
                        # the copied files were checksummed when step_<N> was written
                        copied = {name: entry for name, entry
                                  in read_manifest(step_dir)["files"].items()
                                  if name != STATE_FILE}
                        write_manifest(tmp, self._header(trainer.step), known=copied)
        else:
            with _agreed(acc, self._failure(best, trainer)):
                if acc.is_main_process:
                    self._move_aside(best)
            self._write(trainer, best, position)
        return best

    # ------------------------------------------------------------------ resuming

    def restore(self, trainer) -> tuple[int, int]:
        """Restores the checkpoint chosen by `prepare`, if any; returns the data position
        (epoch, optimiser steps already done in it)."""
        path = self.resume_path
        if path is None:
            return 0, 0
        acc = trainer.accelerator
        acc.load_state(str(path / "accelerate"))
        trainer.scheduler.load_state_dict(load_plain(path / "scheduler.pt"))
        state = json.loads((path / STATE_FILE).read_text())
        trainer.step = state["step"]
        trainer.num_tokens = state["num_tokens"]
        trainer.log_history = state["log_history"]
        trainer.nonfinite_steps.skipped = state.get("skipped_steps", 0)
        trainer.callbacks.load_state_dict(state.get("callbacks", {}))  # e.g. EarlyStopping's
        if state.get("best_metric") == self.config.train.save_best:
            self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.last_saved = path
        if acc.is_main_process:
            print(f"resumed from {path} at step {trainer.step} (run {self.run_id})", flush=True)

        follow_configured_lr(trainer, acc.is_main_process)
        return state["epoch"], state["steps_in_epoch"]


class BestFigureWatch:
    """Warns once when `train.save_best` names a figure that the first training log line, or the
    first evaluation, does not hold (a typo, or a figure this method does not log)."""

    def __init__(self, name: Optional[str]):
        self.name = name
        self.done = not name

    def see(self, values: dict, step: int, evaluation: bool) -> None:
        if self.done or self.name.startswith(("eval/", "metrics/")) != evaluation or not values:
            return
        self.done = True
        if self.name not in values:
            logged = ", ".join(sorted(k for k in values if k != "step"))
            warnings.warn(f"train.save_best={self.name!r} is not among the figures logged at "
                          f"step {step} ({logged}), so best/ may never be written; name one of "
                          "them", stacklevel=2)


def _estimated_size(trainer) -> int:
    """About what a checkpoint takes before one was written: the weights twice (accelerate's
    copy and hf_model) and two optimiser states per trainable weight."""
    total = trainable = 0
    for p in trainer.accelerator.unwrap_model(trainer.model).parameters():
        n = (getattr(p, "ds_numel", None) or p.numel()) * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    return 2 * total + 2 * trainable


def _config_yaml(config) -> str:
    return yaml.safe_dump(json.loads(json.dumps(config.to_dict(), default=str)), sort_keys=False)


def _json_default(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    if torch.is_tensor(v):
        return v.tolist()
    return str(v)
