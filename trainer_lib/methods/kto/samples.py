"""KTO samples (labelled examples, tuples, labelled conversations, preference pairs, token ids)
-> records {"prompt", "completion", "label"}, with errors that name the sample and the field.
A pair becomes two records; transcripts sharing their start (HH-RLHF) are split at it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer_lib.data.conversations import (
    SHAREGPT_ROLES,
)
from trainer_lib.data.conversations import from_sharegpt as _convert_sharegpt
from trainer_lib.data.conversations import normalize_message
from trainer_lib.data.tokens import check_unpadded, token_ids
from trainer_lib.errors import ChatError, KTODataError

KIND_NAMES = {
    "labelled": "a labelled example (prompt/completion/label)",
    "tuple": "a (prompt, completion, label) tuple",
    "messages": "a labelled conversation (messages/label)",
    "conversations": "a labelled ShareGPT conversation (conversations/label)",
    "pair": "a preference pair (prompt/chosen/rejected)",
    "sharegpt_pair": "a ShareGPT preference pair (conversations/chosen/rejected)",
    "tokens": "a pre-tokenised example (prompt_input_ids/completion_input_ids/label)",
}
TOKEN_FIELDS = ("prompt_input_ids", "completion_input_ids")


def _fail(index: int, field: str, problem: str) -> KTODataError:
    return KTODataError(f"sample {index}: field '{field}' {problem}")


def kto_sample_form(sample: Any, index: int, input_key: str, output_key: str, label_key: str) -> str:
    if isinstance(sample, (tuple, list)):
        if len(sample) != 3:
            raise KTODataError(
                f"sample {index}: a tuple must be (prompt, completion, label), got {len(sample)} items"
            )
        return "tuple"
    if not isinstance(sample, dict):
        raise KTODataError(
            f"sample {index}: expected a dict or a (prompt, completion, label) tuple, "
            f"got {type(sample).__name__}"
        )
    if any(field in sample for field in TOKEN_FIELDS):
        return "tokens"
    if "chosen" in sample or "rejected" in sample:
        return "sharegpt_pair" if "conversations" in sample and input_key not in sample else "pair"
    if output_key in sample or input_key in sample:
        return "labelled"
    if "messages" in sample:
        return "messages"
    if "conversations" in sample:
        return "conversations"
    raise KTODataError(
        f"sample {index}: unrecognised keys {sorted(sample)}; expected '{input_key}', "
        f"'{output_key}' and '{label_key}', or 'messages' and '{label_key}', or 'prompt', "
        f"'chosen' and 'rejected', or token ids 'prompt_input_ids', 'completion_input_ids' and "
        f"'{label_key}'"
    )


def _label(value: Any, index: int, field: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _fail(index, field, f"is {value!r}; expected true or false")


# what to do about a missing field, by what the field holds
_MISSING_FIX = {
    "label": "add it: true for a desirable completion, false for an undesirable one (or name "
             "the field that holds it with method.label_key)",
    "prompt": "add it (or name the field that holds it with method.input_key)",
    "completion": "add it (or name the field that holds it with method.output_key)",
    "pair": "a preference pair needs both 'chosen' and 'rejected'",
    "ids": "a pre-tokenised sample needs prompt_input_ids, completion_input_ids and a label",
}
_EMPTY = "is empty; fill it in or remove the sample"


def _required(sample: dict, key: str, index: int, role: str) -> Any:
    if key not in sample:
        raise KTODataError(f"sample {index}: field '{key}' is missing; {_MISSING_FIX[role]}")
    return sample[key]


def _distinct(chosen: Any, rejected: Any, index: int, what: str = "") -> None:
    """A preference pair whose two answers are the same prefers nothing."""
    if chosen == rejected:
        raise _fail(index, "rejected", f"is the same {what}as 'chosen', so there is nothing to "
                    "prefer; remove the pair, or correct one of its answers")


def _check_messages(value: Any, index: int, field: str) -> list:
    if not isinstance(value, list) or not value:
        raise _fail(index, field, "is empty; expected a non-empty list of messages")
    for j, message in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _fail(index, where, f"is {message!r}; expected a message {{'role': ..., 'content': ...}}")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise _fail(index, f"{where}.content", "is missing; expected the message text")
        if content is not None and not isinstance(content, (str, list)):
            raise _fail(index, f"{where}.content", f"is {content!r}; expected a string")
    return _shared_form(lambda: [normalize_message(m, f"{field}[{j}]", index)
                                 for j, m in enumerate(value)])


def _shared_form(convert):
    """Messages in the form SFT conversations take (tool-call arguments as dicts, ShareGPT
    function calls as tool_calls), with that conversion's errors as KTO data errors."""
    try:
        return convert()
    except ChatError as e:
        raise KTODataError(str(e)) from None


