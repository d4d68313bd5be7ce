"""Where a run starts, decided and checked before the model loads, and how it gets back there.

Leftovers of interrupted saves are cleaned up; "latest" continues the run that wrote last among
those with this run's identity, from its newest intact checkpoint, passing over damaged ones and
naming other runs'; resuming skips the batches the checkpointed epoch had used and puts the RNG
states back, so a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import collections
import itertools
import math
import random
import shutil
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from trainer_lib.checkpointing.identity import identity_differences
from trainer_lib.checkpointing.layout import (
    LEFTOVER,
    PREVIOUS,
    STATE_FILE,
    Found,
    find_checkpoints,
    list_checkpoints,
    manifest_or_none,
    state_or_none,
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
    spec = config.train.resume_from_checkpoint
    if not spec:
        names = [p.name for p in list_checkpoints(folder)]
        if names:
            print(f"train.checkpoint_dir {folder} already holds {len(names)} checkpoint(s) of "
                  f"earlier runs ({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}); "
                  "this run starts from scratch and leaves them alone (one it would overwrite "
                  "is renamed <name>.run-<its run id> first); to continue a run instead, set "
                  "train.resume_from_checkpoint=latest", flush=True)
        return None, None
    if spec == "latest":
        return _pick_latest(folder, identity)
    path = _check_explicit(spec, identity)
    return str(path), read_manifest(path).get("run_id")


def _pick_latest(folder: Path, identity: dict) -> tuple[Optional[str], Optional[str]]:
    """The newest intact checkpoint of the run that wrote last among those with this run's
    identity (the run a restarted process continues); other runs' are left alone, and named."""
    found = find_checkpoints(folder)
    runs: dict[str, list[Found]] = {}
    for f in found:
        if f.run_id:
            runs.setdefault(f.run_id, []).append(f)
    recorded = {run: next((f.manifest.get("identity") for f in fs if f.manifest), None)
                for run, fs in runs.items()}
    matching = [run for run in runs
                if recorded[run] and not identity_differences(recorded[run], identity)]
    if not matching:
        _nothing_to_resume(folder, found, runs, recorded, identity)
        return None, None
    chosen = max(matching, key=lambda run: max(f.written_at for f in runs[run]))
    mine = sorted(runs[chosen], key=lambda f: (f.written_at, f.step), reverse=True)
    left = [f.name for f in found if f.run_id not in matching]
    if left:
        print(f"resume_from_checkpoint='latest': leaving aside {len(left)} checkpoint(s) of "
              f"another run in {folder} ({', '.join(left[:4])})", flush=True)
    others = [run for run in matching if run != chosen]
    if others:
        names = [f.name for run in others for f in runs[run]]
        print(f"resume_from_checkpoint='latest': {folder} holds checkpoints of {len(others) + 1} "
              f"runs with these settings; continuing run {chosen}, which wrote the newest "
              f"({mine[0].name}, {_when(mine[0])}), and leaving the other run's "
              f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}) alone; to continue "
              "another run, give its checkpoint's path", flush=True)
    damaged = []
    for f in mine:
        problem = _problem(f.path)
        if problem is None:
            check_safe_to_load(f.path)
            if damaged:
                print(f"resume_from_checkpoint='latest': {'; '.join(damaged)}; resuming from "
                      f"{f.name}, the newest intact checkpoint, instead", flush=True)
            return str(f.path), chosen
        damaged.append(f"{f.name} is unusable: {problem}")
    raise CheckpointError(f"train.resume_from_checkpoint='latest': no intact checkpoint of "
                          f"this run in {folder} ({'; '.join(damaged)})")


def _nothing_to_resume(folder: Path, found: list[Found], runs: dict, recorded: dict,
                       identity: dict) -> None:
    """No run in the folder has this run's identity: says why, or that the run starts from
    scratch when the folder holds no checkpoint at all."""
    unverifiable = [f for f in found if f.run_id and recorded[f.run_id] is None]
    if unverifiable:  # every checkpoint of that run lost its manifest: its own, damaged
        raise CheckpointError(
            f"train.resume_from_checkpoint='latest': no intact checkpoint in {folder} ("
            + "; ".join(f"{f.name} is unusable: {_problem(f.path)}" for f in unverifiable[-4:])
            + ")")
    complete = [f for f in found if f.manifest]
    if complete:
        newest = complete[-1]
        diffs = identity_differences(newest.manifest.get("identity"), identity)
        raise CheckpointError(
            f"train.resume_from_checkpoint='latest': the checkpoints in {folder} are "
            f"from another run ({newest.name}: {'; '.join(diffs[:3])}); resume with that "
            f"run's settings, or give this run its own train.checkpoint_dir")
    legacy = [f.path for f in found if f.run_id is None and (f.path / STATE_FILE).is_file()]
    if legacy:
        raise CheckpointError(
            f"train.resume_from_checkpoint='latest': {folder} holds checkpoints written by "
            f"an earlier trainer_lib ({', '.join(p.name for p in legacy[-4:])}), which "
            "recorded no checksums or run identity and cannot be resumed; start a new run "
            f"from the weights of one with model.model_path={legacy[-1] / 'hf_model'}, or "
            "give this run its own train.checkpoint_dir")
    print(f"resume_from_checkpoint='latest': no checkpoint under {folder}; "
          "starting from scratch", flush=True)


def _problem(path: Path) -> Optional[str]:
    """What makes a checkpoint of a known run unusable, naming the file; None when intact."""
    if not (path / MANIFEST).is_file():
        return (f"{path / MANIFEST} is missing (it lists every file with its checksum; without "
                "it the checkpoint cannot be verified)")
    return damage(path)


def _when(f: Found) -> str:
    return datetime.fromtimestamp(f.written_at).strftime("written %Y-%m-%d %H:%M:%S")


def _not_a_checkpoint(spec: str) -> str:
    return (f"train.resume_from_checkpoint={spec!r} is not a checkpoint folder (no {MANIFEST} "
            "in it, so it does not exist, is incomplete, or was not written by trainer_lib); "
            "give a step_<N> folder under train.checkpoint_dir, or \"latest\"")


def _cannot_resume(spec: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"train.resume_from_checkpoint={spec!r} cannot be resumed: {problem}. Resume from an "
        "earlier checkpoint, or with \"latest\", which falls back to the newest intact one")


def _check_explicit(spec: str, identity: dict) -> Path:
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"train.resume_from_checkpoint={spec!r} does not exist; give a "
                              "step_<N> folder under train.checkpoint_dir, or \"latest\"")
    manifest = manifest_or_none(path)
    if manifest is None:
        if (state_or_none(path) or {}).get("run_id") or (path / MANIFEST).is_file():
            raise _cannot_resume(spec, _problem(path))  # a checkpoint of this library, damaged
        if (path / STATE_FILE).is_file():
            raise CheckpointError(
                f"train.resume_from_checkpoint={spec!r} has no {MANIFEST}: it was written by an "
                "earlier trainer_lib, which recorded no checksums or run identity, or its save "
                f"did not finish; start a new run from its weights with "
                f"model.model_path={path / 'hf_model'}")
        raise CheckpointError(_not_a_checkpoint(spec))
    diffs = identity_differences(manifest.get("identity"), identity)
    if diffs:
        raise CheckpointError(
            f"train.resume_from_checkpoint={spec!r} is from another run: {'; '.join(diffs)}. "
            "Resume it with the settings, model and data it was saved with, or start a new "
            f"run from its weights with model.model_path={path / 'hf_model'}")
    problem = damage(path)
    if problem:
        raise _cannot_resume(spec, problem)
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
