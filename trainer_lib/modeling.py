"""Loading the model and tokenizer named by the config.

Where they come from is checked first, in a second or two: a local path that does not exist is
an error (never a hub lookup), and a hub id when the hub cannot be reached is either read from
the local cache or an error, instead of a minute of retries inside `from_pretrained`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer_lib.attention import DOCUMENT_ATTENTION, register as register_document_attention
from trainer_lib.config import Config, ConfigError
from trainer_lib.quiet import no_progress_bars, quiet_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "auto": "auto"}


def _check_path(path: str | None, what: str) -> str:
    if not path:
        raise ConfigError(
            f"no {what} given: set config.model.model_path (or pass model_path= to train()) to a "
            "local folder or a Hugging Face hub id"
        )
    return str(path)


# a hub repository id: "name" or "owner/name" (letters, digits, "-", "_", ".")
_REPO_ID = re.compile(r"^[\w][\w.-]*(/[\w][\w.-]*)?$")
HUB_CHECK_TIMEOUT = 3.0  # seconds


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable() -> tuple[bool, str]:
    """(whether the hub answers, what failed): one request with a short timeout, through the
    same client and proxies huggingface_hub uses; asked once per process and endpoint."""
    from huggingface_hub import constants

    return _reachable(constants.ENDPOINT)


@functools.lru_cache(maxsize=None)
def _reachable(endpoint: str) -> tuple[bool, str]:
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_CHECK_TIMEOUT)
        return True, ""
    except Exception as e:  # noqa: BLE001 - any failure to get an answer is "unreachable"
        return False, f"{type(e).__name__}: {e}"


def model_source(path: str, setting: str, probe_files: tuple = ("config.json",)) -> dict:
    """Checks where `path` (the value of `setting`) points before anything is loaded; returns
    extra `from_pretrained` arguments (`local_files_only` when the hub is unreachable but the
    files are cached)."""
    if os.path.isdir(path):
        return {}
    expanded = os.path.expanduser(path)
    local = (path.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(expanded)
             or os.path.exists(expanded) or not _REPO_ID.fullmatch(path))
    if local:
        what = "is a file, not a model folder" if os.path.isfile(expanded) else "does not exist"
        raise ConfigError(f"{setting}={path!r}: this local path {what}; give an existing folder "
                          "(as written by save_pretrained) or a Hugging Face hub id (owner/name)")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = any(isinstance(try_to_load_from_cache(path, f), str) for f in probe_files)
    if _hub_offline():
        if cached:
            return {}
        raise ConfigError(f"{setting}={path!r} is a hub id, but HF_HUB_OFFLINE is set and it is "
                          "not in the local cache; download it beforehand (`hf download "
                          f"{path}`) with the network on, or give a local folder")
    start = time.monotonic()
    reachable, why = hub_reachable()
    if reachable:
        return {}
    if cached:
        return {"local_files_only": True}  # use the cached copy without asking the hub
    raise ConfigError(
        f"{setting}={path!r} is a hub id, but the Hugging Face hub ({constants.ENDPOINT}) cannot "
        f"be reached ({why}; checked in {time.monotonic() - start:.1f} s) and it is not in the "
        f"local cache. Connect to the network, download it beforehand (`hf download {path}`), "
        "or give a local folder; with HF_HUB_OFFLINE=1 only the cache is used")


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
        from trainer_lib.peft_utils import apply_lora, build_lora_config

        lora = build_lora_config(config.model.peft_config)  # None: `enabled: false`
    if lora is not None:
        if config.model.num_layers_unfrozen != -1:
            raise ConfigError("model.peft_config and model.num_layers_unfrozen both limit what "
                              "trains; set one (num_layers_unfrozen=-1 with LoRA)")
        if config.model.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: checkpoints need a grad input
        model = apply_lora(model, config.model.peft_config, base_path=path)
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
    if num_layers_unfrozen > len(layers):
        raise ConfigError(f"model.num_layers_unfrozen={num_layers_unfrozen} but the model has "
                          f"only {len(layers)} layers")
    frozen = [model.get_input_embeddings()] + list(layers[:len(layers) - num_layers_unfrozen])
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


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


# --------------------------------------------------------------------------- dropout


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or name.endswith("pdrop")


def disable_dropout(model) -> None:
    """Sets every dropout probability of the model to 0, wherever it lives: nn.Dropout modules
    (LoRA's included), float attributes that modules copied from the config at init (Llama's
    `self.attention_dropout`), and the config itself (Falcon and GPT-Neo read it in forward).

    The user's config values are kept aside and written back for saving (`dropout_as_configured`):
    the saved folder is the model as it was configured, only this run trains without dropout.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if _is_dropout_name(name) and type(value) is float:
                setattr(module, name, 0.0)
    kept = model.__dict__.setdefault("_dropout_as_configured", [])  # not in the saved config
    for config in _configs(model):
        for name, value in list(vars(config).items()):
            if _is_dropout_name(name) and type(value) is float and value != 0.0:
                kept.append((config, name, value))
                setattr(config, name, 0.0)


@contextmanager
def dropout_as_configured(model):
    """Within it, the model's config carries the dropout the user configured (for saving)."""
    changed = []
    for module in model.modules():
        for config, name, value in module.__dict__.get("_dropout_as_configured", []):
            changed.append((config, name, getattr(config, name)))
            setattr(config, name, value)
    try:
        yield
    finally:
        for config, name, value in reversed(changed):
            setattr(config, name, value)


def _configs(model) -> list:
    """The model's config and its sub-configs (a multimodal model's text config, ...)."""
    from transformers import PretrainedConfig

    seen, found = set(), []
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if not isinstance(config, PretrainedConfig) or id(config) in seen:
            continue
        seen.add(id(config))
        found.append(config)
        stack.extend(v for v in vars(config).values() if isinstance(v, PretrainedConfig))
    return found
