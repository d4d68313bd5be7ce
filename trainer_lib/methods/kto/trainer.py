"""KTO: aligning a causal LM from binary feedback (a thumbs up or down on single completions).

`before_step` runs every forward-only pass of the step first (the policy on the KL rows, the
reference), so that z is estimated over every mismatched pair of the whole optimiser step, all
micro-batches and processes, in the step's one all-reduce. `compute_loss` then returns the sum of
per-example losses, which the loop divides by the step's example count.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from trainer_lib.data.chat_template import RunTemplate
from trainer_lib.data.mixture import EpochRanges, epoch_steps, plan_epochs
from trainer_lib.data.pipeline import PreparedData
from trainer_lib.data.store import Groups, materialize
from trainer_lib.errors import ConfigError, DataError, KTODataError
from trainer_lib.methods.kto.batches import completion_logps, kto_batch
from trainer_lib.methods.kto.config import KTOConfig
from trainer_lib.methods.kto.loss import (
    auto_weights,
    class_balance,
    kto_loss,
    kto_sft_losses,
    reference_point,
    sft_scale,
)
from trainer_lib.methods.kto.recipe import (
    KTORecipe,
    epoch_micro_batches,
    micro_batch_offsets,
    micro_batches,
)
from trainer_lib.methods.kto.reference import KTOReference, check_reference_settings
from trainer_lib.model.dropout import disable_dropout
from trainer_lib.model.probe import BOUNDARIES, attention_of
from trainer_lib.ops.attention import DOCUMENT_ATTENTION
from trainer_lib.registry import register_trainer
from trainer_lib.runtime.deepspeed import is_zero3
from trainer_lib.training.trainer import Trainer


@register_trainer(KTOConfig)
class KTOTrainer(Trainer):
    method: KTOConfig

    # ------------------------------------------------------------------ data

    def data_recipe(self) -> KTORecipe:
        m, t = self.config.method, self.config.train
        self.method = m
        check_reference_settings(self.config)
        if m.loss_type == "kto":
            for name in ("batch_size", "eval_batch_size"):
                size = getattr(t, name)
                if size is not None and size < 2:
                    raise ConfigError(
                        f"train.{name}={size}: KTO estimates its reference point from each "
                        "prompt paired with another example's completion in the same micro-batch, "
                        "so a micro-batch needs at least 2 examples; raise it, or use "
                        "method.loss_type='apo_zero_unpaired', which has no KL term"
                    )
        self.chat_template = RunTemplate(self.tokenizer, self.config.tokenizer.chat_template)
        return KTORecipe(self.tokenizer, self.chat_template, m, t.seq_length)

    def arrange(self, data: PreparedData, recipe: KTORecipe) -> tuple[Groups, Groups]:
        """Fixed micro-batches of the examples, with every example's KL partner tokenised."""
        m, t = self.method, self.config.train
        if data.stream is not None:
            raise DataError("KTO cannot train from a stream: its micro-batches (and the KL pairs "
                            "and reference log-probs they fix) are drawn from the whole dataset; "
                            "pass a datasets.Dataset or a file, with data.streaming=False")
        if len(data.train) < (2 if m.loss_type == "kto" else 1):
            raise DataError(data.report.too_few(2 if m.loss_type == "kto" else 1, t.seq_length))
        if data.mixture is not None:
            return self.arrange_mixture(data, recipe)
        self._set_weights(data.store.column("label")[data.train.rows])
        self._check_eval(data)
        return micro_batches(data, recipe, t.batch_size, t.eval_batch_size or t.batch_size, t.seed,
                             with_kl=m.loss_type == "kto", num_proc=self.config.data.num_proc)

    def arrange_mixture(self, data: PreparedData, recipe: KTORecipe) -> tuple[Groups, Groups]:
        """Micro-batches of each planned epoch's draw, one epoch after the other (each with its
        KL pairs, within its micro-batches)."""
        m, t, mixture = self.method, self.config.train, data.mixture
        n = mixture.examples_per_epoch
        if n < (2 if m.loss_type == "kto" else 1):
            raise DataError(f"a mixture of {n} example per epoch: KTO needs at least 2 (set the "
                            "Mixture's examples_per_epoch higher)")
        groups = len(micro_batch_offsets(n, t.batch_size)) - 1
        n_epochs = len(plan_epochs(t, lambda e: groups, lambda g: epoch_steps(
            self.accelerator, g, 1, t.gradient_accumulation_steps)))
        train, evaluation, starts = epoch_micro_batches(
            data, recipe, t.batch_size, t.eval_batch_size or t.batch_size, t.seed,
            with_kl=m.loss_type == "kto", num_proc=self.config.data.num_proc,
            epochs=lambda: [mixture.rows(e) for e in range(n_epochs)], epochs_key=n_epochs)
        self.epoch_ranges = EpochRanges(starts, t.seed)
        layout = train.layout  # the class counts of an epoch: the first one's
        self._set_weights(data.store.column("label")[layout.flat[:layout.offsets[starts[1]]]])
        self._check_eval(data)
        return train, evaluation

    def _check_eval(self, data: PreparedData) -> None:
        m = self.method
        eval_labels = data.store.column("label")[data.eval.rows]
        self._eval_sft_scale = sft_scale(len(eval_labels), int(np.count_nonzero(eval_labels)))
        if m.loss_type == "kto" and len(data.eval) == 1:
            raise DataError("only 1 evaluation example: the KL estimate pairs each example with "
                            "another one's completion, so evaluation needs at least 2; give more "
                            "eval_samples, or raise train.eval_split")

    def _set_weights(self, labels) -> None:
        """Resolves desirable_weight="auto", reports the class counts and checks their balance."""
        m = self.method
        n_d = int(np.count_nonzero(labels))
        n_u = len(labels) - n_d
        try:
            if m.desirable_weight == "auto":
                self.weights = auto_weights(n_d, n_u)
            else:
                self.weights = (float(m.desirable_weight), float(m.undesirable_weight))
            ok, message, _ = class_balance(n_d, n_u, *self.weights)
        except ValueError as e:  # one class is missing
            raise KTODataError(str(e)) from None
        self.class_counts = (n_d, n_u)
        if self.accelerator.is_main_process:
            print(f"KTO data: {n_d} desirable, {n_u} undesirable examples; desirable_weight="
                  f"{self.weights[0]:.4g}, undesirable_weight={self.weights[1]:.4g}", flush=True)
            if not ok:
                warnings.warn(message, stacklevel=2)

    def make_loader(self, items: list, shuffle: bool, batch_size: int | None = None):
        return super().make_loader(items, shuffle, batch_size=1)  # an item is a micro-batch

    def eval_items_per_batch(self) -> int:
        return 1

    def collate(self, items: list[list[dict]]) -> dict:
        """Fixed micro-batches -> one batch; KL pairs come from each example's own micro-batch."""
        items = materialize(items)  # a view of stored micro-batches: fetched at once
        examples, kl_rows = [], []
        for group in items:
            examples.extend(group)
            if self.method.loss_type == "kto":
                # each example's mismatched pair within its micro-batch, made by the pipeline
                kl_rows.extend(ex["kl"] for ex in group)
        batch = kto_batch(examples, kl_rows, pad_token_id=self.tokenizer.pad_token_id,
                          seq_length=self.config.train.seq_length, packing=bool(self.packing),
                          num_rows=self._fixed_rows(), boundaries=self.packing == BOUNDARIES)
        if all("ref_logp" in ex for ex in examples):
            batch["ref_logps"] = torch.tensor([ex["ref_logp"] for ex in examples],
                                              dtype=torch.float64)
            if kl_rows:
                batch["kl_ref_logps"] = torch.tensor([ex["kl_ref_logp"] for ex in examples],
                                                     dtype=torch.float64)
        return batch

    def _fixed_rows(self) -> int | None:
        """ZeRO-3: one shape on every process ([most examples in a micro-batch, seq_length]), so
        all run the same chunks of the loss; None otherwise (rows as packed)."""
        if not is_zero3(self.accelerator):
            return None
        if getattr(self, "_most_examples", None) is None:  # the micro-batches are fixed
            self._most_examples = int(max(np.max(items.sizes(), initial=0) for items in
                                          (self.train_items, self.eval_items) if len(items)))
        return self._most_examples

    # ------------------------------------------------------------------ the model

    @property
    def packing(self):
        """How packed rows keep documents apart (`model.probe`), None for padded rows; before
        the model is loaded, what the config asks for."""
        path = getattr(self, "loss_path", None)
        return path.packing if path is not None else self.method.packing

    def setup_model(self) -> None:
        """Dropout off, then the load-time check, which tries per-document attention first for
        packed rows of a model on SDPA (the same log-probs, faster), then the model's own."""
        if self.method.disable_dropout:
            disable_dropout(self.model)
        attentions = ((DOCUMENT_ATTENTION,) if self.config.model.attn_implementation is None
                      and attention_of(self.model) == "sdpa" else ())
        self.check_loss_path(self.method.packing, attentions)
        self.document_attention = attention_of(self.model) == DOCUMENT_ATTENTION
        self.reference = KTOReference(self)

    def setup_prepared_model(self) -> None:
        self.reference.prepare()

    @property
    def ref_mode(self) -> str:
        return self.reference.mode

    @property
    def ref_model(self):
        return self.reference.model

    def completion_logps(self, model, batch: dict, prefix: str = "", router: bool = False):
        """(completion log-prob [B], completion tokens [B], the MoE load-balancing loss or None)
        of the batch's examples (prefix "") or KL rows ("kl_"); averaged over tokens with
        `method.average_log_probs`. `router`: the load-balancing loss too, when the model has
        one."""
        path = self.loss_path
        forward = path.router.forward_kwargs if router else {}
        sums, counts, out = completion_logps(model, batch, prefix, self.method.loss_chunk_size,
                                             select=not is_zero3(self.accelerator),
                                             head=path.head, **forward)
        aux = None
        if forward:
            aux = path.router.aux_loss(out, batch[prefix + "document_index"] >= 0)
        if self.method.average_log_probs:
            return sums / counts.clamp(min=1).to(sums.dtype), counts, aux
        return sums, counts, aux

    # ------------------------------------------------------------------ loss

    def loss_weight(self, batch: dict) -> float:
        return batch["num_examples"]

    @torch.no_grad()
    def before_step(self, micro: list[dict]) -> list[float]:
        """The step's forward-only passes, the policy on the KL rows and the reference; returns
        this process's (sum of the KL pairs' log-ratios, KL pairs, examples, desirable ones)."""
        kto = self.method.loss_type == "kto"
        ratio_sum, pairs, examples, desirable = 0.0, 0, 0, 0
        for batch in micro:
            batch.update(self.to_device(batch))
            batch["ref_logps"], batch["kl_ref_logps"] = self.reference.logps(batch)
            batch["kl_logps"] = self.completion_logps(self.model, batch, "kl_")[0] if kto else None
            if batch.get("padding"):
                continue
            if kto:
                ratios = batch["kl_logps"].double() - batch["kl_ref_logps"].double()
                ratio_sum = ratio_sum + ratios.sum()
                pairs += len(batch["kl_logps"])
            examples += batch["num_examples"]
            desirable += batch["num_desirable"]
        return [ratio_sum, pairs, examples, desirable]  # the sum stays on the device

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        m = self.method
        policy, tokens, aux = self.completion_logps(model, batch, router=True)
        desirable = batch["is_desirable"]
        if "kl_logps" in batch:  # inside a training step: its reference point and counts
            kl_sum, kl_count, n, n_d = self.step_totals
            ref = batch["ref_logps"]
            z = reference_point(kl_sum, kl_count) if m.loss_type == "kto" else None
            scale = sft_scale(n, n_d)
        else:  # evaluation: this batch's reference point, over the processes
            ref, z, scale = self._evaluation_terms(model, batch)
        losses, z, rewards = kto_loss(
            policy, ref.to(policy.device), desirable, beta=m.beta,
            desirable_weight=self.weights[0], undesirable_weight=self.weights[1],
            loss_type=m.loss_type, z=z)
        loss_sum = losses.sum()
        if m.sft_weight > 0:
            sums = policy * tokens if m.average_log_probs else policy
            loss_sum = loss_sum + scale * kto_sft_losses(sums, tokens, desirable,
                                                         sft_weight=m.sft_weight).sum()
        n_d = batch["num_desirable"]
        n_u = batch["num_examples"] - n_d
        figures = {}
        if aux is not None:  # as SFT: each micro-batch weighted by its share (its examples)
            loss_sum = loss_sum + self.loss_path.router.coef * batch["num_examples"] * aux
            figures["aux_loss"] = (aux.detach() * batch["num_examples"], batch["num_examples"])
        logps = policy.detach()
        # sums by class, left on the device (the step reads them with its other figures)
        sums = [torch.where(desirable, rewards, 0.0).sum(), torch.where(desirable, 0.0, rewards).sum(),
                torch.where(desirable, logps, 0.0).sum(), torch.where(desirable, 0.0, logps).sum()]
        metrics = {
            "rewards/chosen": (sums[0], n_d), "rewards/rejected": (sums[1], n_u),
            "logps/chosen": (sums[2], n_d), "logps/rejected": (sums[3], n_u),
            # counts per step: training_step sets their count to 1 once the step is summed
            "count/chosen": (n_d, 0), "count/rejected": (n_u, 0),
        }
        if m.loss_type == "kto":
            metrics["kl"] = (z, 1)
        return loss_sum, {**metrics, **figures}

    def _evaluation_terms(self, model, batch: dict):
        """Reference log-probs, z and the SFT scale of one evaluation batch (not in a step)."""
        ref, kl_ref = self.reference.logps(batch)
        z = None
        if self.method.loss_type == "kto":
            with torch.no_grad():
                kl = self.completion_logps(model, batch, "kl_")[0]
            weight = 0.0 if batch.get("padding") else 1.0
            totals = torch.stack([(kl.double() - kl_ref.double()).sum() * weight,
                                  torch.tensor(float(len(kl)) * weight, dtype=torch.float64,
                                               device=kl.device)])
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, "sum")
            z = reference_point(totals[0].cpu(), totals[1].cpu())
        return ref, z, self._eval_sft_scale

    def training_step(self, micro: list[dict]) -> dict:
        out = super().training_step(micro)
        for name in ("count/chosen", "count/rejected"):
            if name in out["metrics"]:
                out["metrics"][name] = (out["metrics"][name][0], 1.0)
        if self.reference.syncs_at(self.step + 1):
            self.reference.sync()
        return out

    def log(self, values: dict) -> dict:
        # the margin of the window's means: mean chosen reward - mean rejected reward, when both
        # classes were measured
        for prefix in ("", "eval/"):
            chosen = values.get(prefix + "rewards/chosen")
            rejected = values.get(prefix + "rewards/rejected")
            if chosen is not None and rejected is not None:
                values = {**values, prefix + "rewards/margins": chosen - rejected}
        return super().log(values)
