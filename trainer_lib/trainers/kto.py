"""KTO: aligning a causal LM from binary feedback (a thumbs up or down on single completions).

Data: the shared pipeline with `KTORecipe` (`data/kto_pipeline.py`): samples ->
`normalize_kto_samples` -> tokenised examples -> FIXED micro-batches of `train.batch_size`
examples (drawn as `fixed_micro_batches` draws them), each a loader item: a list of example dicts
(`input_ids`, `labels`, `label`, and `kl`, the tokenised mismatched pair). The loader shuffles
micro-batches as units every epoch; their composition never changes.

KL pairing: `collate` pairs prompt i of a micro-batch with completion p[i] of the same micro-batch,
p = `mismatched_pairing(B)` (a derangement for every B >= 2, odd B included). Because micro-batches
are fixed, so is every example's partner, in every epoch and on every process.

Reference model (`method.ref_model`):
- "precompute": one pass over the fixed micro-batches before training, with the initial policy
  in eval mode, stores on every example its reference log-prob and that of its KL pair; no second
  model is kept. "auto" picks it for a full model.
- "copy": a frozen copy of the initial policy (prepared like the policy under DeepSpeed).
- "adapter": the PEFT policy with its adapters disabled; "auto" picks it for a PEFT model.
All three give the same reference log-probs, so the same losses.

Loss: `compute_loss` returns the SUM of per-example losses; `loss_weight` is the number of
examples, so the loop's step loss is the mean over every example of the step, across
micro-batches and processes, and gradient accumulation gives the gradient of one big batch.
z is estimated per micro-batch (as in the paper) and averaged across processes.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch

from trainer_lib.config import ConfigError, KTOConfig
from trainer_lib.data.chat import RunTemplate
from trainer_lib.data.constants import IGNORE_INDEX
from trainer_lib.data.kto_data import KTODataError
from trainer_lib.data.kto_pipeline import KTORecipe, micro_batches
from trainer_lib.data.pipeline import PreparedData
from trainer_lib.data.samples import DataError
from trainer_lib.data.sampling import padded_collate
from trainer_lib.data.store import Groups, materialize
from trainer_lib.distributed import is_zero3, prepare_reference_model
from trainer_lib.losses.cross_entropy import causal_lm_token_nll
from trainer_lib.losses.kto import (
    auto_weights,
    class_balance,
    completion_logps,
    kto_loss,
    kto_sft_losses,
    mismatched_pairing,
)
from trainer_lib.modeling import load_model
from trainer_lib.registry import register_trainer
from trainer_lib.trainers.base import Trainer


@register_trainer(KTOConfig)
class KTOTrainer(Trainer):
    method: KTOConfig

    # ------------------------------------------------------------------ data

    def data_recipe(self) -> KTORecipe:
        m, t = self.config.method, self.config.train
        self.method = m
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
            raise DataError(f"too few examples to train on ({len(data.train)}): "
                            f"{data.report.summary()}")
        self._set_weights(data.store.column("label")[data.train.rows])
        if m.loss_type == "kto" and len(data.eval) == 1:
            raise DataError("only 1 evaluation example: the KL estimate pairs each example with "
                            "another one's completion, so evaluation needs at least 2; give more "
                            "eval_samples, or raise train.eval_split")
        return micro_batches(data, recipe, t.batch_size, t.eval_batch_size or t.batch_size, t.seed,
                             with_kl=m.loss_type == "kto", num_proc=self.config.data.num_proc)

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

    def _kl_example(self, prompt_ex: dict, completion_ex: dict) -> dict:
        """The mismatched pair of `prompt_ex` (its prompt, `completion_ex`'s completion),
        tokenised by the data pipeline; `completion_ex` must be the partner it was made with."""
        if prompt_ex.get("kl_partner") != completion_ex.get("position"):
            raise ValueError("KL pairs are tokenised with the pairing of the fixed micro-batches "
                             "(mismatched_pairing); this example's partner is another one")
        return prompt_ex["kl"]

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
                pairing = mismatched_pairing(len(group))
                kl_rows.extend(self._kl_example(group[i], group[j]) for i, j in enumerate(pairing))
        pad_id = self.tokenizer.pad_token_id
        # ZeRO-3: one shape on every process, so all run the same chunks of the loss
        width = self.config.train.seq_length if is_zero3(self.accelerator) else None
        batch = _rows(padded_collate(examples, pad_id, width), "")
        if kl_rows:
            batch.update({f"kl_{k}": v for k, v in _rows(padded_collate(kl_rows, pad_id, width),
                                                         "").items()})
        batch["is_desirable"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.bool)
        if all("ref_logp" in ex for ex in examples):
            batch["ref_logps"] = torch.tensor([ex["ref_logp"] for ex in examples],
                                              dtype=torch.float64)
            if kl_rows:
                batch["kl_ref_logps"] = torch.tensor([ex["kl_ref_logp"] for ex in examples],
                                                     dtype=torch.float64)
        batch["num_examples"] = len(examples)
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        return batch

    # ------------------------------------------------------------------ the reference model

    def setup_model(self) -> None:
        mode = self.method.ref_model
        is_peft = _is_peft(self.model)
        if mode == "auto":
            mode = "adapter" if is_peft else "precompute"
        if mode == "adapter" and not is_peft:
            raise ConfigError('method.ref_model="adapter" needs a PEFT policy (set '
                              'model.peft_config); use "precompute" or "copy" for a full model')
        self.ref_mode = mode
        self.ref_model = None
        if mode == "copy":
            # loaded afresh rather than copied: under ZeRO-3 the policy may already be sharded
            # (a copy would hold empty shards); a PEFT policy's reference is its base model
            self.ref_model = load_model(self.config.evolve(
                model=dict(peft_config=None, num_layers_unfrozen=-1, gradient_checkpointing=False)))

    def after_prepare(self) -> None:
        acc = self.accelerator
        if self.ref_model is not None:
            self.ref_model = prepare_reference_model(acc, self.ref_model)
        if self.ref_mode == "precompute":
            self._precompute_reference(self.train_items + self.eval_items)

    @torch.no_grad()
    def _precompute_reference(self, groups: list[list[dict]]) -> None:
        """Stores on every example its reference log-prob and its KL pair's, from the initial
        policy in eval mode. Each process computes a share of the micro-batches (all run the same
        number of forward passes, as a sharded model needs) and the results are exchanged."""
        acc = self.accelerator
        mine = list(range(acc.process_index, len(groups), acc.num_processes))
        rounds = -(-len(groups) // acc.num_processes)
        model, results = acc.unwrap_model(self.model), []
        with _eval_mode(model):
            for r in range(rounds):
                g = mine[r] if r < len(mine) else 0  # a repeat keeps the ranks in step
                batch = self._to_device(self.collate([groups[g]]))
                ref, kl_ref = self._reference_pass(model, batch)
                if r < len(mine):
                    kl = kl_ref.tolist() if kl_ref is not None else [None] * len(ref)
                    results.append((g, ref.tolist(), kl))
        if acc.num_processes > 1:
            shares = [None] * acc.num_processes
            torch.distributed.all_gather_object(shares, results)
            results = [r for share in shares for r in share]
        for g, ref, kl in results:
            groups.set_reference(g, ref, kl)  # carried by every later fetch of these examples

    def _reference_pass(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        avg, chunk = self.method.average_log_probs, self.method.loss_chunk_size
        ref = completion_logps(_token_logps(model, batch, chunk),
                               _completion_mask(batch["labels"]), avg)
        kl_ref = None
        if "kl_input_ids" in batch:
            kl = _rows(batch, "kl_")
            kl_ref = completion_logps(_token_logps(model, kl, chunk),
                                      _completion_mask(kl["labels"]), avg)
        return ref, kl_ref

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.ref_mode == "precompute":
            return batch["ref_logps"], batch.get("kl_ref_logps")
        if self.ref_mode == "copy":
            return self._reference_pass(self.ref_model, batch)
        model = self.accelerator.unwrap_model(self.model)
        with model.disable_adapter(), _eval_mode(model):
            return self._reference_pass(model, batch)

    # ------------------------------------------------------------------ loss

    def loss_weight(self, batch: dict) -> float:
        return batch["num_examples"]

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        m, acc, chunk = self.method, self.accelerator, self.method.loss_chunk_size
        token_logps = _token_logps(model, batch, chunk)
        mask = _completion_mask(batch["labels"])
        policy = completion_logps(token_logps, mask, m.average_log_probs)
        kl_policy = None
        if m.loss_type == "kto":
            with torch.no_grad():  # z is detached: no graph for the mismatched pairs
                kl = _rows(batch, "kl_")
                kl_policy = completion_logps(_token_logps(model, kl, chunk),
                                             _completion_mask(kl["labels"]), m.average_log_probs)
        ref, kl_ref = self.reference_logps(batch)
        desirable = batch["is_desirable"]
        reduce_mean = (lambda t: acc.reduce(t, "mean")) if acc.num_processes > 1 else None
        losses, z, rewards = kto_loss(
            policy, ref, kl_policy, kl_ref, desirable, beta=m.beta,
            desirable_weight=self.weights[0], undesirable_weight=self.weights[1],
            loss_type=m.loss_type, reduce_mean=reduce_mean)
        loss_sum = losses.sum()
        if m.sft_weight > 0:
            loss_sum = loss_sum + kto_sft_losses(token_logps, mask, desirable,
                                                 sft_weight=m.sft_weight).sum()
        n_d = int(desirable.sum())
        n_u = len(desirable) - n_d
        logps = policy.detach()
        metrics = {
            "rewards/chosen": (float(rewards[desirable].sum()), n_d),
            "rewards/rejected": (float(rewards[~desirable].sum()), n_u),
            "logps/chosen": (float(logps[desirable].sum()), n_d),
            "logps/rejected": (float(logps[~desirable].sum()), n_u),
            # counts per step: training_step sets their count to 1 once the step is summed
            "count/chosen": (n_d, 0), "count/rejected": (n_u, 0),
        }
        if m.loss_type == "kto":
            metrics["kl"] = (float(z), 1)
        return loss_sum, metrics

    def training_step(self, micro: list[dict]) -> dict:
        out = super().training_step(micro)
        for name in ("count/chosen", "count/rejected"):
            if name in out["metrics"]:
                out["metrics"][name] = (out["metrics"][name][0], 1.0)
        return out

    def log(self, values: dict) -> None:
        # the margin of the window's means: mean chosen reward - mean rejected reward
        if values.get("count/chosen") and values.get("count/rejected"):
            values = {**values,
                      "rewards/margins": values["rewards/chosen"] - values["rewards/rejected"]}
        super().log(values)


# ---------------------------------------------------------------------- helpers


def _token_logps(model, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """log p(labels[t] | tokens before t): [B, T], 0 at t = 0 and where labels are -100.
    Per-sequence sums weight tokens unequally in the backward pass, so the chunked loss
    recomputes logits there instead of precomputing uniform gradients."""
    return -causal_lm_token_nll(model, batch, chunk_size, fused_grads=False)


def _completion_mask(labels: torch.Tensor) -> torch.Tensor:
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False  # the first token is never predicted
    return mask


def _rows(batch: dict, prefix: str) -> dict:
    return {k: batch[prefix + k] for k in ("input_ids", "attention_mask", "labels")}


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
