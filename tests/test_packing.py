import random

import numpy as np
import pytest
import torch
from plain import pack_dataset

from trainer_lib.data.packing import PackedCollator, best_fit_decreasing
from trainer_lib.data.padding import length_grouped_order, padded_collate
from trainer_lib.ops.cross_entropy import causal_lm_token_nll

torch.set_num_threads(1)

VOCAB, PAD = 101, 0


# ------------------------------------------------------------------ best fit decreasing


def test_bfd_small_case_by_hand():
    # Longest first: 7 -> new bin 0 (room 3); 5 -> new bin 1 (room 5); 4 -> bin 1 (room 1);
    # 3 -> bin 0 (room 0); 2 -> new bin 2 (room 8); 1 -> bin 1, the tightest fit (room 0).
    assert best_fit_decreasing([5, 3, 7, 2, 4, 1], 10) == [[2, 1], [0, 4, 5], [3]]
    # Ties: equal lengths keep index order, equal rooms prefer the earlier bin.
    assert best_fit_decreasing([4, 4, 4, 4, 2, 2], 6) == [[0, 4], [1, 5], [2], [3]]


def test_bfd_properties_and_determinism():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(2000)]
    bins = best_fit_decreasing(lengths, 512)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert bins == best_fit_decreasing(list(lengths), 512)
    lower_bound = -(-sum(lengths) // 512)
    assert len(bins) <= lower_bound * 1.05 + 1  # BFD is near-optimal on such data


def test_bfd_rejects_items_that_cannot_fit():
    with pytest.raises(ValueError, match="item 1 has length 11"):
        best_fit_decreasing([3, 11], 10)


def test_the_collator_refuses_rows_it_cannot_lay_out():
    ex = dict(input_ids=list(range(10)), labels=[-100] * 3 + list(range(3, 10)))
    with pytest.raises(ValueError, match="a row holds 10 tokens, more than seq_length=8"):
        PackedCollator(0, 8)([[ex]])
    with pytest.raises(ValueError, match="an example has 2 input_ids but 1 labels"):
        PackedCollator(0, 8)([[dict(input_ids=[1, 2], labels=[1])]])


# ------------------------------------------------------------------ collation


def _examples(lengths, seed=0, prompt=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        labels = [-100] * min(prompt, n) + ids[prompt:]  # a prompt without loss, then a completion
        out.append(dict(input_ids=ids, labels=labels))
    return out


def test_packed_collator_layout():
    rows = [[dict(input_ids=[5, 6, 7], labels=[5, 6, 7]), dict(input_ids=[8, 9], labels=[-100, 9])],
            [dict(input_ids=[1], labels=[1])]]
    batch = PackedCollator(PAD, seq_length=16, pad_to_multiple_of=4)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9] + [-100] * 3, [-100] * 8]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert batch["num_tokens"] == 6 and batch["num_loss_tokens"] == 3
    fixed = PackedCollator(PAD, seq_length=16, pad_to_multiple_of=None)(rows)
    assert fixed["input_ids"].shape == (2, 16)


def test_padded_collate_layout():
    batch = padded_collate([dict(input_ids=[5, 6, 7], labels=[5, 6, 7]), dict(input_ids=[8], labels=[8])], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["num_tokens"] == 4 and batch["num_loss_tokens"] == 2


# ------------------------------------------------------------------ on a real model


def _tiny_llama(attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=PAD,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    nll = causal_lm_token_nll(model, batch, chunk_size=16)
    total = nll.sum()
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_equals_unpacked(attn):
    model = _tiny_llama(attn)
    examples = _examples([23, 5, 17, 40, 1, 9, 30, 12])
    rows = pack_dataset(examples, seq_length=48)
    assert len(rows) < len(examples)
    packed = PackedCollator(PAD, seq_length=48, pad_to_multiple_of=8)(rows)
    unpacked = padded_collate(examples, PAD)
    assert packed["num_loss_tokens"] == unpacked["num_loss_tokens"]
    assert packed["num_tokens"] == unpacked["num_tokens"] == sum(len(e["input_ids"]) for e in examples)

    loss_p, grads_p = _loss_and_grads(model, packed)
    loss_u, grads_u = _loss_and_grads(model, unpacked)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-5)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6, msg=name)


