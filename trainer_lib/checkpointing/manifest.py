"""Whether a checkpoint folder can be trusted: complete, undamaged and safe to load.

The manifest lists every file with its size and checksum and is written last. Checksums guard
against damage, not against someone who can rewrite the manifest too, so every pickle a resume
reads is first opened with `torch.load(weights_only=True)`: DeepSpeed itself loads its shards with
`weights_only=False`, which would run whatever a planted pickle holds, and so does torch's
distributed checkpoint (FSDP2's sharded states) with its `.metadata` and non-tensor entries.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from trainer_lib.errors import CheckpointError, UnsafeCheckpointError

MANIFEST = "manifest.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
DCP_METADATA = ".metadata"  # the index of a torch distributed checkpoint (a folder of .distcp)
_CHUNK = 8 << 20
# the files one process writes for itself, numbered by process: accelerate's RNG states,
# DeepSpeed's ZeRO shards (data parallel only, so DeepSpeed's rank is the process's) and the
# shards of torch's distributed checkpoint (FSDP2's sharded states: __<rank>_<n>.distcp)
_PER_PROCESS = re.compile(r"(?:^|/)(?:random_states_(\d+)\.pkl"
                          r"|(?:bf16_)?zero_pp_rank_(\d+)_[^/]*|__(\d+)_\d+\.distcp)$")


# --------------------------------------------------------------------------- the manifest


def file_checksum(path: Path) -> str:
    import xxhash  # a dependency of datasets

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def writer_of(name: str) -> int:
    """The process that writes a checkpoint file (a path relative to the checkpoint): the one its
    name numbers, else the main process."""
    found = _PER_PROCESS.search(name)
    return int(next(g for g in found.groups() if g is not None)) if found else 0


def own_checksums(folder: Path, process_index: int) -> dict:
    """Size and checksum of the files in `folder` that this process wrote, read while they are
    fresh in its memory: no process reads another's shards (the main process hashes the rest
    when it writes the manifest)."""
    entries = {}
    for path in _files(folder):
        name = path.relative_to(folder).as_posix()
        if writer_of(name) == process_index:
            entries[name] = {"size": path.stat().st_size, "xxh3_128": file_checksum(path)}
    return entries


def write_manifest(folder: Path, header: Optional[dict] = None,
                   known: Optional[dict] = None) -> int:
    """Writes `folder/manifest.json` (`header`, e.g. the run it belongs to, then the files);
    returns the checkpoint's size in bytes. `known`: entries already computed (by the process that
    wrote the file, or in another manifest for a file copied unchanged from its folder), taken as
    they are where the size agrees instead of read again."""
    files = {}
    for path in _files(folder):
        name, size = path.relative_to(folder).as_posix(), path.stat().st_size
        entry = (known or {}).get(name)
        files[name] = entry if entry and entry["size"] == size else {
            "size": size, "xxh3_128": file_checksum(path)}
    data = json.dumps({"format": 1, **(header or {}), "files": files}, indent=1)
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return sum(v["size"] for v in files.values())


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: it is incomplete (a save that did "
                              "not finish) or not a trainer_lib checkpoint")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        assert isinstance(files, dict)
    except Exception:  # noqa: BLE001 - any damage to the manifest itself
        raise CheckpointError(f"{path} is damaged (not the JSON list of files a checkpoint "
                              "ends with)") from None
    return manifest


def damage(folder: Path) -> Optional[str]:
    """None when every file listed in the manifest is there with its size and checksum;
    otherwise what is wrong, naming the file."""
    try:
        files = read_manifest(folder)["files"]
    except CheckpointError as e:
        return str(e)
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{path} is damaged ({size:,} bytes, {entry.get('size'):,} when saved)"
        if file_checksum(path) != entry.get("xxh3_128"):
            return f"{path} is damaged (its checksum differs from the one saved with it)"
    return None


# --------------------------------------------------------------------------- loading safely


def _harmless_classes(deepspeed: bool) -> list:
    """Classes that a resume's pickles legitimately hold and that are safe to rebuild."""
    classes: list = [np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        classes.append(np._core.multiarray._reconstruct)
    except AttributeError:  # numpy < 2
        classes.append(np.core.multiarray._reconstruct)
    if not deepspeed:  # importing it takes seconds
        return classes
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        classes += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except Exception:  # noqa: BLE001 - without DeepSpeed no checkpoint holds them
        pass
    return classes


def check_safe_to_load(folder: Path) -> None:
    """Opens every file a resume reads the safe way; raises UnsafeCheckpointError for a pickle
    that would run code, CheckpointError for a file that does not parse."""
    from safetensors import safe_open

    files = _files(folder)
    allowed = None
    for path in files:
        name = path.name
        if name.endswith(PICKLE_SUFFIXES):
            if allowed is None:
                allowed = _harmless_classes(deepspeed=any(
                    "zero_pp_rank_" in f.name or f.name.startswith("mp_rank_") for f in files))
            try:
                with torch.serialization.safe_globals(allowed):
                    _load_weights_only(path)
            except Exception as e:  # noqa: BLE001 - UnpicklingError for code, others for damage
                if isinstance(e, pickle.UnpicklingError):
                    raise UnsafeCheckpointError(
                        f"{path} holds objects that loading would have to run "
                        f"({_unsupported(e)}), so it is not loaded: trainer_lib writes only "
                        "tensors and plain data there. Someone or something changed the file; "
                        "resume from a checkpoint you trust") from None
                raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: "
                                      f"{str(e)[:200]})") from None
        elif name == DCP_METADATA:
            _check_distributed_checkpoint(path)
        elif name.endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None
        elif name.endswith(".json"):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except Exception:  # noqa: BLE001
                raise CheckpointError(f"{path} is not valid JSON") from None


