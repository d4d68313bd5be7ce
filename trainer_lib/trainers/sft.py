"""Supervised fine-tuning: next-token loss on the tokens that `labels` marks.

Data: the shared pipeline (`data/pipeline.py`) with `SFTRecipe`: text, prompt/completion pairs,
Alpaca rows and conversations, tokenised by the per-sample functions of `data/tokenize.py` and
`data/chat.py` (texts and pairs in batches). Examples are packed into rows of `seq_length` by
default (best fit decreasing over the lengths column; position ids restart at each document and
no document attends to another), or padded in length-grouped batches with
`method.packing=False`. The loss is the chunked cross-entropy, which never holds the full
float32 logits for the backward pass.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from trainer_lib.config import SFTConfig
from trainer_lib.data import chat
from trainer_lib.data.chat import RunTemplate
from trainer_lib.data.packing import PackedCollator, pack_lengths
from trainer_lib.data.pipeline import PreparedData
from trainer_lib.data.recipe import DataRecipe
from trainer_lib.data.samples import (
    DataError,
    mixed_forms_message,
    normalize_sft_sample,
    sft_sample_form,
)
from trainer_lib.data.sampling import LengthGroupedSampler, padded_collate
from trainer_lib.data.store import GroupLayout, Groups, materialize
from trainer_lib.data.streaming import StreamItems, StreamLoader
from trainer_lib.data.tokenize import tokenize_pairs, tokenize_texts
from trainer_lib.distributed import is_zero3
from trainer_lib.losses.cross_entropy import causal_lm_token_nll
from trainer_lib.registry import register_trainer
from trainer_lib.trainers.base import Trainer


class SFTRecipe(DataRecipe):
    """SFT's normalise and tokenise functions, for the shared pipeline."""

    name = "sft"

    def __init__(self, tokenizer, template: RunTemplate, method: SFTConfig, seq_length: int):
        super().__init__(tokenizer, seq_length, method.overlong)
        self.keys = (method.text_key, method.input_key, method.output_key)
        self.loss_on, self.add_eos, self.template = method.loss_on, method.add_eos, template

    def settings(self) -> dict:
        return {**super().settings(), "keys": self.keys, "loss_on": self.loss_on,
                "add_eos": self.add_eos, "chat_template": [self.template.spec,
                                                           self.template.template]}

    def form(self, sample, index: int) -> str:
        return sft_sample_form(sample, index, *self.keys)

    def mixed_forms(self, index: int, form: str, first: str) -> str:
        return mixed_forms_message(index, form, first)

    def normalize(self, sample, index: int, form: str) -> list[dict]:
        return [normalize_sft_sample(sample, index, form, *self.keys)]

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
            if out[k] is None:
                try:
                    out[k] = tokenize_chat_record(self.tokenizer, record, self.template,
                                                  self.loss_on, index)
                except DataError as e:
                    out[k] = e
        return out

    def fit_kind(self, record: dict) -> str:
        return record["kind"] if record["kind"] in ("text", "pair") else "chat"

    def report_kind(self, record: dict) -> str:
        return record["kind"]


def tokenize_chat_record(tokenizer, record: dict, template: RunTemplate, loss_on: str,
                         index: int | None = None) -> dict:
    """A conversation or a chat prompt/completion record -> input_ids and labels."""
    messages_template = template.for_messages()
    if record["kind"] == "conversation":
        return chat.tokenize_conversation(tokenizer, record["messages"], record["tools"],
                                          messages_template, loss_on=loss_on, index=index)
    return chat.tokenize_prompt_completion_messages(tokenizer, record["prompt"],
                                                    record["completion"], record["tools"],
                                                    messages_template, index=index)


@register_trainer(SFTConfig)
class SFTTrainer(Trainer):
    method: SFTConfig

    # ------------------------------------------------------------------ data

    def data_recipe(self) -> SFTRecipe:
        self.method = self.config.method
        self.chat_template = RunTemplate(self.tokenizer, self.config.tokenizer.chat_template)
        return SFTRecipe(self.tokenizer, self.chat_template, self.method,
                         self.config.train.seq_length)

    def arrange(self, data: PreparedData, recipe: SFTRecipe) -> tuple:
        """Loader items: packed rows (best fit decreasing over the lengths), or single examples."""
        t = self.config.train
        if data.stream is not None:
            acc = self.accelerator
            items = StreamItems(data.stream.stream, data.stream.rows, recipe,
                                packing=self.method.packing, seed=t.seed,
                                buffer_size=self.config.data.stream_buffer,
                                rank=acc.process_index, world=acc.num_processes,
                                name=data.stream.name)
            self.data_report = items.report
            self.train_examples = items.first
            return items, data.eval
        if not len(data.train):
            raise DataError(f"no sample is left to train on: {data.report.summary()}")
        self.train_examples = data.train
        if not self.method.packing:
            return data.train, data.eval
        train = data.train

        def pack():
            bar = tqdm(total=len(train), desc="packing", unit=" examples", dynamic_ncols=True,
                       disable=not (self.accelerator.is_main_process and t.progress_bar))
            with bar:
                flat, offsets = pack_lengths(train.lengths(), t.seq_length, bar)
            return {"rows": train.rows[flat], "offsets": offsets}

        packed = data.derived_arrays("packed", ["best_fit_decreasing", t.seq_length], pack)
        return Groups(GroupLayout(data.store, packed["rows"], packed["offsets"])), data.eval

    def make_loader(self, items, shuffle: bool, batch_size: int | None = None):
        batch_size = batch_size or self.config.train.batch_size
        if isinstance(items, StreamItems):
            return StreamLoader(items, batch_size, self.config.train.seq_length, self.collate)
        if shuffle and not self.method.packing and self.method.group_by_length:
            sampler = LengthGroupedSampler(items.lengths(), self.config.train.batch_size,
                                           self.config.train.seed)
            return DataLoader(items, batch_size=batch_size, sampler=sampler,
                              collate_fn=self.collate)
        return super().make_loader(items, shuffle, batch_size)

    def collate(self, items) -> dict:
        """Packed rows (lists of examples) or single examples, padded. Under ZeRO-3 every batch
        is padded to seq_length so that all processes run the same chunks of the loss."""
        items = materialize(items)
        seq_length = self.config.train.seq_length
        same_shape = is_zero3(self.accelerator)
        if isinstance(items[0], list):
            collator = PackedCollator(self.tokenizer.pad_token_id, seq_length,
                                      pad_to_multiple_of=None if same_shape else 64)
            return collator(items)
        return padded_collate(items, self.tokenizer.pad_token_id,
                              width=seq_length if same_shape else None)

    # ------------------------------------------------------------------ loss

    def loss_weight(self, batch: dict) -> float:
        return batch["num_loss_tokens"]

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        nll = causal_lm_token_nll(model, batch, self.method.loss_chunk_size)
        return nll.sum(), {}
