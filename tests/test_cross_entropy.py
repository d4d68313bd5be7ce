import math

import pytest
import torch
import torch.nn.functional as F
from plain import sequence_logps
from torch import nn

from trainer_lib.ops.cross_entropy import auto_chunk_size, causal_lm_token_nll, chunked_token_nll
from trainer_lib.ops.head import Head

torch.set_num_threads(1)

N, H, V = 37, 16, 53  # vocab not divisible by the chunk size, last chunk partial


def _case(dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.3)
        if bias:
            head.bias.copy_(torch.randn(V, generator=g) * 0.1)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100
    targets[8:16] = -100  # with chunk_size 8, the second chunk has no target at all
    weights = torch.rand(N, generator=g) + 0.5
    return head, hidden, targets, weights


def _reference(head, hidden, targets, weights, transform=Head()):
    hidden = hidden.detach().clone().requires_grad_()
    logits = head(hidden).float()
    if transform.scale is not None:
        logits = logits * transform.scale
    if transform.softcap is not None:
        logits = torch.tanh(logits / transform.softcap) * transform.softcap
    nll = F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
    (nll * weights).sum().backward()
    grads = [hidden.grad] + [p.grad for p in head.parameters()]
    head.zero_grad(set_to_none=True)
    return nll.detach(), grads


def _ours(lm_head, hidden, targets, weights, **kw):
    head = lm_head
    hidden = hidden.detach().clone().requires_grad_()
    nll = chunked_token_nll(hidden, lm_head, targets, chunk_size=8, **kw)
    (nll * weights).sum().backward()
    grads = [hidden.grad] + [p.grad for p in head.parameters()]
    head.zero_grad(set_to_none=True)
    return nll.detach(), grads


MODES = [
    dict(recompute=False, fused_grads=True),
    dict(recompute=False, fused_grads=False),
    dict(recompute=True),
]


@pytest.mark.parametrize("mode", MODES, ids=["fused", "lse-recompute", "checkpoint"])
@pytest.mark.parametrize("uniform", [True, False], ids=["sum", "weighted"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("transform", [Head(), Head(softcap=3.0), Head(scale=0.4),
                                       Head(scale=2.5, softcap=3.0)],
                         ids=["plain", "softcap", "scale", "scale-softcap"])
def test_matches_cross_entropy_float32(mode, uniform, bias, transform):
    """The head's own transforms (Cohere's or Granite's scale, Gemma's soft cap) inside the
    chunks: the loss and every gradient as plain cross-entropy on the transformed logits."""
    head, hidden, targets, weights = _case(bias=bias)
    if uniform:
        weights = torch.full_like(weights, 0.25)
    ref_nll, ref_grads = _reference(head, hidden, targets, weights, transform)
    nll, grads = _ours(head, hidden, targets, weights, head=transform, **mode)
    assert nll.dtype == torch.float32
    assert (nll[targets == -100] == 0).all()
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grads, ref_grads):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES, ids=["fused", "lse-recompute", "checkpoint"])
def test_matches_cross_entropy_bfloat16(mode):
    head, hidden, targets, weights = _case(dtype=torch.bfloat16)
    ref_nll, ref_grads = _reference(head, hidden, targets, weights)
    nll, grads = _ours(head, hidden, targets, weights, **mode)
    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll, ref_nll, rtol=2e-2, atol=2e-2)
    for ours, ref in zip(grads, ref_grads):
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), ref.float(), rtol=5e-2, atol=2e-2)


def test_all_ignored_gives_zero_loss_and_zero_grad():
    head, hidden, targets, weights = _case()
    targets = torch.full_like(targets, -100)
    for mode in MODES:
        nll, grads = _ours(head, hidden, targets, weights, **mode)
        assert (nll == 0).all()
        for g in grads:
            assert g is None or (g == 0).all()


def test_frozen_head_and_no_grad():
    head, hidden, targets, weights = _case()
    head.weight.requires_grad_(False)
    ref_nll, ref_grads = _reference(head, hidden, targets, weights)
    nll, grads = _ours(head, hidden, targets, weights, recompute=False)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(chunked_token_nll(hidden, head, targets, chunk_size=8), ref_nll)


def _tiny_llama(**extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, **extra,
    )
    return LlamaForCausalLM(config).eval()


def test_causal_lm_token_nll_matches_model_logits():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 101, (2, 12), generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt without loss
    labels[1, 9:] = -100  # right padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    batch = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask)

    nll = causal_lm_token_nll(model, batch, chunk_size=5)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1), reduction="none", ignore_index=-100
    ).view(2, 11)
    assert nll.shape == (2, 12)
    assert (nll[:, 0] == 0).all()
    torch.testing.assert_close(nll[:, 1:], ref, rtol=1e-5, atol=1e-5)

    # Model's own mean loss over the same tokens.
    hf_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    n_loss_tokens = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(nll.sum() / n_loss_tokens, hf_loss, rtol=1e-5, atol=1e-6)

    logp, count = sequence_logps(nll, labels)
    torch.testing.assert_close(logp, -ref.sum(-1))
    assert count.tolist() == [(labels[0, 1:] != -100).sum().item(), (labels[1, 1:] != -100).sum().item()]


def test_causal_lm_token_nll_softcap_and_gradients():
    model = _tiny_llama(tie_word_embeddings=True)  # head gradient also reaches the embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.config.final_logit_softcapping = 2.0
    input_ids = torch.randint(0, 101, (1, 10), generator=torch.Generator().manual_seed(2))
    labels = input_ids.clone()
    nll = causal_lm_token_nll(model, dict(input_ids=input_ids, labels=labels), chunk_size=4)
    nll.sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logits = model(input_ids=input_ids).logits.float()  # Llama does not apply the softcap itself
    logits = torch.tanh(logits / 2.0) * 2.0
    ref = F.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none")
    torch.testing.assert_close(nll[0, 1:], ref.detach(), rtol=1e-5, atol=1e-5)
    ref.sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert math.isfinite(nll.sum().item())


def test_automatic_chunks_shrink_as_the_vocabulary_grows_and_stay_exact():
    # a chunk's float32 logits stay near 2**25 elements whatever the vocabulary
    for vocab in (32_000, 128_256, 262_144):
        assert abs(auto_chunk_size(vocab) * vocab - 2**25) <= vocab
    assert auto_chunk_size(1_000) == 8192 and auto_chunk_size(10**7) == 64  # clamped

    vocab, n = 70_000, 600  # 479 tokens per chunk: one full chunk and a partial one
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(8, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, 8, generator=g) * 0.3)
    hidden = torch.randn(n, 8, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[:50] = -100
    ref_nll, ref_grads = _reference(head, hidden, targets, torch.ones(n))
    h = hidden.clone().requires_grad_()
    nll = chunked_token_nll(h, head, targets)  # chunk size from the vocabulary
    nll.sum().backward()
    torch.testing.assert_close(nll.detach(), ref_nll)
    # sums over 70k logits in another order: float32 rounding, not a different value
    torch.testing.assert_close(h.grad, ref_grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.weight.grad, ref_grads[1], rtol=1e-4, atol=1e-6)
