"""A causal LM's head as the chunked loss applies it, and the forward pass that feeds it.

The loss never asks the model for its logits. It runs the model's own forward with the output
layer handed no tokens and keeps that layer's input, so whatever the model does to its hidden
states before the head (MiniCPM3 scales them) is already in it. What the model does after the
output layer is a `Head`: a scale (Cohere's `logit_scale`, Granite's `1 / logits_scaling`,
FalconH1's `lm_head_multiplier`) and a soft cap (Gemma 2 and 3). A head that does anything else
is found when the model loads (`trainer_lib.model.probe`), and the loss then takes the model's own
logits instead (`Head.own_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from trainer_lib.ops.documents import DOCUMENT_KEYS, run_model

# the keys of a batch that go to the model's forward: every batch has input_ids, a padded one an
# attention_mask, a packed one position_ids; the boundary keys only packed rows whose model
# needs them (`PackedCollator(boundaries=True)`); `model_inputs` adds the rows' layout as the
# collator knows it (`ops.documents.DOCUMENT_KEYS`), which `run_model` hands to the forward
FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids")
BOUNDARY_KEYS = ("seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# model types whose `logits_scaling` means something else than Granite's division of the logits
_LOGITS_SCALING_MULTIPLIES = frozenset({"hyperclovax"})
_LOGITS_SCALING_BEFORE_HEAD = frozenset({"minicpm3"})  # in the head's input already


@dataclass(frozen=True)
class Head:
    """What a model does to its output layer's result to make its logits: multiply by `scale`,
    then soft-cap (`tanh(x / softcap) * softcap`). `own_logits`: the loss takes the model's own
    logits (a head the chunked loss cannot reproduce)."""

    scale: Optional[float] = None
    softcap: Optional[float] = None
    own_logits: bool = False

    @classmethod
    def of(cls, config) -> "Head":
        """The head a model config describes, under the names transformers' models use."""
        scale = 1.0
        if getattr(config, "logit_scale", None) is not None:  # Cohere, Cohere2
            scale *= float(config.logit_scale)
        if getattr(config, "lm_head_multiplier", None) is not None:  # FalconH1
            scale *= float(config.lm_head_multiplier)
        scaling = getattr(config, "logits_scaling", None)  # Granite (all of them)
        model_type = getattr(config, "model_type", "")
        if scaling is not None and model_type not in _LOGITS_SCALING_BEFORE_HEAD:
            scale = scale * scaling if model_type in _LOGITS_SCALING_MULTIPLIES else scale / scaling
        softcap = (getattr(config, "final_logit_softcapping", None)  # Gemma 2, Gemma 3
                   or getattr(config, "logits_soft_cap", None))  # RecurrentGemma
        return cls(scale=None if scale == 1.0 else scale,
                   softcap=float(softcap) if softcap else None)

    def logits(self, output: Tensor) -> Tensor:
        """The output layer's result -> the model's logits, in float32."""
        logits = output.float()
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> str:
        if self.own_logits:
            return "the model's own logits"
        parts = [f"logits x {self.scale:g}"] if self.scale is not None else []
        if self.softcap is not None:
            parts.append(f"soft cap {self.softcap:g}")
        return ", ".join(parts) or "plain"


def model_inputs(batch: dict, prefix: str = "") -> dict:
    """The forward's inputs from a batch (prefix "kl_" for KTO's KL rows)."""
    inputs = {k: batch.get(prefix + k) for k in FORWARD_KEYS}
    inputs.update({k: batch[prefix + k] for k in BOUNDARY_KEYS + DOCUMENT_KEYS
                   if prefix + k in batch})
    return inputs


def unwrapped(model):
    """The model under a DDP or DeepSpeed wrapper (a PEFT model stays one: it passes attribute
    lookups to its base model)."""
    return getattr(model, "module", model)


def forward_to_head(model, inputs: dict, keep_logits: bool = False, **forward) -> tuple[Any, Any]:
    """(the output layer's input [B, T, H], the model's output) of the model's own forward.

    The model's top-level forward runs (so DDP and DeepSpeed see the call); its output layer is
    handed no tokens (`keep_logits=False`), so no logits are made, or all of them. The first
    item is None when the output layer was never called with the hidden states.
    """
    head = unwrapped(model).get_output_embeddings()
    seen = []

    def take(module, args):
        seen.append(args[0])
        if not keep_logits:
            return (args[0][..., :0, :],) + tuple(args[1:])
        return None

    # first among the head's hooks, so a wrapper's own (ZeRO-3 gathering the weight) sees what
    # the head runs on
    handle = head.register_forward_pre_hook(take, prepend=True) if head is not None else None
    try:
        out = run_model(model, inputs, use_cache=False, **forward)
    finally:
        if handle is not None:
            handle.remove()
    return (seen[0] if len(seen) == 1 else None), out
