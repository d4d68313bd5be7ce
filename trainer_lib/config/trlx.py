"""trlX's config names, mapped onto trainer_lib's or refused with the setting to use instead,
on the nested dict a config is built from, before any field is checked. Most names are the same
already; this holds only what differs.
"""

from __future__ import annotations

from typing import Any

from trainer_lib.errors import ConfigError

_SFT_METHODS = ("sftconfig",)
_SFT_TRAINERS = ("AccelerateSFTTrainer", "NeMoSFTTrainer")
_OTHER_METHODS = ("ppoconfig", "ilqlconfig", "rftconfig", "dpoconfig", "mrtconfig")


def _refuse(where: str, value: Any, use: str) -> ConfigError:
    return ConfigError(f"{where}={value!r} (a trlX setting) has no equivalent here: {use}")


def _model(section: dict, tokenizer: dict) -> None:
    if "tokenizer_path" in section:  # trlX's early configs kept it under model
        tokenizer.setdefault("tokenizer_path", section.pop("tokenizer_path"))
    if "model_type" in section:
        raise _refuse("model.model_type", section["model_type"],
                      "the trainer follows config.method (SFT or KTO); remove it")
    arch = section.pop("model_arch_type", "causal")
    if arch != "causal":
        raise _refuse("model.model_arch_type", arch,
                      "trainer_lib trains causal language models only")
    delta = section.pop("delta_kwargs", None)
    if delta:
        section["peft_config"] = _delta_to_lora(delta)


def _delta_to_lora(delta: dict) -> dict:
    """trlX's OpenDelta LoRA settings as model.peft_config."""
    kind = delta.get("delta_type")
    modules = delta.get("modified_modules", "all")
    if kind != "lora" or not (modules == "all" or isinstance(modules, list)):
        raise _refuse("model.delta_kwargs", delta,
                      "set model.peft_config to peft.LoraConfig's arguments, e.g. {r: 8, "
                      "lora_alpha: 16, lora_dropout: 0.0, target_modules: all-linear}")
    known = {"delta_type", "modified_modules", "lora_r", "lora_alpha", "lora_dropout"}
    extra = sorted(set(delta) - known)
    if extra:
        raise _refuse("model.delta_kwargs", {k: delta[k] for k in extra},
                      "only delta_type, modified_modules, lora_r, lora_alpha and lora_dropout "
                      "map onto model.peft_config")
    lora = {"target_modules": "all-linear" if modules == "all" else modules}
    for old, new in (("lora_r", "r"), ("lora_alpha", "lora_alpha"),
                     ("lora_dropout", "lora_dropout")):
        if old in delta:
            lora[new] = delta[old]
    return lora


def _tokenizer(section: dict) -> None:
    # trainer_lib pads on the right to train and on the left to generate, by itself
    section.pop("padding_side", None)
    side = section.pop("truncation_side", "right")
    if side != "right":
        raise _refuse("tokenizer.truncation_side", side,
                      "a text keeps its first train.seq_length tokens, and a prompt/completion "
                      "pair loses prompt tokens from the left so the completion stays "
                      "(method.overlong='truncate'); remove it")


def _optimizer(section: dict) -> None:
    name = str(section.get("name", ""))
    if name.endswith("_8bit_bnb"):
        raise _refuse("optimizer.name", name,
                      "8-bit optimisers need bitsandbytes, which is not part of trainer_lib's "
                      f"stack; use optimizer.name={name.split('_')[0]!r} (or 'adafactor' for "
                      "less optimiser memory)")


