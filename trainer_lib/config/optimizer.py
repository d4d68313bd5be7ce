"""Which optimiser and learning-rate schedule a config name means, checked when the config is
built so that a typo fails before anything loads.

Optimisers: any `torch.optim` class by name, any case, and "adafactor" for transformers'
Adafactor (as the HF Trainer names it). Schedules: transformers' `get_scheduler` names with
their own arguments, or a `torch.optim.lr_scheduler` class by name (trlX's "cosine_annealing").
"""

from __future__ import annotations

import inspect
import math

import torch

from trainer_lib.errors import ConfigError, did_you_mean

_UNUSABLE_OPTIMIZERS = {
    "lbfgs": "it needs a closure that re-evaluates the loss at every step",
    "sparseadam": "it takes only sparse gradients",
}
# schedules stepped with a metric, or built from callables or other schedulers
_UNUSABLE_SCHEDULES = {
    "reduce_lr_on_plateau": "it steps on a metric, not once per optimiser step",
    "greedy": "it steps on a metric, not once per optimiser step",
    "ReduceLROnPlateau": "it steps on a metric, not once per optimiser step",
    "LambdaLR": "its lr_lambda is a Python callable, which a config cannot hold",
    "MultiplicativeLR": "its lr_lambda is a Python callable, which a config cannot hold",
    "SequentialLR": "it is built from other scheduler objects",
    "ChainedScheduler": "it is built from other scheduler objects",
}
_TRLX_SCHEDULES = {"cosine_annealing": "CosineAnnealingLR"}  # trlX's names for torch classes
# arguments trainer_lib fills itself: the optimiser, the horizon, the resume position
_FILLED = {"self", "params", "optimizer", "num_warmup_steps", "num_training_steps", "last_epoch",
           "verbose"}
# torch scheduler arguments that mean "the length of the run": the run's optimiser steps
HORIZON_ARGS = ("T_max", "total_steps")


# --------------------------------------------------------------------------- optimisers


def _torch_optimizers() -> dict[str, type]:
    return {n.lower(): c for n, c in vars(torch.optim).items()
            if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
            and c is not torch.optim.Optimizer}


def optimizer_class(name: str) -> type:
    """The optimiser class a name stands for, or a ConfigError naming the valid ones."""
    key = name.strip()
    if key.lower() == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    qualified = key.lower().startswith("torch.optim.")
    key = key.lower().removeprefix("torch.optim.")
    found = _torch_optimizers()
    if not qualified:
        found.pop("adafactor", None)  # that name is transformers' (as in the HF Trainer)
    if key in _UNUSABLE_OPTIMIZERS:
        raise ConfigError(f"optimizer.name={name!r} cannot be used: {_UNUSABLE_OPTIMIZERS[key]}; "
                          "use e.g. 'adamw' or 'sgd'")
    if key not in found:
        valid = sorted(set(found) - set(_UNUSABLE_OPTIMIZERS) | {"adafactor"})
        raise ConfigError(f"optimizer.name={name!r} is not a torch.optim optimiser nor "
                          f"'adafactor'{did_you_mean(key, valid)} (valid, any case: {', '.join(valid)})")
    return found[key]


def accepted_arguments(fn) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(fn).parameters.items()
            if n not in _FILLED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _kind(param: inspect.Parameter) -> str | None:
    """What a keyword argument takes ("number", "bool", "string", "list"; None: anything), from
    its default or else its annotation."""
    default = param.default
    if default is not None and default is not inspect.Parameter.empty:
        for kind, types in (("bool", bool), ("number", (int, float)), ("string", str),
                            ("list", (tuple, list))):
            if isinstance(default, types):
                return kind
    kinds = set()
    for part in str(param.annotation).split("|"):
        part = part.strip().removeprefix("typing.")
        if part in ("None", "NoneType", "torch.Tensor", "Tensor"):
            continue
        head = part.split("[", 1)[0]
        kinds.add({"int": "number", "float": "number", "bool": "bool", "str": "string",
                   "Literal": "string", "list": "list", "tuple": "list", "Iterable": "list",
                   "collections.abc.Iterable": "list"}.get(head))
    return kinds.pop() if len(kinds) == 1 else None


