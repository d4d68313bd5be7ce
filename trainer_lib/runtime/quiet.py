"""Messages from the dependencies that are known to be harmless here, silenced one by one, by
their exact text, where they are raised; everything else still shows. `install()` runs when
trainer_lib is imported."""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager

_WARNINGS = (
    # torch deprecates the collectives DeepSpeed still calls, at every call: thousands per run
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|"
                    r"_all_gather_base|_reduce_scatter_base)` is (deprecated|a private function)"),
    # peft reads transformers' deprecated attribute in every LoRA run
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # FSDP2 warns that a model output returned as a view must not be changed in place; the
    # trainer never changes one (it reads the last hidden states and computes from them)
    (UserWarning, r"^FSDP2-wrapped module \(\w+\) returned a view tensor\."),
)
_LOG_MESSAGES = {
    # said on every machine without a GPU, since accelerate imports DeepSpeed in every run
    "DeepSpeed": (r"^Setting accelerator to CPU\. If you have GPU or other accelerator, we were "
                  r"unable to detect it\.$",),
    # at every checkpoint of a model whose head is tied to its embeddings (the tie is restored on
    # loading); only that tensor: any other shared one is still reported. "[RANK 0] " may lead
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
