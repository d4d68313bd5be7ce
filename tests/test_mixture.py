"""Weighted mixtures: every epoch holds each source's share by weight, exactly, drawn afresh each
epoch from the seed; the same seed draws the same; a resumed run ends at the weights of an
uninterrupted one; sources of different forms mix; YAML and the command line name mixtures too.

The sources here are token ids whose second id names the sample, so what the loop trained on can
be read back from the batches themselves.
"""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from trainer_lib import ConfigError, DataError, Mixture, default_kto_config, train
from trainer_lib.config import Config
from trainer_lib.data.mixture import EpochRanges, draw_rows, epoch_steps, source_counts
from trainer_lib.methods.sft.trainer import SFTTrainer

A = [{"input_ids": [11, 100 + i, 12]} for i in range(40)]  # 40 samples: subsampled at 3:1
B = [{"input_ids": [13, 200 + i, 14]} for i in range(6)]  # 6 samples: repeated at 3:1


def source_of(ids) -> tuple[str, int]:
    return ("a", ids[1] - 100) if ids[0] == 11 else ("b", ids[1] - 200)


def examples_in(batch: dict) -> list[tuple[str, int]]:
    """The (source, sample) of every example in a collated batch, packed or padded."""
    found = []
    for row in batch["input_ids"].tolist():
        found += [source_of(row[p:p + 2]) for p in range(len(row) - 2)
                  if row[p] in (11, 13) and row[p + 2] == row[p] + 1]
    return found


@pytest.fixture
def trained_on(monkeypatch):
    """What each optimiser step of the last run trained on: [(epoch, [(source, sample), ...])]."""
    steps = []
    training_step = SFTTrainer.training_step

    def recording(self, micro):
        steps.append([ex for batch in micro for ex in examples_in(batch)])
        return training_step(self, micro)

    monkeypatch.setattr(SFTTrainer, "training_step", recording)

    def read(trainer):
        epochs = [h["epoch"] for h in trainer.log_history if "loss" in h]  # a resumed run's too
        out = list(zip(epochs[-len(steps):], steps))
        steps.clear()
        return out

    return read


def per_epoch(steps) -> dict[int, list]:
    out: dict[int, list] = {}
    for epoch, batch in steps:
        out.setdefault(epoch, []).extend(batch)
    return out


def test_counts_by_weight_add_up_and_draws_repeat_or_subsample():
    assert source_counts([3, 1], 40) == [30, 10]
    assert source_counts([1, 1, 1], 10) == [4, 3, 3]  # the remainder to the first
    assert sum(source_counts([0.2, 0.7, 0.1], 999)) == 999
    pool = np.arange(100, 106)
    drawn = draw_rows(pool, 10, seed=0, epoch=0, name="b")
    assert sorted(Counter(drawn.tolist()).values()) == [1, 1, 2, 2, 2, 2]  # all once, 4 twice
    assert len(set(draw_rows(np.arange(40), 30, 0, 0, "a"))) == 30  # without repeats
    assert not np.array_equal(draw_rows(pool, 4, 0, 0, "b"), draw_rows(pool, 4, 0, 1, "b"))
    assert np.array_equal(draw_rows(pool, 4, 7, 2, "b"), draw_rows(pool, 4, 7, 2, "b"))