def _check_value(where: str, value, kind: str | None) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"bool": isinstance(value, bool), "number": number, "string": isinstance(value, str),
          "list": isinstance(value, (list, tuple))}.get(kind, True)
    if value is not None and not ok:
        expected = {"bool": "true or false", "number": "a number", "string": "a string",
                    "list": "a list"}[kind]
        raise ConfigError(f"{where} must be {expected}, got {value!r}")


def _check_kwargs(section: str, owner: str, kwargs: dict, accepted: dict, extra=()) -> None:
    for key, value in kwargs.items():
        if key in extra:
            continue
        if key not in accepted:
            valid = sorted(set(accepted) | set(extra))
            raise ConfigError(f"{section}.kwargs.{key} is not an argument of {owner}"
                              f"{did_you_mean(key, valid)} (it takes: {', '.join(valid)})")
        _check_value(f"{section}.kwargs.{key}", value, _kind(accepted[key]))
        default = accepted[key].default
        if isinstance(default, tuple) and isinstance(value, (list, tuple)) \
                and len(value) != len(default):
            raise ConfigError(f"{section}.kwargs.{key} must hold {len(default)} values, like "
                              f"{owner}'s default {list(default)}; got {list(value)}")


# set for the device the run trains on, so not tried on the CPU at config time
_DEVICE_ARGUMENTS = ("fused", "foreach", "capturable")


def constructor_kwargs(cls: type, kwargs: dict) -> dict:
    """`optimizer.kwargs` as the optimiser's constructor takes them: lists as tuples (YAML and
    JSON have no tuples), and transformers' Adafactor on a learning rate of its own, as the HF
    Trainer runs it (the schedule then applies)."""
    out = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if cls.__name__ == "Adafactor" and cls.__module__.startswith("transformers"):
        out.setdefault("scale_parameter", False)
        out.setdefault("relative_step", False)
        out.setdefault("warmup_init", False)
    return out


def _try_optimizer(cls: type, owner: str, kwargs: dict) -> None:
    """Builds the optimiser over one small parameter, so that the values its constructor refuses
    (a beta of 1.5, a negative eps...) are found with the config, not once the model is loaded."""
    tried = {k: v for k, v in constructor_kwargs(cls, kwargs).items()
             if k not in _DEVICE_ARGUMENTS}
    try:
        cls([torch.nn.Parameter(torch.zeros(2, 2))], **tried)
    except Exception as e:  # noqa: BLE001 - whatever the constructor raises is said in one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"optimizer.kwargs {kwargs} are refused by {owner}: {message}") from None


def check_optimizer(cfg) -> None:
    """Config-time check: the optimiser exists and takes every keyword argument given."""
    cls = optimizer_class(cfg.name)
    accepted = accepted_arguments(cls.__init__)
    owner = ("transformers' Adafactor" if cls.__module__.startswith("transformers")
             else f"torch.optim.{cls.__name__}")
    # weight_decay is applied through the parameter groups; 0 suits every optimiser
    _check_kwargs("optimizer", owner, cfg.kwargs, accepted, ("weight_decay",))
    lr = cfg.kwargs.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                           or not math.isfinite(lr) or lr < 0):
        raise ConfigError(f"optimizer.kwargs.lr must be a non-negative number, got {lr!r}"
                          + ("; a learning rate must be finite"
                             if isinstance(lr, float) and not math.isfinite(lr) else ""))
    wd = cfg.kwargs.get("weight_decay", 0.0)
    if isinstance(wd, bool) or not (isinstance(wd, (int, float)) and wd >= 0):
        raise ConfigError(f"optimizer.kwargs.weight_decay must be a number >= 0, got {wd!r}")
    if wd and "weight_decay" not in accepted:
        raise ConfigError(f"optimizer.kwargs.weight_decay: {owner} takes no weight decay; set it "
                          "to 0 or pick an optimiser that has one")
    _try_optimizer(cls, owner, {k: v for k, v in cfg.kwargs.items()
                                if k != "weight_decay" or k in accepted})


def _torch_schedulers() -> dict[str, type]:
    base = torch.optim.lr_scheduler.LRScheduler
    return {n: c for n, c in vars(torch.optim.lr_scheduler).items()
            if isinstance(c, type) and issubclass(c, base) and not n.startswith("_")
            and c is not base}


