"""The names in a checkpoint folder, and finding the complete checkpoints in it.

    step_<N>/  accelerate/ (model, optimiser, RNG states), scheduler.pt, trainer_state.json,
               config.yaml, hf_model/ (an ordinary Hugging Face folder), and manifest.json,
               written last: its presence marks a complete checkpoint
    best/      a copy of the checkpoint with the best `train.save_best` value
"""

from __future__ import annotations

import re
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
