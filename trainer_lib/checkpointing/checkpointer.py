"""Writing checkpoints a run can be resumed from exactly, keeping the last N and the best one.

Each folder is written under a temporary name and renamed when complete, and never over another
run's checkpoint, so a crash or a second run in the same folder loses nothing already saved.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import yaml
from accelerate.utils import broadcast_object_list

from trainer_lib.checkpointing.layout import STATE_FILE, list_checkpoints, manifest_or_none
from trainer_lib.checkpointing.manifest import load_plain, read_manifest, write_manifest
from trainer_lib.checkpointing.resume import follow_configured_lr, plan_start
from trainer_lib.errors import CheckpointError, CheckpointWriteError
from trainer_lib.model.saving import save_pretrained
from trainer_lib.runtime.files import atomic_directory, discard_directory, held_interrupts
from trainer_lib.runtime.processes import on_main_process

# --------------------------------------------------------------------------- writing


@contextmanager
def _shared_atomic_directory(accelerator, path: Path) -> Iterator[Path]:
    """`atomic_directory` that every process writes into: the main process makes the temporary
    folder and renames it once all processes are done."""
    if accelerator.num_processes == 1:
        with atomic_directory(path) as tmp:
            yield tmp
        return
    if accelerator.is_main_process:
        with atomic_directory(path) as tmp:
            broadcast_object_list([str(tmp)])
            yield tmp
            accelerator.wait_for_everyone()
    else:
        name = [None]
        broadcast_object_list(name)
        yield Path(name[0])
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()


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

    # ------------------------------------------------------------------ before the model loads

    def choose_start(self, trainer, identity: dict) -> None:
        """Before the model loads: cleans up after interrupted saves and picks the checkpoint to
        resume, checked (`trainer_lib.resume`). Main process; the outcome is shared."""
        self.identity = identity
        path, run_id = on_main_process(trainer.accelerator,
                                       lambda: plan_start(self.config, identity))
        self.resume_path = Path(path) if path else None
        self.run_id = run_id or self.run_id

    # ------------------------------------------------------------------ saving

    def save(self, trainer, position: tuple[int, int]) -> Path:
        """Writes `step_<N>` (all processes must call this) and applies `keep_last_n`."""
        path = self.dir / f"step_{trainer.step}"
        self._note_best(trainer)
        if self.last_saved == path and path.exists():
            return path
        if trainer.accelerator.is_main_process:
            self._move_aside(path)
        self._write(trainer, path, position)
        self.last_saved = path
        if trainer.accelerator.is_main_process and self.config.train.keep_last_n:
            # this run's checkpoints up to this step: one above it (left from before a resume
            # of an earlier step) is not newer than what was just written
            own = [p for p in list_checkpoints(self.dir)
                   if int(p.name[len("step_"):]) <= trainer.step
                   and (manifest_or_none(p) or {}).get("run_id") == self.run_id]
            for old in own[:-self.config.train.keep_last_n]:
                discard_directory(old)
        return path

    def _move_aside(self, path: Path) -> None:
        """Never writes over another run's checkpoint: it is renamed `<name>.run-<its run id>`
        first (main process), and the run says so."""
        if not path.exists():
            return
        manifest = manifest_or_none(path) or {}
        owner = manifest.get("run_id")
        if owner == self.run_id:
            return  # this run's own (written again, e.g. after falling back past a damaged one)
        aside = path.parent / f"{path.name}.run-{owner or 'unknown'}"
        n = 1
        while aside.exists():
            n += 1
            aside = path.parent / f"{path.name}.run-{owner or 'unknown'}-{n}"
        with held_interrupts():
            os.rename(path, aside)
        print(f"{path} held a checkpoint of another run: kept as {aside.name}", flush=True)

    def _write(self, trainer, path: Path, position: tuple[int, int]) -> None:
        acc = trainer.accelerator
        try:
            with _shared_atomic_directory(acc, path) as tmp:
                acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
                save_pretrained(acc, trainer.model, trainer.tokenizer, tmp / "hf_model")
                if acc.is_main_process:
                    torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
                    (tmp / "config.yaml").write_text(_config_yaml(trainer.config),
                                                     encoding="utf-8")
                    (tmp / STATE_FILE).write_text(json.dumps(
                        self._state(trainer, position), indent=1, default=_json_default))
                    # written last: its presence marks a complete checkpoint
                    self.last_size = write_manifest(tmp, self._header(trainer.step))
        except Exception as e:  # noqa: BLE001 - a failed write, said in the user's terms
            raise self._write_error(e, path, trainer) from e

    def _header(self, step: int) -> dict:
        return {"run_id": self.run_id, "step": step, "identity": self.identity}

    def _write_error(self, error: Exception, path: Path, trainer) -> Exception:
        if isinstance(error, CheckpointError):
            return error
        where = next((p for p in [self.dir, *self.dir.parents] if p.exists()), Path("."))
        free = shutil.disk_usage(where).free
        needed = self.last_size or _estimated_size(trainer)
        code = getattr(error, "errno", None)
        no_space = (code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                    or "No space left" in str(error) or free < needed)
        if not no_space and not isinstance(error, OSError):
            return error
        previous = (f"the previous checkpoint {self.last_saved} is intact; resume from it with "
                    f"train.resume_from_checkpoint={self.last_saved}" if self.last_saved
                    else "no earlier checkpoint of this run exists")
        if no_space:
            why = (f"the disk is full: a checkpoint of this run takes about {_size(needed)} and "
                   f"{_size(free)} are free there. Free some space, or use another "
                   "train.checkpoint_dir (train.keep_last_n keeps fewer checkpoints)")
        else:
            why = f"{type(error).__name__}: {error}"
        result = CheckpointWriteError(f"could not write the checkpoint {path} at step "
                                      f"{trainer.step}: {why}. Nothing of it was kept; {previous}")
        result.errno = errno.ENOSPC if no_space else code
        return result

    def _state(self, trainer, position: tuple[int, int]) -> dict:
        return {"step": trainer.step, "epoch": position[0], "steps_in_epoch": position[1],
                "num_tokens": getattr(trainer, "num_tokens", 0),
                "total_steps": trainer.total_steps,
                "skipped_steps": trainer.nonfinite_steps.skipped,
                "best_metric": self.config.train.save_best, "best_value": self.best_value,
                "best_step": self.best_step, "log_history": trainer.log_history}

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
        if acc.is_main_process:
            self._move_aside(best)
        if self.last_saved == step_dir and step_dir.exists():
            # this step's checkpoint is already on disk: copy it rather than gather again
            if acc.is_main_process:
                try:
                    with atomic_directory(best) as tmp:
                        shutil.copytree(step_dir, tmp, dirs_exist_ok=True)
                        (tmp / STATE_FILE).write_text(json.dumps(
                            self._state(trainer, position), indent=1, default=_json_default))
                        # the copied files were checksummed when step_<N> was written
                        copied = {name: entry for name, entry
                                  in read_manifest(step_dir)["files"].items()
                                  if name != STATE_FILE}
                        write_manifest(tmp, self._header(trainer.step), known=copied)
                except Exception as e:  # noqa: BLE001
                    raise self._write_error(e, best, trainer) from e
            acc.wait_for_everyone()
        else:
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
        if state.get("best_metric") == self.config.train.save_best:
            self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.last_saved = path
        if acc.is_main_process:
            print(f"resumed from {path} at step {trainer.step}", flush=True)

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


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


def _config_yaml(config) -> str:
    return yaml.safe_dump(json.loads(json.dumps(config.to_dict(), default=str)), sort_keys=False)


def _json_default(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    if torch.is_tensor(v):
        return v.tolist()
    return str(v)