def resolve_scheduler(name: str, kwargs: dict) -> tuple[str, object]:
    """("transformers", SchedulerType name) or ("torch", scheduler class) for a config name."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    hf_names = {t.value for t in TYPE_TO_SCHEDULER_FUNCTION}
    torch_names = _torch_schedulers()
    key = _TRLX_SCHEDULES.get(name, name).removeprefix("torch.optim.lr_scheduler.")
    if key in _UNUSABLE_SCHEDULES:
        raise ConfigError(f"scheduler.name={name!r} cannot be used: {_UNUSABLE_SCHEDULES[key]}")
    if key == "linear" and {"start_factor", "end_factor", "total_iters"} & set(kwargs):
        key = "LinearLR"  # trlX's "linear" is torch's LinearLR, told apart by its arguments
    if key.lower() in hf_names:
        key = key.lower()
        if key == "constant" and (kwargs.get("warmup_steps") or kwargs.get("warmup_ratio")):
            key = "constant_with_warmup"  # "constant" would drop the warmup in silence
        return "transformers", key
    by_lower = {n.lower(): c for n, c in torch_names.items()}
    if key.lower() in by_lower:
        return "torch", by_lower[key.lower()]
    valid = sorted(hf_names - set(_UNUSABLE_SCHEDULES))
    classes = sorted(set(torch_names) - set(_UNUSABLE_SCHEDULES))
    raise ConfigError(
        f"scheduler.name={name!r} is unknown{did_you_mean(name, valid + classes)} (transformers' "
        f"schedules: {', '.join(valid)}; or a torch.optim.lr_scheduler class: "
        f"{', '.join(classes)})")


def _warmup_keys(kwargs: dict) -> None:
    steps, ratio = kwargs.get("warmup_steps"), kwargs.get("warmup_ratio")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ConfigError(f"scheduler.kwargs.warmup_steps must be a whole number >= 0, got "
                          f"{steps!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 0 <= ratio <= 1):
        raise ConfigError(f"scheduler.kwargs.warmup_ratio must be a number within [0, 1], got "
                          f"{ratio!r}")
    if steps and ratio:
        raise ConfigError("scheduler.kwargs gives both warmup_steps and warmup_ratio; keep one")


def _hf_accepted(kind: str) -> tuple[dict, tuple]:
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    accepted = accepted_arguments(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(kind)])
    extra = ("warmup_steps", "warmup_ratio")
    if kind in ("linear", "cosine"):
        extra += ("min_lr_ratio",)  # trainer_lib's own floor, kept for existing configs
    return accepted, extra


def check_scheduler(cfg) -> None:
    """Config-time check: the schedule exists and takes every argument given, with the right
    types (`warmup_steps="10"` is refused here, not when the schedule is built)."""
    if not isinstance(cfg.name, str) or not cfg.name:
        raise ConfigError(f"scheduler.name must be a schedule name, got {cfg.name!r}")
    _warmup_keys(cfg.kwargs)
    source, what = resolve_scheduler(cfg.name, cfg.kwargs)
    if source == "transformers":
        accepted, extra = _hf_accepted(what)
        _check_kwargs("scheduler", f"the '{what}' schedule", cfg.kwargs, accepted, extra)
        _check_required(cfg.kwargs, accepted, f"the '{what}' schedule")
        ratio = cfg.kwargs.get("min_lr_ratio")
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
            raise ConfigError(f"scheduler.kwargs.min_lr_ratio must be within [0, 1), got {ratio!r}")
        return
    accepted = accepted_arguments(what.__init__)
    if cfg.kwargs.get("warmup_steps") or cfg.kwargs.get("warmup_ratio"):
        raise ConfigError(f"scheduler.kwargs: torch's {what.__name__} has no warmup; use one of "
                          "transformers' schedules with warmup (e.g. name='cosine') instead")
    _check_kwargs("scheduler", f"torch.optim.lr_scheduler.{what.__name__}", cfg.kwargs, accepted,
                  ("warmup_steps", "warmup_ratio"))
    _check_required(cfg.kwargs, accepted, f"torch's {what.__name__}")


def _check_required(kwargs: dict, accepted: dict, owner: str) -> None:
    missing = [n for n, p in accepted.items() if p.default is inspect.Parameter.empty
               and n not in kwargs and n not in HORIZON_ARGS]
    if missing:
        raise ConfigError(f"scheduler.kwargs must give {', '.join(missing)} for {owner}")
