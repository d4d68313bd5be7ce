"""Optimisers and schedules by name, checked at config time; the learning rate of every step,
the schedule's horizon, gradient clipping and the logged gradient norm, against hand figures."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.optimization import Adafactor

from trainer_lib import ConfigError, default_sft_config, train
from trainer_lib.config import OptimizerConfig, SchedulerConfig
from trainer_lib.methods.sft.trainer import SFTTrainer
from trainer_lib.training.optim import build_optimizer, build_scheduler, param_groups

SAMPLES = [["Hello there\n", "general"], ["Good\n", "morning to you"], ["Yes\n", "no"],
           ["One\n", "two three"]]


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight),
                                                   id(model[1].bias), id(model[2].bias)}


@pytest.mark.parametrize("name, cls", [
    ("adamw", torch.optim.AdamW), ("AdamW", torch.optim.AdamW), ("adam", torch.optim.Adam),
    ("sgd", torch.optim.SGD), ("Adagrad", torch.optim.Adagrad), ("rmsprop", torch.optim.RMSprop),
    ("adafactor", Adafactor), ("torch.optim.Adafactor", torch.optim.Adafactor),
])
def test_optimizers_by_name_keep_the_decay_groups(name, cls):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model, OptimizerConfig(name=name, kwargs=dict(lr=0.1,
                                                                        weight_decay=0.01)))
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    if cls is Adafactor:  # its own learning rate, as the HF Trainer runs it
        assert opt.defaults["relative_step"] is False and opt.defaults["lr"] == 0.1


def test_fused_adamw_on_cpu_gives_the_unfused_result(tiny_config):
    """torch 2.13 has fused Adam/AdamW kernels on CPU: they are the default, and give the
    for-each implementation's weights to float tolerance."""
    config = tiny_config.evolve(train=dict(batch_size=2, total_steps=4),
                                optimizer=dict(kwargs=dict(lr=1e-2, weight_decay=0.1)))
    fused = train(samples=SAMPLES, config=config)
    plain = train(samples=SAMPLES, config=config.evolve(optimizer=dict(kwargs=dict(fused=False))))
    assert fused.optimizer.optimizer.defaults["fused"] is True
    assert plain.optimizer.optimizer.defaults["fused"] is False
    initial = AutoModelForCausalLM.from_pretrained(tiny_config.model.model_path).state_dict()
    a, b = (t.accelerator.unwrap_model(t.model).state_dict() for t in (fused, plain))
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], atol=1e-6, rtol=1e-5)
    assert not torch.equal(a["lm_head.weight"], initial["lm_head.weight"])  # it did train


@pytest.mark.parametrize("override, message", [
    ("scheduler.kwargs.warmup_steps='10'",
     "scheduler.kwargs.warmup_steps must be a whole number >= 0, got '10'"),
    ("scheduler.kwargs.warmup_ratio=1.5", "warmup_ratio must be a number within [0, 1]"),
    ("scheduler.name=cosin", "scheduler.name='cosin' is unknown; did you mean 'cosine'?"),
    ("scheduler.kwargs.num_cycle=2",
     "scheduler.kwargs.num_cycle is not an argument of the 'cosine' schedule; did you mean "
     "'num_cycles'?"),
    ("scheduler.kwargs.num_cycles=two", "scheduler.kwargs.num_cycles must be a number"),
    ("scheduler.name=warmup_stable_decay", "must give num_decay_steps"),
    ("scheduler.name=reduce_lr_on_plateau", "it steps on a metric"),
    ("scheduler.name=StepLR", "must give step_size for torch's StepLR"),
    ("optimizer.name=adamww", "optimizer.name='adamww' is not a torch.optim optimiser nor "
                              "'adafactor'; did you mean 'adamw'?"),
    ("optimizer.kwargs.beta=[0.9,0.95]",
     "optimizer.kwargs.beta is not an argument of torch.optim.AdamW; did you mean 'betas'?"),
    ("optimizer.kwargs.momentum=0.9", "(it takes: amsgrad, betas,"),
    ("optimizer.name=lbfgs", "it needs a closure"),
    ("optimizer.kwargs.lr=fast", "optimizer.kwargs.lr must be a number, got 'fast'"),
])
def test_bad_optimizer_and_scheduler_settings_fail_at_config_time(override, message):
    with pytest.raises(ConfigError) as err:
        default_sft_config().apply_overrides([override])
    assert message in str(err.value)


def test_weight_decay_for_an_optimizer_without_one_is_refused():
    with pytest.raises(ConfigError, match="torch.optim.Rprop takes no weight decay"):
        default_sft_config().evolve(optimizer=dict(name="rprop", kwargs=dict(weight_decay=0.1)))
    default_sft_config().evolve(optimizer=dict(name="rprop", kwargs=dict(weight_decay=0.0)))