def test_a_3_to_1_mixture_gives_3_to_1_examples_every_epoch_drawn_afresh(tiny_config, trained_on,
                                                                         capsys):
    config = tiny_config.evolve(train=dict(batch_size=8, epochs=3, total_steps=100))
    trainer = train(samples=Mixture({"a": (A, 3), "b": (B, 1)}, examples_per_epoch=40),
                    config=config)
    assert trainer.total_steps == 15  # 3 epochs of 40 examples in batches of 8
    epochs = per_epoch(trained_on(trainer))
    assert sorted(epochs) == [0, 1, 2]
    for drawn in epochs.values():
        counts = Counter(source for source, _ in drawn)
        assert counts == {"a": 30, "b": 10}
        a = [i for source, i in drawn if source == "a"]
        assert len(set(a)) == 30  # subsampled: no sample twice
        b = Counter(i for source, i in drawn if source == "b")
        assert set(b) == set(range(6)) and sorted(b.values()) == [1, 1, 2, 2, 2, 2]
    a_sets = [frozenset(i for s, i in epochs[e] if s == "a") for e in range(3)]
    assert len(set(a_sets)) == 3  # a fresh draw each epoch
    assert trainer.data_report.as_dict()["sources/a/examples"] == 30
    assert trainer.data_report.as_dict()["sources/b/examples"] == 10
    assert ("mixture: 40 examples per epoch: a 30 of 40 (subsampled), b 10 of 6 (each 1.67 "
            "times)") in capsys.readouterr().out

    # the same seed draws the same examples in the same order; another seed, others
    again = train(samples=Mixture({"a": (A, 3), "b": (B, 1)}, examples_per_epoch=40),
                  config=config)
    assert per_epoch(trained_on(again)) == epochs
    other = train(samples=Mixture({"a": (A, 3), "b": (B, 1)}, examples_per_epoch=40, seed=5),
                  config=config)
    other_epochs = per_epoch(trained_on(other))
    assert other_epochs != epochs
    assert Counter(s for s, _ in other_epochs[0]) == {"a": 30, "b": 10}


def test_the_default_epoch_holds_as_many_examples_as_the_sources(tiny_config, trained_on):
    config = tiny_config.evolve(train=dict(batch_size=23, epochs=1, total_steps=100))
    trainer = train(samples=Mixture({"a": (A, 1), "b": (B, 1)}), config=config)
    (drawn,) = per_epoch(trained_on(trainer)).values()
    assert Counter(s for s, _ in drawn) == {"a": 23, "b": 23}  # 46 = 40 + 6, half each


