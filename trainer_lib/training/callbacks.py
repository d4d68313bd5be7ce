"""Callbacks: the user's code at named points of the loop, early stopping, and stop requests.

Every hook runs on every process, so a callback that decides from the logged figures (which every
process holds alike) decides the same everywhere. A stop, asked with `trainer.stop_training` or by
a callback that raises, ends the run after the current step on every process: once the step's
hooks have run, the processes agree on it (`Callbacks.settle`) with one small all-reduce, made
only when several processes run callbacks of the user's own; early stopping decides alike
everywhere and needs none. A stop asked outside a hook rides on the next step's all-reduce, as
Ctrl-C does.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional

from accelerate.utils import gather_object

from trainer_lib.config.sections import EarlyStoppingConfig
from trainer_lib.errors import ConfigError, did_you_mean
from trainer_lib.runtime.processes import portable_error, reduce_sum

HOOKS = ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")


class Callback:
    """Subclass and define the hooks you need; each is called on every process (compare
    `trainer.accelerator.is_main_process` for work that one process should do).

    - `on_train_begin(trainer)`: before the first step (after a resume: once restored).
    - `on_step_end(trainer)`: after each optimiser step; `trainer.step` is its number.
    - `on_log(trainer, logs)`: after each logged entry (training figures, evaluation, the stop
      reason) has gone to the trackers; `logs` holds its figures and `"step"`.
    - `on_evaluate(trainer, metrics)`: after each evaluation, with its figures (`eval/*`,
      `metrics/*`).
    - `on_save(trainer, path)`: after a checkpoint (or `best/`) is complete on disk.
    - `on_train_end(trainer)`: once training has ended, normally or by `stop_training`.

    `state_dict()` / `load_state_dict(state)`: what the callback keeps across a resume (saved in
    each checkpoint's trainer state, as plain JSON data).
    """

    def on_train_begin(self, trainer) -> None:
        pass

    def on_step_end(self, trainer) -> None:
        pass

    def on_log(self, trainer, logs: dict) -> None:
        pass

    def on_evaluate(self, trainer, metrics: dict) -> None:
        pass

    def on_save(self, trainer, path) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EarlyStopping(Callback):
    """Stops the run once `metric` has not improved for `patience` evaluations in a row; an
    improvement beats the best value so far by more than `min_delta` (lower is better with
    `mode="min"`). A NaN value is no improvement. Its best value and count are saved in each
    checkpoint, so a resumed run keeps its patience."""

    # it decides from the logged figures, which every process holds alike: its stop (or error)
    # is the same on every process without an exchange
    same_on_every_process = True

    def __init__(self, metric: str = "eval/loss", patience: int = 3, mode: str = "min",
                 min_delta: float = 0.0):
        self.settings = EarlyStoppingConfig(metric, patience, mode, min_delta)
        self.settings.validate("EarlyStopping")
        self.setting = f"EarlyStopping(metric={metric!r})"  # how messages name its metric
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.evaluations_without_improvement = 0

    @classmethod
    def from_config(cls, settings: EarlyStoppingConfig) -> "EarlyStopping":
        """The callback of the `train.early_stopping` section."""
        callback = cls(settings.metric, settings.patience, settings.mode, settings.min_delta)
        callback.setting = f"train.early_stopping.metric={settings.metric!r}"
        return callback

    @property
    def metric(self) -> str:
        return self.settings.metric

    def __repr__(self) -> str:
        s = self.settings
        return (f"EarlyStopping(metric={s.metric!r}, patience={s.patience}, mode={s.mode!r}, "
                f"min_delta={s.min_delta})")

    def on_evaluate(self, trainer, metrics: dict) -> None:
        s = self.settings
        if s.metric not in metrics:
            names = sorted(metrics)
            raise ConfigError(
                f"{self.setting}: the evaluation at step {trainer.step} logs no {s.metric!r} "
                f"(it logs {', '.join(names)}){did_you_mean(s.metric, names)}")
        value = float(metrics[s.metric])
        if self.improves(value):
            self.best, self.best_step = value, trainer.step
            self.evaluations_without_improvement = 0
            return
        self.evaluations_without_improvement += 1
        if self.evaluations_without_improvement >= s.patience:
            best = (f"its best, {self.best:.6g}, was at step {self.best_step}"
                    if self.best is not None else "it has never been finite")
            trainer.stop_training(f"early stopping: {s.metric} has not improved for "
                                  f"{self.evaluations_without_improvement} evaluation(s); {best}")

    def improves(self, value: float) -> bool:
        s = self.settings
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return (value < self.best - s.min_delta if s.mode == "min"
                else value > self.best + s.min_delta)

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.settings.mode, "best": self.best,
                "best_step": self.best_step,
                "evaluations_without_improvement": self.evaluations_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        # a count kept for another figure or direction would mean nothing here
        if state.get("metric") == self.metric and state.get("mode") == self.settings.mode:
            self.best, self.best_step = state.get("best"), state.get("best_step")
            self.evaluations_without_improvement = state.get("evaluations_without_improvement", 0)


class Callbacks:
    """The run's callbacks, called in order at each hook, and the stop they may ask for.

    An exception in a hook is kept, not raised at once: raised on one process only, it would
    leave the others waiting in the next collective. The step's `settle` tells every process, as
    it does a stop request; every process then leaves the loop and raises it (`agreed_error`),
    and no later hook runs.
    """

    def __init__(self, callbacks: Any = None):
        self.callbacks = check_callbacks(callbacks)
        self.stop_reason: Optional[str] = None  # asked on this process
        self.stop_alike = False  # asked by a callback that decides alike on every process
        self.error: Optional[BaseException] = None  # raised by a hook on this process
        self.halted = False
        self._calling: Optional[Callback] = None

    def add(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def __iter__(self):
        return iter(self.callbacks)

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:  # the first reason given is the one recorded
            self.stop_reason = str(reason)
            self.stop_alike = _alike(self._calling)

    def call(self, hook: str, trainer, *args) -> None:
        if self.error is not None or self.halted:
            return  # the run is ending: nothing more of the user's code runs
        for callback in self.callbacks:
            self._calling = callback
            try:
                getattr(callback, hook)(trainer, *args)
            except Exception as e:  # noqa: BLE001 - raised on every process by agreed_error
                if hasattr(e, "add_note"):  # Python 3.11+: said under the traceback
                    e.add_note(f"raised by {type(callback).__name__}.{hook} at step "
                               f"{trainer.step}")
                self.error = e
                return
            finally:
                self._calling = None

    def settle(self, accelerator, carried: Optional[str]) -> Optional[str]:
        """How this step ends, the same on every process: "error" (a hook raised), "request" (a
        stop was asked) or None. `carried` is what the step's all-reduce said (asked before
        it); what this step's hooks asked is added here, by one small all-reduce when several
        processes run callbacks of the user's own, which may decide differently on each."""
        asked = [self.stop_reason is not None, self.error is not None]
        if accelerator.num_processes > 1:
            if any(not _alike(cb) for cb in self.callbacks):
                asked = [v > 0 for v in reduce_sum(accelerator, asked).tolist()]
            else:  # early stopping only: it decides alike everywhere; a stop asked on one
                # process outside a hook reaches the others in the next step's all-reduce
                asked[0] = asked[0] and self.stop_alike
        if carried == "error" or asked[1]:
            return "error"
        if carried == "request" or asked[0]:
            return "request"
        return None

    def halt(self) -> None:
        """No hook runs from now on (a callback raised on some process: the run is ending)."""
        self.halted = True

    def agreed_reason(self, accelerator) -> Optional[str]:
        """The stop reason every process records: the first process's that asked (one exchange,
        made once the step's all-reduce has told every process that a stop was asked)."""
        if accelerator.num_processes == 1:
            return self.stop_reason
        return next((r for r in gather_object([self.stop_reason]) if r is not None), None)

    def agreed_error(self, accelerator) -> Optional[BaseException]:
        """The callback error to raise on this process once the loop is over: its own, with its
        traceback, or the first other process's (same type and message); one exchange."""
        if accelerator.num_processes == 1:
            return self.error
        mine = None if self.error is None else portable_error(self.error)
        failed = next((e for e in gather_object([mine]) if e is not None), None)
        if self.error is not None or failed is None:
            return self.error
        kind, message = failed
        try:
            return kind(message)
        except Exception:  # noqa: BLE001 - a type that does not take one message
            return RuntimeError(message)

    def state_dict(self) -> dict:
        """Each callback's state under its class name (numbered when a class comes twice)."""
        return {key: cb.state_dict() for key, cb in self._keyed()}

    def load_state_dict(self, states: dict) -> None:
        for key, callback in self._keyed():
            if key in states:
                callback.load_state_dict(states[key])

    def _keyed(self) -> list[tuple[str, Callback]]:
        seen: dict[str, int] = {}
        out = []
        for callback in self.callbacks:
            name = type(callback).__name__
            seen[name] = seen.get(name, 0) + 1
            out.append((name if seen[name] == 1 else f"{name}-{seen[name]}", callback))
        return out


