"""What a run guarantees when things go wrong: non-finite steps are never applied or saved, every
file a resume reads loads without running code, damaged and foreign checkpoints are refused (or
passed over for "latest", which continues the run that wrote last), Ctrl-C saves and stops on
every process at the same step, a full disk loses nothing that was saved, and a write that fails
on one process stops every process."""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trainer_lib import default_sft_config, train
from trainer_lib.checkpointing.layout import list_checkpoints
from trainer_lib.checkpointing.manifest import damage, read_manifest, write_manifest, writer_of
from trainer_lib.checkpointing.resume import plan_start
from trainer_lib.errors import (
    CheckpointError,
    CheckpointWriteError,
    NonFiniteLossError,
    UnsafeCheckpointError,
)
from trainer_lib.methods.sft.trainer import SFTTrainer
from trainer_lib.model.embedded import DEFAULT_DATA

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "fault_run.py"
SAMPLES = [{"prompt": f"word{i} ", "completion": f"token{i} word{i + 1}"} for i in range(16)]


def _config(model_dir, ckpts: Path, **train_kw):
    settings = dict(seq_length=32, batch_size=4, epochs=10, total_steps=4, checkpoint_interval=2,
                    log_interval=1, eval_interval=1000, progress_bar=False,
                    checkpoint_dir=str(ckpts), logging_dir=str(ckpts.parent / "logs"))
    settings.update(train_kw)
    return default_sft_config().evolve(
        model=dict(model_path=model_dir), train=settings,
        optimizer=dict(kwargs=dict(lr=1e-3)), scheduler=dict(name="constant"),
        method=dict(packing=False))


def _refuse_model(config):
    raise AssertionError("the model was loaded before the error")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model is loaded: the error must come before."""
    monkeypatch.setattr("trainer_lib.training.trainer.load_model", _refuse_model)


@pytest.fixture(scope="module")
def run_ckpts(tiny_model_dir, tmp_path_factory) -> Path:
    """One run of 4 steps over 16 samples, checkpointed at steps 2 and 4; tests work on copies."""
    folder = tmp_path_factory.mktemp("run") / "ckpts"
    train(samples=SAMPLES, config=_config(tiny_model_dir, folder))
    return folder


@pytest.fixture
def ckpts(run_ckpts, tmp_path) -> Path:
    return Path(shutil.copytree(run_ckpts, tmp_path / "ckpts"))


def _env():
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def _launch_two(spec: dict, setup: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """tests/scripts/fault_run.py on 2 processes under `accelerate launch`, with the accelerate
    config `configs/accelerate/<setup>.yaml`; a hang fails the test at `timeout`."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
           "--main_process_port", str(port), "--config_file",
           str(REPO / "configs" / "accelerate" / f"{setup}.yaml"), str(SCRIPT), json.dumps(spec)]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- non-finite steps


@pytest.fixture(scope="module")
def embedded_model(tmp_path_factory) -> str:
    from trainer_lib.model.embedded import tiny_model

    return tiny_model(tmp_path_factory.mktemp("embedded") / "model")