def test_a_resumed_mixture_ends_at_the_weights_of_an_uninterrupted_run(tiny_config, trained_on,
                                                                      tmp_path):
    """Packed rows, epochs of a fresh draw each, a checkpoint in the middle of the second."""
    config = tiny_config.evolve(
        train=dict(seq_length=8, batch_size=2, epochs=10, total_steps=9, checkpoint_interval=4,
                   checkpoint_dir=str(tmp_path / "whole")),
        method=dict(packing=True), scheduler=dict(name="cosine"))
    mixture = Mixture({"a": (A, 3), "b": (B, 1)}, examples_per_epoch=24)
    whole = train(samples=mixture, config=config)
    whole_steps = trained_on(whole)
    assert [e for e, _ in whole_steps] == [0] * 6 + [1] * 3  # 12 rows of 2 examples an epoch
    assert Counter(s for _, batch in whole_steps[:6] for s, _ in batch) == {"a": 18, "b": 6}

    resumed = train(samples=mixture, config=config.evolve(train=dict(
        checkpoint_dir=str(tmp_path / "resumed"),
        resume_from_checkpoint=str(tmp_path / "whole" / "step_8"))))
    assert trained_on(resumed)[-1] == whole_steps[-1]  # step 9: the same batch of epoch 1
    a, b = (t.accelerator.unwrap_model(t.model).state_dict() for t in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_total_steps_counts_each_planned_epoch():
    class OneProcess:
        num_processes = 1

    assert epoch_steps(OneProcess(), 40, 8, 1) == 5
    assert epoch_steps(OneProcess(), 41, 8, 2) == 3  # 6 batches, 2 a step
    ranges = EpochRanges([0, 5, 9], seed=1)
    sampler = ranges.sampler()
    sampler.set_epoch(1)
    assert sorted(sampler) == [5, 6, 7, 8] and len(sampler) == 4


def test_sources_of_different_forms_train_together(tiny_config, tmp_path):
    pairs = [{"prompt": f"word{i} ", "completion": f"token{i}"} for i in range(12)]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": f"word{i} token{i}"}) + "\n" for i in range(8)))
    chats = [{"messages": [{"role": "user", "content": f"word{i}"},
                           {"role": "assistant", "content": f"token{i}"}]} for i in range(5)]
    config = tiny_config.evolve(train=dict(total_steps=3, epochs=1))
    trainer = train(samples=Mixture({"pairs": (pairs, 2), "texts": (str(path), 1),
                                     "chats": (chats, 1), "ids": (B, 1)}, examples_per_epoch=20),
                    config=config)
    report = trainer.data_report.as_dict()
    assert [report[f"sources/{n}/examples"] for n in ("pairs", "texts", "chats", "ids")] == \
        [8, 4, 4, 4]
    assert {k: v for k, v in report.items() if k.startswith("kind/")} == {
        "kind/conversation": 5, "kind/pair": 12, "kind/text": 8, "kind/pretokenised": 6}
    assert len([h for h in trainer.log_history if "loss" in h]) == 3


def test_a_kto_mixture_of_text_and_ids_trains(tiny_model_dir, tmp_path):
    texts = [{"prompt": f"word{i} ", "completion": f"token{i}", "label": i % 2 == 0}
             for i in range(10)]
    ids = [{"prompt_input_ids": [11, 100 + i], "completion_input_ids": [12, 13],
            "label": i % 2 == 1} for i in range(4)]
    config = default_kto_config().evolve(
        model=dict(model_path=tiny_model_dir),
        train=dict(seq_length=32, batch_size=4, epochs=2, total_steps=100, log_interval=1,
                   progress_bar=False, checkpoint_dir=str(tmp_path / "ckpts")))
    trainer = train(samples=Mixture({"texts": (texts, 1), "ids": (ids, 1)}, examples_per_epoch=12),
                    config=config)
    assert trainer.total_steps == 6  # 3 micro-batches of 4 an epoch
    assert trainer.data_report.as_dict()["sources/ids/examples"] == 6
    epochs = trainer.epoch_ranges
    for e in range(2):
        drawn = [ex for group in trainer.train_items[epochs.starts[e]:epochs.starts[e + 1]]
                 for ex in group]
        assert Counter(ex["input_ids"][0] == 11 for ex in drawn) == {True: 6, False: 6}
    assert all(np.isfinite(h["loss"]) for h in trainer.log_history if "loss" in h)


def test_evaluation_samples_come_from_every_source_and_are_never_drawn(tiny_config):
    import datasets
    from transformers import AutoTokenizer

    from trainer_lib.data.chat_template import RunTemplate
    from trainer_lib.data.pipeline import build_data
    from trainer_lib.methods.sft.recipe import SFTRecipe

    tokenizer = AutoTokenizer.from_pretrained(tiny_config.model.model_path)
    recipe = SFTRecipe(tokenizer, RunTemplate(tokenizer, "default"), tiny_config.method, 64)
    config = tiny_config.evolve(train=dict(eval_split=0.25))
    data = build_data(None, config, recipe, Mixture({"a": (A, 3), "b": (B[:4], 1)}))
    held = [source_of(ex["input_ids"]) for ex in data.eval]
    assert Counter(s for s, _ in held) == {"a": 10, "b": 1}
    drawn = {source_of(ex["input_ids"]) for e in range(3) for ex in data.store.fetch(
        data.mixture.rows(e))}
    assert not drawn & set(held)
    # 33 examples left to draw from, 3:1
    assert data.report.sources == {"a": {"examples": 25, "available": 30},
                                   "b": {"examples": 8, "available": 3}}

    # a DatasetDict source: its validation split is evaluated on, its train split drawn from
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(B[:4]),
                                   "validation": datasets.Dataset.from_list(B[4:])})
    data = build_data(None, tiny_config, recipe, Mixture({"a": (A, 1), "b": (splits, 1)}))
    assert sorted(source_of(ex["input_ids"]) for ex in data.eval) == [("b", 4), ("b", 5)]


