"""Writing the trained model as an ordinary Hugging Face folder, atomically: full, as a LoRA
adapter folder, or with the adapters merged. Every process calls it (a sharded model is gathered
collectively); only the main process writes, and a failed write is raised on every process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from torch.distributed.tensor import DTensor

from trainer_lib.model.card import ModelCard, users_card, write_card
from trainer_lib.model.dropout import dropout_as_configured
from trainer_lib.model.lora import is_peft_model
from trainer_lib.runtime.files import atomic_directory, write_error
from trainer_lib.runtime.processes import all_or_none
from trainer_lib.runtime.quiet import no_progress_bars


def save_pretrained(accelerator, model, tokenizer, path: str | os.PathLike,
                    merge_adapters: bool = False,
                    failure: Optional[Callable[[Exception], BaseException]] = None,
                    card: Optional[ModelCard] = None) -> None:
    """Every process must call this (a sharded model is gathered collectively); only the main
    process writes.

    A LoRA model is written as its adapter folder (adapter_config.json pointing at the base model,
    adapter weights only), or with `merge_adapters=True` as a full model with the adapters merged
    into the base weights, which loads with AutoModelForCausalLM alone.

    A write that fails leaves `path` as it was and raises on every process: a full disk (or any
    OSError) as CheckpointWriteError naming the folder and the space the model takes, or what
    `failure(error)` returns (a checkpoint names itself).

    `card`: the model card written as README.md, unless the folder already holds a README.md
    that trainer_lib did not write (the user's, kept as it is).
    """
    path = Path(path)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    # gathers ZeRO-3 shards (needs stage3_gather_16bit_weights_on_model_save, which
    # runtime/deepspeed.py always sets) and FSDP2 shards; the unwrapped module alone would hold
    # empty shards or this process's part
    state_dict = accelerator.get_state_dict(model)
    with all_or_none(accelerator):  # the others wait here while the main process writes
        if accelerator.is_main_process:
            try:
                _write_folder(unwrapped, state_dict, tokenizer, path, merge_adapters, card)
            except Exception as e:  # noqa: BLE001 - a failed write, said in the user's terms
                said = (failure or _model_write_error(unwrapped, state_dict, path,
                                                      merge_adapters))(e)
                if said is e:
                    raise
                raise said from e


def _write_folder(unwrapped, state_dict, tokenizer, path: Path, merge_adapters: bool,
                  card: Optional[ModelCard]) -> None:
    is_peft = is_peft_model(unwrapped)
    kept = users_card(path)  # the folder is replaced whole: the user's README.md goes along
    # the folder keeps the dropout the user configured, even if training ran without it
    with atomic_directory(path) as tmp, no_progress_bars(), dropout_as_configured(unwrapped):
        if is_peft and merge_adapters:
            merged = _merged_copy(unwrapped, state_dict)
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if kept is not None:
            write_card(tmp, kept)
        elif card is not None:  # over the template card peft writes for an adapter
            kind = "adapter" if is_peft and not merge_adapters else "merged" if is_peft else "full"
            lora = unwrapped.peft_config.get("default") if is_peft else None
            write_card(tmp, card.render(kind, lora))


def _model_write_error(unwrapped, state_dict, path: Path, merge_adapters: bool):
    existed = path.exists()  # atomic_directory leaves it as it was

    def convert(error: Exception) -> BaseException:
        adapters_only = is_peft_model(unwrapped) and not merge_adapters
        return write_error(
            error, f"the model folder {path}", path,
            ("the model", _bytes_written(unwrapped, state_dict, adapters_only)),
            "save it elsewhere (the command line's --output, or trainer.save_pretrained(path))",
            f"Nothing of it was kept: {path} is as it was" if existed
            else f"Nothing of it was kept ({path} was not created)")

    return convert


def _bytes_written(unwrapped, state_dict, adapters_only: bool) -> int:
    """About what the folder's weights take: the adapters' alone, or the model's."""
    if state_dict is None:
        state_dict = unwrapped.state_dict()
    if adapters_only:
        from peft import get_peft_model_state_dict

        state_dict = get_peft_model_state_dict(unwrapped, state_dict=state_dict)
    # tied weights share one storage and are written once
    storages = {t.untyped_storage().data_ptr(): t.nbytes for t in state_dict.values()
                if hasattr(t, "untyped_storage")}
    return sum(storages.values())


def _merged_copy(peft_model, state_dict):
    """A plain model with the adapters merged, built apart from the (maybe sharded) live one."""
    import copy

    # ZeRO-3 (ds_numel) or FSDP2 (DTensor) shards: the live model holds only this process's part
    sharded = any(hasattr(p, "ds_numel") or isinstance(p, DTensor)
                  for p in peft_model.parameters())
    if not sharded:
        model = copy.deepcopy(peft_model)
    else:
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM
        from transformers.integrations import deepspeed as hf_deepspeed

        base = peft_model.get_base_model()
        # built whole on this process: ZeRO-3's partitioned construction must not kick in
        saved = hf_deepspeed._hf_deepspeed_config_weak_ref
        hf_deepspeed.unset_hf_deepspeed_config()
        try:
            plain = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype)
        finally:
            hf_deepspeed._hf_deepspeed_config_weak_ref = saved
        model = get_peft_model(plain, copy.deepcopy(peft_model.peft_config["default"]))
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if unexpected or (sharded and missing):
            raise RuntimeError(f"merging adapters: the gathered weights do not fit the model "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.merge_and_unload()
