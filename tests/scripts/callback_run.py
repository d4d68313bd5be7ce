"""Runs that tests/test_callbacks.py launches on 2 processes: a stop asked, and an error raised,
by a callback on rank 1 only.

    python callback_run.py '{"model_dir": ..., "out": ...}'

Each process writes what happened to rank<N>.json in `out`.
"""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)

from trainer_lib import Callback, default_sft_config, train  # noqa: E402
from trainer_lib.checkpointing.layout import list_checkpoints  # noqa: E402
from trainer_lib.checkpointing.manifest import damage  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
SAMPLES = [{"prompt": f"word{i} ", "completion": f"token{i} word{i + 1}"} for i in range(16)]


class OnRankOne(Callback):
    def __init__(self, action):
        self.action = action

    def on_step_end(self, trainer):
        if RANK == 1 and trainer.step == 2:
            if self.action == "stop":
                trainer.stop_training("rank 1 asked at step 2")
            else:
                raise ValueError("rank 1 failed at step 2")


def config(spec, ckpts, **train_kw):
    return default_sft_config().evolve(
        model=dict(model_path=spec["model_dir"]),
        train=dict(seq_length=32, batch_size=2, epochs=50, total_steps=20, log_interval=1,
                   eval_interval=1000, progress_bar=False, checkpoint_dir=str(ckpts), **train_kw),
        scheduler=dict(name="constant"), method=dict(packing=False))


def checkpoints(ckpts):
    found = list_checkpoints(ckpts)
    return {"checkpoints": [p.name for p in found],
            "intact": all(damage(p) is None for p in found)}


def main(spec):
    out = Path(spec["out"])
    report = {}
    ckpts = out / "stop"
    trainer = train(samples=SAMPLES, callbacks=[OnRankOne("stop")],
                    config=config(spec, ckpts, checkpoint_interval=1000))
    report["processes"] = trainer.accelerator.num_processes
    report["stop"] = {"step": trainer.step, "last": trainer.log_history[-1], **checkpoints(ckpts)}
    ckpts = out / "error"
    try:
        train(samples=SAMPLES, callbacks=[OnRankOne("raise")],
              config=config(spec, ckpts, checkpoint_interval=1))
        raised = None
    except Exception as e:  # noqa: BLE001 - what the test looks at
        raised = f"{type(e).__name__}: {e}"
    report["error"] = {"raised": raised, **checkpoints(ckpts)}
    (out / f"rank{RANK}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
