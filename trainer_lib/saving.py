"""Writing the trained model as an ordinary Hugging Face folder, atomically.

The folder is written under a temporary name beside the target and renamed into place only when
complete, so a crash mid-save never leaves a half-written folder where a good one was: either the
previous folder or the new one is there (an interrupted swap leaves the previous one under
`<name>.previous-*`, never a partial one under `<name>`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


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
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)
    if path.exists():
        old = path.parent / f"{path.name}.previous-{tag}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save_pretrained(accelerator, model, tokenizer, path: str | os.PathLike,
                    merge_adapters: bool = False) -> None:
    """Every process must call this (a sharded model is gathered collectively); only the main
    process writes."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    is_peft = hasattr(unwrapped, "peft_config") and hasattr(unwrapped, "merge_and_unload")
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards on every rank
    if accelerator.is_main_process:
        with atomic_directory(path) as tmp:
            if is_peft and merge_adapters:
                merged = _merged_copy(unwrapped, state_dict)
                merged.save_pretrained(tmp, safe_serialization=True)
            else:
                unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()


def _merged_copy(peft_model, state_dict):
    import copy

    model = copy.deepcopy(peft_model)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=False)
    return model.merge_and_unload()
