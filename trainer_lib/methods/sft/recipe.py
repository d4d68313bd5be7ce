"""SFT's part of the data pipeline: how a sample's form is told, normalised and tokenised."""

from __future__ import annotations

from trainer_lib.data import chat_template
from trainer_lib.data.chat_template import RunTemplate
from trainer_lib.data.recipe import DataRecipe
from trainer_lib.data.tokenize import tokenize_pairs, tokenize_texts
from trainer_lib.data.tokens import vocabulary_size
from trainer_lib.errors import ChatError, DataError
from trainer_lib.methods.sft.config import SFTConfig
from trainer_lib.methods.sft.samples import (
    mixed_forms_message,
    normalize_sft_sample,
    sft_sample_form,
)


class SFTRecipe(DataRecipe):
    """SFT's normalise and tokenise functions, for the shared pipeline."""

    name = "sft"

    def __init__(self, tokenizer, template: RunTemplate, method: SFTConfig, seq_length: int):
        super().__init__(tokenizer, seq_length, method.overlong)
        self.keys = (method.text_key, method.input_key, method.output_key)
        self.loss_on, self.add_eos, self.template = method.loss_on, method.add_eos, template
        self.vocab_size = vocabulary_size(tokenizer)
        self.require_assistant_last = method.require_assistant_last

    def settings(self) -> dict:
        return {**super().settings(), "keys": self.keys, "loss_on": self.loss_on,
                "add_eos": self.add_eos, "chat_template": [self.template.spec,
                                                           self.template.template],
                "require_assistant_last": self.require_assistant_last}

    def form(self, sample, index: int) -> str:
        return sft_sample_form(sample, index, *self.keys)

    def mixed_forms(self, index: int, form: str, first: str) -> str:
        return mixed_forms_message(index, form, first)

    def normalize(self, sample, index: int, form: str) -> list[dict]:
        record = normalize_sft_sample(sample, index, form, *self.keys,
                                      vocab_size=self.vocab_size)
        if self.require_assistant_last and _last_turn_not_assistant(record):
            role = record["messages"][-1]["role"]
            raise ChatError(f"sample {index}: the conversation ends with a {role} turn, after "
                            "the assistant's last, which trains nothing; end it with the "
                            "assistant's answer or remove the trailing turns (or set "
                            "method.require_assistant_last=false to train on it as it is)")
        return [record]

    def note(self, record: dict) -> str:
        # with loss on every token the trailing turn trains like any other
        if self.loss_on != "all" and _last_turn_not_assistant(record):
            return "last_turn_not_assistant"
        return ""

    def tokenize(self, records: list[dict], indices: list[int]) -> list:
        out: list = [None] * len(records)
        texts = [k for k, r in enumerate(records) if r["kind"] == "text"]
        pairs = [k for k, r in enumerate(records) if r["kind"] == "pair"]
        if texts:
            done = tokenize_texts(self.tokenizer, [records[k]["text"] for k in texts], self.add_eos)
            for k, example in zip(texts, done):
                out[k] = example
        if pairs:
            done = tokenize_pairs(self.tokenizer, [records[k]["prompt"] for k in pairs],
                                  [records[k]["completion"] for k in pairs], self.add_eos)
            for k, example in zip(pairs, done):
                out[k] = example
        for k, (record, index) in enumerate(zip(records, indices)):
            if record["kind"] == "pretokenised":  # used as given
                out[k] = {"input_ids": record["input_ids"], "labels": record["labels"]}
            elif out[k] is None:
                try:
                    out[k] = tokenize_chat_record(self.tokenizer, record, self.template,
                                                  self.loss_on, index)
                except DataError as e:
                    out[k] = e
        return out

    def fit_kind(self, record: dict) -> str:
        if record["kind"] == "pretokenised":  # ids with a mask are cut at the end, as conversations
            return "chat" if record["masked"] else "text"
        return record["kind"] if record["kind"] in ("text", "pair") else "chat"

    def report_kind(self, record: dict) -> str:
        return record["kind"]


def _last_turn_not_assistant(record: dict) -> bool:
    return record["kind"] == "conversation" and record["messages"][-1]["role"] != "assistant"


def tokenize_chat_record(tokenizer, record: dict, template: RunTemplate, loss_on: str,
                         index: int | None = None) -> dict:
    """A conversation or a chat prompt/completion record -> input_ids and labels."""
    messages_template = template.for_messages()
    if record["kind"] == "conversation":
        return chat_template.tokenize_conversation(tokenizer, record["messages"], record["tools"],
                                          messages_template, loss_on=loss_on, index=index)
    return chat_template.tokenize_prompt_completion_messages(tokenizer, record["prompt"],
                                                    record["completion"], record["tools"],
                                                    messages_template, index=index)
