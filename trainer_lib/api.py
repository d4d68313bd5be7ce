"""The one call: `train(samples=..., eval_prompts=..., metric_fn=..., config=...)`."""

from __future__ import annotations

from typing import Any, Callable, Optional

from trainer_lib import methods  # noqa: F401 - the built-in methods register themselves
from trainer_lib.config import Config, default_sft_config
from trainer_lib.errors import ConfigError
from trainer_lib.registry import get_trainer_class
from trainer_lib.runtime.quiet import install as install_quiet


def train(samples: Any = None, eval_prompts: Optional[list] = None,
          metric_fn: Optional[Callable] = None, config: Optional[Config] = None,
          model_path: Optional[str] = None, eval_samples: Any = None,
          callbacks: Optional[list] = None):
    """Trains a model and returns the trainer (its `.model`, `.tokenizer`, `.log_history`,
    `.save_pretrained(path)`).

    `samples`: a list, a `datasets.Dataset`, a path to a .json/.jsonl file, or a `Mixture` of
    such sources (or None, with `data.mixture` set in the config).
    `eval_samples`: validation samples for `eval/loss` (or set `train.eval_split`).
    `eval_prompts` and `metric_fn(samples, prompts, outputs, **metadata)`: generation-based
    evaluation every `train.eval_interval` steps.
    `model_path`, when given, overrides `config.model.model_path`.
    `callbacks`: `trainer_lib.Callback` objects called at points of the loop (EarlyStopping is
    one); see training/callbacks.py.
    """
    install_quiet()  # the dependencies' known-harmless noise (see runtime/quiet.py)
    if config is None:
        config = default_sft_config()
    if not isinstance(config, Config):
        raise ConfigError(f"config must be a trainer_lib Config, got {type(config).__name__}; "
                          "start from default_sft_config() or default_kto_config()")
    if model_path is not None:
        config = config.evolve(model=dict(model_path=model_path))
    trainer_cls = get_trainer_class(config.method)
    trainer = trainer_cls(config, samples=samples, eval_samples=eval_samples,
                          eval_prompts=eval_prompts, metric_fn=metric_fn, callbacks=callbacks)
    return trainer.train()
