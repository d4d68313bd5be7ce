"""The load-balancing loss of a mixture-of-experts model, as transformers adds it.

With `output_router_logits=True` a transformers MoE model returns its routers' logits and an
`aux_loss` (Switch Transformer's load balancing), and adds `router_aux_loss_coef * aux_loss` to
its loss. The library computes its own loss, so it adds the same term. The model's `aux_loss`
counts every token of the batch it was given, which for a packed row includes its padding tail;
so where the model's module has transformers' `load_balancing_loss_func`, the term is computed
with it over the real tokens only (the padded batch's `attention_mask`, as the model would).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor

from trainer_lib.ops.head import unwrapped

_SIGNATURE = ["gate_logits", "num_experts", "top_k", "attention_mask"]


def causal_lm(model):
    """The transformers model under DDP/DeepSpeed and PEFT wrappers."""
    model = unwrapped(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass(frozen=True)
class RouterLoss:
    """`coef` x the load-balancing loss, added to the loss (0: off, no router logits asked)."""

    coef: float = 0.0
    # (router logits, token mask) -> the loss, over the real tokens; None: the model's aux_loss
    over_tokens: Optional[Callable[[Any, Tensor], Tensor]] = None

    @classmethod
    def of(cls, model, coef: Optional[float] = None) -> "RouterLoss":
        """The model's own (its `router_aux_loss_coef`) or `coef` when given; off for a model
        without routers (its forward takes no `output_router_logits`)."""
        lm = causal_lm(model)
        if "output_router_logits" not in inspect.signature(type(lm).forward).parameters:
            return cls()
        if coef is None:
            coef = getattr(lm, "router_aux_loss_coef", None)
            if coef is None:
                coef = getattr(lm.config, "router_aux_loss_coef", None)
        if not coef:
            return cls()
        return cls(coef=float(coef), over_tokens=_token_loss(lm))

    @property
    def forward_kwargs(self) -> dict:
        return {"output_router_logits": True} if self.coef else {}

    def aux_loss(self, out, token_mask: Tensor) -> Tensor:
        """The load-balancing loss of one forward's output (without the coefficient)."""
        if self.over_tokens is not None:
            return self.over_tokens(out.router_logits, token_mask)
        return out.aux_loss

    def without_token_mask(self) -> "RouterLoss":
        return RouterLoss(self.coef, None)


def _token_loss(lm) -> Optional[Callable[[Any, Tensor], Tensor]]:
    """transformers' load_balancing_loss_func of the model's module with the model's expert
    counts, when it has them under the usual names."""
    fn = getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)
    experts, top_k = getattr(lm, "num_experts", None), getattr(lm, "num_experts_per_tok", None)
    if fn is None or not isinstance(experts, int) or not isinstance(top_k, int):
        return None
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    if names != _SIGNATURE:
        return None
    return lambda router_logits, mask: fn(router_logits, experts, top_k, mask)
