"""The SFT trainer end to end: the step loss under gradient accumulation, learning a task,
and the saved folder."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer_lib import train
from trainer_lib.methods.sft.trainer import SFTTrainer


def _varied_pairs(n=8):
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot"]
    return [[f"Say something {i}\n", " ".join(rng.choice(words) for _ in range(1 + 3 * (i % 4)))]
            for i in range(n)]


def _one_step(config, samples):
    trainer = SFTTrainer(config, samples=samples)
    initial = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(
        trainer.model).state_dict().items()}
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    return trainer, initial, model


def test_accumulated_step_equals_one_big_batch(tiny_config):
    """Completions of very different lengths: the step's loss is the mean over all completion
    tokens of the 8 examples, whether they come as one batch of 8 or 4 micro-batches of 2.
    A mean of per-micro-batch means would weight the tokens of short completions more."""
    samples = _varied_pairs(8)
    base = tiny_config.evolve(
        train=dict(total_steps=1, max_grad_norm=None),
        optimizer=dict(name="sgd", kwargs=dict(lr=0.5, weight_decay=0.0)),
        method=dict(group_by_length=False),
    )
    big, initial, big_model = _one_step(base.evolve(train=dict(batch_size=8)), samples)
    acc, _, acc_model = _one_step(
        base.evolve(train=dict(batch_size=2, gradient_accumulation_steps=4)), samples)

    assert big.log_history[0]["loss"] == pytest.approx(acc.log_history[0]["loss"], rel=1e-5)
    for name, p in big_model.state_dict().items():
        torch.testing.assert_close(acc_model.state_dict()[name], p, rtol=1e-5, atol=1e-6)
        if name.endswith("lm_head.weight"):
            assert not torch.equal(p, initial[name])  # the step really moved the weights

    # the reference, in plain torch on the initial weights: mean over all completion tokens
    ref = AutoModelForCausalLM.from_pretrained(tiny_config.model.model_path)
    ref.load_state_dict(initial)
    items = big.train_items
    total, count, per_batch_means = 0.0, 0, []
    for start in range(0, 8, 2):
        b_total, b_count = 0.0, 0
        for ex in items[start:start + 2]:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            with torch.no_grad():
                logits = ref(ids).logits[0, :-1]
            keep = labels != -100
            b_total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            b_count += int(keep.sum())
        total, count = total + b_total, count + b_count
        per_batch_means.append(b_total / b_count)
    assert big.log_history[0]["loss"] == pytest.approx(total / count, rel=1e-5)
    # and why it matters: the mean of micro-batch means is a different number here
    assert abs(sum(per_batch_means) / 4 - total / count) > 1e-3


def test_tiny_model_learns_completions_of_noise_prompts(tiny_config, tmp_path):
    """Prompts are random noise, completions are fixed answers: the training loss can only
    reach zero if the prompt tokens carry no loss. Greedy decoding of the reloaded folder must
    then reproduce every answer exactly."""
    rng = random.Random(1)
    answers = ["red apple", "blue river", "grey stone", "white cloud", "orange tiger",
               "yellow lemon"]
    samples = [{"prompt": " ".join(f"word{rng.randint(0, 199)}" for _ in range(6)) + "\n",
                "completion": a} for a in answers]
    config = tiny_config.evolve(
        model=dict(model_path=tiny_config.model.model_path),
        train=dict(batch_size=2, epochs=300, total_steps=150, log_interval=10),
        optimizer=dict(kwargs=dict(lr=1e-2)),
        method=dict(packing=True),  # the default: all six pairs share one packed row
    )
    trainer = train(samples=samples, config=config)
    losses = [e["loss"] for e in trainer.log_history if "loss" in e]
    assert losses[-1] < 0.05 < losses[0]
    assert {"step", "loss", "learning_rate", "grad_norm", "num_tokens",
            "tokens_per_second"} <= set(trainer.log_history[-1])

    out = tmp_path / "out"
    trainer.save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    for s in samples:
        ids = tok(s["prompt"], return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
        text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text == s["completion"]


def test_num_tokens_counts_non_padding_tokens(tiny_config):
    samples = _varied_pairs(8)
    trainer = train(samples=samples, config=tiny_config.evolve(
        train=dict(batch_size=4, total_steps=2)))
    expected = sum(len(ex["input_ids"]) for ex in trainer.train_items)
    assert trainer.log_history[-1]["num_tokens"] == expected


def test_lr_schedule_warms_up_and_decays(tiny_config):
    trainer = train(samples=_varied_pairs(8), config=tiny_config.evolve(
        train=dict(batch_size=1, total_steps=8),
        scheduler=dict(name="linear", kwargs=dict(warmup_steps=2))))
    lrs = [e["learning_rate"] for e in trainer.log_history]
    assert lrs[0] < lrs[1] < lrs[2]
    assert lrs[2] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
