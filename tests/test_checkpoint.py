"""Checkpoints: exact resume after a kill, atomic writes, keep_last_n, save_best, NaN stop."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer_lib import train
from trainer_lib.checkpointing.layout import list_checkpoints
from trainer_lib.errors import CheckpointError, NonFiniteLossError

SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_run.py"
REPO = SCRIPT.parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_subprocess(spec: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(SCRIPT), json.dumps(spec)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with attention dropout, so resuming must also restore the RNG."""
    folder = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["attention_dropout"] = 0.1
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def _spec(method, model_dir, folder, **extra):
    return dict(method=method, model_dir=model_dir, checkpoint_dir=str(folder / "ckpts"),
                total_steps=6, checkpoint_interval=2, weights_out=str(folder / "final.pt"),
                **extra)


@pytest.fixture(scope="module")
def reference_weights(dropout_model_dir, tmp_path_factory):
    """Final weights of an uninterrupted run, per method (trained in this process)."""
    cache = {}

    def get(method):
        if method not in cache:
            folder = tmp_path_factory.mktemp(f"reference-{method}")
            _load_script().run(_spec(method, dropout_model_dir, folder))
            cache[method] = torch.load(folder / "final.pt")
        return cache[method]

    return get


def _assert_same_weights(expected: dict, path: Path):
    got = torch.load(path)
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"tensors differ after resuming: {different[:5]}"


@pytest.mark.parametrize("method", ["sft", "kto"])
def test_sigkill_then_resume_from_latest_matches_uninterrupted_run(
        method, dropout_model_dir, reference_weights, tmp_path):
    killed = _run_subprocess(_spec(method, dropout_model_dir, tmp_path, kill_at_step=5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = tmp_path / "ckpts"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_2", "step_4"]
    assert not (tmp_path / "final.pt").exists()

    resumed = _run_subprocess(_spec(method, dropout_model_dir, tmp_path, resume="latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_4" in resumed.stdout
    _assert_same_weights(reference_weights(method), tmp_path / "final.pt")
    state = json.loads((ckpts / "step_6" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"]] == list(range(1, 7))


def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one(dropout_model_dir, tmp_path):
    killed = _run_subprocess(_spec("sft", dropout_model_dir, tmp_path,
                                   kill_in_checkpoint_write=4))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = tmp_path / "ckpts"
    assert any(p.name.startswith(".step_4.tmp") for p in ckpts.iterdir())  # the partial write
    assert not (ckpts / "step_4").exists()
    assert list_checkpoints(ckpts)[-1] == ckpts / "step_2"
    state = json.loads((ckpts / "step_2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    AutoModelForCausalLM.from_pretrained(ckpts / "step_2" / "hf_model")


def test_latest_with_no_checkpoint_starts_fresh(tiny_config, capsys):
    config = tiny_config.evolve(train=dict(total_steps=2, epochs=4, resume_from_checkpoint="latest"))
    trainer = train(samples=[["a b", " c"]] * 8, config=config)
    assert trainer.step == 2
    assert "no checkpoint under" in capsys.readouterr().out


def test_resume_from_a_missing_path_is_a_clear_error(tiny_config, tmp_path):
    config = tiny_config.evolve(train=dict(resume_from_checkpoint=str(tmp_path / "nope")))
    with pytest.raises(CheckpointError, match="'.*nope' does not exist.*step_<N> folder"):
        train(samples=[["a b", " c"]] * 8, config=config)


def test_keep_last_n_and_save_best(tiny_config):
    losses = iter([5.0, 3.0, 4.0, 1.0, 2.0, 6.0])
    config = tiny_config.evolve(train=dict(total_steps=6, checkpoint_interval=1, keep_last_n=2,
                                           save_best="metrics/score", save_best_mode="min",
                                           eval_interval=1),
                                method=dict(gen_kwargs=dict(max_new_tokens=2)))
    trainer = train(samples=[["a b", " c"]] * 24, eval_prompts=["a"],
                    metric_fn=lambda samples, prompts, outputs: {"score": next(losses)},
                    config=config)
    ckpts = Path(config.train.checkpoint_dir)
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_5", "step_6"]
    best = json.loads((ckpts / "best" / "trainer_state.json").read_text())
    assert best["step"] == 4 and best["best_value"] == 1.0
    assert [e["metrics/score"] for e in trainer.log_history] == [5.0, 3.0, 4.0, 1.0, 2.0, 6.0]
    AutoModelForCausalLM.from_pretrained(ckpts / "best" / "hf_model")
    # best/'s manifest checks out against its files (copied from step_4, the state rewritten)
    from trainer_lib.checkpointing.manifest import damage, file_checksum, read_manifest

    assert damage(ckpts / "best") is None
    entry = read_manifest(ckpts / "best")["files"]["trainer_state.json"]
    assert entry["xxh3_128"] == file_checksum(ckpts / "best" / "trainer_state.json")
    # the newest checkpoint knows the best so far, so a resumed run keeps comparing against it
    last = json.loads((ckpts / "step_6" / "trainer_state.json").read_text())
    assert (last["best_step"], last["best_value"]) == (4, 1.0)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_config):
    config = tiny_config.evolve(train=dict(total_steps=6, checkpoint_interval=2))
    from trainer_lib.methods.sft.trainer import SFTTrainer

    class NaNAtStep4(SFTTrainer):
        def compute_loss(self, model, batch):
            loss, metrics = super().compute_loss(model, batch)
            return (loss * float("nan") if self.step == 3 else loss), metrics

    trainer = NaNAtStep4(config, samples=[["a b", " c"]] * 24)
    with pytest.raises(NonFiniteLossError, match=r"at step 4 .*tokens.*lower learning rate") as e:
        trainer.train()
    ckpts = Path(config.train.checkpoint_dir)
    assert "step_2" in str(e.value)
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_2"]
    AutoModelForCausalLM.from_pretrained(ckpts / "step_2" / "hf_model")


def test_non_finite_loss_report_skips_the_empty_share_of_a_short_rank():
    from trainer_lib.training.step import NonFiniteSteps

    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "num_tokens": 3}
    out = {"loss": float("nan"), "grad_norm": float("nan"), "nonfinite": True}
    with pytest.raises(NonFiniteLossError, match=r"2 micro-batch\(es\), 6 tokens.*\[5, 6, 7\]"):
        NonFiniteSteps(0).check(out, [batch, None, batch], 7, None, True)
