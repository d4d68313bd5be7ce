"""The KTO trainer end to end on the tiny model: exactness at the first step on every reference
mode, learning a rule, gradient accumulation, the KL pairing, bad input, and the example."""

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer_lib import ConfigError, DataError, KTOTrainer, train
from trainer_lib.data.kto_data import KTODataError
from trainer_lib.data.tokenize import tokenize_pair
from trainer_lib.losses.kto import mismatched_pairing
from trainer_lib.data.sampling import padded_collate
from trainer_lib.trainers.kto import _completion_mask, _token_logps

REPO = Path(__file__).resolve().parents[1]
WORDS = ("apple river stone cloud tiger lemon piano robot candle garden silver planet window "
         "forest castle hot cold big small fast slow happy sad light dark open closed early late "
         "full empty hard soft high low young old strong weak wet dry rich poor loud quiet").split()


def shout(words):
    """Feedback with a rule: answering in capitals is desirable, in lower case undesirable."""
    rows = []
    for w in words:
        rows.append({"prompt": f"Shout: {w}", "completion": f" {w.upper()}", "label": True})
        rows.append({"prompt": f"Shout: {w}", "completion": f" {w}", "label": False})
    return rows


@pytest.fixture
def kto_config(tiny_config):
    return tiny_config.evolve(method=dict(name="kto", beta=0.1),
                              train=dict(seq_length=32, batch_size=4, total_steps=3))


def steps(trainer, name="loss"):
    return [h[name] for h in trainer.log_history if name in h]


# ------------------------------------------------------------------ exactness


def test_first_step_is_exact_and_reference_modes_agree(kto_config):
    """Policy == reference at step 1: z = 0, rewards = 0, loss = 0.5 (w_D = w_U = 1). "copy",
    "precompute" and "adapter" compute the same reference, so every later step agrees too."""
    samples, held = shout(WORDS[:12]), shout(WORDS[12:16])
    config = kto_config.evolve(model=dict(peft_config=dict(rank=4, alpha=8, dropout=0.0)),
                               optimizer=dict(kwargs=dict(lr=1e-2)),
                               train=dict(total_steps=4, eval_interval=2))
    runs = {}
    for mode in ("copy", "precompute", "adapter"):
        runs[mode] = train(samples=samples, eval_samples=held,
                           config=config.evolve(method=dict(ref_model=mode)))
        first = runs[mode].log_history[0]
        assert first["loss"] == pytest.approx(0.5, abs=1e-6)
        for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert first[name] == pytest.approx(0.0, abs=1e-6), (mode, name)
        assert first["count/chosen"] + first["count/rejected"] == 4
    assert runs["copy"].ref_model is not None and runs["precompute"].ref_model is None
    losses = {mode: steps(t) for mode, t in runs.items()}
    assert len(losses["copy"]) == 4 and max(abs(x - 0.5) for x in losses["copy"]) > 1e-4
    for mode in ("precompute", "adapter"):
        assert losses[mode] == pytest.approx(losses["copy"], abs=1e-5), mode
        assert steps(runs[mode], "eval/loss") == pytest.approx(steps(runs["copy"], "eval/loss"),
                                                               abs=1e-5)


