"""The KTO trainer end to end on the tiny model: exactness at the first step on every reference
mode, with dropout and under bf16, learning a rule, gradient accumulation, a reference that
follows the policy, a policy that starts from a trained adapter, bad input, and the example."""

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_kto_figures import completion_logp, feedback
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer_lib import ConfigError, DataError, KTOTrainer, train
from trainer_lib.data.tokenize import tokenize_pair
from trainer_lib.errors import KTODataError

REPO = Path(__file__).resolve().parents[1]
WORDS = ("apple river stone cloud tiger lemon piano robot candle garden silver planet window "
         "forest castle hot cold big small fast slow happy sad light dark open closed early late "
         "full empty hard soft high low young old strong weak wet dry rich poor loud quiet").split()


def shout(words):
    return feedback(words, mark="")


@pytest.fixture
def kto_config(tiny_config):
    return tiny_config.evolve(method=dict(name="kto", beta=0.1),
                              train=dict(seq_length=32, batch_size=4, total_steps=3))


def steps(trainer, name="loss"):
    return [h[name] for h in trainer.log_history if name in h]


# ------------------------------------------------------------------ exactness


def test_first_step_is_exact_and_reference_modes_agree_under_bf16(kto_config):
    """Policy == reference at step 1: z = 0, rewards = 0, loss = 0.5 (w_D = w_U = 1), exactly,
    under bf16 autocast and with LoRA dropout configured. "copy", "precompute" and "adapter"
    compute the same reference, so every later step agrees too."""
    samples, held = shout(WORDS[:12]), shout(WORDS[12:16])
    config = kto_config.evolve(model=dict(peft_config=dict(rank=4, alpha=8, dropout=0.1)),
                               optimizer=dict(kwargs=dict(lr=1e-2)),
                               train=dict(total_steps=4, eval_interval=2, mixed_precision="bf16"))
    runs = {}
    for mode in ("copy", "precompute", "adapter"):
        runs[mode] = train(samples=samples, eval_samples=held,
                           config=config.evolve(method=dict(ref_model=mode)))
        first = runs[mode].log_history[0]
        assert first["loss"] == 0.5, mode
        for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert first[name] == 0.0, (mode, name)
        assert first["count/chosen"] + first["count/rejected"] == 4
    assert runs["copy"].ref_model is not None and runs["precompute"].ref_model is None
    losses = {mode: steps(t) for mode, t in runs.items()}
    assert len(losses["copy"]) == 4 and max(abs(x - 0.5) for x in losses["copy"]) > 1e-4
    for mode in ("precompute", "adapter"):
        assert losses[mode] == pytest.approx(losses["copy"], abs=1e-5), mode
        assert steps(runs[mode], "eval/loss") == pytest.approx(steps(runs["copy"], "eval/loss"),
                                                               abs=1e-5)


