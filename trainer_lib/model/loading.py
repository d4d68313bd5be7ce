"""Loading the model and tokenizer named by the config.

Where they come from is checked first, in a second or two: a local path that does not exist is
an error (never a hub lookup), and a hub id when the hub cannot be reached is either read from
the local cache or an error, instead of a minute of retries inside `from_pretrained`.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer_lib.config import Config, ConfigError
from trainer_lib.errors import did_you_mean
from trainer_lib.model.lora import apply_lora, build_lora_config
from trainer_lib.ops.attention import DOCUMENT_ATTENTION
from trainer_lib.ops.attention import register as register_document_attention
from trainer_lib.runtime.hub import model_source
from trainer_lib.runtime.quiet import no_progress_bars, quiet_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "auto": "auto"}


def _check_path(path: str | None, what: str) -> str:
    if not path:
        raise ConfigError(
            f"no {what} given: set config.model.model_path (or pass model_path= to train()) to a "
            "local folder or a Hugging Face hub id"
        )
    return str(path)


def _load_error(path: str, what: str, err: Exception) -> ConfigError:
    where = "local folder" if os.path.isdir(path) else "hub id (or a path that does not exist)"
    return ConfigError(f"could not load the {what} from '{path}' ({where}): {err}")


def load_tokenizer(config: Config):
    path = _check_path(config.tokenizer.tokenizer_path or config.model.model_path, "tokenizer path")
    setting = "tokenizer.tokenizer_path" if config.tokenizer.tokenizer_path else "model.model_path"
    extra = model_source(path, setting, ("tokenizer_config.json", "tokenizer.json", "config.json"))
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=config.model.trust_remote_code,
                                            **extra)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and what to do
        raise _load_error(path, "tokenizer", e) from e
    if tok.pad_token is None:
        # a pad token that carries no loss (labels are -100 there) and is masked out of attention
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise ConfigError(f"the tokenizer at '{path}' has no pad, eos or unk token to pad with")
    tok.padding_side = "right"
    quiet_tokenizer(tok, config.train.seq_length)  # examples are cut to seq_length anyway
    return tok


def adapter_base(path: str) -> str | None:
    """The base model of a LoRA adapter folder (its adapter_config.json), None for a model."""
    config_file = os.path.join(str(path), "adapter_config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        return json.load(f).get("base_model_name_or_path")


def load_model(config: Config):
    path = _check_path(config.model.model_path, "model path")
    kwargs = dict(dtype=_DTYPES[config.model.torch_dtype],
                  trust_remote_code=config.model.trust_remote_code,
                  **model_source(path, "model.model_path"))
    if config.model.attn_implementation:
        if config.model.attn_implementation == DOCUMENT_ATTENTION:
            register_document_attention()
        kwargs["attn_implementation"] = config.model.attn_implementation
    base = adapter_base(path)
    if base is not None and config.model.peft_config is not None:
        raise ConfigError(
            f"model.model_path '{path}' is a LoRA adapter folder and model.peft_config adds "
            "another adapter: leave peft_config unset to keep training the adapter the folder "
            "holds, or merge it first (trainer.save_pretrained(path, merge_adapters=True)) and "
            "train a new adapter on the merged folder")
    if base is not None:  # checked as model_path is: a missing folder or an unreachable hub
        base_kwargs = {**kwargs, **model_source(
            base, f"base_model_name_or_path in {os.path.join(path, 'adapter_config.json')}")}
    try:
        with no_progress_bars():
            if base is None:
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            else:  # the adapter keeps training on its frozen base
                from peft import PeftModel

                model = PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(base, **base_kwargs), path,
                    is_trainable=True)
    except Exception as e:  # noqa: BLE001
        raise _load_error(path, "model", e) from e
    if config.model.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = None
    if config.model.peft_config is not None:
        lora = build_lora_config(config.model.peft_config)  # None: `enabled: false`
    if lora is not None:  # with num_layers_unfrozen=-1 (ModelConfig.validate)
        if config.model.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: checkpoints need a grad input
        model = apply_lora(model, lora, base_path=path)
    elif config.model.num_layers_unfrozen >= 0:
        freeze_bottom_layers(model, config.model.num_layers_unfrozen)
    report_trainable_parameters(model)
    return model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of transformer blocks (model.model.layers, transformer.h, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and (
                n is None or len(module) == n):
            return module
    raise ConfigError(f"model.num_layers_unfrozen: cannot find the transformer layers of "
                      f"{type(model).__name__}")


def freeze_bottom_layers(model, num_layers_unfrozen: int) -> None:
    """Trains only the top `num_layers_unfrozen` transformer layers (trlX's rule).

    Frozen: the input embeddings and every layer below the top N. Trainable: the top N layers and
    everything above them (the final norm and the output head), unless the head is tied to the
    input embeddings, in which case it stays frozen with them. N = 0 trains only the final norm
    and the head.
    """
    layers = decoder_layers(model)
    check_num_layers_unfrozen(num_layers_unfrozen, len(layers))
    frozen = [model.get_input_embeddings()] + list(layers[:len(layers) - num_layers_unfrozen])
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


def check_num_layers_unfrozen(num_layers_unfrozen: int, num_layers: int) -> None:
    if num_layers_unfrozen > num_layers:
        raise ConfigError(f"model.num_layers_unfrozen={num_layers_unfrozen} but the model has "
                          f"only {num_layers} layers; set it to {num_layers} or less (-1 trains "
                          "them all)")


def check_attn_implementation(name: str | None) -> None:
    """`model.attn_implementation` by transformers' own rule (eager, a registered attention
    function, or a hub kernel "org/repo"), checked before the model loads."""
    if not name or name == DOCUMENT_ATTENTION:
        return
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys(), DOCUMENT_ATTENTION]
    if name in valid or is_kernel(name):
        return
    raise ConfigError(f"model.attn_implementation={name!r} is not an attention implementation"
                      f"{did_you_mean(name, valid)} (valid: {', '.join(valid)}, a hub kernel "
                      "'org/repo', or null for the model's default)")


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 keeps the true size in ds_numel


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += _numel(p)
        trainable += _numel(p) if p.requires_grad else 0
    return trainable, total


def report_trainable_parameters(model) -> tuple[int, int]:
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise ConfigError("no parameter of the model is trainable: check model.peft_config and "
                          "model.num_layers_unfrozen")
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"trainable parameters: {trainable:,} of {total:,} "
              f"({100 * trainable / max(total, 1):.4f}%)", flush=True)
    return trainable, total


def align_special_tokens(model, tokenizer) -> None:
    """Makes generation stop and pad where training taught it to."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    if tokenizer.eos_token_id is not None:
        gen.eos_token_id = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
