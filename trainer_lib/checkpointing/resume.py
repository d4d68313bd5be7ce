"""Where a run starts, decided and checked before the model loads, and how it gets back there.

Leftovers of interrupted saves are cleaned up, "latest" passes over damaged checkpoints and other
runs', and resuming skips the batches the checkpointed epoch had used and puts the RNG states
back, so a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import collections
import itertools
import math
import random
import shutil
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from trainer_lib.checkpointing.identity import identity_differences
from trainer_lib.checkpointing.layout import (
    LEFTOVER,
    PREVIOUS,
    STATE_FILE,
    list_checkpoints,
    manifest_or_none,
)
from trainer_lib.checkpointing.manifest import MANIFEST, check_safe_to_load, damage, read_manifest
from trainer_lib.errors import CheckpointError


def plan_start(config, identity: dict) -> tuple[Optional[str], Optional[str]]:
    """(the checkpoint to resume or None, the run it belongs to); says what it found."""
    folder = Path(config.train.checkpoint_dir)
    removed = clean_leftovers(folder)
    if removed:
        print(f"removed {len(removed)} leftover folder(s) of interrupted saves in "
              f"{folder}: {', '.join(removed[:4])}{' ...' if len(removed) > 4 else ''}",
              flush=True)
    found = [(p, manifest_or_none(p)) for p in list_checkpoints(folder)]
    spec = config.train.resume_from_checkpoint
    if not spec:
        if found:
            names = [p.name for p, _ in found]
            print(f"train.checkpoint_dir {folder} already holds {len(names)} checkpoint(s) of "
                  f"earlier runs ({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}); "
                  "this run starts from scratch and leaves them alone (one it would overwrite "
                  "is renamed <name>.run-<its run id> first); to continue a run instead, set "
                  "train.resume_from_checkpoint=latest", flush=True)
        return None, None
    if spec == "latest":
        path = _pick_latest(folder, found, identity)
    else:
        path = _check_explicit(spec, identity)
    if path is None:
        return None, None
    return str(path), read_manifest(path).get("run_id")


def _pick_latest(folder: Path, found: list, identity: dict) -> Optional[Path]:
    own = [(p, m) for p, m in found if m and not identity_differences(m.get("identity"),
                                                                       identity)]
    if not own:
        if found:
            newest, manifest = found[-1]
            diffs = identity_differences(manifest and manifest.get("identity"),
                                         identity) if manifest else ["unreadable"]
            raise CheckpointError(
                f"train.resume_from_checkpoint='latest': the checkpoints in {folder} are "
                f"from another run ({newest.name}: {'; '.join(diffs[:3])}); resume with that "
                f"run's settings, or give this run its own train.checkpoint_dir")
        legacy = _legacy_checkpoints(folder)
        if legacy:
            raise CheckpointError(
                f"train.resume_from_checkpoint='latest': {folder} holds checkpoints written by "
                f"an earlier trainer_lib ({', '.join(p.name for p in legacy[-4:])}), which "
                "recorded no checksums or run identity and cannot be resumed; start a new run "
                f"from the weights of one with model.model_path={legacy[-1] / 'hf_model'}, or "
                "give this run its own train.checkpoint_dir")
        print(f"resume_from_checkpoint='latest': no checkpoint under {folder}; "
              "starting from scratch", flush=True)
        return None
    others = [p.name for p, m in found if (p, m) not in own]
    if others:
        print(f"resume_from_checkpoint='latest': leaving aside {len(others)} checkpoint(s) of "
              f"another run in {folder} ({', '.join(others[:4])})", flush=True)
    damaged = []
    for path, _ in reversed(own):
        problem = damage(path)
        if problem is None:
            check_safe_to_load(path)
            if damaged:
                print(f"resume_from_checkpoint='latest': {'; '.join(damaged)}; resuming from "
                      f"{path.name}, the newest intact checkpoint, instead", flush=True)
            return path
        damaged.append(f"{path.name} is unusable: {problem}")
    raise CheckpointError(f"train.resume_from_checkpoint='latest': no intact checkpoint of "
                          f"this run in {folder} ({'; '.join(damaged)})")


def _not_a_checkpoint(spec: str) -> str:
    return (f"train.resume_from_checkpoint={spec!r} is not a checkpoint folder (no {MANIFEST} "
            "in it, so it does not exist, is incomplete, or was not written by trainer_lib); "
            "give a step_<N> folder under train.checkpoint_dir, or \"latest\"")


def _legacy_checkpoints(folder: Path) -> list[Path]:
    """`step_<N>` folders with a state file and no manifest (an earlier trainer_lib's), oldest
    first."""
    if not folder.is_dir():
        return []
    found = [(int(p.name[len("step_"):]), p) for p in folder.glob("step_*")
             if p.name[len("step_"):].isdigit() and (p / STATE_FILE).is_file()
             and not (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def _check_explicit(spec: str, identity: dict) -> Path:
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"train.resume_from_checkpoint={spec!r} does not exist; give a "
                              "step_<N> folder under train.checkpoint_dir, or \"latest\"")
    if not (path / MANIFEST).is_file() and (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"train.resume_from_checkpoint={spec!r} has no {MANIFEST}: it was written by an "
            "earlier trainer_lib, which recorded no checksums or run identity, or its save "
            f"did not finish; start a new run from its weights with "
            f"model.model_path={path / 'hf_model'}")
    manifest = read_manifest(path) if (path / MANIFEST).is_file() else None
    if manifest is None:
        raise CheckpointError(_not_a_checkpoint(spec))
    diffs = identity_differences(manifest.get("identity"), identity)
    if diffs:
        raise CheckpointError(
            f"train.resume_from_checkpoint={spec!r} is from another run: {'; '.join(diffs)}. "
            "Resume it with the settings, model and data it was saved with, or start a new "
            f"run from its weights with model.model_path={path / 'hf_model'}")
    problem = damage(path)
    if problem:
        raise CheckpointError(
            f"train.resume_from_checkpoint={spec!r} cannot be resumed: {problem}. Resume "
            "from an earlier checkpoint, or with \"latest\", which falls back to the newest "
            "intact one")
    check_safe_to_load(path)
    return path


def clean_leftovers(checkpoint_dir: Path) -> list[str]:
    """Removes what interrupted saves and deletions left in the folder (only names this library
    makes); a previous folder whose replacement never arrived is put back."""
    if not checkpoint_dir.is_dir():
        return []
    removed = []
    for p in sorted(checkpoint_dir.iterdir()):
        if not p.is_dir():
            continue
        if LEFTOVER.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        elif m := PREVIOUS.match(p.name):
            target = checkpoint_dir / m.group(1)
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
            else:
                p.rename(target)
    return removed


def follow_configured_lr(trainer, is_main: bool) -> None:
    """A resumed run uses `optimizer.kwargs.lr` as given now (the optimiser state would bring back
    the saved one), so that lowering it after a non-finite step takes effect; the schedule goes on
    from the same position, scaled."""
    lr = trainer.config.optimizer.kwargs.get("lr")
    groups = trainer.optimizer.param_groups
    saved = groups[0].get("initial_lr", groups[0]["lr"]) if groups else None
    if lr is None or not saved or math.isclose(lr, saved, rel_tol=1e-9):
        return
    ratio = lr / saved
    for g in groups:
        g["initial_lr"] = g.get("initial_lr", g["lr"]) * ratio
        g["lr"] *= ratio
    scheduler = trainer.scheduler
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [b * ratio for b in scheduler.base_lrs]
        scheduler._last_lr = [g["lr"] for g in groups]
    if is_main:
        print(f"optimizer.kwargs.lr is {lr:g} now and was {saved:g} when the checkpoint was "
              "saved: the schedule goes on from the new value", flush=True)


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