@pytest.fixture(scope="module")
def dropout_models(tiny_model_dir, tmp_path_factory):
    """A tiny GPT-2 with every dropout at 0.3, and the tiny Llama with attention_dropout 0.3."""
    import json
    import shutil

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("dropout")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4,
                               n_positions=128, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
                    ).save_pretrained(folder / "gpt2")
    tok.save_pretrained(folder / "gpt2")
    shutil.copytree(tiny_model_dir, folder / "llama")
    config = json.loads((folder / "llama" / "config.json").read_text())
    (folder / "llama" / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    return folder


@pytest.mark.parametrize("model, mode", [("gpt2", "precompute"), ("gpt2", "copy"),
                                         ("llama", "precompute")])
def test_first_step_is_exact_with_dropout_and_the_saved_model_keeps_it(kto_config, dropout_models,
                                                                       model, mode, tmp_path):
    import json

    config = kto_config.evolve(model=dict(model_path=str(dropout_models / model)),
                               method=dict(ref_model=mode, desirable_weight=2.0,
                                           undesirable_weight=0.5),
                               train=dict(total_steps=1, batch_size=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2 * n / (0.5 * n) is outside [1, 4/3] on purpose
        trainer = train(samples=shout(WORDS[:10]), config=config)
    first = trainer.log_history[0]
    n_d, n_u = first["count/chosen"], first["count/rejected"]
    assert n_d + n_u == 5
    assert first["loss"] == pytest.approx(0.5 * (2.0 * n_d + 0.5 * n_u) / 5, abs=1e-7)
    assert first["kl"] == first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    # trained without dropout; the saved folder is the model as configured
    live = trainer.accelerator.unwrap_model(trainer.model)
    assert all(m.p == 0 for m in live.modules() if isinstance(m, torch.nn.Dropout))
    trainer.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    names = ["attn_pdrop", "resid_pdrop", "embd_pdrop"] if model == "gpt2" else ["attention_dropout"]
    assert [saved[n] for n in names] == [0.3] * len(names)
    assert all(getattr(live.config, n) == 0.0 for n in names)
    assert "_attn_implementation" not in json.dumps(saved)
    if model == "llama":
        assert all(layer.self_attn.attention_dropout == 0.0 for layer in live.model.layers)


def test_dropout_left_on_is_not_exact(kto_config, dropout_models):
    """The setting is what makes the first step exact: with dropout left on it is not."""
    trainer = train(samples=shout(WORDS[:10]), config=kto_config.evolve(
        model=dict(model_path=str(dropout_models / "gpt2")),
        method=dict(disable_dropout=False), train=dict(total_steps=1)))
    assert abs(trainer.log_history[0]["rewards/chosen"]) > 1e-4


# ------------------------------------------------------------------ behaviour


@torch.no_grad()
def held_out_margin(model, tokenizer, words):
    """Mean over held-out prompts of logp(capitals) - logp(lower case)."""
    model = model.eval()
    pairs = [tokenize_pair(tokenizer, r["prompt"], r["completion"]) for r in shout(words)]
    logps = [completion_logp(model, ex["input_ids"], ex["labels"])[0] for ex in pairs]
    return sum(a - b for a, b in zip(logps[0::2], logps[1::2])) / (len(logps) // 2)


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

    z is the mean over the step's mismatched pairs, but a prompt's partner comes from its own
    micro-batch, so 2 x 4 and 1 x 8 pair differently: KTO is compared at the first step, where
    the policy equals the reference and z = 0 either way. apo_zero_unpaired has no z, so every
    step matches; the SFT term is a mean over the step's desirable examples, so it matches too."""
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


# ------------------------------------------------------------------ the reference


def test_a_reference_synced_fully_every_step_is_the_policy(kto_config):
    """TR-DPO with alpha = 1 every step: the reference is the policy at every step, so every
    step is exact (loss 0.5, z and rewards 0) while the policy moves."""
    config = kto_config.evolve(method=dict(sync_ref_model=True, ref_model_mixup_alpha=1.0,
                                           ref_model_sync_steps=1),
                               optimizer=dict(kwargs=dict(lr=1e-2)), train=dict(total_steps=3))
    trainer = train(samples=shout(WORDS[:6]), config=config)
    assert trainer.ref_mode == "copy"  # what "auto" picks for a moving reference
    assert steps(trainer) == [0.5] * 3 and steps(trainer, "kl") == [0.0] * 3
    assert steps(trainer, "rewards/chosen") == [0.0] * len(steps(trainer, "rewards/chosen"))
    initial = AutoModelForCausalLM.from_pretrained(config.model.model_path).state_dict()
    live = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert any(not torch.equal(live[k], initial[k]) for k in initial)
    for (name, r), p in zip(trainer.ref_model.named_parameters(),
                            trainer.accelerator.unwrap_model(trainer.model).parameters()):
        assert torch.equal(r, p), name


@pytest.mark.parametrize("settings, message", [
    (dict(method=dict(sync_ref_model=True, ref_model="precompute")),
     'sync_ref_model .*ref_model="precompute" has none'),
    (dict(method=dict(sync_ref_model=True), model=dict(peft_config=dict(rank=4))),
     "sync_ref_model moves the reference .* a PEFT policy"),
    (dict(method=dict(sync_ref_model=True), train=dict(resume_from_checkpoint="latest")),
     "sync_ref_model: checkpoints do not hold the moving reference"),
])
def test_a_moving_reference_needs_a_copy_of_its_own(kto_config, settings, message):
    with pytest.raises(ConfigError, match=message):
        train(samples=shout(WORDS[:4]), config=kto_config.evolve(**settings))


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter folder whose weights are not zero, as an SFT run with LoRA leaves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("adapter") / "sft_lora"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_a_policy_that_carries_a_trained_adapter_is_its_own_reference(kto_config, trained_adapter,
                                                                     tiny_model_dir):
    """The reference is the model as loaded, base plus the trained adapter, not the bare base;
    the adapter keeps training. "adapter" (auto) and "precompute" agree."""
    config = kto_config.evolve(model=dict(model_path=str(trained_adapter)),
                               optimizer=dict(kwargs=dict(lr=1e-2)), train=dict(total_steps=2))
    runs = {mode: train(samples=shout(WORDS[:6]), config=config.evolve(method=dict(ref_model=mode)))
            for mode in ("auto", "precompute")}
    assert runs["auto"].ref_mode == "adapter"
    for run in runs.values():
        first = run.log_history[0]
        assert first["loss"] == 0.5 and first["kl"] == 0.0 and first["rewards/chosen"] == 0.0
    assert steps(runs["auto"]) == pytest.approx(steps(runs["precompute"]), abs=1e-6)
    assert abs(steps(runs["auto"])[1] - 0.5) > 1e-5
    # the precomputed reference log-probs are those of the adapter as loaded
    trainer = runs["precompute"]
    ex = trainer.train_items[0][0]
    loaded = AutoModelForCausalLM.from_pretrained(trained_adapter).eval()
    bare = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert ex["ref_logp"] == pytest.approx(completion_logp(loaded, ex["input_ids"], ex["labels"])[0],
                                           abs=1e-4)
    assert abs(ex["ref_logp"] - completion_logp(bare, ex["input_ids"], ex["labels"])[0]) > 1e-2
    policy = runs["auto"].accelerator.unwrap_model(runs["auto"].model)
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n and ".default." in n for n in trained)
    with pytest.raises(ConfigError, match="is a LoRA adapter folder and model.peft_config adds"):
        train(samples=shout(WORDS[:4]), config=config.evolve(model=dict(peft_config=dict(rank=4))))


@pytest.mark.parametrize("base, message", [
    ("/nonexistent/base", "this local path does not exist"),
    ("nobody/not-cached", "is a hub id, but HF_HUB_OFFLINE is set and it is not in the local cache"),
])
def test_an_adapters_base_model_is_checked_as_model_path_is(base, message, kto_config,
                                                            trained_adapter, tmp_path,
                                                            monkeypatch):
    import json
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = Path(shutil.copytree(trained_adapter, tmp_path / "adapter"))
    settings = json.loads((folder / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match=rf"base_model_name_or_path in .*adapter_config.json="
                                          rf"'{base}'.*{message}"):
        train(samples=shout(WORDS[:4]), config=kto_config.evolve(model=dict(model_path=str(folder))))


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