def test_a_method_draws_a_mixture_with_the_default_arrange_or_refuses_it(tiny_config):
    """A method of one's own that keeps Trainer.arrange trains on each epoch's draw; one whose
    own arrange() knows nothing of mixtures is refused one, rather than ignoring the weights."""
    from trainer_lib.training.trainer import Trainer

    class Default(SFTTrainer):
        arrange = Trainer.arrange

    class Own(SFTTrainer):
        def arrange(self, data, recipe):
            return data.train, data.eval

    config = tiny_config.evolve(train=dict(epochs=2, batch_size=8, total_steps=100))
    mixture = Mixture({"a": (A, 3), "b": (B, 1)}, examples_per_epoch=16)
    trainer = Default(config, samples=mixture)
    starts = trainer.epoch_ranges.starts
    assert starts == [0, 16, 32] and trainer.total_steps == 4
    for e in range(2):
        drawn = trainer.train_items[starts[e]:starts[e + 1]]
        assert Counter(source_of(ex["input_ids"])[0] for ex in drawn) == {"a": 12, "b": 4}
    with pytest.raises(DataError, match=r"Own\.arrange\(\) does not draw a Mixture's epochs"):
        Own(config, samples=mixture)


# ---------------------------------------------------------------- YAML and the command line


def write_sources(tmp_path) -> tuple[str, str]:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(s) + "\n" for s in A))
    b.write_text("".join(json.dumps(s) + "\n" for s in B))
    return str(a), str(b)


def test_a_mixture_from_yaml(tiny_config, tmp_path):
    a, b = write_sources(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(f"data:\n  mixture:\n    - {{name: a, path: {a}, weight: 3}}\n"
                    f"    - {{name: b, path: {b}, weight: 1}}\n  examples_per_epoch: 20\n")
    loaded = Config.load_yaml(path)
    assert loaded.data.mixture == [{"name": "a", "path": a, "weight": 3},
                                   {"name": "b", "path": b, "weight": 1}]
    config = tiny_config.evolve(data=loaded.to_dict()["data"], train=dict(total_steps=2))
    trainer = train(config=config)
    report = trainer.data_report.as_dict()
    assert (report["sources/a/examples"], report["sources/b/examples"]) == (15, 5)


def test_the_command_line_takes_mix_flags(tiny_model_dir, tmp_path, capsys):
    from trainer_lib.cli import main

    a, b = write_sources(tmp_path)
    status = main(["sft", "--mix", "a", a, "3", "--mix", "b", b, "1",
                   f"model.model_path={tiny_model_dir}", "train.total_steps=2",
                   "train.progress_bar=false", f"train.checkpoint_dir={tmp_path / 'ckpts'}",
                   "data.examples_per_epoch=8"])
    out = capsys.readouterr().out
    assert status == 0
    assert "data: a mixture of a (" in out and "weight 3" in out
    assert "mixture: 8 examples per epoch: a 6 of 40 (subsampled), b 2 of 6" in out
    assert (tmp_path / "ckpts" / "final" / "config.json").is_file()


@pytest.mark.parametrize("mixture,words", [
    ([], "data.mixture is empty"),
    ([{"name": "a", "path": "a.jsonl", "wieght": 1}],
     r"unknown key 'data.mixture\[0\].wieght'; did you mean 'weight'"),
    ([{"name": "a", "path": "a.jsonl", "weight": 0}],
     r"data.mixture\[0\].weight must be a number > 0, got 0"),
    ([{"name": "a", "path": "a.jsonl"}, {"name": "a", "path": "b.jsonl"}],
     r"data.mixture\[1\].name 'a' is used twice"),
    ([{"name": "a"}], r"data.mixture\[0\].path must be a non-empty string"),
    ("a.jsonl", "must be a list"),
])
def test_a_bad_mixture_in_a_config_is_named(mixture, words):
    with pytest.raises(ConfigError, match=words):
        Config.from_dict({"data": {"mixture": mixture}})


@pytest.mark.parametrize("make,words", [
    (lambda: Mixture([("a", A)]), "takes a dict"),
    (lambda: Mixture({"a": A}), r"source 'a' must be a \(source, weight\) pair"),
    (lambda: Mixture({"a": (A, -1)}), "the weight must be a number > 0, got -1"),
    (lambda: Mixture({"a": (A, 1)}, examples_per_epoch=0), "examples_per_epoch must be"),
    (lambda: Mixture({"a": (Mixture({"b": (B, 1)}), 1)}), "is itself a Mixture"),
])
def test_a_bad_mixture_is_named(make, words):
    with pytest.raises(DataError, match=words):
        make()