@pytest.mark.parametrize("mode", ["copy", "precompute"])
def test_first_step_loss_is_the_weighted_mean(kto_config, mode):
    config = kto_config.evolve(method=dict(ref_model=mode, desirable_weight=2.0,
                                           undesirable_weight=0.5),
                               train=dict(total_steps=1, batch_size=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2 * n / (0.5 * n) is outside [1, 4/3] on purpose
        trainer = train(samples=shout(WORDS[:10]), config=config)
    first = trainer.log_history[0]
    n_d, n_u = first["count/chosen"], first["count/rejected"]
    assert n_d + n_u == 5
    assert first["loss"] == pytest.approx(0.5 * (2.0 * n_d + 0.5 * n_u) / 5, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ behaviour


@torch.no_grad()
def held_out_margin(model, tokenizer, words):
    """Mean over held-out prompts of logp(capitals) - logp(lower case)."""
    rows = shout(words)
    batch = padded_collate([tokenize_pair(tokenizer, r["prompt"], r["completion"]) for r in rows],
                 tokenizer.pad_token_id)
    logps = (_token_logps(model.eval(), batch) * _completion_mask(batch["labels"])).sum(-1)
    return float((logps[0::2] - logps[1::2]).mean())


def test_training_raises_the_margin_of_held_out_rule_following_completions(kto_config):
    random.Random(0).shuffle(words := list(WORDS))
    train_words, held_words = words[:36], words[36:]
    config = kto_config.evolve(train=dict(batch_size=8, epochs=100, total_steps=30,
                                          log_interval=10),
                               optimizer=dict(kwargs=dict(lr=3e-3)))
    before = held_out_margin(AutoModelForCausalLM.from_pretrained(config.model.model_path),
                             AutoTokenizer.from_pretrained(config.model.model_path), held_words)
    trainer = train(samples=shout(train_words), config=config)
    after = held_out_margin(trainer.model, trainer.tokenizer, held_words)
    assert after > before + 2.0, (before, after)
    assert trainer.log_history[-1]["rewards/margins"] > 0
    assert trainer.log_history[-1]["loss"] < 0.5


# ------------------------------------------------------------------ accumulation


def _params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


@pytest.mark.parametrize("loss_type, n_steps, sft_weight", [
    ("apo_zero_unpaired", 3, 0.0), ("kto", 1, 0.0), ("apo_zero_unpaired", 2, 0.5)])
def test_two_micro_batches_equal_one_batch(kto_config, loss_type, n_steps, sft_weight):
    """8 examples per step as 2 micro-batches of 4 or as 1 batch of 8: same loss, same update.

    Exact for KTO only while z is the same in both: z is estimated per micro-batch (as in the
    paper), so it is compared at the first step, where the policy equals the reference and z = 0
    in every micro-batch. apo_zero_unpaired has no z, so every step matches; the SFT term is per
    example, so it matches too."""
    samples = shout(WORDS[:4])
    base = kto_config.evolve(method=dict(loss_type=loss_type, ref_model="precompute",
                                         sft_weight=sft_weight),
                             optimizer=dict(name="sgd", kwargs=dict(lr=0.5)),
                             train=dict(total_steps=n_steps, epochs=n_steps, max_grad_norm=None))
    one = train(samples=samples, config=base.evolve(train=dict(batch_size=8)))
    two = train(samples=samples, config=base.evolve(train=dict(batch_size=4,
                                                               gradient_accumulation_steps=2)))
    assert len(steps(one)) == len(steps(two)) == n_steps
    assert steps(two) == pytest.approx(steps(one), abs=1e-6)
    assert torch.allclose(_params(two), _params(one), atol=1e-6)
    assert not torch.allclose(_params(one), _params(train(samples=samples, config=base.evolve(
        train=dict(total_steps=1, epochs=1, batch_size=8), optimizer=dict(kwargs=dict(lr=0.0))))))


# ------------------------------------------------------------------ the KL pairing


def test_kl_pairs_come_from_the_same_fixed_micro_batch(kto_config):
    """Odd micro-batches included: every prompt gets another example's completion from its own
    micro-batch; the micro-batches, and so the precomputed values, stay fixed."""
    samples = shout(WORDS[:11])
    trainer = train(samples=samples,
                    config=kto_config.evolve(train=dict(batch_size=3, total_steps=1)))
    # 22 = 7 * 3 + 1: the lone last example joins a micro-batch
    assert sorted(len(g) for g in trainer.train_items) == [3, 3, 3, 3, 3, 3, 4]
    assert sum(len(g) for g in trainer.train_items) == 22
    for group in trainer.train_items:
        batch = trainer.collate([group])
        pairing = mismatched_pairing(len(group))
        for i, j in enumerate(pairing):
            assert j != i
            expected = tokenize_pair(trainer.tokenizer, samples[group[i]["sample"]]["prompt"],
                                     samples[group[j]["sample"]]["completion"])
            row = batch["kl_input_ids"][i][batch["kl_attention_mask"][i].bool()].tolist()
            assert row == expected["input_ids"]
        assert batch["ref_logps"].shape == batch["kl_ref_logps"].shape == (len(group),)


# ------------------------------------------------------------------ bad input


def test_a_label_that_is_not_a_boolean_is_named(kto_config):
    samples = shout(WORDS[:4])
    samples[3]["label"] = "yes"
    with pytest.raises(DataError, match=r"sample 3: field 'label' is 'yes'; expected true or fa"):
        train(samples=samples, config=kto_config)


def test_batch_size_one_needs_apo_zero_unpaired(kto_config):
    config = kto_config.evolve(train=dict(batch_size=1, total_steps=1))
    with pytest.raises(ConfigError, match="train.batch_size=1.*at least 2.*apo_zero_unpaired"):
        train(samples=shout(WORDS[:4]), config=config)
    trainer = train(samples=shout(WORDS[:4]),
                    config=config.evolve(method=dict(loss_type="apo_zero_unpaired")))
    assert trainer.log_history[0]["loss"] == pytest.approx(0.5, abs=1e-6)


def test_a_single_evaluation_example_is_an_error_before_training(kto_config):
    samples = shout(WORDS[:4])
    with pytest.raises(DataError, match="only 1 evaluation example.*at least 2"):
        train(samples=samples, eval_samples=samples[:1],
              config=kto_config.evolve(train=dict(total_steps=1)))


@pytest.mark.parametrize("label, missing", [(True, "undesirable"), (False, "desirable")])
def test_one_class_missing_is_an_error(kto_config, label, missing):
    samples = [r for r in shout(WORDS[:6]) if r["label"] is label]
    with pytest.raises(KTODataError, match=f"no {missing} examples"):
        train(samples=samples, config=kto_config)


def test_class_imbalance_warns_with_weights_and_auto_resolves_them(kto_config, capsys):
    samples = shout(WORDS[:12])
    samples = [r for r in samples if r["label"]] + [r for r in samples if not r["label"]][:3]
    config = kto_config.evolve(train=dict(total_steps=1))
    with pytest.warns(UserWarning, match=r"12 / \(1 \* 3\).*method.desirable_weight=0.2917"):
        train(samples=samples, config=config)
    assert "12 desirable, 3 undesirable" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = train(samples=samples, config=config.evolve(method=dict(desirable_weight="auto")))
    assert trainer.weights == pytest.approx((7 / 6 * 3 / 12, 1.0))


def test_adapter_reference_needs_a_peft_model(kto_config):
    with pytest.raises(ConfigError, match="needs a PEFT policy"):
        train(samples=shout(WORDS[:4]), config=kto_config.evolve(method=dict(ref_model="adapter")))


def test_the_trainer_is_registered_for_kto_configs(kto_config):
    trainer = train(samples=shout(WORDS[:4]), config=kto_config.evolve(train=dict(total_steps=1)))
    assert isinstance(trainer, KTOTrainer) and trainer.ref_mode == "precompute"


# ------------------------------------------------------------------ the example


def test_the_example_runs_and_prints_the_margins(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRAINER_LIB_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "kto_feedback.py"), "--output",
         str(tmp_path / "kto"), "--sft_epochs", "1", "--steps", "3", "train.log_interval=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "log-prob margin, mean logp(desirable) - mean logp(undesirable): before" in out.stdout
    assert "reward margin vs the SFT reference" in out.stdout
    assert (tmp_path / "kto" / "model" / "config.json").exists()
