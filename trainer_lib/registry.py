"""The one registry of methods: a name, its config class and its trainer.

`@register_trainer(ConfigClass)` registers a method under its config's `name`; registered methods
are what `Config.from_dict`, YAML files, `default_config(name)` and the command line accept.
Installed packages declare theirs under the entry-point group `trainer_lib.methods`, loaded when
an unknown name is first asked for.
"""

from __future__ import annotations

from importlib import metadata

from trainer_lib.errors import ConfigError, did_you_mean

ENTRY_POINT_GROUP = "trainer_lib.methods"

_CONFIGS: dict[str, type] = {}  # method name -> its config class
_TRAINERS: dict[type, type] = {}  # config class -> its trainer class
_entry_points_loaded = False


def method_name(config_cls: type) -> str:
    """The name a method config class gives its method (the default of its `name` field)."""
    fields = getattr(config_cls, "__dataclass_fields__", {})
    name = fields["name"].default if "name" in fields else None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{config_cls.__name__} cannot be registered: a method config is a "
                          "dataclass (subclass MethodConfig) with a field `name: str = "
                          "\"<method name>\"` naming the method")
    return name


def register_trainer(method_config_cls: type):
    """Class decorator: `@register_trainer(SFTConfig) class SFTTrainer(Trainer): ...`."""
    name = method_name(method_config_cls)
    taken = _CONFIGS.get(name)
    if taken is not None and _where(taken) != _where(method_config_cls):
        raise ConfigError(f"the method name '{name}' of {_where(method_config_cls)} is taken by "
                          f"{_where(taken)}; give the config's `name` field another default")

    def decorate(trainer_cls: type) -> type:
        if taken is not None:  # the same class defined again (a re-run notebook cell)
            _TRAINERS.pop(taken, None)
        _CONFIGS[name] = method_config_cls
        _TRAINERS[method_config_cls] = trainer_cls
        return trainer_cls

    return decorate


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def method_names() -> list[str]:
    return sorted(_CONFIGS)


def method_config_class(name: str) -> type:
    """The config class of the method called `name`; installed packages' entry points are
    loaded when the name is not registered yet."""
    if name not in _CONFIGS:
        load_entry_points()
    if name not in _CONFIGS:
        known = method_names()
        hint = did_you_mean(name, known, cutoff=0.5) or f"; registered methods: {', '.join(known)}"
        raise ConfigError(
            f"unknown method '{name}'{hint}. A method of your own is registered with "
            f"@register_trainer(YourConfig) in a module that is imported first (on the command "
            f"line: trainer-lib --import YOUR_MODULE {name} ...), or by a package's entry point "
            f"in the group '{ENTRY_POINT_GROUP}'")
    return _CONFIGS[name]


def load_entry_points() -> None:
    """Imports every module installed packages declare under `trainer_lib.methods` (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as e:  # noqa: BLE001 - said with the entry point that failed
            raise ConfigError(f"the method entry point '{entry.name} = {entry.value}' (group "
                              f"'{ENTRY_POINT_GROUP}') cannot be imported: "
                              f"{type(e).__name__}: {e}") from e


def get_trainer_class(method_config: object) -> type:
    for cls in type(method_config).__mro__:
        if cls in _TRAINERS:
            return _TRAINERS[cls]
    name = type(method_config).__name__
    known = ", ".join(sorted(c.__name__ for c in _TRAINERS)) or "none"
    raise ConfigError(
        f"no trainer is registered for {name}; registered method configs: {known}. Decorate a "
        f"Trainer subclass with @register_trainer({name}).")

