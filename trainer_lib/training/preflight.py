"""Checks that run before the model loads, so that a mistake costs seconds: settings that can only
be judged together, the eval prompts and generation settings, the output folders. They run on the
main process and an error there is raised on every process.
"""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from trainer_lib.config import Config, ConfigError
from trainer_lib.model.loading import check_attn_implementation, check_num_layers_unfrozen
from trainer_lib.runtime.processes import on_main_process
from trainer_lib.training.callbacks import EarlyStopping
from trainer_lib.training.evaluation import check_eval_inputs, check_gen_kwargs
from trainer_lib.training.optim import build_scheduler


def check_run(config: Config, accelerator, has_eval_data: bool, eval_prompts: Any,
              metric_fn: Any, callbacks: Any = ()) -> Any:
    """Everything that can be judged from the settings and the call alone; returns the model's
    config (read with transformers.AutoConfig, None when it cannot be read here)."""
    def checks():
        check_eval_inputs(eval_prompts, metric_fn)
        check_gen_kwargs(config.method.gen_kwargs)
        check_save_best(config, has_eval_data, metric_fn)
        check_early_stopping(callbacks, has_eval_data, metric_fn)
        check_learning_rate(config)
        check_schedule(config)
        check_attn_implementation(config.model.attn_implementation)
        check_writable(config.train.checkpoint_dir, "train.checkpoint_dir")
        if config.train.tracker is not None:
            check_writable(config.train.logging_dir, "train.logging_dir")
        model_config = read_model_config(config)
        check_seq_length(config, model_config)
        check_layers(config, model_config)
        return model_config

    return on_main_process(accelerator, checks)


def check_save_best(config: Config, has_eval_data: bool, metric_fn: Any) -> None:
    name = config.train.save_best
    if name:
        check_logged(f"train.save_best={name!r}", name, has_eval_data, metric_fn,
                     "best/ would never be written", "e.g. 'loss'")


def check_early_stopping(callbacks: Any, has_eval_data: bool, metric_fn: Any) -> None:
    """The figure each EarlyStopping watches (from `callbacks=` or `train.early_stopping`) is
    logged by this run's evaluations."""
    for callback in callbacks:
        if isinstance(callback, EarlyStopping):
            check_logged(callback.setting, callback.metric, has_eval_data, metric_fn,
                         "the run would never stop early", "an evaluation figure")


def check_logged(setting: str, name: str, has_eval_data: bool, metric_fn: Any,
                 consequence: str, alternative: str) -> None:
    """A figure a setting watches can be logged in this run: `eval/*` needs evaluation data,
    `metrics/*` a metric_fn."""
    if name.startswith("eval/") and not has_eval_data:
        raise ConfigError(
            f"{setting} but the run has no evaluation data, so {name} is never logged and "
            f"{consequence}: pass eval_samples= to train() (or --eval-data), set "
            f"train.eval_split, or name a figure that is logged, {alternative}")
    if name.startswith("metrics/") and metric_fn is None:
        raise ConfigError(
            f"{setting} but no metric_fn is given, so no metrics/* figure is ever logged and "
            f"{consequence}: pass metric_fn= (and eval_prompts=) to train(), or name a figure "
            f"that is logged, {alternative}")


def check_learning_rate(config: Config) -> None:
    if config.optimizer.kwargs.get("lr", 1) == 0:
        warnings.warn("optimizer.kwargs.lr is 0: the weights will not change; set a positive "
                      "learning rate to train", stacklevel=3)


# the steps a schedule is tried for: enough for what fails at a step, in a fraction of a second
_SCHEDULE_TRIAL_STEPS = 10_000


def check_schedule(config: Config) -> None:
    """Builds the schedule on a stand-in optimiser and steps it through the run, so that settings
    that fail only when used (a StepLR step_size of 0, cosine_with_min_lr without its floor) are
    found before the model loads."""
    lr = config.optimizer.kwargs.get("lr")  # the run's: a schedule may be judged against it
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))],
                                lr=1e-3 if lr is None else lr)
    total = config.train.total_steps
    where = (f"scheduler.name={config.scheduler.name!r} with "
             f"scheduler.kwargs={config.scheduler.kwargs}")
    step = 0
    try:
        scheduler = build_scheduler(optimizer, config.scheduler, total)
        for step in range(1, min(total, _SCHEDULE_TRIAL_STEPS) + 1):
            optimizer.step()
            scheduler.step()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - said in one line, with the setting
        when = f"fails at step {step}" if step else "cannot be built"
        raise ConfigError(f"{where} {when}: {type(e).__name__}: {e}; change the schedule's "
                          "arguments") from None


def check_writable(folder: str | Path, setting: str) -> None:
    """The folder exists or can be made, and a file can be written in it."""
    path = Path(folder)
    fix = f"set {setting} to a folder you can write to"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{setting}={str(folder)!r} is a file, not a folder; {fix}")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{setting}={str(folder)!r} cannot be made: {blocker} is a file; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".trainer_lib-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{setting}={str(folder)!r} is not writable ({e.strerror or e}); "
                          f"{fix}") from None


def read_model_config(config: Config) -> Optional[Any]:
    """The model's config.json, without loading weights (None when it cannot be read: loading
    the model says why later)."""
    path = config.model.model_path
    if not path:
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    except Exception:  # noqa: BLE001
        return None


def check_layers(config: Config, model_config: Any) -> None:
    """`model.num_layers_unfrozen` against the layers the model's config declares."""
    if model_config is None or config.model.num_layers_unfrozen < 0:
        return
    text = getattr(model_config, "get_text_config", lambda: model_config)()
    layers = getattr(text, "num_hidden_layers", None)
    if isinstance(layers, int):
        check_num_layers_unfrozen(config.model.num_layers_unfrozen, layers)


def check_seq_length(config: Config, model_config: Any) -> None:
    """`train.seq_length` against the model's positions: an error for learned (absolute)
    position embeddings, which have no row past the limit; a warning for rotary ones, which run
    past it but were never trained there."""
    if model_config is None:
        return
    text = getattr(model_config, "get_text_config", lambda: model_config)()
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    seq = config.train.seq_length
    if not isinstance(limit, int) or seq <= limit:
        return
    message = (f"train.seq_length={seq} is above the model's max_position_embeddings={limit}")
    rotary = any(getattr(text, k, None) for k in ("rope_parameters", "rope_scaling", "rope_theta"))
    if rotary:
        warnings.warn(f"{message}: the model uses rotary positions, which run past it but were "
                      f"never trained there; lower train.seq_length to {limit}, or extend the "
                      "model's context (rope_scaling) first", stacklevel=3)
        return
    raise ConfigError(f"{message}, and its position embeddings end there; lower "
                      f"train.seq_length to {limit} or less")