def _lrs(name, kwargs, steps=10, lr=1.0):
    """The learning rate each of `steps` optimiser steps uses."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(opt, SchedulerConfig(name=name, kwargs=kwargs), steps)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        opt.step()
        scheduler.step()
    return out


def _cos(progress):
    return 0.5 * (1 + math.cos(math.pi * progress))


# warmup is step / warmup_steps (the first step at 0), as in transformers and the HF Trainer
SCHEDULES = [
    ("cosine", dict(warmup_steps=2), [0, 0.5] + [_cos((s - 2) / 8) for s in range(2, 10)]),
    ("linear", dict(warmup_ratio=0.15), [0, 0.5] + [1 - (s - 2) / 8 for s in range(2, 10)]),
    ("constant", dict(warmup_steps=4), [0, 0.25, 0.5, 0.75] + [1.0] * 6),
    ("constant", dict(warmup_steps=0), [1.0] * 10),
    ("cosine", dict(warmup_steps=2, min_lr_ratio=0.1),
     [0, 0.5] + [0.1 + 0.9 * _cos((s - 2) / 8) for s in range(2, 10)]),
    ("linear", dict(min_lr_ratio=0.1), [0.1 + 0.9 * (1 - s / 10) for s in range(10)]),
    ("cosine_with_min_lr", dict(warmup_steps=0, min_lr_rate=0.2),
     [0.2 + 0.8 * _cos(s / 10) for s in range(10)]),
    ("cosine_with_restarts", dict(num_cycles=2),
     [_cos((2 * s / 10) % 1.0) for s in range(10)]),
    ("polynomial", dict(warmup_steps=0, lr_end=0.1, power=2.0),  # lr_end is absolute: 0.05 x 2.0
     [0.05 + 0.95 * (1 - s / 10) ** 2 for s in range(10)]),
    ("inverse_sqrt", dict(warmup_steps=4), [0, 0.25, 0.5, 0.75] + [2 / math.sqrt(s) for s in
                                                                    range(4, 10)]),
    ("warmup_stable_decay", dict(warmup_steps=2, num_decay_steps=4),
     [0, 0.5, 1, 1, 1, 1] + [_cos(k / 4) for k in range(4)]),
    ("CosineAnnealingLR", dict(eta_min=0.5),  # eta_min is absolute: 0.25 x 2.0; T_max: the run
     [0.25 + 0.75 * _cos(s / 10) for s in range(10)]),
    ("cosine_annealing", dict(T_max=20), [_cos(s / 20) for s in range(10)]),  # trlX's name
]


@pytest.mark.parametrize("name, kwargs, expected", SCHEDULES,
                         ids=[f"{n}-{'-'.join(k)}" for n, k, _ in SCHEDULES])
def test_learning_rate_of_every_step_by_hand(name, kwargs, expected):
    assert _lrs(name, kwargs, lr=2.0) == pytest.approx([2.0 * e for e in expected], abs=1e-9)


def test_the_schedule_spans_the_real_number_of_optimizer_steps(tiny_config):
    """10 samples, 4 per step, 2 epochs: 6 optimiser steps, far fewer than total_steps. The
    linear decay reaches 0 at step 6, not at step 1000, and resume can rebuild it."""
    samples = [[f"Word{i}\n", f"token{i}"] for i in range(10)]
    config = tiny_config.evolve(
        train=dict(batch_size=4, epochs=2, total_steps=1000),
        optimizer=dict(kwargs=dict(lr=0.1)),
        scheduler=dict(name="linear", kwargs=dict(warmup_steps=2)))
    trainer = train(samples=samples, config=config)
    assert trainer.total_steps == 6 and trainer.step == 6
    expected = [0.0, 0.05, 0.1, 0.1 * 3 / 4, 0.1 * 2 / 4, 0.1 * 1 / 4]
    assert [e["learning_rate"] for e in trainer.log_history] == pytest.approx(expected)
    # a checkpoint's scheduler state restores the position in a rebuilt schedule
    model = trainer.accelerator.unwrap_model(trainer.model)
    again = build_scheduler(build_optimizer(model, config.optimizer), config.scheduler, 6)
    again.load_state_dict(trainer.scheduler.state_dict())
    assert again.last_epoch == 6 and again.get_last_lr() == trainer.scheduler.get_last_lr()


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_gradient_clipping_is_applied_and_the_logged_norm_is_the_true_one(tiny_config, max_norm):
    """One SGD step (lr 1) on one batch: the logged grad_norm is torch's clip_grad_norm_ of the
    gradients plain torch computes, and the weights move by exactly the clipped gradient."""
    samples = [f"word{i} token{i} word{i + 1}" for i in range(4)]
    config = tiny_config.evolve(
        train=dict(batch_size=4, total_steps=1, max_grad_norm=max_norm),
        optimizer=dict(name="sgd", kwargs=dict(lr=1.0, weight_decay=0.0)))
    trainer = SFTTrainer(config, samples=samples)
    trainer.train()

    ref = AutoModelForCausalLM.from_pretrained(tiny_config.model.model_path)
    loss_sum, count = 0.0, 0
    for ex in trainer.train_items:  # one batch: every example, the sum over its loss tokens
        logits = ref(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(ex["labels"][1:])
        loss_sum = loss_sum + F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        count += int((labels != -100).sum())
    (loss_sum / count).backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    logged = trainer.log_history[0]["grad_norm"]
    assert logged == pytest.approx(norm.item(), rel=1e-5)
    scale = min(1.0, max_norm / (norm.item() + 1e-6))
    assert (scale < 1) == (max_norm < 1)  # the small bound really clips, the large one not
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_config.model.model_path).state_dict()
    for name, grad in grads.items():
        torch.testing.assert_close(trained[name], initial[name] - scale * grad,
                                   atol=1e-6, rtol=1e-4)


def test_same_seed_same_run_other_seed_other_run(tiny_config):
    cfg = tiny_config.evolve(train=dict(batch_size=2, total_steps=3))
    a, b = train(samples=SAMPLES, config=cfg), train(samples=SAMPLES, config=cfg)
    c = train(samples=SAMPLES, config=cfg.evolve(train=dict(seed=7)))

    def weights(trainer):
        return trainer.accelerator.unwrap_model(trainer.model).state_dict()

    assert all(torch.equal(v, weights(b)[k]) for k, v in weights(a).items())
    assert any(not torch.equal(v, weights(c)[k]) for k, v in weights(a).items())


def test_bf16_mixed_precision_trains(tiny_config):
    cfg = tiny_config.evolve(train=dict(batch_size=2, total_steps=3, mixed_precision="bf16"))
    trainer = train(samples=SAMPLES, config=cfg)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(math.isfinite(e["loss"]) for e in trainer.log_history)
