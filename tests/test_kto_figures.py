"""What KTO logs, against an independent computation: after several real steps, the loss, kl and
rewards the trainer logged equal the paper's formula applied to log-probs computed here with plain
torch, one example at a time, from the policy's weights before each step and the initial model;
the reference point from the mismatched pairs of the whole step."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer_lib.data.tokenize import tokenize_pair
from trainer_lib.methods.kto.trainer import KTOTrainer
from trainer_lib.training.trainer import _Window

WORDS = "apple river stone cloud tiger lemon piano robot candle garden silver planet".split()


def feedback(words, mark: str = "!"):
    """Feedback with a rule: answering in capitals (then `mark`) is desirable, in lower case
    undesirable."""
    rows = []
    for w in words:
        rows.append({"prompt": f"Shout: {w}", "completion": f" {w.upper()}{mark}", "label": True})
        rows.append({"prompt": f"Shout: {w}", "completion": f" {w}", "label": False})
    return rows


class Recording(KTOTrainer):
    """Keeps the policy's weights before every step and the micro-batches it trained on."""

    def collate(self, items):
        return {**super().collate(items), "groups": items}

    def training_step(self, micro):
        self.before.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        self.steps_seen.append([g for b in micro if b is not None for g in b["groups"]])
        return super().training_step(micro)


@torch.no_grad()
def completion_logp(model, ids, labels):
    """Sum and count of log p(completion token) of one example, with plain torch."""
    logps = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    target = torch.tensor(labels[1:])
    keep = target != -100
    picked = logps[keep].gather(-1, target[keep][:, None])[:, 0]
    return picked.sum().item(), int(keep.sum())


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def expected(policy, ref, tokenizer, groups, samples, m, weights, *, kl_on="mismatched"):
    """The paper's loss, z and rewards of a set of micro-batches (one step, or one evaluation
    batch) drawn from `samples`, from the policy and reference models."""
    def logp(model, ex):
        s, n = completion_logp(model, ex["input_ids"], ex["labels"])
        return s / n if m.average_log_probs else s, s, n

    ratios, kl = [], []
    for group in groups:
        for i, ex in enumerate(group):
            (p, p_sum, n), (r, _, _) = logp(policy, ex), logp(ref, ex)
            ratios.append((ex["label"], p - r, p, -p_sum / n))
            partner = group[(i + 1) % len(group)] if kl_on == "mismatched" else ex
            pair = tokenize_pair(tokenizer, samples[ex["sample"]]["prompt"],
                                 samples[partner["sample"]]["completion"], add_eos=True)
            kl.append(logp(policy, pair)[0] - logp(ref, pair)[0])
    z = max(0.0, sum(kl) / len(kl))
    w_d, w_u = weights
    losses = [w_d * (1 - sigmoid(m.beta * (r - z))) if good else
              w_u * (1 - sigmoid(m.beta * (z - r))) for good, r, _, _ in ratios]
    nll = [n for good, _, _, n in ratios if good]
    loss = sum(losses) / len(losses) + (m.sft_weight * sum(nll) / len(nll) if nll else 0.0)
    chosen = [m.beta * r for good, r, _, _ in ratios if good]
    rejected = [m.beta * r for good, r, _, _ in ratios if not good]
    return dict(loss=loss, kl=z, chosen=chosen, rejected=rejected,
                logps=[p for good, _, p, _ in ratios if good])


