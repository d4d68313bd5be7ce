"""Supervised fine-tuning: next-token loss on the tokens that `labels` marks.

Examples are packed into rows of `seq_length` by default (best fit decreasing; position ids
restart at each document and no document attends to another), or padded in length-grouped
batches with `method.packing=False`. The loss is the chunked cross-entropy, which never holds the
full float32 logits for the backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from trainer_lib.config import SFTConfig
from trainer_lib.data.packing import PackedCollator, pack_dataset
from trainer_lib.data.chat import RunTemplate
from trainer_lib.data.samples import DataError, hold_out, load_samples, normalize_sft_samples
from trainer_lib.data.sampling import LengthGroupedSampler, padded_collate
from trainer_lib.data.tokenize import (
    DataReport,
    count_loss_tokens,
    fit_to_length,
    tokenize_pair,
    tokenize_text,
)
from trainer_lib.distributed import is_zero3
from trainer_lib.losses.cross_entropy import causal_lm_token_nll
from trainer_lib.registry import register_trainer
from trainer_lib.trainers.base import Trainer


@register_trainer(SFTConfig)
class SFTTrainer(Trainer):
    method: SFTConfig

    # ------------------------------------------------------------------ data

    def build_datasets(self, samples: Any, eval_samples: Any) -> tuple[list, list]:
        self.method = self.config.method
        self.chat_template = RunTemplate(self.tokenizer, self.config.tokenizer.chat_template)
        records = normalize_sft_samples(load_samples(samples), self.method.text_key,
                                        self.method.input_key, self.method.output_key)
        if eval_samples is not None:
            eval_records = normalize_sft_samples(load_samples(eval_samples, "eval_samples"),
                                                 self.method.text_key, self.method.input_key,
                                                 self.method.output_key)
        else:
            records, eval_records = hold_out(records, self.config.train.eval_split,
                                             self.config.train.seed)
        self.data_report = DataReport()
        train_examples = self.tokenize_records(records, self.data_report)
        if not train_examples:
            raise DataError(f"no sample is left to train on: {self.data_report.summary()}")
        eval_examples = self.tokenize_records(eval_records, DataReport())
        if self.accelerator.is_main_process:
            print(self.data_report.summary(), flush=True)
        return self.arrange(train_examples), eval_examples

    def tokenize_records(self, records: list[dict], report: DataReport) -> list[dict]:
        m, seq_length = self.method, self.config.train.seq_length
        examples = []
        for i, record in enumerate(records):
            kind = record["kind"]
            report.kinds[kind] += 1
            report.num_samples += 1
            example = self.tokenize_record(record, i)
            fitted, what = fit_to_length(example, seq_length,
                                         "text" if kind == "text" else "pair" if kind == "pair"
                                         else "chat", m.overlong)
            if what.startswith("dropped:"):
                report.dropped[what.split(":", 1)[1]] += 1
            elif what == "truncated":
                report.truncated += 1
            elif what == "split":
                report.split += 1
            for ex in fitted:
                if count_loss_tokens(ex["labels"]) == 0:
                    report.dropped["no_loss_tokens"] += 1
                    continue
                report.num_examples += 1
                report.num_tokens += len(ex["input_ids"])
                report.num_loss_tokens += count_loss_tokens(ex["labels"])
                examples.append(ex)
        return examples

    def tokenize_record(self, record: dict, index: int) -> dict:
        tok, m = self.tokenizer, self.method
        if record["kind"] == "text":
            return tokenize_text(tok, record["text"], m.add_eos)
        if record["kind"] == "pair":
            return tokenize_pair(tok, record["prompt"], record["completion"], m.add_eos)
        from trainer_lib.data import chat

        template = self.chat_template.for_messages()
        if record["kind"] == "conversation":
            return chat.tokenize_conversation(tok, record["messages"], record["tools"], template,
                                              loss_on=m.loss_on)
        return chat.tokenize_prompt_completion_messages(tok, record["prompt"],
                                                        record["completion"], record["tools"],
                                                        template)

    def arrange(self, examples: list[dict]) -> list:
        """Loader items: packed rows of examples (best fit decreasing), or single examples."""
        self.train_examples = examples
        if self.method.packing:
            return pack_dataset(examples, self.config.train.seq_length)
        return examples

    def make_loader(self, items: list, shuffle: bool, batch_size: int | None = None):
        if shuffle and not self.method.packing and self.method.group_by_length:
            lengths = [len(ex["input_ids"]) for ex in items]
            sampler = LengthGroupedSampler(lengths, self.config.train.batch_size,
                                           self.config.train.seed)
            return DataLoader(items, batch_size=batch_size or self.config.train.batch_size,
                              sampler=sampler, collate_fn=self.collate)
        return super().make_loader(items, shuffle, batch_size)

    def collate(self, items: list) -> dict:
        """Packed rows (lists of examples) or single examples, padded. Under ZeRO-3 every batch
        is padded to seq_length so that all processes run the same chunks of the loss."""
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
