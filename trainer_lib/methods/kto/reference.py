"""The KTO reference model (`method.ref_model`): precomputed log-probs, the policy with its
adapters off, or a frozen copy (the only one that can follow the policy, TR-DPO).

Every reference pass runs in eval mode under the policy's autocast, attention and dropout, on
exactly the rows the policy sees, so at the first step the reference equals the policy bit for
bit: z and the rewards are 0.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from trainer_lib.data.packing import document_boundaries
from trainer_lib.data.store import Groups
from trainer_lib.errors import ConfigError
from trainer_lib.methods.kto.batches import kept_positions
from trainer_lib.model.dropout import disable_dropout
from trainer_lib.model.loading import adapter_base, load_model
from trainer_lib.model.lora import is_peft_model
from trainer_lib.model.probe import attention_of, switch_attention
from trainer_lib.ops.documents import host_documents, host_padding
from trainer_lib.runtime.deepspeed import is_zero3, prepare_reference_model
from trainer_lib.runtime.fsdp import reshard

REFERENCE_ADAPTER = "reference"


def check_reference_settings(config) -> None:
    """Settings that cannot work together, named before anything is loaded."""
    m = config.method
    path = config.model.model_path
    peft = config.model.peft_config is not None or (path and adapter_base(path))
    if m.ref_model == "adapter" and not peft:
        raise ConfigError('method.ref_model="adapter" needs a PEFT policy (set '
                          'model.peft_config); use "precompute" or "copy" for a full model')
    if not m.sync_ref_model:
        return
    if peft:  # (ref_model "precompute" and "adapter" are refused by KTOConfig.validate)
        raise ConfigError(
            "method.sync_ref_model moves the reference towards the policy parameter by "
            "parameter; a PEFT policy (model.peft_config, or a model_path holding an adapter) "
            "trains other parameters than its reference has: use a full model, or set "
            "method.sync_ref_model=false")
    if config.train.resume_from_checkpoint:
        raise ConfigError(
            "method.sync_ref_model: checkpoints do not hold the moving reference model, so the "
            "run cannot be resumed exactly; start it again, or resume with "
            "method.sync_ref_model=false")


class KTOReference:
    """The reference of one KTO run (its mode, and its model when it has one of its own)."""

    def __init__(self, trainer):
        self.trainer = trainer
        m, model = trainer.method, trainer.model
        mode = m.ref_model
        if mode == "auto":
            mode = ("copy" if m.sync_ref_model else "adapter" if is_peft_model(model)
                    else "precompute")
        self.mode, self.model, self.adapter = mode, None, None
        path = trainer.config.model.model_path
        if mode == "copy":
            # loaded afresh rather than copied: under ZeRO-3 the policy may already be sharded
            # (a copy would hold empty shards); a fresh LoRA's reference is its base model, a
            # carried adapter's the adapter as loaded (load_model loads it so)
            self.model = load_model(trainer.config.evolve(
                model=dict(peft_config=None, num_layers_unfrozen=-1, gradient_checkpointing=False)))
            if m.disable_dropout:
                disable_dropout(self.model)
            # the attention the load-time check left the policy on (the same log-probs)
            switch_attention(self.model, attention_of(model))
        elif mode == "adapter" and adapter_base(path):
            model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            self.adapter = REFERENCE_ADAPTER
        if m.sync_ref_model:
            names = [n for n, _ in self.model.named_parameters()]
            if names != [n for n, _ in model.named_parameters()]:
                raise ConfigError("method.sync_ref_model: the reference copy's parameters do not "
                                  "match the policy's")

    def prepare(self) -> None:
        """Once the policy is prepared: the copy prepared like it, or the precompute pass."""
        if self.model is not None:
            self.model = prepare_reference_model(self.trainer.accelerator, self.model)
        if self.mode == "precompute":
            self.precompute(self.trainer.train_items + self.trainer.eval_items)

    # ------------------------------------------------------------------ log-probs

    @contextmanager
    def _reference(self):
        """The model that gives reference log-probs, ready to run."""
        if self.mode == "copy":  # prepared with the policy's precision (prepare_reference_model)
            yield self.model
            return
        # the policy unwrapped from DDP/DeepSpeed but not from accelerate's autocast wrapper
        model = self.trainer.accelerator.unwrap_model(self.trainer.model, keep_fp32_wrapper=True)
        was_training = model.training
        model.eval()
        try:
            with self._adapter_off(model):
                yield model
        finally:
            model.train(was_training)

    @contextmanager
    def _adapter_off(self, model):
        if self.mode != "adapter":
            yield
        elif self.adapter is None:
            with model.disable_adapter():
                yield
        else:
            active = model.active_adapter
            model.set_adapter(self.adapter, inference_mode=True)
            try:
                yield
            finally:
                model.set_adapter(active)  # trainable again, as it was

    @torch.no_grad()
    def logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference log-probs of a batch's examples and KL rows (from the batch when
        precomputed)."""
        if self.mode == "precompute":
            return batch["ref_logps"], batch.get("kl_ref_logps")
        with self._reference() as model:
            result = self._pass(model, batch)
            if self.mode == "copy":
                reshard(model)  # FSDP2 keeps the head gathered until a backward that never comes
            return result

    def _pass(self, model, batch: dict):
        ref = self.trainer.completion_logps(model, batch)[0]
        kl = None
        if "kl_input_ids" in batch:
            kl = self.trainer.completion_logps(model, batch, "kl_")[0]
        return ref, kl

    @torch.no_grad()  # not inference_mode: ZeRO-3 would keep gathered weights as inference tensors
    def precompute(self, groups) -> None:
        """Stores `ref_logp` and `kl_ref_logp` on every example of `groups` (stored micro-batches,
        or lists of example dicts). Each process computes a share of
        the micro-batches, all running the same number of passes (a sharded model needs every
        process in each), and the shares are exchanged."""
        trainer, acc = self.trainer, self.trainer.accelerator
        per_pass = self._micro_batches_per_pass()
        mine = list(range(acc.process_index, len(groups), acc.num_processes))
        passes = -(-(-(-len(groups) // acc.num_processes)) // per_pass)
        results = []
        sizes = groups.sizes() if isinstance(groups, Groups) else [len(g) for g in groups]
        with self._reference() as model:
            for p in range(passes):
                chunk = mine[p * per_pass:(p + 1) * per_pass]
                # repeats keep the processes in step (and, under ZeRO-3, at one shape)
                fill = per_pass if is_zero3(acc) else max(len(chunk), 1)
                batches = [trainer.collate([groups[g]]) for g in chunk + [0] * (fill - len(chunk))]
                ref, kl = self._pass(model, trainer.to_device(concat_batches(batches)))
                ref, kl = ref.tolist(), kl.tolist() if kl is not None else [None] * len(ref)
                start = 0
                for g in chunk:
                    n = int(sizes[g])
                    results.append((g, ref[start:start + n], kl[start:start + n]))
                    start += n
        if acc.num_processes > 1:
            shares = [None] * acc.num_processes
            torch.distributed.all_gather_object(shares, results)
            results = [r for share in shares for r in share]
        for g, ref, kl in results:
            if isinstance(groups, Groups):  # carried by every later fetch of these examples
                groups.set_reference(g, ref, kl)
            else:
                for ex, a, b in zip(groups[g], ref, kl):
                    ex["ref_logp"], ex["kl_ref_logp"] = a, b

    def _micro_batches_per_pass(self) -> int:
        """Micro-batches in one precompute pass. Several only when their rows give the same
        log-probs side by side as alone (per-document attention; fixed ZeRO-3 shapes), which
        keeps the reference exactly equal to the initial policy."""
        t, m = self.trainer.config.train, self.trainer.method
        if not (self.trainer.document_attention or is_zero3(self.trainer.accelerator)):
            return 1
        return max(1, (m.precompute_ref_batch_size or t.batch_size) // t.batch_size)

    # ------------------------------------------------------------------ TR-DPO

    def syncs_at(self, step: int) -> bool:
        m = self.trainer.method
        return m.sync_ref_model and step % m.ref_model_sync_steps == 0

    @torch.no_grad()
    def sync(self) -> None:
        """ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter."""
        acc, alpha = self.trainer.accelerator, self.trainer.method.ref_model_mixup_alpha
        policy_model = acc.unwrap_model(self.trainer.model)
        for model in (policy_model, self.model):
            reshard(model)  # FSDP2: both as shards, the same slice of each parameter here
        policy = list(policy_model.parameters())
        ref = list(getattr(self.model, "module", self.model).parameters())

        def mix():
            for r, p in zip(ref, policy):
                r.mul_(1.0 - alpha).add_(p.to(r.dtype), alpha=alpha)

        if not is_zero3(acc):
            return mix()
        import deepspeed

        # one pair at a time (never both whole models at once): gathered, mixed on the main
        # process, and only the reference's part sharded again from it
        gathered = deepspeed.zero.GatheredParameters
        for r, p in zip(ref, policy):
            with gathered([p]), gathered([r], modifier_rank=0):
                if acc.is_main_process:
                    r.mul_(1.0 - alpha).add_(p.to(r.dtype), alpha=alpha)


def concat_batches(batches: list[dict]) -> dict:
    """Several collated KTO batches as one: rows stacked (padded to the widest), documents
    renumbered. Only the keys a forward pass needs."""
    if len(batches) == 1:
        return batches[0]
    out = {"num_examples": sum(b["num_examples"] for b in batches)}
    for prefix in ("", "kl_"):
        if prefix + "input_ids" not in batches[0]:
            continue
        width = max(b[prefix + "input_ids"].shape[1] for b in batches)
        offset, parts = 0, {}
        for b in batches:
            pad = width - b[prefix + "input_ids"].shape[1]
            for key, fill in (("input_ids", 0), ("labels", -100), ("attention_mask", 0),
                              ("position_ids", None), ("document_index", -1)):
                value = b.get(prefix + key)
                if value is None:
                    continue
                if key == "document_index":
                    value = torch.where(value >= 0, value + offset, value)
                if pad:
                    tail = (torch.arange(pad).expand(len(value), pad) if fill is None else
                            torch.full((len(value), pad), fill, dtype=value.dtype))
                    value = torch.cat([value, tail], dim=1)
                parts.setdefault(key, []).append(value)
            offset += b["num_examples"]
        out.update({prefix + k: torch.cat(v) for k, v in parts.items()})
        found = kept_positions(out[prefix + "labels"], out[prefix + "document_index"])
        if prefix + "attention_mask" in out:  # padded rows: whether any has padding
            found.update(host_padding(out[prefix + "attention_mask"].numpy()))
        if prefix + "position_ids" in out:  # packed rows: their documents, from the host
            positions = out[prefix + "position_ids"].numpy()
            found.update(host_documents(positions))
            if prefix + "seq_idx" in batches[0]:  # the boundaries of the stacked rows
                found.update(document_boundaries(positions))
        out.update({prefix + k: v for k, v in found.items()})
    return out
