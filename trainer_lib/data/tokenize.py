"""Records -> tokenised examples {"input_ids", "labels"} (labels aligned, -100 where no loss),
and the over-long policy (`method.overlong`: truncate, drop, split).

A prompt/completion pair is tokenised as one text, so the tokens at the seam are the ones the
model sees at inference.
"""

from __future__ import annotations

from trainer_lib.ops.cross_entropy import IGNORE_INDEX


def tokenize_text(tokenizer, text: str, add_eos: bool = True) -> dict:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def tokenize_pair(tokenizer, prompt: str, completion: str, add_eos: bool = True) -> dict:
    """Tokenises prompt + completion as one text, so tokens at the seam are the ones the model
    would see at inference."""
    eos = tokenizer.eos_token_id if add_eos else None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
        return _pair_example(enc["input_ids"], enc["offset_mapping"], len(prompt), eos)
    # slow tokenizers have no offsets: the parts are tokenised apart
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = p_ids + c_ids + ([eos] if eos is not None else [])
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(p_ids) + ids[len(p_ids):]}


def _pair_example(ids: list, offsets: list, prompt_chars: int, eos) -> dict:
    """A token that contains any completion character carries loss (and the EOS, if added)."""
    labels = [t if end > prompt_chars and end > start else IGNORE_INDEX
              for t, (start, end) in zip(ids, offsets)]
    if eos is not None:
        ids, labels = ids + [eos], labels + [eos]
    return {"input_ids": ids, "labels": labels}


def fit_to_length(example: dict, seq_length: int, kind: str, policy: str) -> tuple[list[dict], str]:
    """Applies the over-long policy. Returns (examples, what happened) where what happened is
    "" (fits), "truncated", "split", or a drop reason starting with "dropped:"."""
    ids, labels = example["input_ids"], example["labels"]
    n = len(ids)
    if n <= seq_length:
        return [example], ""
    if policy == "drop":
        return [], "dropped:too_long"
    if policy == "split":
        if kind != "text":
            raise ValueError('method.overlong="split" applies to text samples only; '
                             'use "truncate" or "drop" for prompt/completion and chat data')
        pieces = [
            {"input_ids": ids[s:s + seq_length], "labels": labels[s:s + seq_length]}
            for s in range(0, n, seq_length)
        ]
        # a last piece of one token has nothing to predict
        pieces = [p for p in pieces if len(p["input_ids"]) > 1]
        return pieces, "split"
    if kind == "pair":
        return _truncate_pair(ids, labels, seq_length)
    ids, labels = ids[:seq_length], labels[:seq_length]
    if all(l == IGNORE_INDEX for l in labels[1:]):
        return [], "dropped:no_loss_tokens_after_truncation"
    return [{"input_ids": ids, "labels": labels}], "truncated"


def _truncate_pair(ids: list, labels: list, seq_length: int) -> tuple[list[dict], str]:
    prompt_len = next((i for i, l in enumerate(labels) if l != IGNORE_INDEX), len(labels))
    completion_len = len(ids) - prompt_len
    keep_head = 1 if prompt_len > 0 else 0  # BOS (or the first prompt token) stays
    if completion_len <= seq_length - keep_head:
        # drop prompt tokens from the left, right after the head
        tail = seq_length - completion_len - keep_head
        keep = list(range(keep_head)) + list(range(prompt_len - tail, len(ids)))
    else:
        # the completion alone does not fit: keep the head and cut the completion's end
        keep = (list(range(keep_head)) + list(range(prompt_len, len(ids))))[:seq_length]
    new = {"input_ids": [ids[i] for i in keep], "labels": [labels[i] for i in keep]}
    return [new], "truncated"


# ---------------------------------------------------------------------- many at once
# The same results as tokenize_text / tokenize_pair, one tokenizer call per batch (the fast
# tokenizer's batch encoding); slow tokenizers go one by one.


def _encode_batch(tokenizer, texts: list[str]) -> tuple[list, list]:
    """(ids, offsets) per text, exactly as `tokenizer(texts, add_special_tokens=True,
    return_offsets_mapping=True)` gives them. When the Rust tokenizer is set as that call would
    set it (no truncation, no padding, special tokens as the wrapper treats them), it is asked
    directly: the wrapper's conversion of every encoding costs a quarter of the tokenising."""
    backend = tokenizer.backend_tokenizer
    if (backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens",
                                                              False))):
        encodings = backend.encode_batch(texts, add_special_tokens=True)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def tokenize_texts(tokenizer, texts: list[str], add_eos: bool = True) -> list[dict]:
    if not getattr(tokenizer, "is_fast", False):
        return [tokenize_text(tokenizer, t, add_eos) for t in texts]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    out = []
    for ids in _encode_batch(tokenizer, texts)[0]:
        ids = ids + eos
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def tokenize_pairs(tokenizer, prompts: list[str], completions: list[str],
                   add_eos: bool = True) -> list[dict]:
    if not getattr(tokenizer, "is_fast", False):
        return [tokenize_pair(tokenizer, p, c, add_eos) for p, c in zip(prompts, completions)]
    eos = tokenizer.eos_token_id if add_eos else None
    all_ids, all_offsets = _encode_batch(tokenizer, [p + c for p, c in zip(prompts, completions)])
    return [_pair_example(ids, offsets, len(prompt), eos)
            for prompt, ids, offsets in zip(prompts, all_ids, all_offsets)]
