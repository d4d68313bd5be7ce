"""Packed KTO micro-batches: the per-example log-probs of packed rows equal those of padded rows
and of each example run alone; per-document attention equals transformers' attention; the KL
rows pair every prompt with another example's completion of the same micro-batch."""

import pytest
import torch
from test_kto_figures import completion_logp, feedback
from transformers import AutoModelForCausalLM

from trainer_lib import train
from trainer_lib.data.packing import pack_documents
from trainer_lib.data.tokenize import tokenize_pair
from trainer_lib.methods.kto.batches import completion_logps, kto_batch
from trainer_lib.methods.kto.loss import mismatched_pairing
from trainer_lib.ops.attention import DOCUMENT_ATTENTION, register

WORDS = "apple river stone cloud tiger lemon piano robot candle garden silver".split()


def examples(tokenizer, rows):
    return [{**tokenize_pair(tokenizer, r["prompt"], r["completion"], add_eos=True),
             "label": r["label"]} for r in rows]


def test_packed_log_probs_equal_padded_ones_and_each_example_alone(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = feedback(WORDS[:5]) + [{"prompt": "Say them all:", "completion": " ".join(WORDS),
                                   "label": True}]
    exs = examples(tok, rows)
    kl = [tokenize_pair(tok, rows[i]["prompt"], rows[j]["completion"], add_eos=True)
          for i, j in enumerate(mismatched_pairing(len(rows)))]
    packed = kto_batch(exs, kl, pad_token_id=tok.pad_token_id, seq_length=48, packing=True)
    padded = kto_batch(exs, kl, pad_token_id=tok.pad_token_id, seq_length=48, packing=False)
    assert len(packed["input_ids"]) < len(exs) == len(padded["input_ids"])  # rows hold several
    for prefix, docs in (("", exs), ("kl_", kl)):
        alone = [completion_logp(model, d["input_ids"], d["labels"]) for d in docs]
        want = torch.tensor([s for s, _ in alone], dtype=torch.float64)
        with torch.no_grad():
            for attention in ("sdpa", register()):
                model.set_attn_implementation(attention)
                for batch in (packed, padded):
                    logps, n, _ = completion_logps(model, batch, prefix)
                    torch.testing.assert_close(logps.double(), want, atol=1e-4, rtol=1e-5)
                    assert n.tolist() == [c for _, c in alone]
                # every position through the head (as under ZeRO-3): the same
                logps, _, _ = completion_logps(model, packed, prefix, select=False)
                torch.testing.assert_close(logps.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_document_attention_equals_transformers_attention_and_gradients(tiny_model_dir, reference):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    docs = [{"input_ids": torch.randint(3, 500, (n,)).tolist(), "labels": [1] * n}
            for n in (20, 7, 33, 12, 1, 25)]
    batch = pack_documents(docs, 48, pad_token_id=0)
    assert (batch["document_index"].max(1).values - batch["document_index"].clamp(min=0).min(1)
            .values).max() > 0  # some row holds several documents

    def run(attention):
        model.set_attn_implementation(attention)
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        real = batch["document_index"] >= 0
        (logits[real].float().square().mean()).backward()
        return logits[real].detach(), [p.grad.clone() for p in model.parameters()]

    logits, grads = run(register())
    want_logits, want_grads = run(reference)
    torch.testing.assert_close(logits, want_logits, atol=2e-5, rtol=1e-4)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-3)
    # a document alone gives its logits in the packed row: none sees another
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([docs[2]["input_ids"]])).logits[0]
    row = logits[(batch["document_index"][batch["document_index"] >= 0] == 2)]
    torch.testing.assert_close(row, alone, atol=2e-5, rtol=1e-4)


def test_document_attention_leaves_padded_batches_and_generation_to_sdpa(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    inputs = tok(["Shout: apple", "Shout: a much longer river"], return_tensors="pt", padding=True)
    outputs = {}
    for attention in ("sdpa", register()):
        model.set_attn_implementation(attention)
        outputs[attention] = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(outputs["sdpa"], outputs[DOCUMENT_ATTENTION])


def test_kl_pairs_come_from_the_same_fixed_micro_batch(tiny_config):
    """Odd micro-batches included: every prompt gets another example's completion from its own
    micro-batch, packed as documents of their own rows; the micro-batches stay fixed."""
    samples = feedback(WORDS[:11])
    trainer = train(samples=samples,
                    config=tiny_config.evolve(method=dict(name="kto"),
                                              train=dict(seq_length=32, batch_size=3,
                                                         total_steps=1)))
    # 22 = 7 * 3 + 1: the lone last example joins a micro-batch
    assert sorted(len(g) for g in trainer.train_items) == [3, 3, 3, 3, 3, 3, 4]
    assert sum(len(g) for g in trainer.train_items) == 22
    assert trainer.document_attention
    for group in trainer.train_items:
        batch = trainer.collate([group])
        for i, j in enumerate(mismatched_pairing(len(group))):
            assert j != i
            expected = tokenize_pair(trainer.tokenizer, samples[group[i]["sample"]]["prompt"],
                                     samples[group[j]["sample"]]["completion"])
            row = batch["kl_input_ids"][batch["kl_document_index"] == i].tolist()
            assert row == expected["input_ids"]
            assert batch["input_ids"][batch["document_index"] == i].tolist() == group[i]["input_ids"]
        assert batch["ref_logps"].shape == batch["kl_ref_logps"].shape == (len(group),)
