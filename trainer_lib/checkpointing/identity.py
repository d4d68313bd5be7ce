"""The run identity: the model, the data and the settings that change shapes or the data order.
A checkpoint records it; resuming with another one is refused, naming what differs."""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import torch

from trainer_lib.data.store import Examples, Groups
from trainer_lib.runtime.deepspeed import zero_stage


def data_fingerprint(items: Any, sampled: int = 1000) -> dict:
    """The number of tokenised examples, with a checksum of all their lengths and of the tokens
    and labels of up to `sampled` of them, spread evenly (all of a small dataset), from the loader
    items (examples, packed rows of examples, or KTO micro-batches): cheap for millions of
    examples, and no other dataset passes for this one by chance."""
    import xxhash

    if isinstance(items, (Examples, Groups)):  # Arrow-backed: lengths from the table, a sample read
        if isinstance(items, Examples):
            store, rows = items.store, items.rows
        else:
            layout, store = items.layout, items.layout.store
            starts = layout.offsets[items.ids].astype(np.int64)
            sizes = layout.offsets[items.ids + 1].astype(np.int64) - starts
            first = np.cumsum(sizes) - sizes  # where each group begins in the flat order
            positions = np.repeat(starts - first, sizes) + np.arange(int(sizes.sum()))
            rows = layout.flat[positions]
        h = xxhash.xxh3_64()
        h.update(store.lengths()[rows].astype(np.int64).tobytes())
        for ex in store.fetch(rows[::max(1, len(rows) // sampled)]):
            for key in ("input_ids", "labels"):
                h.update(np.asarray(ex[key], dtype=np.int64).tobytes())
        return {"examples": int(len(rows)), "checksum": h.hexdigest()}

    examples: list = []

    def visit(x):
        if isinstance(x, dict) and "input_ids" in x:
            examples.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)

    for item in items:
        visit(item)
    h = xxhash.xxh3_64()
    h.update(np.asarray([len(ex["input_ids"]) for ex in examples], dtype=np.int64).tobytes())
    every = max(1, len(examples) // sampled)
    for ex in examples[::every]:
        for key in ("input_ids", "labels"):
            if key in ex:
                v = ex[key]
                h.update(np.asarray(v.tolist() if torch.is_tensor(v) else v, dtype=np.int64)
                         .tobytes())
    return {"examples": len(examples), "checksum": h.hexdigest()}


def model_fingerprint(model_config: Any) -> Optional[str]:
    """A checksum of the model's architecture (its config.json, without paths and versions)."""
    if model_config is None:
        return None
    import xxhash

    d = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    for key in ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path",
                "torch_dtype", "dtype", "use_cache"):
        d.pop(key, None)
    return xxhash.xxh3_64(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def run_identity(trainer, model_config: Any) -> dict:
    """What a checkpoint must share with a run that resumes it."""
    cfg = trainer.config
    plain = cfg.to_dict()
    settings = {
        "method.name": cfg.method.name,
        "train.seq_length": cfg.train.seq_length,
        "train.batch_size": cfg.train.batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.seed": cfg.train.seed,
        "number of processes": trainer.accelerator.num_processes,
        "DeepSpeed ZeRO stage": zero_stage(trainer.accelerator)
        if trainer.accelerator.distributed_type.name == "DEEPSPEED" else None,
        # FSDP2 checkpoints hold sharded weights and optimiser states that only FSDP2 reads
        "FSDP": 2 if trainer.accelerator.distributed_type.name == "FSDP" else None,
        "model.peft_config": json.dumps(plain["model"]["peft_config"], sort_keys=True,
                                        default=str),
        "model.num_layers_unfrozen": cfg.model.num_layers_unfrozen,
        "optimizer.name": cfg.optimizer.name,
    }
    if hasattr(cfg.method, "packing"):
        settings["method.packing"] = cfg.method.packing
    items = trainer.train_items
    epochs = getattr(trainer, "epoch_ranges", None)
    if epochs is not None:  # a mixture's first epoch: the later ones planned depend on total_steps
        items = epochs.first(items)
    return {"model_path": str(cfg.model.model_path),
            "model": model_fingerprint(model_config),
            "data": data_fingerprint(items),
            "settings": settings}


def identity_differences(saved: Optional[dict], current: dict) -> list[str]:
    """What differs between a checkpoint's identity and this run's, in words; [] when none."""
    if not saved:
        return ["it records no run identity (written by an earlier trainer_lib)"]
    out = []
    if saved.get("model") != current["model"]:
        out.append(f"the model differs (model.model_path '{current['model_path']}' here, "
                   f"'{saved.get('model_path')}' there, with another architecture)")
    a, b = saved.get("data", {}), current["data"]
    if a != b:
        if a.get("examples") != b["examples"]:
            out.append(f"the training data differs ({b['examples']} examples here, "
                       f"{a.get('examples')} there)")
        else:
            out.append(f"the training data differs (the same number of examples, "
                       f"{b['examples']}, with other tokens)")
    for key, value in current["settings"].items():
        if key in saved.get("settings", {}) and saved["settings"][key] != value:
            out.append(f"{key} is {value} here, {saved['settings'][key]} there")
    return out