def _text_or_messages(value: Any, index: int, field: str) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise _fail(index, field, _EMPTY)
        return value
    if isinstance(value, dict):  # a single message, e.g. {"role": "assistant", "content": ...}
        value = [value]
    if isinstance(value, list):
        return _check_messages(value, index, field)
    if value is None:
        raise _fail(index, field, _EMPTY)
    raise _fail(index, field, f"is {type(value).__name__}; expected a string or a list of messages")


def _completion(value: Any, index: int, field: str) -> Any:
    value = _text_or_messages(value, index, field)
    if isinstance(value, list):
        last = value[-1]
        if last["role"] != "assistant":
            raise _fail(index, f"{field}[-1].role", f"is {last['role']!r}; a completion must be an assistant turn")
        if not last.get("tool_calls") and not _nonempty(last.get("content")):
            raise _fail(index, f"{field}[-1].content", _EMPTY)
    return value


def _nonempty(content: Any) -> bool:
    return bool(content.strip()) if isinstance(content, str) else bool(content)


def _from_sharegpt(turns: Any, index: int, field: str) -> list:
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list) or not turns:
        raise _fail(index, field, "is empty; expected a non-empty list of turns")
    for j, turn in enumerate(turns):
        where = f"{field}[{j}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _fail(index, where, f"is {turn!r}; expected a ShareGPT turn {{'from': ..., 'value': ...}}")
        if turn["from"] not in SHAREGPT_ROLES:
            raise _fail(
                index, f"{where}.from",
                f"is {turn['from']!r}; expected one of {', '.join(sorted(SHAREGPT_ROLES))}",
            )
        if not isinstance(turn["value"], str):
            raise _fail(index, f"{where}.value", f"is {turn['value']!r}; expected a string")
    return _shared_form(lambda: _convert_sharegpt({"conversations": turns}, index))


def _split_conversation(messages: list, index: int, field: str) -> tuple[list, list]:
    """The final assistant turn is the completion; the turns before it, the prompt."""
    if messages[-1]["role"] != "assistant":
        raise _fail(
            index, f"{field}[-1].role",
            f"is {messages[-1]['role']!r}; the last turn must be the assistant completion being judged",
        )
    if len(messages) < 2:
        raise _fail(index, field, "has no prompt before the assistant completion")
    last = messages[-1]
    if not last.get("tool_calls") and not _nonempty(last.get("content")):
        raise _fail(index, f"{field}[-1].content", _EMPTY)
    return messages[:-1], messages[-1:]


# Where an assistant turn starts in text transcripts (Anthropic HH "\n\nAssistant:", ChatML,
# Llama-2 chat, Alpaca): the prompt of a pair of transcripts ends with the last of these that
# both share, so the completion judged is the whole final answer.
_ASSISTANT_HEADERS = ("Assistant:", "<|im_start|>assistant\n", "[/INST]", "### Response:")


