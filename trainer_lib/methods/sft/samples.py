"""SFT samples as users bring them (texts, prompt/completion pairs, Alpaca rows, conversations,
token ids) -> normalised records, with errors that name the sample and the field.
"""

from __future__ import annotations

from typing import Any

from trainer_lib.data.conversations import normalize_conversation
from trainer_lib.data.tokens import check_unpadded, loss_labels, mask_given, token_ids
from trainer_lib.errors import DataError


def sample_kind(sample: Any, text_key: str = "text", input_key: str = "prompt",
                output_key: str = "completion") -> str:
    """The kind of one raw sample, or "unknown"."""
    if isinstance(sample, str):
        return "text"
    if isinstance(sample, (list, tuple)):
        return "pair" if len(sample) == 2 else "unknown"
    if isinstance(sample, dict):
        if "input_ids" in sample:  # already tokenised: the ids win over any text beside them
            return "pretokenised"
        if "messages" in sample or "conversations" in sample:
            return "conversation"
        if input_key in sample or output_key in sample:
            return "pair"
        if "instruction" in sample and "output" in sample:
            return "pair"  # Alpaca
        if text_key in sample:
            return "text"
    return "unknown"


def _describe_expected(text_key: str, input_key: str, output_key: str) -> str:
    return (
        f"a string, a {{'{text_key}': ...}} dict, a [prompt, completion] pair, a "
        f"{{'{input_key}': ..., '{output_key}': ...}} dict, an Alpaca "
        "{'instruction', 'input', 'output'} dict, a {'messages': [...]} conversation, or token "
        "ids {'input_ids': [...]}"
    )


def sft_sample_form(sample: Any, index: int, text_key: str = "text", input_key: str = "prompt",
                    output_key: str = "completion") -> str:
    """The kind of one sample ("text", "pair" or "conversation"); DataError when it has none."""
    kind = sample_kind(sample, text_key, input_key, output_key)
    if kind == "unknown":
        raise DataError(f"sample {index}: cannot tell what it is ({_preview(sample)}); expected "
                        + _describe_expected(text_key, input_key, output_key))
    return kind


def mixed_forms_message(index: int, kind: str, first: str) -> str:
    return (f"sample {index} is a {kind} sample but sample 0 is a {first} sample; one dataset "
            "must hold one kind of sample (convert them first, e.g. text into prompt/completion "
            "pairs)")


def normalize_sft_sample(sample: Any, i: int, kind: str, text_key: str = "text",
                         input_key: str = "prompt", output_key: str = "completion",
                         vocab_size: int | None = None) -> dict:
    """One checked sample of `kind` -> its record. `vocab_size` bounds the ids of a "pretokenised"
    sample (the tokenizer's length)."""
    if kind == "pretokenised":
        return normalize_token_sample(sample, i, vocab_size)
    if kind == "text":
        text = sample if isinstance(sample, str) else sample[text_key]
        _require_string(text, i, text_key if isinstance(sample, dict) else "text")
        return {"kind": "text", "text": text}
    if kind == "conversation":
        record = normalize_conversation(sample, i)
        return {"kind": "conversation", **record}
    # pairs
    if isinstance(sample, (list, tuple)):
        prompt, completion = sample
        pname, cname = "[0] (prompt)", "[1] (completion)"
    elif "instruction" in sample and input_key not in sample:
        _require_string(sample["instruction"], i, "instruction")
        _require_string(sample.get("input") or "", i, "input", allow_empty=True)
        prompt, completion = alpaca_prompt(sample["instruction"], sample.get("input")), sample["output"]
        pname, cname = "instruction", "output"
    else:
        for key in (input_key, output_key):
            if key not in sample:
                raise DataError(
                    f"sample {i}: missing field '{key}' (has {sorted(sample)}); a prompt/"
                    f"completion sample needs both '{input_key}' and '{output_key}' "
                    "(remap other names with method.input_key / method.output_key)"
                )
        prompt, completion = sample[input_key], sample[output_key]
        pname, cname = input_key, output_key
    if isinstance(prompt, list) or isinstance(completion, list):
        p_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        c_msgs = (completion if isinstance(completion, list)
                  else [{"role": "assistant", "content": completion}])
        tools = sample.get("tools") if isinstance(sample, dict) else None
        checked = normalize_conversation({"messages": p_msgs + c_msgs, "tools": tools}, i)
        return {"kind": "chat_pair", "prompt": checked["messages"][: len(p_msgs)],
                "completion": checked["messages"][len(p_msgs):], "tools": checked["tools"]}
    _require_string(prompt, i, pname, allow_empty=True)
    _require_string(completion, i, cname)
    return {"kind": "pair", "prompt": prompt, "completion": completion}


def normalize_token_sample(sample: dict, i: int, vocab_size: int | None) -> dict:
    """`{"input_ids": [...]}`, with `completion_mask` or `assistant_masks` (1 = loss) or
    `labels` (-100 = no loss), or none of them (loss on every token) -> a "pretokenised"
    record, used as given: nothing is added."""
    ids = token_ids(sample["input_ids"], i, "input_ids",
                    vocab_size if vocab_size is not None else 2 ** 31)
    check_unpadded(sample, i)
    return {"kind": "pretokenised", "input_ids": ids, "labels": loss_labels(sample, ids, i),
            "masked": mask_given(sample)}


def alpaca_prompt(instruction: str, extra: str | None = None) -> str:
    """The prompt format of Stanford Alpaca, used for {"instruction", "input", "output"} rows."""
    if extra:
        return (f"### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n### Response:\n")
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _require_string(value: Any, i: int, field: str, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise DataError(
            f"sample {i}: field '{field}' is a {type(value).__name__} ({_preview(value)}); "
            "expected a string"
        )
    if not allow_empty and not value.strip():
        raise DataError(
            f"sample {i}: field '{field}' is empty; there is nothing to train on, remove the "
            "sample or fill it in"
        )


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
