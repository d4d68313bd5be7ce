"""Optimiser groups, schedules, and the training options of the loop."""

import math

import pytest
import torch

from trainer_lib import train
from trainer_lib.config import OptimizerConfig
from trainer_lib.optim import build_optimizer, lr_lambda, param_groups

SAMPLES = [["Hello there\n", "general"], ["Good\n", "morning to you"], ["Yes\n", "no"],
           ["One\n", "two three"]]


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight),
                                                   id(model[1].bias), id(model[2].bias)}


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("sgd", torch.optim.SGD)])
def test_optimizers(name, cls):
    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(model, OptimizerConfig(name=name, kwargs=dict(lr=0.1, weight_decay=0.01)))
    assert isinstance(opt, cls)


def test_schedules_by_hand():
    cos = lr_lambda("cosine", total_steps=10, warmup_steps=2)
    assert [cos(0), cos(1)] == pytest.approx([1 / 3, 2 / 3])
    assert cos(2) == pytest.approx(1.0)
    assert cos(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    lin = lr_lambda("linear", total_steps=10, warmup_steps=0, min_lr_ratio=0.1)
    assert lin(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda("constant", 10, 3)(7) == 1.0


def _weights(trainer):
    return trainer.accelerator.unwrap_model(trainer.model).state_dict()


def test_same_seed_same_run_other_seed_other_run(tiny_config):
    cfg = tiny_config.evolve(train=dict(batch_size=2, total_steps=3))
    a, b = train(samples=SAMPLES, config=cfg), train(samples=SAMPLES, config=cfg)
    c = train(samples=SAMPLES, config=cfg.evolve(train=dict(seed=7)))
    assert all(torch.equal(v, _weights(b)[k]) for k, v in _weights(a).items())
    assert any(not torch.equal(v, _weights(c)[k]) for k, v in _weights(a).items())


def test_bf16_mixed_precision_and_gradient_checkpointing_train(tiny_config):
    cfg = tiny_config.evolve(train=dict(batch_size=2, total_steps=3, mixed_precision="bf16"),
                             model=dict(gradient_checkpointing=True))
    trainer = train(samples=SAMPLES, config=cfg)
    assert trainer.accelerator.mixed_precision == "bf16"
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert all(math.isfinite(e["loss"]) for e in trainer.log_history)


def test_gradient_clipping_reports_the_norm_before_clipping(tiny_config):
    cfg = tiny_config.evolve(train=dict(batch_size=4, total_steps=1, max_grad_norm=1e-3))
    trainer = train(samples=SAMPLES, config=cfg)
    assert trainer.log_history[0]["grad_norm"] > 1e-3