def test_a_nan_gradient_is_never_applied_and_the_named_checkpoint_resumes(embedded_model,
                                                                          tmp_path, capsys):
    # the run of the report: the embedded model, the shipped instructions, lr=1e4 (with the main
    # example's schedule, shorter rows); the gradient norm turns NaN while the loss is finite
    folder = tmp_path / "ckpts"
    config = default_sft_config().evolve(
        model=dict(model_path=embedded_model),
        train=dict(seq_length=128, batch_size=2, epochs=80, total_steps=12, checkpoint_interval=3,
                   log_interval=1, progress_bar=False, checkpoint_dir=str(folder)),
        optimizer=dict(kwargs=dict(lr=1e4, weight_decay=0.01)),
        scheduler=dict(name="cosine", kwargs=dict(warmup_steps=20)))
    with pytest.raises(NonFiniteLossError) as e:
        train(samples=str(DEFAULT_DATA), config=config)
    message = str(e.value)
    assert "the gradient norm is nan (the loss" in message and "is finite) at step " in message
    failed = int(message.split("is finite) at step ")[1].split()[0])
    assert "lower learning rate" in message and "train.skip_nonfinite_steps" in message
    # the newest checkpoint before the broken step is named; nothing of that step was saved
    last = folder / f"step_{(failed - 1) // 3 * 3}"
    assert f"train.resume_from_checkpoint={last} " in message
    assert list_checkpoints(folder)[-1] == last
    for name in ("accelerate/model.safetensors", "hf_model/model.safetensors"):
        assert all(torch.isfinite(w).all() for w in load_file(last / name).values())

    # it loads and trains past the step that failed, with the lower learning rate suggested
    capsys.readouterr()
    trainer = train(samples=str(DEFAULT_DATA), config=config.evolve(
        train=dict(total_steps=failed + 1, resume_from_checkpoint=str(last)),
        optimizer=dict(kwargs=dict(lr=1e-3))))
    out = capsys.readouterr().out
    assert f"resumed from {last} at step {last.name[5:]}" in out
    assert "optimizer.kwargs.lr is 0.001 now and was 10000" in out
    resumed = [h for h in trainer.log_history if h["step"] > int(last.name[5:])]
    assert [h["step"] for h in resumed] == list(range(int(last.name[5:]) + 1, failed + 2))
    assert all(math.isfinite(h["grad_norm"]) and h["learning_rate"] < 1e-3 for h in resumed)
    AutoModelForCausalLM.from_pretrained(folder / f"step_{failed + 1}" / "hf_model")


class NaNAtSteps(SFTTrainer):
    nan_steps = (2, 4)

    def compute_loss(self, model, batch):
        loss, metrics = super().compute_loss(model, batch)
        return (loss * float("nan") if self.step + 1 in self.nan_steps else loss), metrics


def test_skip_nonfinite_steps_skips_within_its_bound_without_moving_the_schedule(
        tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path / "ckpts", total_steps=6, checkpoint_interval=6,
                     skip_nonfinite_steps=2).evolve(scheduler=dict(name="linear"))
    trainer = NaNAtSteps(config, samples=SAMPLES)
    trainer.train()
    history = trainer.log_history
    assert [h["step"] for h in history] == [1, 3, 5, 6]  # the skipped steps log nothing
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    # the schedule follows the applied updates: 4 of 6 steps, so it is where a 4-step run is
    assert trainer.scheduler.last_epoch == 4
    assert history[-1]["skipped_steps"] == 2
    state = json.loads((tmp_path / "ckpts" / "step_6" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 2

    # a third such step is one too many; the last checkpoint is named
    NaNAtSteps.nan_steps = (1, 2, 4)
    try:
        with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4 .*now 2"):
            NaNAtSteps(config.evolve(train=dict(checkpoint_dir=str(tmp_path / "other"),
                                                checkpoint_interval=3)), samples=SAMPLES).train()
    finally:
        NaNAtSteps.nan_steps = (2, 4)
    assert [p.name for p in list_checkpoints(tmp_path / "other")] == ["step_3"]


# the optimiser is wrapped again below, after the schedule hooked the first wrapper's step
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_skipped_step_under_fp16_loss_scaling_lets_the_next_step_run(tiny_model_dir, tmp_path):
    # accelerate scales fp16 losses only on a GPU; here the run gets the same GradScaler on CPU
    from accelerate.optimizer import AcceleratedOptimizer

    config = _config(tiny_model_dir, tmp_path / "ckpts", total_steps=6, checkpoint_interval=6,
                     skip_nonfinite_steps=2, mixed_precision="fp16")
    trainer = NaNAtSteps(config, samples=SAMPLES)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    acc = trainer.accelerator
    acc.scaler, acc.native_amp = scaler, True
    trainer.optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, device_placement=False,
                                             scaler=scaler)
    acc._optimizers = [trainer.optimizer]
    trainer.train()  # the step after a skipped one unscales again
    assert [h["step"] for h in trainer.log_history] == [1, 3, 5, 6]
    assert scaler.get_scale() < 2.0 ** 8  # the NaN steps lowered the scale


# --------------------------------------------------------------------------- unsafe checkpoints


class Plant:
    """Unpickling this creates `marker`: the stand-in for code run by loading a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _header(step: Path) -> dict:
    """A checkpoint's manifest without its list of files: what writing it anew keeps."""
    return {k: v for k, v in read_manifest(step).items() if k not in ("format", "files")}


# every file a single-process resume reads (hf_model/ and config.yaml are for people)
RESUME_READS = ["accelerate/model.safetensors", "accelerate/optimizer.bin",
                "accelerate/random_states_0.pkl", "scheduler.pt", "trainer_state.json"]


def test_a_planted_pickle_in_any_file_a_resume_reads_is_refused_and_never_runs(
        ckpts, tiny_model_dir, tmp_path, no_model_load):
    step = ckpts / "step_4"
    files = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()}
    assert {f for f in files if not f.startswith("hf_model/")} == {
        *RESUME_READS, "config.yaml", "manifest.json"}
    marker = tmp_path / "code-ran"
    for name in RESUME_READS:
        copy = Path(shutil.copytree(step, tmp_path / "planted" / name.replace("/", "_")))
        torch.save({"state": Plant(marker)}, copy / name)
        write_manifest(copy, _header(copy))  # as someone who can write the folder would
        kind = UnsafeCheckpointError if name.endswith((".bin", ".pkl", ".pt")) else CheckpointError
        with pytest.raises(kind) as e:
            train(samples=SAMPLES, config=_config(tiny_model_dir, ckpts,
                                                  resume_from_checkpoint=str(copy)))
        assert str(copy / name) in str(e.value)
        if kind is UnsafeCheckpointError:
            assert "refers to posix.mkdir" in str(e.value) and "resume from a checkpoint you " \
                   "trust" in str(e.value)
        assert not marker.exists(), name