def _train(section: dict, updates: dict, current) -> None:
    trainer = section.pop("trainer", None)
    if trainer is not None:
        if trainer not in _SFT_TRAINERS:
            raise _refuse("train.trainer", trainer, "trainer_lib trains SFT and KTO "
                          "(method.name='sft' or 'kto')")
        method = updates.setdefault("method", {})
        if isinstance(method, dict):
            method.setdefault("name", "sft")
    section.pop("pipeline", None)  # the data's format comes from the samples themselves
    if "logging_dir" in section and section["logging_dir"] is None:
        section.pop("logging_dir")  # trlX's "none given": trainer_lib's default folder
    if section.pop("trainer_kwargs", None):
        raise _refuse("train.trainer_kwargs", "...", "give each setting under its section")
    rollouts = section.pop("rollout_logging_dir", None)
    if rollouts is not None:
        raise _refuse("train.rollout_logging_dir", rollouts, "it is a PPO setting; remove it")
    if "save_optimizer" in section and not section.pop("save_optimizer"):
        raise _refuse("train.save_optimizer", False, "a checkpoint always holds the optimiser "
                      "state, which an exact resume needs; remove it")
    if isinstance(section.get("save_best"), bool):
        best = section.pop("save_best")
        if best:
            raise _refuse("train.save_best", True,
                          "train.save_best names the logged figure to rank checkpoints by, e.g. "
                          "'eval/loss' or 'metrics/<name>', with train.save_best_mode 'min' or "
                          "'max'")
        section["save_best"] = None
    wandb = {}
    for old, new in (("entity_name", "entity"), ("group_name", "group")):
        if section.get(old) is not None:
            wandb[new] = section.pop(old)
        section.pop(old, None)
    if wandb:
        kwargs = section.setdefault("tracker_kwargs", {})
        kwargs["wandb"] = {**wandb, **kwargs.get("wandb", {})}
    if "minibatch_size" in section:
        _minibatch(section, current)


def _minibatch(section: dict, current) -> None:
    """trlX's batch_size is the optimiser step's batch, cut into minibatch_size forward
    passes: here that is batch_size=minibatch_size with gradient accumulation."""
    minibatch = section.pop("minibatch_size")
    if minibatch is None:
        return
    batch = section.get("batch_size", current.train.batch_size if current else 8)
    if "gradient_accumulation_steps" in section:
        raise ConfigError("train.minibatch_size (trlX) and train.gradient_accumulation_steps both "
                          "split the batch; give train.batch_size (per forward pass) and "
                          "train.gradient_accumulation_steps only")
    if not (isinstance(minibatch, int) and isinstance(batch, int) and minibatch > 0
            and batch % minibatch == 0):
        raise ConfigError(f"train.minibatch_size={minibatch!r} must divide train.batch_size="
                          f"{batch!r} (trlX's rule); here: train.batch_size is the batch of one "
                          "forward pass and train.gradient_accumulation_steps the passes per step")
    section["batch_size"] = minibatch
    section["gradient_accumulation_steps"] = batch // minibatch


def _method(section: dict) -> None:
    name = section.get("name")
    if not isinstance(name, str):
        return
    if name.lower() in _SFT_METHODS:
        section["name"] = "sft"
    elif name.lower() in _OTHER_METHODS:
        raise _refuse("method.name", name, "trainer_lib trains SFT and KTO (method.name='sft' "
                      "or 'kto')")


def from_trlx_names(updates: dict, current=None) -> dict:
    """The nested update dict with trlX's names mapped onto trainer_lib's (in place)."""
    # a section given as a dataclass (SFTConfig(), ...) holds nothing of trlX's
    if isinstance(updates.get("model"), dict):
        tokenizer = updates.get("tokenizer", {})
        if isinstance(tokenizer, dict):
            _model(updates["model"], tokenizer)
            if tokenizer:
                updates["tokenizer"] = tokenizer
    if isinstance(updates.get("tokenizer"), dict):
        _tokenizer(updates["tokenizer"])
    if isinstance(updates.get("optimizer"), dict):
        _optimizer(updates["optimizer"])
    if isinstance(updates.get("train"), dict):
        _train(updates["train"], updates, current)
    if isinstance(updates.get("method"), dict):
        _method(updates["method"])
    return updates
