"""Loading the model and tokenizer named by the config."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer_lib.config import Config, ConfigError

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
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and what to do
        raise _load_error(path, "tokenizer", e) from e
    if tok.pad_token is None:
        # a pad token that carries no loss (labels are -100 there) and is masked out of attention
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise ConfigError(f"the tokenizer at '{path}' has no pad, eos or unk token to pad with")
    tok.padding_side = "right"
    return tok


def load_model(config: Config):
    path = _check_path(config.model.model_path, "model path")
    kwargs = dict(dtype=_DTYPES[config.model.torch_dtype],
                  trust_remote_code=config.model.trust_remote_code)
    if config.model.attn_implementation:
        kwargs["attn_implementation"] = config.model.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _load_error(path, "model", e) from e
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


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