def _doc_spans(position_ids):
    starts = (position_ids == 0).nonzero().flatten().tolist() + [position_ids.numel()]
    return list(zip(starts[:-1], starts[1:]))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_documents_in_a_row_are_isolated(attn):
    model = _tiny_llama(attn).eval()
    row = _examples([7, 12, 9], seed=3)
    batch = PackedCollator(PAD, seq_length=32, pad_to_multiple_of=None)([row])
    spans = _doc_spans(batch["position_ids"][0])  # three documents, then the pad run
    assert len(spans) == 4

    @torch.no_grad()
    def logits(b):
        # use_cache=False matters: with a cache transformers skips the packing detection.
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                    attention_mask=b.get("attention_mask"), use_cache=False)
        assert torch.isfinite(out.logits).all()
        return out.logits[0]

    base = logits(batch)
    for changed, (s, e) in enumerate(spans):
        other = dict(batch, input_ids=batch["input_ids"].clone())
        other["input_ids"][0, s:e] = (other["input_ids"][0, s:e] + 7) % (VOCAB - 1) + 1
        moved = logits(other)
        for k, (s2, e2) in enumerate(spans):
            same = torch.allclose(moved[s2:e2], base[s2:e2], rtol=0, atol=1e-6)
            assert same == (k != changed), (changed, k)
        nll_base = causal_lm_token_nll(model, batch)[0]
        nll_moved = causal_lm_token_nll(model, dict(other, labels=batch["labels"]))[0]
        for k, (s2, e2) in enumerate(spans):
            if k != changed:
                torch.testing.assert_close(nll_moved[s2:e2], nll_base[s2:e2], rtol=0, atol=1e-6)

    # The test has teeth: an all-ones mask turns packing detection off and documents mix.
    leaky = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
    leaky_other = dict(leaky, input_ids=batch["input_ids"].clone())
    leaky_other["input_ids"][0, : spans[0][1]] += 1
    s, e = spans[1]
    assert not torch.allclose(logits(leaky)[s:e], logits(leaky_other)[s:e], atol=1e-6)


# ------------------------------------------------------------------ length grouping


def test_length_grouped_order():
    rng = random.Random(1)
    lengths = [rng.randint(1, 1000) for _ in range(1000)]
    order = length_grouped_order(lengths, batch_size=4, seed=7, mega_batch_mult=10)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, batch_size=4, seed=7, mega_batch_mult=10)
    assert order != length_grouped_order(lengths, batch_size=4, seed=8, mega_batch_mult=10)
    assert lengths[order[0]] == max(lengths)
    # Within a batch, lengths are close: much less spread than in a random order.
    def spread(o):
        return sum(max(lengths[i] for i in o[s : s + 4]) - min(lengths[i] for i in o[s : s + 4])
                   for s in range(0, 1000, 4))
    assert spread(order) < spread(list(range(1000))) / 5
    assert sorted(length_grouped_order([3, 1, 2], batch_size=8, seed=0)) == [0, 1, 2]
    assert length_grouped_order([], batch_size=2, seed=0) == []


def _bfd_reference(lengths, capacity):
    """Best fit decreasing written plainly (quadratic): longest first, ties by index; the open bin
    with the least room that fits, ties by the earliest bin."""
    bins, rooms = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b, room in enumerate(rooms) if room >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (rooms[b], b))
            bins[b].append(i)
            rooms[b] -= lengths[i]
        else:
            bins.append([i])
            rooms.append(capacity - lengths[i])
    return bins


def test_packing_the_lengths_column_gives_the_rows_of_plain_best_fit_decreasing():
    import numpy as np

    from trainer_lib.data.packing import pack_lengths

    rng = np.random.default_rng(5)
    for n, capacity in ((1, 8), (300, 64), (1500, 512)):
        lengths = rng.integers(1, capacity + 1, n)
        flat, offsets = pack_lengths(lengths, capacity)
        rows = [flat[offsets[b]:offsets[b + 1]].tolist() for b in range(len(offsets) - 1)]
        assert rows == _bfd_reference(lengths.tolist(), capacity)
        assert rows == best_fit_decreasing(lengths.tolist(), capacity)


def test_the_collators_layout_answers_as_transformers_own_lookups():
    """While a forward runs, transformers' packed-sequence and no-padding lookups answer from
    the collator's host arrays; the answers equal what transformers works out on the device."""
    from transformers import masking_utils

    from trainer_lib.ops.documents import host_documents, host_padding, layout_known

    packed = np.array([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0, 0]])
    single = np.tile(np.arange(9), (2, 1))
    for positions in (packed, single):
        ids = torch.zeros(positions.shape, dtype=torch.long)
        device_answer = masking_utils.find_packed_sequence_indices(torch.from_numpy(positions))
        with layout_known({"input_ids": ids, **host_documents(positions)}):
            host_answer = masking_utils.find_packed_sequence_indices(torch.from_numpy(positions))
        if device_answer is None:
            assert host_answer is None
        else:
            assert torch.equal(host_answer, device_answer)
    for mask in (np.ones((2, 9), dtype=np.int64), np.array([[1] * 9, [1] * 6 + [0] * 3])):
        ids = torch.zeros(mask.shape, dtype=torch.long)
        args = (torch.from_numpy(mask).bool(), 9, 9, 0, 0)
        device_answer = masking_utils._ignore_causal_mask_sdpa(*args)
        with layout_known({"input_ids": ids, **host_padding(mask)}):
            host_answer = masking_utils._ignore_causal_mask_sdpa(*args)
        assert host_answer == device_answer == bool(mask.all())
    # the stand-ins are in place, and defer to transformers for rows they were not told about
    assert masking_utils.find_packed_sequence_indices.__module__ == "trainer_lib.ops.documents"
    assert masking_utils.find_packed_sequence_indices(torch.from_numpy(single)) is None