@pytest.mark.parametrize("settings", [
    # one micro-batch per step; a reference pass over two micro-batches at a time
    dict(train=dict(batch_size=4), method=dict(precompute_ref_batch_size=8)),
    # two micro-batches per step (z over both), averaged log-probs, the SFT term, a reference copy
    dict(train=dict(batch_size=3, gradient_accumulation_steps=2),
         method=dict(average_log_probs=True, sft_weight=0.5, desirable_weight=1.2,
                     ref_model="copy")),
], ids=["summed", "averaged_sft_accumulated"])
def test_logged_figures_equal_the_formula_on_the_models_own_log_probs(tiny_config, settings):
    config = tiny_config.evolve(
        method=dict(name="kto", beta=0.5),
        train=dict(seq_length=32, total_steps=4, epochs=10, log_interval=1, eval_interval=4),
        optimizer=dict(name="adamw", kwargs=dict(lr=3e-2)),
    ).evolve(**settings)
    samples, eval_samples = feedback(WORDS[:9]), feedback(WORDS[9:])
    trainer = Recording(config, samples=samples, eval_samples=eval_samples)
    trainer.before, trainer.steps_seen = [], []
    trainer.train()
    m, tok = trainer.method, trainer.tokenizer
    initial = AutoModelForCausalLM.from_pretrained(config.model.model_path).eval()
    policy = AutoModelForCausalLM.from_pretrained(config.model.model_path).eval()
    logged = [h for h in trainer.log_history if "loss" in h]
    assert len(logged) == len(trainer.before) == 4
    kl_matched = []
    for entry, state, groups in zip(logged, trainer.before, trainer.steps_seen):
        policy.load_state_dict(state)
        want = expected(policy, initial, tok, groups, samples, m, trainer.weights)
        assert entry["loss"] == pytest.approx(want["loss"], abs=2e-5)
        assert entry["kl"] == pytest.approx(want["kl"], abs=2e-5)
        for name, values in (("rewards/chosen", want["chosen"]), ("rewards/rejected", want["rejected"]),
                             ("logps/chosen", want["logps"])):
            if values:
                assert entry[name] == pytest.approx(sum(values) / len(values), abs=2e-5), name
            else:  # a class absent from the step is left out, not logged as 0
                assert name not in entry
        kl_matched.append(expected(policy, initial, tok, groups, samples, m, trainer.weights,
                                   kl_on="matched")["kl"])
    # the run is one where the KL of matched pairs would have been logged differently
    kl_logged = [e["kl"] for e in logged]
    assert max(kl_logged) > 0.05
    assert max(abs(a - b) for a, b in zip(kl_logged, kl_matched)) > 0.01

    # evaluation: each batch's own z, eval/loss a mean over all evaluation examples
    policy.load_state_dict(trainer.accelerator.unwrap_model(trainer.model).state_dict())
    evals = [expected(policy, initial, tok, [g], eval_samples, m, trainer.weights)
             for g in trainer.eval_items]
    sizes = [len(g) for g in trainer.eval_items]
    final = trainer.log_history[-1]
    if m.sft_weight == 0:
        assert final["eval/loss"] == pytest.approx(
            sum(e["loss"] * n for e, n in zip(evals, sizes)) / sum(sizes), abs=2e-5)
    assert final["eval/kl"] == pytest.approx(sum(e["kl"] for e in evals) / len(evals), abs=2e-5)
    chosen = [c for e in evals for c in e["chosen"]]
    rejected = [c for e in evals for c in e["rejected"]]
    assert final["eval/rewards/chosen"] == pytest.approx(sum(chosen) / len(chosen), abs=2e-5)
    assert final["eval/rewards/rejected"] == pytest.approx(sum(rejected) / len(rejected), abs=2e-5)
    assert final["eval/rewards/margins"] == pytest.approx(
        final["eval/rewards/chosen"] - final["eval/rewards/rejected"])
    assert "eval/logps/chosen" in final and "eval/logps/rejected" in final


def test_a_figure_with_nothing_measured_in_the_window_is_left_out():
    window = _Window()
    window.add({"loss_sum": 2.0, "weight": 4.0, "num_tokens": 10, "seconds": 1.0,
                "learning_rate": 0.1, "grad_norm": 1.0,
                "metrics": {"rewards/chosen": (0.8, 4.0), "rewards/rejected": (0.0, 0.0)}})
    summary = window.summary()
    assert summary["rewards/chosen"] == pytest.approx(0.2)
    assert "rewards/rejected" not in summary
