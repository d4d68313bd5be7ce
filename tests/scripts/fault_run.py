"""Runs that tests/test_faults.py watches from outside, alone or launched on 2 processes.

    python fault_run.py '{"model_dir": ..., "checkpoint_dir": ..., "at_step": 3, ...}'

SIGINT is sent to this process while it trains step `at_step` (to process `rank` only, when
given), as a terminal or a launcher would send it; with `second_in_save` another one follows
while the checkpoint is being written. Uncaught, the interrupt ends the process as it would end a
user's script.

With `out`, the interrupt is caught instead: the run resumes from the checkpoint it names and
trains one more step; a run with a NaN loss at one step skips that step; then, for each pickle
file of that checkpoint, a copy with a planted pickle (one that would create a marker folder when
loaded) is resumed, which must be refused. Each process writes what happened to rank<N>.json in
`out`.

With `fail_rank`, the checkpoint writes of two processes are watched instead (write_failures).
"""

import errno
import json
import os
import shutil
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("TRAINER_LIB_TEST_THREADS", "2")))


def samples():
    return [{"prompt": f"word{i} ", "completion": f"token{i} word{i + 1}"} for i in range(16)]


def make_config(spec: dict, **train):
    from trainer_lib import default_sft_config

    settings = dict(seq_length=32, batch_size=2, epochs=100, total_steps=50, log_interval=1,
                    eval_interval=1000, checkpoint_interval=1000,
                    checkpoint_dir=spec["checkpoint_dir"], progress_bar=False)
    settings.update(train)
    return default_sft_config().evolve(
        model=dict(model_path=spec["model_dir"]), train=settings,
        optimizer=dict(kwargs=dict(lr=1e-3)), scheduler=dict(name="constant"),
        method=dict(packing=False))


