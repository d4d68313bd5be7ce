"""The config sections: plain dataclasses, each validating its own values."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from trainer_lib.config.optimizer import check_optimizer, check_scheduler
from trainer_lib.config.trackers import TRACKER_NAMES, tracker_names
from trainer_lib.errors import ConfigError, did_you_mean
from trainer_lib.model.lora import build_lora_config


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
        # the adapter's settings are peft's to judge, here rather than once the model is loaded
        lora = build_lora_config(self.peft_config) if self.peft_config is not None else None
        if lora is not None and self.num_layers_unfrozen != -1:
            raise ConfigError("model.peft_config and model.num_layers_unfrozen both limit what "
                              "trains; set one (num_layers_unfrozen=-1 with LoRA)")


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
        check_scheduler(self)


@dataclass
class EarlyStoppingConfig:
    """`train.early_stopping`: stop once `metric` has not improved for `patience` evaluations in a
    row (an improvement beats the best so far by more than `min_delta`)."""

    metric: str = "eval/loss"  # an evaluation figure: eval/<name> or metrics/<name>
    patience: int = 3
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0

    def validate(self, where: str = "train.early_stopping") -> None:
        if not isinstance(self.metric, str) or not self.metric.startswith(("eval/", "metrics/")):
            raise ConfigError(
                f"{where}.metric must name an evaluation figure, 'eval/<name>' (e.g. "
                f"'eval/loss') or 'metrics/<name>' (from metric_fn), got {self.metric!r}: "
                "early stopping counts evaluations without improvement")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) \
                or self.patience < 1:
            raise ConfigError(f"{where}.patience must be a whole number of evaluations, at "
                              f"least 1, got {self.patience!r}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"{where}.mode must be 'min' (lower is better, as for a loss) or "
                              f"'max', got {self.mode!r}")
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float)) \
                or not self.min_delta >= 0:
            raise ConfigError(f"{where}.min_delta must be a number >= 0 (how much better than "
                              f"the best a value must be to count), got {self.min_delta!r}")


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
    # None, or {metric, patience, mode, min_delta}: stop when an evaluation figure stops improving
    early_stopping: Optional[EarlyStoppingConfig] = None
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
    # FSDP2 (torch's fully_shard) under a launcher: True, or a dict of accelerate's
    # FullyShardedDataParallelPlugin settings (reshard_after_forward, cpu_offload, ...); an
    # accelerate FSDP config (configs/accelerate/fsdp2.yaml) does the same without it
    fsdp: Any = None
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
        if self.fsdp is not None and not isinstance(self.fsdp, (bool, dict)):
            raise ConfigError("train.fsdp must be true, false, or a dict of FSDP2 settings "
                              f"(e.g. {{reshard_after_forward: true}}); got {self.fsdp!r}")
        if self.fsdp and self.deepspeed_config is not None:
            raise ConfigError("train.fsdp and train.deepspeed_config both shard the model: "
                              "set one")
        if self.early_stopping is not None:
            self.early_stopping.validate()
        tracker_names(self.tracker)
        for name, kwargs in self.tracker_kwargs.items():
            if name not in TRACKER_NAMES or not isinstance(kwargs, dict):
                raise ConfigError(f"train.tracker_kwargs maps a tracker name "
                                  f"({', '.join(TRACKER_NAMES)}) to its keyword arguments; got "
                                  f"{name!r}: {kwargs!r}{did_you_mean(name, TRACKER_NAMES)}")


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
    # a weighted mixture to train on instead of `samples`: [{name, path, weight}, ...], each
    # epoch drawing weight / (sum of weights) of its examples from each source
    mixture: Optional[list] = None
    mixture_seed: Optional[int] = None  # the draws' seed; None: train.seed
    # examples in an epoch of the mixture; None: as many as its sources hold together
    examples_per_epoch: Optional[int] = None

    def validate(self) -> None:
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError("data.num_proc must be at least 1, or None for the CPU cores available")
        if self.stream_buffer < 1:
            raise ConfigError("data.stream_buffer must be at least 1")
        if self.mixture is not None:
            check_mixture(self.mixture)
            if self.streaming:
                raise ConfigError("data.mixture draws its share from every whole source, which a "
                                  "stream does not have; set data.streaming=false")
        if self.examples_per_epoch is not None and self.examples_per_epoch < 1:
            raise ConfigError("data.examples_per_epoch must be at least 1, or null for as many "
                              "as the mixture's sources hold together")


MIXTURE_KEYS = ("name", "path", "weight")


def check_mixture(entries: list) -> None:
    """`data.mixture`: a list of {name, path, weight} (weight optional: 1), names unique."""
    if not entries:
        raise ConfigError("data.mixture is empty: list its sources, each {name: ..., path: ..., "
                          "weight: ...}, or set it to null")
    seen = set()
    for i, entry in enumerate(entries):
        where = f"data.mixture[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be {{name: ..., path: ..., weight: ...}}, got "
                              f"{entry!r}")
        for key in entry:
            if key not in MIXTURE_KEYS:
                hint = (did_you_mean(key, MIXTURE_KEYS)
                        or f"; its keys are {', '.join(MIXTURE_KEYS)}")
                raise ConfigError(f"unknown key '{where}.{key}'{hint}")
        for key in ("name", "path"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                what = " (a .json/.jsonl/.parquet file or a hub name)" if key == "path" else ""
                raise ConfigError(f"{where}.{key} must be a non-empty string{what}, got "
                                  f"{entry.get(key)!r}")
        if entry["name"] in seen:
            raise ConfigError(f"{where}.name '{entry['name']}' is used twice; give every source "
                              "its own name")
        seen.add(entry["name"])
        weight = entry.get("weight", 1.0)
        if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
                or not math.isfinite(weight) or weight <= 0):
            raise ConfigError(f"{where}.weight must be a number > 0, got {weight!r} (leave a "
                              "source out to not use it)")


@dataclass
class MethodConfig:
    """The base of every method's config (`config.method`): generation settings for evaluation
    and the loss's chunking. A method's subclass adds a `name` field, whose default names the
    method, and may override `defaults()`."""

    gen_kwargs: dict = field(default_factory=lambda: dict(max_new_tokens=64, do_sample=False))
    stop_sequences: list = field(default_factory=list)
    # Tokens per chunk in the cross-entropy over the vocabulary (bounds the logits memory);
    # None: about 2**25 / vocabulary tokens, so a chunk's float32 logits take 128 MiB.
    loss_chunk_size: Optional[int] = None
    # A mixture-of-experts model's load-balancing loss is added with this coefficient (logged
    # as aux_loss); None: the model config's router_aux_loss_coef; 0: not added.
    router_aux_loss_coef: Optional[float] = None

    def validate(self) -> None:
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ConfigError("method.loss_chunk_size must be at least 1")
        bad = [s for s in self.stop_sequences if not isinstance(s, str) or not s]
        if bad:
            raise ConfigError(f"method.stop_sequences must be a list of non-empty strings, got "
                              f"{bad[0]!r} in {self.stop_sequences!r}")
        if self.router_aux_loss_coef is not None and not self.router_aux_loss_coef >= 0:
            raise ConfigError("method.router_aux_loss_coef must be >= 0 (0: no load-balancing "
                              "loss), or None for the model config's own coefficient; got "
                              f"{self.router_aux_loss_coef}")

    @classmethod
    def defaults(cls) -> dict:
        """Settings of the other sections this method starts from (`default_config(name)`),
        as nested dicts, e.g. {"optimizer": {"kwargs": {"lr": 5e-6}}}."""
        return {}