def _alike(callback: Optional[Callback]) -> bool:
    return bool(getattr(callback, "same_on_every_process", False))


def check_callbacks(callbacks: Any) -> list[Callback]:
    """The `callbacks=` argument as a list of Callback objects; a class is instantiated (as the
    HF Trainer does), anything else, or a hook name this loop never calls, is an error."""
    if callbacks is None:
        return []
    if isinstance(callbacks, (Callback, type)):
        callbacks = [callbacks]
    if not isinstance(callbacks, (list, tuple)):
        raise ConfigError(f"callbacks must be a list of trainer_lib.Callback objects, got "
                          f"{type(callbacks).__name__}")
    out = []
    for i, cb in enumerate(callbacks):
        if isinstance(cb, type) and issubclass(cb, Callback):
            cb = cb()
        if not isinstance(cb, Callback):
            kind = ("a function" if inspect.isroutine(cb)
                    else f"a class ({cb.__name__})" if isinstance(cb, type)
                    else f"a {type(cb).__name__}")
            raise ConfigError(
                f"callbacks[{i}] is {kind}, not a trainer_lib.Callback: subclass Callback and "
                f"define any of {', '.join(HOOKS)}")
        for name in dir(type(cb)):
            if name.startswith("on_") and name not in HOOKS and callable(getattr(cb, name)):
                raise ConfigError(
                    f"callbacks[{i}] ({type(cb).__name__}) defines {name}, which is never "
                    f"called{did_you_mean(name, HOOKS) or ''}; the hooks are {', '.join(HOOKS)}")
        out.append(cb)
    return out