def test_a_planted_object_in_a_distributed_checkpoint_is_refused_and_never_runs(tmp_path):
    # FSDP2's sharded states are torch distributed checkpoints: an index read with pickle and
    # non-tensor entries read with torch.load(weights_only=False) by torch itself
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    from trainer_lib.checkpointing.manifest import check_safe_to_load

    marker = tmp_path / "code-ran"

    def write(folder: Path, settings) -> Path:
        with warnings.catch_warnings():  # one process, no process group: said and fine
            warnings.simplefilter("ignore")
            dcp.save({"weight": torch.ones(3), "settings": settings},
                     storage_writer=dcp.FileSystemWriter(str(folder / "model")))
        return folder

    check_safe_to_load(write(tmp_path / "good", {"lr": 0.1, "betas": (0.9, 0.99)}))
    bad = write(tmp_path / "entry", Plant(marker))
    with pytest.raises(UnsafeCheckpointError, match=r"model/__0_0\.distcp .*posix\.mkdir"):
        check_safe_to_load(bad)
    index = write(tmp_path / "index", {"lr": 0.1}) / "model" / ".metadata"
    index.write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"model/\.metadata .*posix\.mkdir"):
        check_safe_to_load(index.parents[1])
    assert not marker.exists()


def test_latest_refuses_an_unsafe_newest_checkpoint_rather_than_passing_over_it(
        ckpts, tiny_model_dir, tmp_path, no_model_load):
    torch.save({"state": Plant(tmp_path / "code-ran")}, ckpts / "step_4" / "scheduler.pt")
    write_manifest(ckpts / "step_4", _header(ckpts / "step_4"))
    with pytest.raises(UnsafeCheckpointError, match="step_4/scheduler.pt"):
        train(samples=SAMPLES, config=_config(tiny_model_dir, ckpts,
                                              resume_from_checkpoint="latest"))
    assert not (tmp_path / "code-ran").exists()