def _split_transcripts(chosen: str, rejected: str, index: int) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) of two text transcripts sharing a start.

    The shared start is cut back to the end of the last assistant header in it; without one, to
    the last whitespace, so that no word is cut in half (the completions then start with it).
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    common = chosen[:shared]
    cut = max((common.rfind(h) + len(h) for h in _ASSISTANT_HEADERS if h in common), default=-1)
    if cut < 0:
        cut = max(common.rfind(" "), common.rfind("\n"))
    if cut <= 0 or not common[:cut].strip():
        raise _fail(index, "chosen", "shares no prompt with 'rejected': the transcripts differ "
                    "from their start; give the prompt separately as 'prompt'")
    # an answer may be blank (a few HH-RLHF transcripts end with "Assistant: "): the completion
    # judged is then the end of the turn alone, as TRL keeps it
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _implicit_prompt_pair(sample: dict, index: int, input_key: str) -> list[dict]:
    """{"chosen", "rejected"} as whole transcripts sharing their start (lists of messages, or
    texts such as Anthropic HH's "\n\nHuman: ...\n\nAssistant: ..."): the shared start is the
    prompt, the rest of each its completion (TRL's `extract_prompt`, then unpaired)."""
    chosen = _text_or_messages(_required(sample, "chosen", index, "pair"), index, "chosen")
    rejected = _text_or_messages(_required(sample, "rejected", index, "pair"), index, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise _fail(index, "rejected", "must have the same form as 'chosen' (both text or both messages)")
    _distinct(chosen, rejected, index, "transcript ")
    if isinstance(chosen, str):
        prompt, good, bad = _split_transcripts(chosen, rejected, index)
        return [_record(prompt, good, True, sample), _record(prompt, bad, False, sample)]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise _fail(index, "chosen", "shares no first turns with 'rejected', so there is no prompt")
    prompt = chosen[:shared]
    return [
        _record(prompt, _completion(chosen[shared:], index, "chosen"), True, sample),
        _record(prompt, _completion(rejected[shared:], index, "rejected"), False, sample),
    ]


def _record(prompt: Any, completion: Any, label: bool, sample: Any) -> dict:
    record = {"prompt": prompt, "completion": completion, "label": label}
    if isinstance(sample, dict) and sample.get("tools"):
        record["tools"] = sample["tools"]
    return record


def _token_record(sample: dict, index: int, label_key: str, vocab_size: int) -> dict:
    """Pre-tokenised ids, used as given (nothing added): loss on the completion's tokens."""
    ids = {f: token_ids(_required(sample, f, index, "ids"), index, f, vocab_size, KTODataError)
           for f in TOKEN_FIELDS}
    check_unpadded(sample, index, KTODataError)
    return {"prompt": ids["prompt_input_ids"], "completion": ids["completion_input_ids"],
            "label": _label(_required(sample, label_key, index, "label"), index, label_key),
            "tokens": True}


def normalize_kto_sample(
    sample: Any, kind: str, index: int, input_key: str, output_key: str, label_key: str,
    vocab_size: int = 2 ** 31,
) -> list[dict]:
    """One KTO sample of format `kind` (as `kto_sample_form` found it) -> its records (a pair gives two);
    errors name the sample by `index`. `vocab_size` bounds the ids of a pre-tokenised sample."""
    if kind == "tokens":
        return [_token_record(sample, index, label_key, vocab_size)]
    if kind == "tuple":
        prompt, completion, label = sample
        return [_record(
            _text_or_messages(prompt, index, "prompt"),
            _completion(completion, index, "completion"),
            _label(label, index, "label"),
            sample,
        )]
    if kind == "labelled":
        return [_record(
            _text_or_messages(_required(sample, input_key, index, "prompt"), index, input_key),
            _completion(_required(sample, output_key, index, "completion"), index, output_key),
            _label(_required(sample, label_key, index, "label"), index, label_key),
            sample,
        )]
    if kind in ("messages", "conversations"):
        raw = sample[kind]
        messages = _check_messages(raw, index, kind) if kind == "messages" else _from_sharegpt(raw, index, kind)
        prompt, completion = _split_conversation(messages, index, kind)
        label = _label(_required(sample, label_key, index, "label"), index, label_key)
        return [_record(prompt, completion, label, sample)]
    if kind == "pair" and input_key not in sample:
        return _implicit_prompt_pair(sample, index, input_key)
    if kind == "pair":
        prompt = _text_or_messages(_required(sample, input_key, index, "prompt"), index, input_key)
        chosen = _completion(_required(sample, "chosen", index, "pair"), index, "chosen")
        rejected = _completion(_required(sample, "rejected", index, "pair"), index, "rejected")
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise _fail(index, "rejected", "must have the same form as 'chosen' (both text or both messages)")
        _distinct(chosen, rejected, index)
        return [_record(prompt, chosen, True, sample), _record(prompt, rejected, False, sample)]
    # sharegpt_pair
    prompt = _from_sharegpt(sample["conversations"], index, "conversations")
    records = []
    for key, label in (("chosen", True), ("rejected", False)):
        turns = _from_sharegpt(_required(sample, key, index, "pair"), index, key)
        records.append(_record(prompt, _completion(turns, index, key), label, sample))
    _distinct(records[0]["completion"], records[1]["completion"], index)
    return records
