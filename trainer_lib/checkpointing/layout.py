"""The names in a checkpoint folder, and finding the checkpoints in it and the run of each.

    step_<N>/  accelerate/ (model, optimiser, RNG states), scheduler.pt, trainer_state.json,
               config.yaml, hf_model/ (an ordinary Hugging Face folder), and manifest.json,
               written last: its presence marks a complete checkpoint
    best/      a copy of the checkpoint with the best `train.save_best` value

The run a checkpoint belongs to, and when it was written, are in manifest.json and again in
trainer_state.json, so a checkpoint that lost its manifest is still known as its run's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from trainer_lib.checkpointing.manifest import MANIFEST, read_manifest
from trainer_lib.errors import CheckpointError

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
# what interrupted saves and deletions of this library leave behind (and nothing else)
LEFTOVER = re.compile(r"^\.(step_\d+|best)\.(tmp|deleting)-[0-9a-f]{8}$")
PREVIOUS = re.compile(r"^(step_\d+|best)\.previous-[0-9a-f]{8}$")


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete `step_<N>` folders, oldest first (temporary and partial folders are skipped)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def manifest_or_none(path: Path) -> Optional[dict]:
    try:
        return read_manifest(path)
    except CheckpointError:
        return None


@dataclass
class Found:
    """A `step_<N>` folder: its manifest (None when missing or unreadable), the run that wrote it
    (from the manifest, else from its trainer_state.json; None when neither says) and when."""

    path: Path
    step: int
    manifest: Optional[dict]
    run_id: Optional[str]
    written_at: float

    @property
    def name(self) -> str:
        return self.path.name


def find_checkpoints(checkpoint_dir: str | Path) -> list[Found]:
    """Every `step_<N>` folder, complete or not, oldest step first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if (m := STEP_DIR.match(p.name)) and p.is_dir():
            manifest = manifest_or_none(p)
            record = manifest or state_or_none(p) or {}
            found.append(Found(p, int(m.group(1)), manifest, record.get("run_id"),
                               _time(record.get("written_at"), p)))
    return sorted(found, key=lambda f: f.step)


def owner(path: Path) -> Optional[str]:
    """The run a checkpoint folder belongs to, from its manifest or else its state file."""
    return ((manifest_or_none(path) or state_or_none(path) or {}).get("run_id")
            if path.is_dir() else None)


def state_or_none(path: Path) -> Optional[dict]:
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        return state if isinstance(state, dict) else None
    except (OSError, ValueError):
        return None


def _time(written_at: Optional[str], path: Path) -> float:
    """Seconds since the epoch; a checkpoint that does not record it (an earlier trainer_lib's)
    counts as written when its folder last changed."""
    try:
        return datetime.fromisoformat(written_at).timestamp()
    except (TypeError, ValueError):
        return path.stat().st_mtime
