"""Trains the tiny model from a JSON spec; the kill and resume tests run it as a subprocess.

    python train_run.py '{"method": "sft", "model_dir": ..., "checkpoint_dir": ..., ...}'

Spec keys: method ("sft" or "kto": any method with an entry in SAMPLES), model_dir, checkpoint_dir,
total_steps, checkpoint_interval, resume (None or "latest" or a path), weights_out (a .pt file of
the final state dict), kill_at_step (SIGKILL itself while training that step),
kill_in_checkpoint_write (SIGKILL itself inside the write of that step's checkpoint).
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("TRAINER_LIB_TEST_THREADS", "2")))


def sft_samples():
    return [{"prompt": f"word{i} ", "completion": f"token{i} word{i + 1}"} for i in range(24)]


def kto_samples():
    return [{"prompt": f"word{i} ", "completion": f"token{i} word{i + 1}", "label": i % 3 != 0}
            for i in range(24)]


SAMPLES = {"sft": sft_samples, "kto": kto_samples}


def make_config(spec: dict):
    from trainer_lib.config import Config
    from trainer_lib.registry import method_config_class

    return Config(method=method_config_class(spec["method"])()).evolve(
        model=dict(model_path=spec["model_dir"]),
        train=dict(seq_length=32, batch_size=4, gradient_accumulation_steps=2, epochs=100,
                   total_steps=spec["total_steps"], log_interval=1, eval_interval=1000,
                   checkpoint_interval=spec["checkpoint_interval"],
                   checkpoint_dir=spec["checkpoint_dir"], resume_from_checkpoint=spec.get("resume"),
                   progress_bar=False, logging_dir=str(Path(spec["checkpoint_dir"]) / "logs")),
        optimizer=dict(kwargs=dict(lr=1e-3, weight_decay=0.01)),
        scheduler=dict(name="cosine", kwargs=dict(warmup_steps=2)),
    )


def _kill_self():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def run(spec: dict):
    import trainer_lib.checkpointing.checkpointer as checkpoint
    from trainer_lib.api import train
    from trainer_lib.training.trainer import Trainer

    if spec.get("kill_at_step"):
        original_step = Trainer.training_step

        def training_step(self, micro):
            if self.step + 1 == spec["kill_at_step"]:
                _kill_self()
            return original_step(self, micro)

        Trainer.training_step = training_step
    if spec.get("kill_in_checkpoint_write"):
        original_save = checkpoint.save_pretrained

        def save_pretrained(accelerator, model, tokenizer, path, **kw):
            original_save(accelerator, model, tokenizer, path, **kw)
            if f"step_{spec['kill_in_checkpoint_write']}.tmp" in str(path):
                _kill_self()  # the model state is half written under the temporary name

        checkpoint.save_pretrained = save_pretrained
    trainer = train(samples=SAMPLES[spec["method"]](), config=make_config(spec))
    if spec.get("weights_out"):
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        torch.save(state, spec["weights_out"])
    return trainer


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
