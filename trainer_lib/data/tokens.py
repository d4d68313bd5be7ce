"""Pre-tokenised samples: token ids and loss masks checked before anything trains on them.

Ids are used exactly as given (nothing is added: no BOS, no EOS), so every id must be one of the
tokenizer's, and every mask or `labels` must line up with the ids token for token. Each error
names the sample, the field and the fix; a method's own forms (methods/<name>/samples.py) are
built on these checks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer_lib.errors import DataError
from trainer_lib.ops.cross_entropy import IGNORE_INDEX

# the masks TRL's processed datasets carry: 1 where the token carries loss, 0 where not
LOSS_MASKS = ("completion_mask", "assistant_masks")
_IDS_HINT = "token ids from the model's tokenizer, e.g. tokenizer(text)['input_ids']"


def _preview(value: Any, limit: int = 50) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _integers(value: Any, index: int, field: str, error: type, what: str,
              booleans: bool = False) -> list[int]:
    """`value` as a list of Python ints; floats are refused, and booleans unless `booleans`
    (a mask may be written true/false)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise error(f"sample {index}: field '{field}' is a {type(value).__name__} "
                    f"({_preview(value)}); expected a list of {what}")
    out = []
    for position, item in enumerate(value):
        if isinstance(item, np.integer) or (booleans and isinstance(item, (bool, np.bool_))):
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int):
            raise error(f"sample {index}: field '{field}' holds {_preview(item)} at position "
                        f"{position}; expected a list of {what}")
        out.append(item)
    return out


def token_ids(value: Any, index: int, field: str, vocab_size: int,
              error: type = DataError) -> list[int]:
    """A non-empty list of ids, each in [0, vocab_size)."""
    ids = _integers(value, index, field, error, _IDS_HINT)
    if not ids:
        raise error(f"sample {index}: field '{field}' is empty; give at least one token id, or "
                    "remove the sample")
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise error(f"sample {index}: field '{field}' holds {bad} at position {ids.index(bad)}, "
                    f"outside the tokenizer's vocabulary (ids 0 to {vocab_size - 1}); tokenise "
                    "with the model's own tokenizer (tokenizer.tokenizer_path), or fix the id")
    return ids


def loss_labels(sample: dict, ids: list[int], index: int, error: type = DataError) -> list[int]:
    """The labels of pre-tokenised ids: the ids, -100 where a given mask says 0 or the given
    `labels` say -100. Several given: a token carries loss only where all of them say so (as TRL
    combines `completion_mask` and `assistant_masks`). None given: loss on every token."""
    keep = [True] * len(ids)
    for field in LOSS_MASKS:
        if sample.get(field) is None:
            continue
        mask = _integers(sample[field], index, field, error, "0 and 1, one per token", True)
        _same_length(mask, ids, index, field, error, "one value per token (1 = loss, 0 = none)")
        for position, value in enumerate(mask):
            if value not in (0, 1):
                raise error(f"sample {index}: field '{field}' holds {value} at position "
                            f"{position}; a mask holds 1 (the token carries loss) or 0 (not)")
            keep[position] = keep[position] and value == 1
    if sample.get("labels") is not None:
        labels = _integers(sample["labels"], index, "labels", error, "token ids and -100")
        _same_length(labels, ids, index, "labels", error,
                     "the input_ids, aligned (not shifted), with -100 where there is no loss")
        for position, (label, token) in enumerate(zip(labels, ids)):
            if label != IGNORE_INDEX and label != token:
                raise error(f"sample {index}: field 'labels' is {label} at position {position} "
                            f"where 'input_ids' is {token}; labels must be the input_ids, "
                            "aligned (not shifted: the loss shifts them), with -100 where there "
                            f"is no loss{_shift_hint(labels, ids)}")
            keep[position] = keep[position] and label != IGNORE_INDEX
    return [t if k else IGNORE_INDEX for t, k in zip(ids, keep)]


def _shift_hint(labels: list[int], ids: list[int]) -> str:
    targets = [(l, t) for l, t in zip(labels[:-1], ids[1:]) if l != IGNORE_INDEX]
    if targets and all(l == t for l, t in targets):
        return " (these look shifted left by one position: give them unshifted)"
    return ""


def _same_length(values: list, ids: list, index: int, field: str, error: type, what: str) -> None:
    if len(values) != len(ids):
        raise error(f"sample {index}: field '{field}' has {len(values)} values but 'input_ids' "
                    f"has {len(ids)} tokens; give {what}")


def check_unpadded(sample: dict, index: int, error: type = DataError) -> None:
    """An `attention_mask` carried along must be all ones: the ids of a sample are used as they
    are, so padding in them would be trained on."""
    mask = sample.get("attention_mask")
    if mask is None:
        return
    values = _integers(mask, index, "attention_mask", error, "0 and 1, one per token", True)
    if 0 in values:
        raise error(f"sample {index}: field 'attention_mask' is 0 at position {values.index(0)}: "
                    "the sample holds padding, which would be trained on as tokens; give the ids "
                    "without padding (batches are padded or packed for you)")


def mask_given(sample: dict) -> bool:
    """Whether a pre-tokenised SFT sample says where its loss is (else: on every token)."""
    return any(sample.get(f) is not None for f in LOSS_MASKS + ("labels",))


def vocabulary_size(tokenizer) -> int:
    """How many ids a pre-tokenised sample may use: the tokenizer's, added tokens included."""
    try:
        return len(tokenizer)
    except TypeError:  # a tokenizer-like object without a length
        return tokenizer.vocab_size