def run(spec: dict) -> None:
    import trainer_lib.checkpointing.checkpointer as checkpoint
    import trainer_lib.training.interrupts as interrupts
    from trainer_lib import train
    from trainer_lib.training.trainer import Trainer

    interrupts.FOLD_SECONDS = 0.0  # the second signal comes at once here, not a second later
    rank = int(os.environ.get("RANK", "0"))
    signals = spec.get("rank") is None or spec["rank"] == rank
    original_step = Trainer.training_step

    def training_step(self, micro):
        if signals and self.step + 1 == spec["at_step"]:
            os.kill(os.getpid(), signal.SIGINT)
        return original_step(self, micro)

    Trainer.training_step = training_step
    if spec.get("second_in_save"):
        original_save = checkpoint.save_pretrained

        def save_pretrained(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # the accelerate state is half written by now
            return original_save(*args, **kwargs)

        checkpoint.save_pretrained = save_pretrained
    if not spec.get("out"):
        train(samples=samples(), config=make_config(spec))
        return
    try:
        train(samples=samples(), config=make_config(spec))
    except KeyboardInterrupt as stop:
        trainer, path = stop.trainer, stop.checkpoint
    Trainer.training_step = original_step
    resumed = train(samples=samples(), config=make_config(
        spec, resume_from_checkpoint=str(path), total_steps=trainer.step + 1))
    report = {"stopped_at": trainer.step, "checkpoint": str(path), "resumed_to": resumed.step,
              "processes": trainer.accelerator.num_processes,
              "distributed_type": str(trainer.accelerator.distributed_type),
              "nan_step": skip_a_nan_step(spec),
              "planted": plant_and_resume(spec, Path(path), rank, resumed.accelerator)}
    (Path(spec["out"]) / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


def skip_a_nan_step(spec: dict) -> dict:
    """A NaN loss at step 2 of 3, with train.skip_nonfinite_steps=1: the update is not applied
    (under DeepSpeed the engine skips it) and the run goes on."""
    from trainer_lib import train
    from trainer_lib.methods.sft.trainer import SFTTrainer

    original = SFTTrainer.compute_loss

    def compute_loss(self, model, batch):
        loss, metrics = original(self, model, batch)
        return (loss * float("nan") if self.step + 1 == 2 else loss), metrics

    SFTTrainer.compute_loss = compute_loss
    try:
        trainer = train(samples=samples(), config=make_config(
            spec, checkpoint_dir=spec["checkpoint_dir"] + "-nan", total_steps=3,
            skip_nonfinite_steps=1))
    finally:
        SFTTrainer.compute_loss = original
    weights = trainer.accelerator.get_state_dict(trainer.model)  # gathered from every process
    return {"steps": trainer.step, "skipped": trainer.nonfinite_steps.skipped,
            "schedule_steps": trainer.scheduler.last_epoch,
            "logged_steps": [h["step"] for h in trainer.log_history if "loss" in h],
            "finite": None if weights is None else all(
                bool(torch.isfinite(w).all()) for w in weights.values())}


class Plant:
    """Unpickling this creates `marker`: the stand-in for code run by loading a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant_and_resume(spec: dict, step: Path, rank: int, accelerator) -> dict:
    import trainer_lib.training.trainer as base
    from trainer_lib import train
    from trainer_lib.checkpointing.manifest import read_manifest, write_manifest

    out = Path(spec["out"])
    marker = out / "code-ran"
    names = sorted(p.relative_to(step).as_posix() for p in step.rglob("*")
                   if p.is_file() and p.name.endswith((".pt", ".bin", ".pkl")))
    copies = {name: out / "planted" / name.replace("/", "_") / step.name for name in names}
    if rank == 0:
        for name, copy in copies.items():
            shutil.copytree(step, copy)
            torch.save({"state": Plant(marker)}, copy / name)
            header = {k: v for k, v in read_manifest(copy).items() if k not in ("format", "files")}
            write_manifest(copy, header)  # as someone who can write the folder would
    accelerator.wait_for_everyone()

    def no_model(config):
        raise AssertionError("the model was loaded")

    base.load_model = no_model
    results = {}
    for name, copy in copies.items():
        try:
            train(samples=samples(), config=make_config(spec, resume_from_checkpoint=str(copy)))
            outcome = "resumed"
        except Exception as e:  # noqa: BLE001 - what the test looks at
            outcome = f"{type(e).__name__}: {e}"
        results[name] = {"outcome": outcome, "code_ran": marker.exists()}
    return results


def write_failures(spec: dict) -> None:
    """Checkpoints at steps 1 and 2, noting the files each process hashes for the first; a final
    save that fails on the main process alone; then a run that resumes from "latest" (verifying
    the manifest assembled from both processes' checksums) and whose checkpoint write at step 3
    fails on process `fail_rank` alone, as on a full disk. Each process reports what it raised."""
    import transformers.modeling_utils as modeling
    from safetensors import SafetensorError

    import trainer_lib.checkpointing.manifest as manifest
    from trainer_lib import train

    rank = int(os.environ.get("RANK", "0"))
    out, folder = Path(spec["out"]), Path(spec["checkpoint_dir"])
    hashed = []
    checksum = manifest.file_checksum

    def file_checksum(path):
        if ".step_1.tmp-" in str(path):  # while step_1 is written (not when it is verified)
            hashed.append(str(path).split(".step_1.tmp-", 1)[1].split("/", 1)[1])
        return checksum(path)

    manifest.file_checksum = file_checksum
    trainer = train(samples=samples(), config=make_config(spec, total_steps=2,
                                                           checkpoint_interval=1))
    save_file = modeling.safe_save_file

    def full_disk_on_main(tensors, filename, metadata=None):
        if rank == 0 and "final" in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        return save_file(tensors, filename, metadata=metadata)

    modeling.safe_save_file = full_disk_on_main
    final_save = outcome(lambda: trainer.save_pretrained(str(out / "final")))

    save = torch.save

    def full_disk_on_one(obj, f, *args, **kwargs):
        if rank == spec["fail_rank"] and ".step_3.tmp-" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return save(obj, f, *args, **kwargs)

    torch.save = full_disk_on_one
    checkpoint = outcome(lambda: train(samples=samples(), config=make_config(
        spec, total_steps=3, checkpoint_interval=1, resume_from_checkpoint="latest")))
    torch.save = save
    report = {"hashed": hashed, "final_save": final_save, "checkpoint": checkpoint,
              "left": sorted(p.name for p in folder.iterdir()),
              "out": sorted(p.name for p in out.iterdir() if "final" in p.name)}
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


def outcome(fn) -> str:
    try:
        fn()
        return "done"
    except Exception as e:  # noqa: BLE001 - what the test looks at
        return f"{type(e).__name__}: {e}"


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    write_failures(spec) if spec.get("fail_rank") is not None else run(spec)
