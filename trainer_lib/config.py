"""Configuration: plain dataclasses, one per section, with a strict `evolve()`.

Every section validates its own values; `Config.evolve` and `Config.from_dict` refuse unknown
keys and name the closest valid one, so a typo never silently trains with a default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration value or key that cannot be used."""


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    model_path: Optional[str] = None
    # A peft.LoraConfig, or a dict of its keyword arguments (plus the shorthands `rank`, `alpha`,
    # `dropout`, `exclude_modules`, and target_modules="all-linear").
    peft_config: Any = None
    # Train only the top N transformer layers (and the final norm/head); -1 trains everything.
    num_layers_unfrozen: int = -1
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    attn_implementation: Optional[str] = None  # "sdpa" | "eager" | "flash_attention_2" | None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    def validate(self) -> None:
        if self.num_layers_unfrozen < -1:
            raise ConfigError("model.num_layers_unfrozen must be -1 (train all layers) or >= 0")


@dataclass
class TokenizerConfig:
    tokenizer_path: Optional[str] = None  # defaults to model.model_path
    # "default": the tokenizer's own template; None: no template (contents are concatenated);
    # any other string: a Jinja template, or a path to a .jinja file.
    chat_template: Optional[str] = "default"


@dataclass
class OptimizerConfig:
    # any torch.optim class by name, any case ("adamw", "AdamW", "sgd", "adagrad", ...), or
    # "adafactor" (transformers' Adafactor); Adam and AdamW run fused where the device has it
    name: str = "adamw"
    # the optimiser's keyword arguments; weight_decay never applies to biases and norm weights
    kwargs: dict = field(default_factory=lambda: dict(lr=1e-4, weight_decay=0.0))

    def validate(self) -> None:
        from trainer_lib.optim import check_optimizer

        check_optimizer(self)


@dataclass
class SchedulerConfig:
    # transformers' schedule names (get_scheduler: "linear", "cosine", "cosine_with_min_lr",
    # "warmup_stable_decay", ...) or a torch.optim.lr_scheduler class ("CosineAnnealingLR")
    name: str = "cosine"
    # warmup_steps or warmup_ratio (of the run's optimiser steps), plus the schedule's own
    # arguments (num_cycles, min_lr_rate, num_decay_steps, lr_end, power, ...)
    kwargs: dict = field(default_factory=lambda: dict(warmup_steps=0))

    def validate(self) -> None:
        from trainer_lib.optim import check_scheduler

        check_scheduler(self)