# --------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scribble(path: Path):
    """4 KB of random bytes in the middle: the header stays valid, the size the same."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": ("accelerate/model.safetensors", _truncate),
    "truncated optimizer state": ("accelerate/optimizer.bin", _truncate),
    "truncated trainer state": ("trainer_state.json", _truncate),
    "random bytes in the weights": ("accelerate/model.safetensors", _scribble),
    "a missing RNG state": ("accelerate/random_states_0.pkl", Path.unlink),
    "no manifest": ("manifest.json", Path.unlink),
    "an emptied manifest": ("manifest.json", lambda p: p.write_text("")),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_given_by_path_is_refused_naming_the_file(
        kind, ckpts, tiny_model_dir, no_model_load):
    name, spoil = DAMAGE[kind]
    spoil(ckpts / "step_4" / name)
    with pytest.raises(CheckpointError) as e:
        train(samples=SAMPLES, config=_config(
            tiny_model_dir, ckpts, resume_from_checkpoint=str(ckpts / "step_4")))
    message = str(e.value)
    assert f"cannot be resumed: {ckpts / 'step_4' / name} is " in message
    assert "is damaged" in message or "is missing" in message
    assert '"latest", which falls back to the newest intact one' in message


@pytest.mark.parametrize("kind", ["random bytes in the weights", "truncated optimizer state",
                                  "no manifest", "an emptied manifest"])
def test_latest_falls_back_to_the_newest_intact_checkpoint_and_says_so(kind, ckpts,
                                                                       tiny_model_dir, capsys):
    name, spoil = DAMAGE[kind]
    run = read_manifest(ckpts / "step_2")["run_id"]
    spoil(ckpts / "step_4" / name)
    trainer = train(samples=SAMPLES, config=_config(tiny_model_dir, ckpts,
                                                    resume_from_checkpoint="latest"))
    out = capsys.readouterr().out
    said = "is missing" if kind == "no manifest" else "is damaged"
    assert f"step_4 is unusable: {ckpts / 'step_4' / name} {said}" in out
    assert "resuming from step_2, the newest intact checkpoint, instead" in out
    assert f"resumed from {ckpts / 'step_2'} at step 2" in out
    assert "another run" not in out  # it is this run's own checkpoint, damaged
    assert trainer.step == 4 and damage(ckpts / "step_4") is None  # written again, whole
    # by the same run, in place: the folder names are the user's as they were
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_4"]
    assert read_manifest(ckpts / "step_4")["run_id"] == run


def test_leftovers_of_interrupted_saves_and_deletions_are_cleaned_up_at_start(
        ckpts, tiny_model_dir, capsys):
    (ckpts / ".step_6.tmp-0123abcd" / "accelerate").mkdir(parents=True)
    shutil.copytree(ckpts / "step_2", ckpts / ".step_2.deleting-89abcdef")
    shutil.copytree(ckpts / "step_4", ckpts / "step_4.previous-76543210")  # replaced: remove
    os.rename(ckpts / "step_2", ckpts / "step_2.previous-01234567")  # never replaced: restore
    (ckpts / "notes").mkdir()
    (ckpts / ".step_9.tmp-mine").mkdir()  # not a name this library makes
    train(samples=SAMPLES, config=_config(tiny_model_dir, ckpts, total_steps=5,
                                          resume_from_checkpoint="latest"))
    assert "removed 3 leftover folder(s) of interrupted saves" in capsys.readouterr().out
    assert sorted(p.name for p in ckpts.iterdir()) == [
        ".step_9.tmp-mine", "notes", "step_2", "step_4", "step_5"]
    assert damage(ckpts / "step_2") is None


def test_an_interrupted_deletion_never_leaves_a_folder_that_looks_complete(ckpts, monkeypatch):
    from trainer_lib.runtime import files as saving

    def crash(path, ignore_errors=False):
        raise OSError("the machine went down")

    monkeypatch.setattr(saving.shutil, "rmtree", crash)
    with pytest.raises(OSError, match="went down"):
        saving.discard_directory(ckpts / "step_4")
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_2"]
    assert list_checkpoints(ckpts)[-1] == ckpts / "step_2"


def test_an_interrupt_during_a_commit_is_raised_when_the_commit_is_done():
    import threading
    import time

    from trainer_lib.runtime.files import held_interrupts

    # another thread, as torch's are in every run, which the signal could be delivered to
    other = threading.Thread(target=time.sleep, args=(2,))
    other.start()
    finished = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with held_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(50):
                    time.sleep(0.002)  # where Python would run the handler at once
                finished = True
    finally:
        other.join()
    assert finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --------------------------------------------------------------------------- other runs


def test_latest_refuses_another_runs_checkpoints_naming_the_difference(ckpts, tiny_model_dir,
                                                                       no_model_load):
    config = _config(tiny_model_dir, ckpts, batch_size=2, resume_from_checkpoint="latest")
    with pytest.raises(CheckpointError, match=r"'latest': the checkpoints in .* are from another "
                       r"run \(step_4: train.batch_size is 2 here, 4 there\).*own "
                       r"train.checkpoint_dir"):
        train(samples=SAMPLES, config=config)


def test_resuming_with_other_data_or_another_model_is_refused(ckpts, tiny_model_dir, tmp_path,
                                                              no_model_load):
    step = str(ckpts / "step_4")
    with pytest.raises(CheckpointError, match=r"is from another run: the training data differs "
                       r"\(15 examples here, 16 there\).*model.model_path=.*step_4/hf_model"):
        train(samples=SAMPLES[:15], config=_config(tiny_model_dir, ckpts,
                                                   resume_from_checkpoint=step))
    other = Path(shutil.copytree(tiny_model_dir, tmp_path / "other-model"))
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match=r"the model differs \(model.model_path '.*"
                       r"other-model' here"):
        train(samples=SAMPLES, config=_config(str(other), ckpts, resume_from_checkpoint=step))


def test_a_fresh_run_never_overwrites_or_deletes_another_runs_checkpoints(ckpts, tiny_model_dir,
                                                                           capsys):
    before = _snapshot(ckpts)
    run_a = read_manifest(ckpts / "step_2")["run_id"]
    # keep_last_n=1 in a run that writes only step_3: the other run's higher steps do not count
    # against it, and it deletes none of them
    train(samples=SAMPLES, config=_config(tiny_model_dir, ckpts, total_steps=3,
                                          checkpoint_interval=3, keep_last_n=1))
    assert ("already holds 2 checkpoint(s) of earlier runs (step_2, step_4); this run starts "
            "from scratch and leaves them alone") in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_2", "step_3", "step_4"]
    assert {k: v for k, v in _snapshot(ckpts).items() if not k.startswith("step_3/")} == before

    # a run (other settings) that writes step_2 and step_4 itself keeps the other run's aside
    shutil.rmtree(ckpts / "step_3")
    train(samples=SAMPLES, config=_config(tiny_model_dir, ckpts, batch_size=2, keep_last_n=1))
    out = capsys.readouterr().out
    assert f"{ckpts / 'step_2'} held a checkpoint of another run: kept as step_2.run-{run_a}" in out
    assert sorted(p.name for p in ckpts.iterdir()) == [
        f"step_2.run-{run_a}", "step_4", f"step_4.run-{run_a}"]
    kept = {k.replace(f".run-{run_a}", ""): v for k, v in _snapshot(ckpts).items()
            if f".run-{run_a}" in k}
    assert kept == before
    assert read_manifest(ckpts / "step_4")["run_id"] != run_a


def test_keep_last_n_after_resuming_an_earlier_step_keeps_what_the_run_just_wrote(ckpts,
                                                                                   tiny_model_dir):
    # step_2 and step_4 of one run; resumed from step_2, the run writes step_3. Its own step_4
    # (a later step of the run, not yet rewritten) must not count as newer than step_3.
    run_a = read_manifest(ckpts / "step_2")["run_id"]
    train(samples=SAMPLES, config=_config(tiny_model_dir, ckpts, total_steps=3,
                                          checkpoint_interval=1, keep_last_n=1,
                                          resume_from_checkpoint=str(ckpts / "step_2")))
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_3", "step_4"]
    assert read_manifest(ckpts / "step_3")["run_id"] == run_a
    assert damage(ckpts / "step_3") is None
    # "latest" is where the run stopped: step_3, written after step_4 by the resumed run
    config = _config(tiny_model_dir, ckpts, resume_from_checkpoint="latest")
    assert plan_start(config, read_manifest(ckpts / "step_3")["identity"]) == (
        str(ckpts / "step_3"), run_a)


def test_latest_continues_the_run_that_wrote_last_not_another_with_the_same_settings(
        ckpts, tiny_model_dir, capsys):
    # run A wrote step_2 and step_4; run B, with the same settings, starts afresh in the same
    # folder and stops after writing step_3
    run_a = read_manifest(ckpts / "step_4")["run_id"]
    train(samples=SAMPLES, config=_config(tiny_model_dir, ckpts, total_steps=3,
                                          checkpoint_interval=3))
    run_b = read_manifest(ckpts / "step_3")["run_id"]
    assert run_b != run_a
    state = json.loads((ckpts / "step_3" / "trainer_state.json").read_text())
    assert state["run_id"] == run_b
    assert state["written_at"] == read_manifest(ckpts / "step_3")["written_at"]
    capsys.readouterr()

    # B, restarted with "latest", continues from its own step_3, not from A's step_4
    trainer = train(samples=SAMPLES, config=_config(tiny_model_dir, ckpts,
                                                    resume_from_checkpoint="latest"))
    out = capsys.readouterr().out
    assert (f"holds checkpoints of 2 runs with these settings; continuing run {run_b}, which "
            "wrote the newest (step_3, written ") in out
    assert "leaving the other run's (step_2, step_4) alone" in out
    assert f"resumed from {ckpts / 'step_3'} at step 3 (run {run_b})" in out
    assert trainer.step == 4
    # it wrote step_4 as run B; A's step_4 was kept aside, whole
    assert read_manifest(ckpts / "step_4")["run_id"] == run_b
    assert f"held a checkpoint of another run: kept as step_4.run-{run_a}" in out
    assert damage(ckpts / f"step_4.run-{run_a}") is None


# --------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("failure", ["ENOSPC", "torch zip writer"])
def test_a_save_that_fails_for_lack_of_space_says_so_and_keeps_the_previous_checkpoint(
        failure, tiny_model_dir, tmp_path, monkeypatch):
    import trainer_lib.checkpointing.checkpointer as checkpoint

    original = checkpoint.save_pretrained

    def full_disk(accelerator, model, tokenizer, path, **kw):
        if ".step_2.tmp" in str(path):
            if failure == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device")
            # what torch.save raises when the disk fills under it; little is free by then
            monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                                lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
            raise RuntimeError("[enforce fail at inline_container.cc:783] . unexpected pos "
                               "857152 vs 857040")
        return original(accelerator, model, tokenizer, path, **kw)

    monkeypatch.setattr(checkpoint, "save_pretrained", full_disk)
    folder = tmp_path / "ckpts"
    with pytest.raises(CheckpointWriteError) as e:
        train(samples=SAMPLES, config=_config(tiny_model_dir, folder, total_steps=2,
                                              checkpoint_interval=1))
    message = str(e.value)
    assert f"could not write the checkpoint {folder / 'step_2'} at step 2: the disk is full" \
        in message
    assert "a checkpoint of this run takes about" in message and "are free there" in message
    assert f"the previous checkpoint {folder / 'step_1'} is intact" in message
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in folder.iterdir()) == ["step_1"]  # nothing half-written
    assert damage(folder / "step_1") is None


def _cli_args(model_dir, data: Path, ckpts: Path, output: Path) -> list[str]:
    return ["sft", "--data", str(data), "--output", str(output),
            f"model.model_path={model_dir}", f"train.checkpoint_dir={ckpts}",
            "train.total_steps=2", "train.epochs=10", "train.checkpoint_interval=2",
            "train.seq_length=32", "train.batch_size=4", "train.progress_bar=false"]


def test_a_full_disk_at_the_final_save_is_one_line_naming_the_folder_and_the_space(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils as modeling
    from safetensors import SafetensorError

    from trainer_lib.cli import main

    save_file = modeling.safe_save_file

    def full_disk(tensors, filename, metadata=None):
        if ".final.tmp-" in str(filename):  # what safetensors raises when the disk fills
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(modeling, "safe_save_file", full_disk)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    out, ckpts = tmp_path / "out" / "final", tmp_path / "ckpts"
    assert main(_cli_args(tiny_model_dir, data, ckpts, out)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error" in line.lower()]
    assert line.startswith(f"trainer-lib: error: could not write the model folder {out}: the disk "
                           "is full: the model takes about ")
    assert "are free there. Free some space, or save it elsewhere (the command line's --output" \
        in line
    assert line.endswith(f"Nothing of it was kept ({out} was not created); the last checkpoint "
                         "holds the model as of step 2, as a Hugging Face folder: "
                         f"{ckpts / 'step_2' / 'hf_model'}")
    # the size said is the weights' (what model.safetensors takes, less its small header)
    said = float(line.split("the model takes about ")[1].split(" KB")[0]) * 1000
    weights = (ckpts / "step_2" / "hf_model" / "model.safetensors").stat().st_size
    assert 0.95 * weights < said <= weights
    assert list(out.parent.iterdir()) == []  # nothing half-written
    AutoModelForCausalLM.from_pretrained(ckpts / "step_2" / "hf_model")


def _tmpfs_works(folder: Path) -> bool:
    try:
        probe = subprocess.run(["unshare", "-Urm", "mount", "-t", "tmpfs", "-o", "size=64k",
                                "tmpfs", str(folder)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def test_the_final_save_on_a_really_full_disk(tiny_model_dir, tmp_path):
    """The command line writes its output to a 64 KB tmpfs (in a mount namespace of its own):
    the model does not fit. Where such a mount is not allowed, the test above, with the writer
    failing as it does here, covers the same."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if not _tmpfs_works(mount):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    out = mount / "final"
    script = ('mount -t tmpfs -o size=64k tmpfs "$MOUNT" || exit 99; "$@"; code=$?; '
              'echo "left on the disk: [$(ls -A "$MOUNT")]"; exit $code')
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script, "sh", sys.executable, "-m", "trainer_lib",
         *_cli_args(tiny_model_dir, data, tmp_path / "ckpts", out)],
        env={**_env(), "MOUNT": str(mount)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert line.startswith(f"trainer-lib: error: could not write the model folder {out}: the disk "
                           "is full: the model takes about ")
    assert " are free there" in line and f"({out} was not created)" in line
    assert "left on the disk: []" in proc.stdout


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_finishes_the_step_saves_and_prints_the_line_that_resumes(tiny_model_dir,
                                                                         tmp_path):
    """The command line, interrupted from outside as a terminal would."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    folder = tmp_path / "ckpts"
    overrides = [f"model.model_path={tiny_model_dir}", f"train.checkpoint_dir={folder}",
                 "train.total_steps=100000", "train.epochs=100000", "train.seq_length=32",
                 "train.batch_size=4", "train.log_interval=1", "train.progress_bar=false"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer_lib", "sft", "--data", str(data),
                             *overrides], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    line = next(l for l in err.splitlines() if l.startswith("training interrupted"))
    step = int(line.split(" at step ")[1].split(":")[0])
    assert step >= 3
    path = folder / f"step_{step}"
    assert line == (f"training interrupted at step {step}: saved {path}; resume with "
                    f"train.resume_from_checkpoint={path}")
    assert damage(path) is None and [p.name for p in folder.iterdir()] == [path.name]
    assert json.loads((path / "trainer_state.json").read_text())["step"] == step

    # the setting it names resumes the run
    from trainer_lib.cli import load_config

    config = load_config("sft", None, overrides + [f"train.resume_from_checkpoint={path}",
                                                   f"train.total_steps={step + 1}"])
    assert train(samples=str(data), config=config).step == step + 1


def test_a_second_ctrl_c_stops_at_once_and_leaves_no_temporary_folder(tiny_model_dir, tmp_path):
    folder = tmp_path / "ckpts"
    spec = {"model_dir": tiny_model_dir, "checkpoint_dir": str(folder), "at_step": 3,
            "second_in_save": True}
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps(spec)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in (130, -signal.SIGINT), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert ("stopped at once by a second interrupt after step 3; no checkpoint was written"
            in proc.stderr)
    assert list(folder.iterdir()) == []  # no step_3, no .step_3.tmp-*


def test_ctrl_c_on_one_of_two_zero3_processes_stops_both_after_the_same_step(tiny_model_dir,
                                                                            tmp_path):
    """Rank 1 alone gets the signal; both stop after step 2 and save it; the ZeRO-3 checkpoint
    resumes on both; a NaN step is skipped by both; and a planted pickle in any of the
    checkpoint's files is refused on both."""
    spec = {"model_dir": tiny_model_dir, "checkpoint_dir": str(tmp_path / "ckpts"),
            "out": str(tmp_path), "at_step": 2, "rank": 1}
    proc = _launch_two(spec, "zero3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["processes"] == 2 and report["distributed_type"].endswith("DEEPSPEED")
        assert report["stopped_at"] == 2 and report["resumed_to"] == 3
        assert report["checkpoint"] == str(tmp_path / "ckpts" / "step_2")
        # DeepSpeed applied none of the NaN step: its schedule moved for 2 steps of 3
        assert report["nan_step"]["steps"] == 3 and report["nan_step"]["skipped"] == 1
        assert report["nan_step"]["schedule_steps"] == 2
        assert report["nan_step"]["logged_steps"] == [1, 3]
        planted = report["planted"]
        assert {"scheduler.pt", "accelerate/random_states_0.pkl",
                "accelerate/random_states_1.pkl"} < set(planted)
        assert sum("zero_pp_rank_" in name for name in planted) == 4  # model and optimiser x 2
        for name, result in planted.items():
            assert result["outcome"].startswith("UnsafeCheckpointError") and name in \
                result["outcome"], result
            assert not result["code_ran"]
    assert reports[0]["nan_step"]["finite"] is True


# --------------------------------------------------------------------------- two processes


@pytest.mark.parametrize("setup", ["zero3", "ddp"])
def test_a_write_that_fails_on_one_of_two_processes_raises_on_both_and_none_waits(
        setup, tiny_model_dir, tmp_path):
    """Each process hashes the files it wrote, and the manifest assembled from both verifies
    when the run resumes; a final save that fails on the main process alone, and a checkpoint
    write that fails on process 1 alone (a full disk), raise CheckpointWriteError on both, naming
    the folder, instead of leaving one waiting for the other (the timeout would fail the test)."""
    folder = tmp_path / "ckpts"
    spec = {"model_dir": tiny_model_dir, "checkpoint_dir": str(folder), "out": str(tmp_path),
            "fail_rank": 1}
    proc = _launch_two(spec, setup, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {folder / 'step_2'} at step 2" in proc.stdout
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    final, step_2, step_3 = tmp_path / "final", folder / "step_2", folder / "step_3"
    for report in reports:
        assert report["final_save"].startswith(
            f"CheckpointWriteError: could not write the model folder {final}: the disk is full: "
            "the model takes about ")
        assert report["final_save"].endswith(
            f"({final} was not created); the last checkpoint holds the model as of step 2, as a "
            f"Hugging Face folder: {step_2 / 'hf_model'}")
        assert report["checkpoint"].startswith(
            f"CheckpointWriteError: could not write the checkpoint {step_3} at step 3 on "
            "process 1: the disk is full: a checkpoint of this run takes about ")
        assert report["checkpoint"].endswith(
            f"Nothing of it was kept; the previous checkpoint {step_2} is intact; resume from "
            f"it with train.resume_from_checkpoint={step_2}")
        # nothing half-written, on either side
        assert report["left"] == ["step_1", "step_2"] and report["out"] == []

    # each process hashed what it wrote and nothing else; the manifest holds both
    hashed = [set(report["hashed"]) for report in reports]
    files = set(read_manifest(folder / "step_1")["files"])
    assert hashed[0] | hashed[1] == files and not hashed[0] & hashed[1]
    assert hashed[1] == {name for name in files if writer_of(name) == 1}
    assert "accelerate/random_states_1.pkl" in hashed[1]
    if setup == "zero3":  # its model and optimiser shards
        assert len([name for name in hashed[1] if "zero_pp_rank_1_" in name]) == 2
    assert damage(folder / "step_1") is None
