"""Supervised fine-tuning: next-token loss on the tokens that `labels` marks."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from trainer_lib.config import SFTConfig
from trainer_lib.data.samples import DataError, load_samples, normalize_sft_samples
from trainer_lib.data.tokenize import (
    IGNORE_INDEX,
    DataReport,
    count_loss_tokens,
    fit_to_length,
    tokenize_pair,
    tokenize_text,
)
from trainer_lib.registry import register_trainer
from trainer_lib.trainers.base import Trainer


@register_trainer(SFTConfig)
class SFTTrainer(Trainer):
    method: SFTConfig

    # ------------------------------------------------------------------ data

    def build_datasets(self, samples: Any, eval_samples: Any) -> tuple[list, list]:
        self.method = self.config.method
        self.chat_template = self._resolve_template()
        records = normalize_sft_samples(load_samples(samples), self.method.text_key,
                                        self.method.input_key, self.method.output_key)
        if eval_samples is not None:
            eval_records = normalize_sft_samples(load_samples(eval_samples, "eval_samples"),
                                                 self.method.text_key, self.method.input_key,
                                                 self.method.output_key)
        elif self.config.train.eval_split > 0:
            order = list(range(len(records)))
            random.Random(self.config.train.seed).shuffle(order)
            n_eval = max(1, int(round(self.config.train.eval_split * len(records))))
            if n_eval >= len(records):
                raise DataError(f"train.eval_split={self.config.train.eval_split} leaves no "
                                f"training samples out of {len(records)}")
            held = set(order[:n_eval])
            eval_records = [r for i, r in enumerate(records) if i in held]
            records = [r for i, r in enumerate(records) if i not in held]
        else:
            eval_records = []
        self.data_report = DataReport()
        train_examples = self.tokenize_records(records, self.data_report)
        if not train_examples:
            raise DataError(f"no sample is left to train on: {self.data_report.summary()}")
        eval_examples = self.tokenize_records(eval_records, DataReport())
        if self.accelerator.is_main_process:
            print(self.data_report.summary(), flush=True)
        return self.arrange(train_examples), eval_examples

    def _resolve_template(self):
        spec = self.config.tokenizer.chat_template
        if spec is None:
            return None  # passthrough
        if spec == "default":
            # the tokenizer's own; a missing one is an error only if a conversation needs it
            return getattr(self.tokenizer, "chat_template", None)
        from trainer_lib.data.chat import apply_template_to_tokenizer, resolve_chat_template

        template = resolve_chat_template(self.tokenizer, spec)
        apply_template_to_tokenizer(self.tokenizer, template)  # saved with the model
        return template

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

        template = self._template_for_chat()
        if record["kind"] == "conversation":
            return chat.tokenize_conversation(tok, record["messages"], record["tools"], template,
                                              loss_on=m.loss_on)
        return chat.tokenize_prompt_completion_messages(tok, record["prompt"],
                                                        record["completion"], record["tools"],
                                                        template)

    def _template_for_chat(self):
        if self.chat_template is None and self.config.tokenizer.chat_template == "default":
            from trainer_lib.data.chat import resolve_chat_template

            resolve_chat_template(self.tokenizer, "default")  # raises the explanatory error
        return self.chat_template

    def arrange(self, examples: list[dict]) -> list:
        """How examples become loader items (one example per item when unpacked)."""
        return examples

    def collate(self, items: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        width = max(len(ex["input_ids"]) for ex in items)
        input_ids = torch.full((len(items), width), pad, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, ex in enumerate(items):
            n = len(ex["input_ids"])
            input_ids[row, :n] = torch.tensor(ex["input_ids"])
            labels[row, :n] = torch.tensor(ex["labels"])
            mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
                "num_tokens": int(mask.sum()),
                "num_loss_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}

    # ------------------------------------------------------------------ loss

    def loss_weight(self, batch: dict) -> float:
        return batch["num_loss_tokens"]

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       use_cache=False).logits
        labels = batch["labels"][:, 1:]
        loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, {}
