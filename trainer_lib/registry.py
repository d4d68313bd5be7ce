"""Which trainer runs which method: a registry keyed by the method-config class.

Trainers register themselves with a visible decorator in their own module, and
`trainer_lib.trainers` imports every built-in trainer module explicitly, so the full list of
built-in methods is readable in one place.
"""

from __future__ import annotations

_TRAINERS: dict[type, type] = {}


def register_trainer(method_config_cls: type):
    """Class decorator: `@register_trainer(SFTConfig) class SFTTrainer(Trainer): ...`."""

    def decorate(trainer_cls: type) -> type:
        _TRAINERS[method_config_cls] = trainer_cls
        return trainer_cls

    return decorate


def get_trainer_class(method_config: object) -> type:
    for cls in type(method_config).__mro__:
        if cls in _TRAINERS:
            return _TRAINERS[cls]
    known = ", ".join(sorted(c.__name__ for c in _TRAINERS)) or "none"
    raise ValueError(
        f"no trainer is registered for {type(method_config).__name__}; registered method "
        f"configs: {known}. Decorate a Trainer subclass with @register_trainer("
        f"{type(method_config).__name__})."
    )
