"""Messages from the dependencies that are known to be harmless here, silenced where they are
raised, one message at a time; everything else still shows.

- DeepSpeed logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were
  unable to detect it." when it is imported on a machine without a GPU, and accelerate imports
  it in every run (to unwrap models) whether DeepSpeed is used or not.
- accelerate logs "Removed shared tensor {'lm_head.weight'} while saving" at every checkpoint of
  a model whose output head is tied to its input embeddings: the tie is restored on loading.
  Only that message, for the output head; any other shared tensor is still reported.
- torch 2.13 deprecates the collectives DeepSpeed still calls (`all_gather_into_tensor`,
  `reduce_scatter_tensor`, ...) with a FutureWarning at every call: thousands per ZeRO-3 run.
- transformers warns that `is_gradient_checkpointing` is deprecated whenever peft reads it.
- The library truncates every example to `train.seq_length` itself, so transformers' "Token
  indices sequence length is longer than the specified maximum" is silenced for the library's
  own tokenizer when `train.seq_length` fits the model (`quiet_tokenizer`).
- transformers' "Loading weights" and "Writing model shards" bars, while the library itself
  loads or saves (`no_progress_bars`).

`install()` runs when trainer_lib is imported.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager

_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|"
                    r"_all_gather_base|_reduce_scatter_base)` is (deprecated|a private function)"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)
_LOG_MESSAGES = {
    "DeepSpeed": (r"^Setting accelerator to CPU\. If you have GPU or other accelerator, we were "
                  r"unable to detect it\.$",),
    # accelerate may put "[RANK 0] " in front
    "accelerate.utils.other": (r"^(\[RANK \d+\] )?Removed shared tensor "
                               r"\{'([\w.]+\.)?lm_head\.weight'\} while saving",),
}


class _DropMessages(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


_logging_done = False


def install() -> None:
    """Adds the filters; again after anything reset the warning filters (a
    `warnings.catch_warnings` block around the import, as pytest has)."""
    global _logging_done
    present = {(f[0], getattr(f[1], "pattern", None), f[2]) for f in warnings.filters}
    for category, pattern in _WARNINGS:
        if ("ignore", pattern, category) not in present:
            warnings.filterwarnings("ignore", message=pattern, category=category)
    if _logging_done:
        return
    _logging_done = True
    for name, patterns in _LOG_MESSAGES.items():
        # a logger's filters stay when the library configures it later (DeepSpeed adds its
        # handler and level at import, after this)
        logging.getLogger(name).addFilter(_DropMessages(patterns))


@contextmanager
def no_progress_bars():
    """transformers' progress bars off while the library loads or saves a model, then as they
    were."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def quiet_tokenizer(tokenizer, seq_length: int) -> None:
    """The library cuts every example to `seq_length` tokens after tokenising it whole; when
    that fits the model, transformers' warning about over-long token sequences is noise."""
    limit = getattr(tokenizer, "model_max_length", None)
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict) and limit and seq_length <= limit:
        flags["sequence-length-is-longer-than-the-specified-maximum"] = True