@dataclass
class TrainConfig:
    seq_length: int = 512
    batch_size: int = 8  # sequences per process per micro-batch
    gradient_accumulation_steps: int = 1
    epochs: int = 1
    total_steps: int = 1000  # optimiser steps; training stops at whichever of epochs/total_steps is first
    seed: int = 1000
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    eval_interval: int = 100
    eval_batch_size: Optional[int] = None  # defaults to batch_size
    eval_split: float = 0.0  # fraction of samples held out for eval/loss when no eval_samples are given
    checkpoint_interval: int = 1000
    checkpoint_dir: str = "ckpts"
    keep_last_n: Optional[int] = None
    save_best: Optional[str] = None  # a logged name, e.g. "eval/loss" or "metrics/accuracy"
    save_best_mode: Literal["min", "max"] = "min"
    resume_from_checkpoint: Optional[str] = None  # a checkpoint folder, or "latest"
    log_interval: int = 10
    # None, or one or a list of: "jsonl", and accelerate's trackers (wandb, tensorboard,
    # mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio) as installed
    tracker: Optional[Union[str, list]] = None
    # per tracker, keyword arguments for its init (accelerate's init_kwargs), e.g.
    # {"wandb": {"entity": "team"}, "mlflow": {"tags": {"team": "nlp"}}}
    tracker_kwargs: dict = field(default_factory=dict)
    logging_dir: str = "logs"
    project_name: str = "trainer_lib"
    run_name: Optional[str] = None
    tags: list = field(default_factory=list)
    deepspeed_config: Any = None  # a path to a DeepSpeed JSON, or a dict
    progress_bar: bool = True
    # Steps whose loss or gradient norm is NaN/inf that may be skipped (not applied) in a run
    # before it stops; 0: stop at the first.
    skip_nonfinite_steps: int = 0

    def validate(self) -> None:
        if self.seq_length < 2:
            raise ConfigError(f"train.seq_length must be at least 2, got {self.seq_length}")
        for name in ("batch_size", "gradient_accumulation_steps", "epochs", "total_steps",
                     "eval_interval", "checkpoint_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError("train.eval_batch_size must be at least 1")
        if not 0.0 <= self.eval_split < 1.0:
            raise ConfigError(f"train.eval_split must be within [0, 1), got {self.eval_split}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError("train.max_grad_norm must be positive, or None to disable clipping")
        if self.skip_nonfinite_steps < 0:
            raise ConfigError("train.skip_nonfinite_steps must be >= 0 (0: stop at the first "
                              f"non-finite step), got {self.skip_nonfinite_steps}")
        if self.keep_last_n is not None and self.keep_last_n < 1:
            raise ConfigError("train.keep_last_n must be at least 1, or None to keep all")
        if self.deepspeed_config is not None and not isinstance(self.deepspeed_config, (str, dict)):
            raise ConfigError("train.deepspeed_config must be a path to a JSON file or a dict")
        from trainer_lib.tracking import TRACKER_NAMES, tracker_names

        tracker_names(self.tracker)
        for name, kwargs in self.tracker_kwargs.items():
            if name not in TRACKER_NAMES or not isinstance(kwargs, dict):
                raise ConfigError(f"train.tracker_kwargs maps a tracker name "
                                  f"({', '.join(TRACKER_NAMES)}) to its keyword arguments; got "
                                  f"{name!r}: {kwargs!r}")


@dataclass
class DataConfig:
    """How samples become tokenised examples (the method decides what the examples are)."""

    # worker processes that tokenise; None: the CPU cores available to this process (a dataset
    # of fewer than ~1,000 samples per worker is tokenised in the process itself)
    num_proc: Optional[int] = None
    # where prepared data is cached; None: $TRAINER_LIB_DATA_CACHE, else ~/.cache/trainer_lib/data
    cache_dir: Optional[str] = None
    cache: bool = True  # False: prepare afresh in a temporary folder, removed once opened
    streaming: bool = False  # stream a path or hub name instead of preparing it whole
    stream_buffer: int = 1000  # examples packed together (and shuffled) at a time when streaming

    def validate(self) -> None:
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError("data.num_proc must be at least 1, or None for the CPU cores available")
        if self.stream_buffer < 1:
            raise ConfigError("data.stream_buffer must be at least 1")


@dataclass
class MethodConfig:
    """What every method shares: generation settings for evaluation."""

    gen_kwargs: dict = field(default_factory=lambda: dict(max_new_tokens=64, do_sample=False))
    stop_sequences: list = field(default_factory=list)
    # Tokens per chunk in the cross-entropy over the vocabulary (bounds the logits memory);
    # None: about 2**25 / vocabulary tokens, so a chunk's float32 logits take 128 MiB.
    loss_chunk_size: Optional[int] = None

    def validate(self) -> None:
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ConfigError("method.loss_chunk_size must be at least 1")


@dataclass
class SFTConfig(MethodConfig):
    name: str = "sft"
    text_key: str = "text"
    input_key: str = "prompt"
    output_key: str = "completion"
    # For conversations: "assistant" (every assistant turn), "last_assistant", or "all" tokens.
    loss_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    add_eos: bool = True
    packing: bool = True
    # An example longer than seq_length: "truncate" it, "drop" it, or "split" it (text only).
    overlong: Literal["truncate", "drop", "split"] = "truncate"
    group_by_length: bool = True  # for unpacked batches


@dataclass
class KTOConfig(MethodConfig):
    name: str = "kto"
    input_key: str = "prompt"
    output_key: str = "completion"
    label_key: str = "label"
    beta: float = 0.1
    desirable_weight: Union[float, str] = 1.0  # or "auto"
    undesirable_weight: float = 1.0
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    sft_weight: float = 0.0
    average_log_probs: bool = False
    # "auto": "adapter" for a PEFT policy, "copy" with sync_ref_model, else "precompute".
    ref_model: Literal["auto", "copy", "precompute", "adapter"] = "auto"
    overlong: Literal["truncate", "drop"] = "truncate"
    # every dropout of the policy and the reference set to 0 (the saved config keeps the user's)
    disable_dropout: bool = True
    # examples and KL rows packed as documents of rows of train.seq_length (else padded rows)
    packing: bool = True
    # examples per forward pass of the precomputed reference pass (None: train.batch_size)
    precompute_ref_batch_size: Optional[int] = None
    # TR-DPO: every ref_model_sync_steps steps, ref <- alpha * policy + (1 - alpha) * ref
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"method.beta must be positive, got {self.beta}")
        if isinstance(self.desirable_weight, str):
            if self.desirable_weight != "auto":
                raise ConfigError('method.desirable_weight must be a positive number or "auto"')
        elif self.desirable_weight <= 0:
            raise ConfigError("method.desirable_weight must be positive")
        if self.undesirable_weight <= 0:
            raise ConfigError("method.undesirable_weight must be positive")
        if self.sft_weight < 0:
            raise ConfigError("method.sft_weight must be >= 0")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ConfigError("method.precompute_ref_batch_size must be at least 1, or None "
                              "(train.batch_size)")
        if not 0 < self.ref_model_mixup_alpha <= 1:
            raise ConfigError(f"method.ref_model_mixup_alpha must be within (0, 1], got "
                              f"{self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            raise ConfigError("method.ref_model_sync_steps must be at least 1")
        if self.sync_ref_model and self.ref_model in ("precompute", "adapter"):
            raise ConfigError(
                f'method.sync_ref_model moves the reference towards the policy, which needs a '
                f'reference model of its own; method.ref_model="{self.ref_model}" has none: use '
                'ref_model="copy" (or "auto"), or set sync_ref_model=false')


METHOD_CONFIGS: dict[str, type] = {"sft": SFTConfig, "kto": KTOConfig}

_SECTIONS = {
    "model": ModelConfig,
    "tokenizer": TokenizerConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "train": TrainConfig,
    "data": DataConfig,
}

# Fields whose values are free-form dicts (their keys are not checked against a dataclass).
_FREE_DICTS = {"kwargs", "gen_kwargs", "deepspeed_config", "peft_config", "tracker_kwargs"}


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but `1e-5` is a float (YAML 1.1 reads it as a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[0-9][0-9_]*[eE][-+]?[0-9]+
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


# --------------------------------------------------------------------------- helpers


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Checks (and gently coerces) a value against a field annotation."""
    origin = typing.get_origin(tp)
    if tp is Any or value is None and _allows_none(tp):
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                continue
            try:
                return _check_type(value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        or_null = " or null" if _allows_none(tp) else ""
        if len(errors) == 1:  # Optional[X]: X's own message says what was expected
            raise ConfigError(errors[0].replace(", got ", f"{or_null}, got ", 1))
        arms = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
        raise ConfigError(f"{where}: {value!r} is not one of the accepted types ({arms}{or_null})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{where} must be one of {choices}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return value
    return value


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _update_dataclass(obj: Any, updates: dict, where: str) -> Any:
    """A copy of dataclass `obj` with `updates` applied, strictly."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{where} must be given as a mapping of its fields, got {updates!r}")
    names = {f.name for f in dataclasses.fields(obj)}
    hints = _field_types(type(obj))
    changes = {}
    for key, value in updates.items():
        if key not in names:
            raise ConfigError(f"unknown key '{where}.{key}'{_suggest(key, names)}")
        current = getattr(obj, key)
        if isinstance(value, dict) and isinstance(current, dict) and key in _FREE_DICTS:
            # kwargs, gen_kwargs, peft_config...: a partial dict (e.g. the override
            # `model.peft_config.r=16`) updates the current one, like nested sections
            value = {**current, **value}
        changes[key] = _check_type(value, hints[key], f"{where}.{key}")
    new = dataclasses.replace(obj, **changes)
    if hasattr(new, "validate"):
        new.validate()
    return new


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "to_dict") and callable(value.to_dict):  # e.g. a peft.LoraConfig
        return _plain(value.to_dict())
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """`"train.batch_size=4"` -> `("train.batch_size", 4)`; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(dotted: dict) -> dict:
    """`{"train.batch_size": 4}` -> `{"train": {"batch_size": 4}}` (deep-merging)."""
    out: dict = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}' conflicts with another value for '{part}'")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- the config


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=SFTConfig)

    def evolve(self, **updates: Any) -> "Config":
        """A new config with `updates` applied: nested dicts per section, or dotted keys.

        `cfg.evolve(train=dict(batch_size=4))` and `cfg.evolve(**{"train.batch_size": 4})` are
        the same. Unknown keys raise a ConfigError naming the closest valid key.
        """
        from trainer_lib.trlx_names import from_trlx_names

        updates = from_trlx_names(_nest(updates), self)
        new = copy.copy(self)
        valid = [f.name for f in dataclasses.fields(self)]
        for section, value in updates.items():
            if section not in valid:
                raise ConfigError(f"unknown config section '{section}'{_suggest(section, valid)}")
            current = getattr(self, section)
            if dataclasses.is_dataclass(value):
                if section == "method" and not isinstance(value, MethodConfig):
                    raise ConfigError("config.method must be a method config such as SFTConfig()")
                value.validate() if hasattr(value, "validate") else None
                setattr(new, section, copy.deepcopy(value))
                continue
            if section == "method" and isinstance(value, dict) and "name" in value:
                name = value["name"]
                if name != getattr(current, "name", None):
                    if name not in METHOD_CONFIGS:
                        raise ConfigError(
                            f"unknown method '{name}'{_suggest(name, METHOD_CONFIGS)}"
                        )
                    current = METHOD_CONFIGS[name]()
            setattr(new, section, _update_dataclass(current, value, section))
        return new

    def apply_overrides(self, overrides: typing.Iterable[str]) -> "Config":
        """Applies command-line style overrides: `["train.batch_size=4", "model.model_path=x"]`."""
        return self.evolve(**dict(parse_override(o) for o in overrides))

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping, got {type(d).__name__}")
        from trainer_lib.trlx_names import from_trlx_names

        d = from_trlx_names(copy.deepcopy(d))
        method = d.get("method") or {}
        name = method.get("name", "sft") if isinstance(method, dict) else "sft"
        if name not in METHOD_CONFIGS:
            raise ConfigError(f"unknown method '{name}'{_suggest(name, METHOD_CONFIGS)}")
        # start from the method's own defaults, so a short KTO file gets the KTO learning rate
        base = _DEFAULT_CONFIGS[name]()
        return base.evolve(**d)

    @classmethod
    def load_yaml(cls, path: str | Path, overrides: typing.Iterable[str] = ()) -> "Config":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = _load_yaml_text(f.read())
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({e})") from None
        data = {} if data is None else data
        return cls.from_dict(data).apply_overrides(overrides)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self


def default_sft_config() -> Config:
    return Config(method=SFTConfig())


def default_kto_config() -> Config:
    return Config(
        optimizer=OptimizerConfig(kwargs=dict(lr=5e-6, weight_decay=0.0)),
        train=TrainConfig(batch_size=8),
        method=KTOConfig(),
    )


_DEFAULT_CONFIGS = {"sft": default_sft_config, "kto": default_kto_config}
