"""The run's config: the sections, a strict `evolve()`, and `from_dict` / `load_yaml`.

`Config.evolve` and `Config.from_dict` refuse unknown keys and name the closest valid one, so a
typo never silently trains with a default. Methods come from the registry by name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from trainer_lib.config.sections import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainConfig,
)
from trainer_lib.config.trlx import from_trlx_names
from trainer_lib.config.yaml_io import YAMLError, dump_yaml, parse_yaml, read_yaml
from trainer_lib.errors import ConfigError, did_you_mean
from trainer_lib.registry import method_config_class

# Fields whose values are free-form dicts (their keys are not checked against a dataclass).
_FREE_DICTS = {"kwargs", "gen_kwargs", "deepspeed_config", "fsdp", "peft_config",
               "tracker_kwargs"}


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    valid = list(valid)
    return did_you_mean(key, valid, cutoff=0.5) or f"; valid keys: {', '.join(sorted(valid))}"


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
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{where} must be a mapping of its fields "
                              f"({', '.join(f.name for f in dataclasses.fields(tp))}), "
                              f"got {value!r}")
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


def _section_type(tp: Any) -> Any:
    """The dataclass a field holds (`Optional[EarlyStoppingConfig]` -> EarlyStoppingConfig)."""
    arms = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return next((a for a in arms if dataclasses.is_dataclass(a) and isinstance(a, type)), None)


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
        nested = _section_type(hints[key])
        if nested is not None and isinstance(value, dict):
            # a section inside a section (train.early_stopping): its keys are checked too, and
            # a partial dict (`train.early_stopping.patience=5`) updates it, or its defaults
            value = _update_dataclass(current if current is not None else nested(), value,
                                      f"{where}.{key}")
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
        value = parse_yaml(raw) if raw.strip() else ""
    except YAMLError:
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
    # SFT unless a method is given
    method: MethodConfig = field(default_factory=lambda: method_config_class("sft")())

    def evolve(self, **updates: Any) -> "Config":
        """A new config with `updates` applied: nested dicts per section, or dotted keys.

        `cfg.evolve(train=dict(batch_size=4))` and `cfg.evolve(**{"train.batch_size": 4})` are
        the same. Unknown keys raise a ConfigError naming the closest valid key.
        """
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
                    current = method_config_class(name)()
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
        d = from_trlx_names(copy.deepcopy(d))
        method = d.get("method") or {}
        name = method.get("name", "sft") if isinstance(method, dict) else "sft"
        # start from the method's own defaults, so a short KTO file gets the KTO learning rate
        return default_config(name).evolve(**d)

    @classmethod
    def load_yaml(cls, path: str | Path, overrides: typing.Iterable[str] = ()) -> "Config":
        return cls.from_dict(read_yaml(path)).apply_overrides(overrides)

    def to_yaml(self) -> str:
        # through JSON, so that values YAML cannot represent (a dtype in a peft config) are text
        return dump_yaml(json.loads(json.dumps(self.to_dict(), default=str)))

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self


def default_config(name: str) -> Config:
    """The full default config of a registered method: its config class's defaults, and the
    settings of other sections the method starts from (`MethodConfig.defaults()`)."""
    cls = method_config_class(name)
    return Config(method=cls()).evolve(**cls.defaults())


def default_sft_config() -> Config:
    return default_config("sft")


def default_kto_config() -> Config:
    return default_config("kto")