# what the index of a torch distributed checkpoint legitimately holds
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo")} | {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")}


class _DCPIndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        known = (module, name) in _DCP_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not known:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        return super().find_class(module, name)


def _check_distributed_checkpoint(index: Path) -> None:
    """torch's distributed checkpoint reads its index with pickle and each non-tensor entry
    (optimiser settings) with `torch.load(weights_only=False)`: the index is opened with only its
    own classes allowed and every non-tensor entry with `weights_only=True`. Tensor entries are
    read with `weights_only=True` by torch itself."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    def unsafe(path: Path, e: Exception) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{path} holds objects that loading would have to run ({_unsupported(e)}), so it is "
            "not loaded: trainer_lib writes only tensors and plain data there. Someone or "
            "something changed the file; resume from a checkpoint you trust")

    try:
        with open(index, "rb") as f:
            metadata = _DCPIndexUnpickler(f).load()
        entries = [(key, info) for key, info in metadata.storage_data.items()
                   if isinstance(metadata.state_dict_metadata.get(key.fqn),
                                 BytesStorageMetadata)]
    except pickle.UnpicklingError as e:
        raise unsafe(index, e) from None
    except Exception as e:  # noqa: BLE001 - damage
        raise CheckpointError(f"{index} cannot be read ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    for _, info in entries:
        shard = index.parent / info.relative_path
        try:
            with open(shard, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), map_location="cpu",
                           weights_only=True)
        except pickle.UnpicklingError as e:
            raise unsafe(shard, e) from None
        except Exception as e:  # noqa: BLE001 - damage
            raise CheckpointError(f"{shard} cannot be read ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None


def _load_weights_only(path: Path) -> None:
    try:  # mapped rather than read, so a large shard costs no memory
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        torch.load(path, map_location="cpu", weights_only=True)


def _unsupported(e: Exception) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    if found:
        return f"it refers to {found.group(1)}"
    return "it uses pickle instructions beyond tensors and plain data"


def load_plain(path: Path) -> Any:
    """A small state written with torch.save (the schedule), read without running code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} cannot be loaded safely ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
