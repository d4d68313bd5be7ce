"""Every error a user may catch, in one place, and the one way a message suggests a valid name.

Mistakes found before training (settings, data, checkpoints) are ConfigError, DataError or
CheckpointError; failures of a running run are NonFiniteLossError and CheckpointWriteError.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Optional


class ConfigError(ValueError):
    """A configuration value or key that cannot be used."""


class DataError(ValueError):
    """A sample that cannot be trained on; the message names the sample, the field and the fix."""


class ChatError(DataError):
    """A conversation or chat template that cannot be used; the message names the sample and the fix."""


class KTODataError(DataError):
    """A KTO sample that cannot be used; the message names the sample and the field."""


class EvalPromptError(DataError):
    """`eval_prompts` (or `metric_fn`) that cannot be used; the message names the prompt."""


class MetricFnError(RuntimeError):
    """`metric_fn` raised, or returned something that is not {name: float | [float per sample]}."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, incomplete, damaged, unsafe to load, or
    written by another run. The message names the folder, the file or setting, and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds objects that loading would have to execute."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a folder that became read-only...). The
    message names the folder, the space needed and free, and the checkpoint that is intact."""


class NonFiniteLossError(FloatingPointError):
    """A step's loss or gradient norm was NaN or infinite (and not allowed to be skipped)."""


def closest(word: str, choices: Iterable[str], cutoff: float = 0.6) -> Optional[str]:
    """The valid name closest to a mistyped one, if any is close enough."""
    found = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=cutoff)
    return found[0] if found else None


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """`"; did you mean 'x'?"` for the closest valid name, or "" when none is close."""
    close = closest(word, choices, cutoff)
    return f"; did you mean '{close}'?" if close else ""
