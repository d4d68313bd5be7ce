"""Checkpoints that a run can be resumed from exactly, and the best one kept aside.

Layout of `train.checkpoint_dir`:

    step_<N>/
        accelerate/          model, optimiser, RNG states of every process, sampler
                             (`accelerator.save_state`, which also handles DeepSpeed engines)
        scheduler.pt         the learning-rate schedule (stepped by hand, so not in accelerate's)
        trainer_state.json   step, epoch, steps done in that epoch, num_tokens, best metric,
                             log_history
        config.yaml          the run's config (`config.to_dict()`)
        hf_model/            an ordinary Hugging Face folder (AutoModelForCausalLM.from_pretrained)
    best/                    a full copy of the checkpoint with the best `train.save_best` value
                             (same layout; `best/trainer_state.json` says which step)

Each folder is written under a temporary name and renamed when complete, so a crash while writing
leaves the previous checkpoints as they were; "latest" is the highest complete `step_<N>`.

Resuming restores everything above, then skips the batches the checkpointed epoch had already
used (the loader's order is a function of seed and epoch) and restores the RNG states once more
after skipping, so on CPU a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import yaml
from accelerate.utils import broadcast_object_list

from trainer_lib.saving import atomic_directory, save_pretrained

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------- finding checkpoints


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete `step_<N>` folders, oldest first (temporary and partial folders are skipped)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, checkpoint_dir: str | Path) -> Optional[Path]:
    """"latest" → the newest complete checkpoint or None; a path → that folder (checked)."""
    if spec == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"train.resume_from_checkpoint={spec!r} is not a checkpoint folder (no {STATE_FILE} "
            f"in it); give a step_<N> folder under train.checkpoint_dir, or \"latest\""
        )
    return path


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
        self._noted_step: Optional[int] = None
        self._improved = False

    # ------------------------------------------------------------------ saving

    def save(self, trainer, position: tuple[int, int]) -> Path:
        """Writes `step_<N>` (all processes must call this) and applies `keep_last_n`."""
        path = self.dir / f"step_{trainer.step}"
        self._note_best(trainer)
        if self.last_saved == path and path.exists():
            return path
        self._write(trainer, path, position)
        self.last_saved = path
        if trainer.accelerator.is_main_process and self.config.train.keep_last_n:
            for old in list_checkpoints(self.dir)[:-self.config.train.keep_last_n]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def _write(self, trainer, path: Path, position: tuple[int, int]) -> None:
        acc = trainer.accelerator
        with _shared_atomic_directory(acc, path) as tmp:
            acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
            save_pretrained(acc, trainer.model, trainer.tokenizer, tmp / "hf_model")
            if acc.is_main_process:
                torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
                (tmp / "config.yaml").write_text(_config_yaml(trainer.config), encoding="utf-8")
                # written last: its presence marks a complete checkpoint
                (tmp / STATE_FILE).write_text(json.dumps(self._state(trainer, position), indent=1,
                                                         default=_json_default))

    def _state(self, trainer, position: tuple[int, int]) -> dict:
        return {"step": trainer.step, "epoch": position[0], "steps_in_epoch": position[1],
                "num_tokens": getattr(trainer, "num_tokens", 0),
                "total_steps": trainer.total_steps,
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
        if self.last_saved == step_dir and step_dir.exists():
            # this step's checkpoint is already on disk: copy it rather than gather again
            if acc.is_main_process:
                with atomic_directory(best) as tmp:
                    shutil.copytree(step_dir, tmp, dirs_exist_ok=True)
                    (tmp / STATE_FILE).write_text(json.dumps(
                        self._state(trainer, position), indent=1, default=_json_default))
            acc.wait_for_everyone()
        else:
            self._write(trainer, best, position)
        return best

    # ------------------------------------------------------------------ resuming

    def resume(self, trainer) -> tuple[int, int]:
        """Restores the checkpoint named by `train.resume_from_checkpoint`, if any; returns the
        data position (epoch, optimiser steps already done in it)."""
        spec = self.config.train.resume_from_checkpoint
        if not spec:
            return 0, 0
        path = resolve_checkpoint(spec, self.dir)
        if path is None:
            if trainer.accelerator.is_main_process:
                print(f"resume_from_checkpoint='latest': no checkpoint under {self.dir}; "
                      "starting from scratch", flush=True)
            return 0, 0
        acc = trainer.accelerator
        acc.load_state(str(path / "accelerate"))
        trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        state = json.loads((path / STATE_FILE).read_text())
        trainer.step = state["step"]
        trainer.num_tokens = state["num_tokens"]
        trainer.log_history = state["log_history"]
        if state.get("best_metric") == self.config.train.save_best:
            self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.last_saved = path
        if acc.is_main_process:
            print(f"resumed from {path} at step {trainer.step}", flush=True)
        return state["epoch"], state["steps_in_epoch"]


def skip_batches(batches: Iterator, n: int) -> None:
    """Consumes `n` batches, then puts the RNG states back as they were, so what follows (dropout,
    sampling) draws the same numbers as in the run that did not stop."""
    if n <= 0:
        return
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    collections.deque(itertools.islice(batches, n), maxlen=0)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state_all(states[3])


def check_finite_loss(out: dict, micro: list[dict], step: int, last_checkpoint: Optional[Path]
                      ) -> None:
    """Stops the run when a step's loss is NaN or infinite, saying where and what to try."""
    loss = out["loss"]
    if math.isfinite(loss):
        return
    micro = [b for b in micro if b is not None]  # a rank short of data joins with None
    first = micro[0] if micro else {}
    ids = first.get("input_ids")
    preview = ids[0][:12].tolist() if torch.is_tensor(ids) and ids.ndim == 2 else None
    tokens = sum(int(b.get("num_tokens", 0)) for b in micro)
    kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
            else "no checkpoint was written before it")
    raise NonFiniteLossError(
        f"the training loss is {loss} at step {step} ({len(micro)} micro-batch(es), {tokens} "
        f"tokens; first token ids of the first row: {preview}). Try a lower learning rate "
        f"(optimizer.kwargs.lr), gradient clipping (train.max_grad_norm), or check this data; "
        f"{kept} (nothing was saved from the broken step)."
    )


def _config_yaml(config) -> str:
    return yaml.safe_dump(json.loads(json.dumps(config.to_dict(), default=str)), sort_keys=False)


def _json_default(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    if torch.is_tensor(v):
        return v.tolist()
    return str(v)
