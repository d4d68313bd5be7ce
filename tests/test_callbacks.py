"""Callbacks and early stopping: each hook sees what the run logs and saves, `stop_training`
ends the run after the current step with a checkpoint and the reason (on 2 processes too), a
callback that raises stops the run and leaves the last checkpoint as it was, and EarlyStopping
stops where its patience runs out, also after a resume."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_lib import Callback, ConfigError, EarlyStopping, default_sft_config, train
from trainer_lib.checkpointing.layout import list_checkpoints
from trainer_lib.checkpointing.manifest import damage
from trainer_lib.config import Config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "callback_run.py"
SAMPLES = [{"prompt": f"word{i} ", "completion": f"token{i} word{i + 1}"} for i in range(16)]
EVAL = [{"prompt": f"word{i} ", "completion": f"token{i} word{i + 1}"} for i in range(16, 20)]


def _config(model_dir, ckpts: Path, **train_kw):
    settings = dict(seq_length=32, batch_size=4, epochs=50, total_steps=8, log_interval=2,
                    eval_interval=1000, checkpoint_interval=1000, progress_bar=False,
                    checkpoint_dir=str(ckpts), logging_dir=str(ckpts.parent / "logs"))
    settings.update(train_kw)
    return default_sft_config().evolve(
        model=dict(model_path=model_dir), train=settings,
        optimizer=dict(kwargs=dict(lr=1e-2)), scheduler=dict(name="constant"),
        method=dict(packing=False))


class Recorder(Callback):
    """Every call, in order, with what it was given."""

    def __init__(self, stop_at=None, raise_at=None):
        self.calls, self.stop_at, self.raise_at = [], stop_at, raise_at

    def on_train_begin(self, trainer):
        self.calls.append(("train_begin", trainer.step))

    def on_step_end(self, trainer):
        self.calls.append(("step_end", trainer.step))
        if trainer.step == self.stop_at:
            trainer.stop_training(f"asked at step {trainer.step}")
        if trainer.step == self.raise_at:
            raise ValueError(f"the callback failed at step {trainer.step}")

    def on_log(self, trainer, logs):
        self.calls.append(("log", trainer.step, dict(logs)))

    def on_evaluate(self, trainer, metrics):
        self.calls.append(("evaluate", trainer.step, dict(metrics)))

    def on_save(self, trainer, path):
        self.calls.append(("save", trainer.step, Path(path), (Path(path) / "manifest.json")
                           .is_file()))

    def on_train_end(self, trainer):
        self.calls.append(("train_end", trainer.step))

    def of(self, hook):
        return [c[1:] for c in self.calls if c[0] == hook]


def test_the_hooks_see_every_logged_entry_evaluation_and_checkpoint(tiny_model_dir, tmp_path):
    recorder = Recorder()
    trainer = train(samples=SAMPLES, eval_samples=EVAL, callbacks=[recorder], config=_config(
        tiny_model_dir, tmp_path / "ckpts", total_steps=6, eval_interval=3,
        checkpoint_interval=4, save_best="eval/loss"))
    assert recorder.calls[0] == ("train_begin", 0) and recorder.calls[-1] == ("train_end", 6)
    assert recorder.of("step_end") == [(s,) for s in range(1, 7)]
    # on_log: every entry of log_history, figure for figure (training and evaluation at the same
    # step are two calls, merged into one entry)
    merged: dict[int, dict] = {}
    for step, logs in recorder.of("log"):
        assert logs["step"] == step
        merged.setdefault(step, {}).update(logs)
    assert list(merged.values()) == trainer.log_history
    assert {s for s, logs in recorder.of("log") if "loss" in logs} == {2, 4, 6}
    # on_evaluate: each evaluation's figures, as logged
    evaluations = recorder.of("evaluate")
    assert [s for s, _ in evaluations] == [3, 6]
    for step, metrics in evaluations:
        entry = next(h for h in trainer.log_history if h["step"] == step)
        assert metrics == {k: v for k, v in entry.items() if k.startswith("eval/")}
    # on_save: each checkpoint and best/, already complete on disk
    saves = recorder.of("save")
    ckpts = tmp_path / "ckpts"
    assert (4, ckpts / "step_4", True) in saves and (6, ckpts / "step_6", True) in saves
    assert all(complete for *_, complete in saves)
    assert any(path == ckpts / "best" for _, path, _ in saves)


def test_stop_training_ends_after_the_current_step_with_a_checkpoint_and_the_reason(
        tiny_model_dir, tmp_path, capsys):
    recorder = Recorder(stop_at=3)
    ckpts = tmp_path / "ckpts"
    trainer = train(samples=SAMPLES, callbacks=[recorder],
                    config=_config(tiny_model_dir, ckpts, total_steps=20))
    # asked in step 3's on_step_end: no further step is taken
    assert trainer.step == 3 and recorder.calls[-1] == ("train_end", 3)
    assert [c for c in recorder.calls if c[0] == "step_end"][-1] == ("step_end", 3)
    last = trainer.log_history[-1]
    assert last["step"] == 3 and last["stop_reason"] == "asked at step 3"
    assert "loss" in last  # the figures of step 3 (after the line of step 2) are logged too
    assert list_checkpoints(ckpts) == [ckpts / "step_3"] and damage(ckpts / "step_3") is None
    saved = json.loads((ckpts / "step_3" / "trainer_state.json").read_text())
    assert saved["log_history"][-1]["stop_reason"] == "asked at step 3"
    assert "stopped at step 3: asked at step 3; saved" in capsys.readouterr().out
    # the checkpoint resumes the run
    resumed = train(samples=SAMPLES, config=_config(tiny_model_dir, ckpts, total_steps=5,
                                                    resume_from_checkpoint=str(ckpts / "step_3")))
    assert resumed.step == 5


def test_a_callback_that_raises_stops_the_run_and_keeps_the_last_checkpoint(tiny_model_dir,
                                                                           tmp_path):
    ckpts = tmp_path / "ckpts"
    recorder = Recorder(raise_at=3)
    with pytest.raises(ValueError, match="the callback failed at step 3") as e:
        train(samples=SAMPLES, callbacks=[recorder],
              config=_config(tiny_model_dir, ckpts, total_steps=20, checkpoint_interval=2,
                             keep_last_n=1))
    # nothing was saved after the error, and keep_last_n deleted nothing for it
    assert list_checkpoints(ckpts) == [ckpts / "step_2"] and damage(ckpts / "step_2") is None
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2"]
    if sys.version_info >= (3, 11):
        notes = "\n".join(e.value.__notes__)
        assert "raised by Recorder.on_step_end at step 3" in notes
        assert f"train.resume_from_checkpoint={ckpts / 'step_2'}" in notes
    # no hook ran after the one that raised, not even on_train_end
    assert recorder.calls[-1] == ("step_end", 3)
    resumed = train(samples=SAMPLES, config=_config(tiny_model_dir, ckpts, total_steps=3,
                                                    resume_from_checkpoint=str(ckpts / "step_2")))
    assert resumed.step == 3


def test_callbacks_that_cannot_be_called_are_refused_before_the_model_loads(tiny_model_dir,
                                                                            tmp_path,
                                                                            monkeypatch):
    def refuse(config):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr("trainer_lib.training.trainer.load_model", refuse)
    config = _config(tiny_model_dir, tmp_path / "ckpts")

    class PortedFromHF(Callback):
        def on_epoch_end(self, trainer):
            pass

    with pytest.raises(ConfigError, match=r"callbacks\[0\] \(PortedFromHF\) defines "
                       r"on_epoch_end, which is never called.*on_train_end"):
        train(samples=SAMPLES, config=config, callbacks=[PortedFromHF()])
    with pytest.raises(ConfigError, match=r"callbacks\[1\] is a function, not a "
                       r"trainer_lib\.Callback: subclass Callback"):
        train(samples=SAMPLES, config=config, callbacks=[Recorder(), print])
    with pytest.raises(ConfigError, match=r"EarlyStopping\(metric='eval/loss'\) but the run has "
                       "no evaluation data.*would never stop early.*eval_samples="):
        train(samples=SAMPLES, config=config, callbacks=[EarlyStopping(patience=2)])
    with pytest.raises(ConfigError, match=r"train\.early_stopping\.metric='metrics/exact' but "
                       "no metric_fn is given"):
        train(samples=SAMPLES, eval_samples=EVAL, config=config.evolve(
            train=dict(early_stopping=dict(metric="metrics/exact"))))


# --------------------------------------------------------------------------- EarlyStopping


class FakeTrainer:
    def __init__(self):
        self.step, self.stopped = 0, []

    def stop_training(self, reason):
        self.stopped.append((self.step, reason))


def _evaluate(callback, values, name="eval/loss"):
    trainer = FakeTrainer()
    for value in values:
        trainer.step += 1
        callback.on_evaluate(trainer, {name: value})
    return trainer.stopped


@pytest.mark.parametrize("kwargs,values,stops_at", [
    (dict(patience=2), [3.0, 2.0, 2.5, 2.0, 1.0], 4),  # 2.5 and 2.0 are no better than 2.0
    (dict(patience=2), [3.0, 2.0, 2.5, 1.9, 2.5, 2.5], 6),  # an improvement resets the count
    (dict(patience=1, min_delta=0.5), [3.0, 2.6, 2.0], 2),  # 0.4 better is not enough
    (dict(patience=2, mode="max", metric="metrics/exact"), [0.1, 0.5, 0.5, 0.4], 4),
    (dict(patience=2), [math.nan, math.nan, 1.0], 2),  # NaN is never an improvement
])
def test_early_stopping_counts_evaluations_without_improvement(kwargs, values, stops_at):
    stopped = _evaluate(EarlyStopping(**kwargs), values, kwargs.get("metric", "eval/loss"))
    assert stopped and stopped[0][0] == stops_at


def test_early_stopping_state_survives_a_round_trip_for_the_same_figure_only():
    first = EarlyStopping(patience=3)
    _evaluate(first, [2.0, 1.0, 1.5])
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint holds it
    assert state["best"] == 1.0 and state["evaluations_without_improvement"] == 1
    again = EarlyStopping(patience=3)
    again.load_state_dict(state)
    assert _evaluate(again, [1.2, 1.1]) == [(2, "early stopping: eval/loss has not improved for "
                                                "3 evaluation(s); its best, 1, was at step 2")]
    other = EarlyStopping(metric="eval/kl", patience=3)
    other.load_state_dict(state)  # kept for another figure: starts afresh
    assert other.best is None and other.evaluations_without_improvement == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(patience=0), r"EarlyStopping\.patience must be a whole number of evaluations, at "
                       "least 1, got 0"),
    (dict(metric="loss"), r"EarlyStopping\.metric must name an evaluation figure"),
    (dict(mode="lowest"), r"EarlyStopping\.mode must be 'min'"),
    (dict(min_delta=-0.1), r"EarlyStopping\.min_delta must be a number >= 0"),
])
def test_early_stopping_settings_are_checked_when_made(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EarlyStopping(**kwargs)


def test_train_early_stopping_is_a_config_section_for_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  early_stopping:\n    patience: 4\n    min_delta: 0.01\n")
    config = Config.load_yaml(path, ["train.early_stopping.mode=max"])
    settings = config.train.early_stopping
    assert (settings.metric, settings.patience, settings.mode, settings.min_delta) == (
        "eval/loss", 4, "max", 0.01)
    assert Config.from_dict(config.to_dict()).train.early_stopping == settings
    assert default_sft_config().apply_overrides(
        ["train.early_stopping=null"]).train.early_stopping is None
    with pytest.raises(ConfigError, match=r"unknown key 'train\.early_stopping\.patiense'; did "
                       "you mean 'patience'"):
        config.apply_overrides(["train.early_stopping.patiense=2"])
    with pytest.raises(ConfigError, match=r"train\.early_stopping\.patience must be"):
        config.apply_overrides(["train.early_stopping.patience=0"])
    with pytest.raises(ConfigError, match=r"train\.early_stopping must be a mapping of its "
                       r"fields \(metric, patience, mode, min_delta\)"):
        config.apply_overrides(["train.early_stopping=true"])


def _plateau_config(model_dir, ckpts: Path, **train_kw):
    """eval/loss falls while the learning rate is on, for 4 steps, then stays put (StepLR takes
    it to exactly 0); evaluated every step."""
    return _config(model_dir, ckpts, total_steps=30, eval_interval=1, **train_kw).evolve(
        optimizer=dict(kwargs=dict(lr=3e-2)),
        scheduler=dict(name="StepLR", kwargs=dict(step_size=4, gamma=0.0)))


def _expected_stop(log_history: list, patience: int) -> int:
    """The step whose evaluation uses up the patience, worked out from the logged eval/loss."""
    best, without = math.inf, 0
    for entry in log_history:
        if "eval/loss" not in entry:
            continue
        if entry["eval/loss"] < best:
            best, without = entry["eval/loss"], 0
        else:
            without += 1
            if without == patience:
                return entry["step"]
    raise AssertionError("the patience never ran out")


@pytest.fixture(scope="module")
def plateau_run(tiny_model_dir, tmp_path_factory):
    """An uninterrupted run with train.early_stopping (patience 3), a checkpoint every step."""
    ckpts = tmp_path_factory.mktemp("plateau") / "ckpts"
    config = _plateau_config(tiny_model_dir, ckpts, checkpoint_interval=1).evolve(
        train=dict(early_stopping=dict(patience=3)))
    return train(samples=SAMPLES, eval_samples=EVAL, config=config), ckpts


def test_early_stopping_stops_a_run_whose_eval_loss_stops_improving(plateau_run):
    trainer, _ = plateau_run
    losses = [h["eval/loss"] for h in trainer.log_history if "eval/loss" in h]
    assert losses[3] < losses[0]  # it did improve first
    decided = _expected_stop(trainer.log_history, patience=3)
    assert trainer.step == decided < 30  # the step whose evaluation used up the patience
    reason = trainer.log_history[-1]["stop_reason"]
    assert reason.startswith("early stopping: eval/loss has not improved for 3 evaluation(s)")


def test_a_run_resumed_mid_patience_stops_where_the_uninterrupted_run_did(plateau_run,
                                                                        tiny_model_dir,
                                                                        tmp_path):
    trainer, ckpts = plateau_run
    # the last checkpoint taken after one evaluation without improvement (of the 3 allowed)
    states = {p: json.loads((p / "trainer_state.json").read_text())["callbacks"]
              for p in list_checkpoints(ckpts)}
    middle = [p for p, s in states.items()
              if s["EarlyStopping"]["evaluations_without_improvement"] == 1][-1]
    copy = Path(shutil.copytree(middle, tmp_path / "ckpts" / middle.name))
    config = _plateau_config(tiny_model_dir, tmp_path / "ckpts",
                             resume_from_checkpoint=str(copy))
    resumed = train(samples=SAMPLES, eval_samples=EVAL, config=config,
                    callbacks=[EarlyStopping(patience=3)])  # the same as the config's section
    assert resumed.step == trainer.step
    assert resumed.log_history[-1]["stop_reason"] == trainer.log_history[-1]["stop_reason"]

    class Forgetful(EarlyStopping):  # no saved state of its own: its patience starts afresh
        pass

    shutil.rmtree(tmp_path / "ckpts")
    shutil.copytree(middle, copy)
    fresh = train(samples=SAMPLES, eval_samples=EVAL, config=config,
                  callbacks=[Forgetful(patience=3)])
    assert fresh.step > trainer.step


def test_an_early_stopping_metric_the_evaluation_does_not_log_stops_the_run_naming_it(
        tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"EarlyStopping\(metric='eval/los'\): the evaluation "
                       r"at step 2 logs no 'eval/los' \(it logs eval/loss\); did you mean "
                       "'eval/loss'"):
        train(samples=SAMPLES, eval_samples=EVAL, callbacks=[EarlyStopping("eval/los")],
              config=_config(tiny_model_dir, tmp_path / "ckpts", eval_interval=2))


# --------------------------------------------------------------------------- 2 processes


def test_stop_training_or_an_error_on_one_of_two_processes_stops_both_after_the_same_step(
        tiny_model_dir, tmp_path):
    """DDP on CPU. Rank 1 alone asks to stop at step 2: both stop after step 2, with the step_2
    checkpoint and rank 1's reason. Then rank 1 alone raises at step 2 of a run checkpointed
    every step: both raise its error after step 2, and step_1 is the last checkpoint."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"model_dir": tiny_model_dir, "out": str(tmp_path)}
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
           "--main_process_port", str(port), "--config_file",
           str(REPO / "configs" / "accelerate" / "ddp.yaml"), str(SCRIPT), json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["processes"] == 2
        stop = report["stop"]
        assert stop["step"] == 2 and stop["last"]["stop_reason"] == "rank 1 asked at step 2"
        assert stop["checkpoints"] == ["step_2"] and stop["intact"]
        error = report["error"]
        assert error["raised"] == "ValueError: rank 1 failed at step 2"
        assert error["checkpoints"] == ["step_1"] and error["intact"]
