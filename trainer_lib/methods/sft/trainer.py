"""SFT: next-token loss on the tokens `labels` marks, over packed rows (default) or
length-grouped padded batches (`method.packing=false`, or a model whose packed rows would not
keep documents apart: the load-time check says so), plus a MoE model's load-balancing loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from trainer_lib.data.chat_template import RunTemplate
from trainer_lib.data.mixture import EpochRanges, epoch_steps, mixture_examples, plan_epochs
from trainer_lib.data.packing import PackedCollator, pack_lengths
from trainer_lib.data.padding import LengthGroupedSampler, padded_collate
from trainer_lib.data.pipeline import PreparedData
from trainer_lib.data.store import GroupLayout, Groups, materialize
from trainer_lib.data.streaming import StreamItems, StreamLoader
from trainer_lib.errors import DataError
from trainer_lib.methods.sft.config import SFTConfig
from trainer_lib.methods.sft.recipe import SFTRecipe
from trainer_lib.model.probe import BOUNDARIES
from trainer_lib.ops.cross_entropy import lm_token_nll, shifted
from trainer_lib.ops.head import model_inputs
from trainer_lib.registry import register_trainer
from trainer_lib.runtime.deepspeed import is_zero3
from trainer_lib.training.trainer import Trainer


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
            # packing is switched off on it if the model needs (the load-time check)
            self.unpacked_items, self.unpacked_epochs = items, None
            return items, data.eval
        if not len(data.train):
            raise DataError(data.report.too_few(1, t.seq_length))
        self.train_examples = data.train
        # what trains if the model cannot be packed (the load-time check): the examples
        self.unpacked_items, self.unpacked_epochs = data.train, None
        if data.mixture is not None:
            return self.arrange_mixture(data), data.eval
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

    def arrange_mixture(self, data: PreparedData):
        """Each planned epoch's draw as items, one epoch after the other: its examples, or the
        packed rows of them (packed epoch by epoch, so an epoch's rows hold its examples)."""
        t, mixture = self.config.train, data.mixture
        self.unpacked_items, self.unpacked_epochs = mixture_examples(data, t, self.accelerator)
        if not self.method.packing:
            self.epoch_ranges = self.unpacked_epochs
            return self.unpacked_items
        lengths = data.store.lengths()

        def pack(epoch: int):
            rows = mixture.rows(epoch)
            flat, offsets = pack_lengths(lengths[rows], t.seq_length)
            return rows[flat], offsets

        def plan() -> dict:
            epochs = plan_epochs(t, pack, lambda packed: epoch_steps(
                self.accelerator, len(packed[1]) - 1, t.batch_size, t.gradient_accumulation_steps))
            bases = np.cumsum([0] + [len(rows) for rows, _ in epochs])
            return {"rows": np.concatenate([rows for rows, _ in epochs]),
                    "offsets": np.concatenate([[0]] + [offsets[1:] + base for (_, offsets), base
                                                       in zip(epochs, bases)]),
                    "starts": np.cumsum([0] + [len(offsets) - 1 for _, offsets in epochs])}

        key = ["packed", t.seq_length, t.epochs, t.total_steps, t.batch_size,
               t.gradient_accumulation_steps, self.accelerator.num_processes]
        arrays = data.derived_arrays("mixture_epochs", key, plan)
        self.epoch_ranges = EpochRanges(arrays["starts"], t.seed)
        return Groups(GroupLayout(data.store, arrays["rows"], arrays["offsets"]))

    def make_loader(self, items, shuffle: bool, batch_size: int | None = None):
        batch_size = batch_size or self.config.train.batch_size
        if isinstance(items, StreamItems):
            return StreamLoader(items, batch_size, self.config.train.seq_length, self.collate)
        if shuffle and not self.packing and self.method.group_by_length:
            epochs = getattr(self, "epoch_ranges", None)
            sampler = (epochs.sampler(items.lengths(), self.config.train.batch_size) if epochs
                       else LengthGroupedSampler(items.lengths(), self.config.train.batch_size,
                                                 self.config.train.seed))
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
                                      pad_to_multiple_of=None if same_shape else 64,
                                      boundaries=self.packing == BOUNDARIES)
            batch = collator(items)
            path = getattr(self, "loss_path", None)
            if path is not None and path.router.coef:  # the real tokens, for the MoE loss
                filled = torch.tensor([sum(len(ex["input_ids"]) for ex in row) for row in items])
                width = batch["input_ids"].shape[1]
                batch["token_mask"] = (torch.arange(width)[None, :] < filled[:, None]).long()
            return batch
        return padded_collate(items, self.tokenizer.pad_token_id,
                              width=seq_length if same_shape else None)

    # ------------------------------------------------------------------ the model

    @property
    def packing(self):
        """How packed rows keep documents apart (`model.probe`), None for padded batches;
        before the model is loaded, what the config asks for."""
        path = getattr(self, "loss_path", None)
        return path.packing if path is not None else self.method.packing

    def setup_model(self) -> None:
        """The load-time check; a model that cannot be packed exactly trains on padded,
        length-grouped batches of the same examples."""
        path = self.check_loss_path(self.method.packing)
        if self.method.packing and path.packing is None:
            items = self.unpacked_items
            if isinstance(items, StreamItems):
                items.packing = False
            self.train_items = items
            if self.unpacked_epochs is not None:  # a mixture's epochs, as examples
                self.epoch_ranges = self.unpacked_epochs

    # ------------------------------------------------------------------ loss

    def loss_weight(self, batch: dict) -> float:
        return batch["num_loss_tokens"]

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        path = self.loss_path
        # the loss is the NLL's plain sum (times the step's scale): a uniform upstream gradient
        nll, out = lm_token_nll(model, model_inputs(batch), shifted(batch["labels"]), path.head,
                                chunk_size=self.method.loss_chunk_size, fused_grads="uniform",
                                **path.router.forward_kwargs)
        loss = nll.sum()
        if not path.router.coef:
            return loss, {}
        # the load-balancing loss of each micro-batch, weighted by its share of the step's
        # tokens: the step adds coef x their token-weighted mean, on any split into
        # micro-batches and processes
        mask = batch.get("token_mask", batch.get("attention_mask"))
        aux = path.router.aux_loss(out, mask)
        weight = self.loss_weight(batch)
        loss = loss + path.router.coef * weight * aux
        return loss, {"aux_loss": (aux.detach() * weight, weight)}
