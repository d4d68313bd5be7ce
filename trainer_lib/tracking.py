"""Where logged figures go: Weights & Biases, TensorBoard, a JSON-lines file, or nowhere.

A tracker has three methods: `log(values, step)`, `log_table(name, columns, rows, step)` and
`finish()`. Only the main process writes; every other process gets the `Tracker` that does
nothing, so the training loop can log unconditionally.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from trainer_lib.config import Config


class Tracker:
    """Records nothing: for `train.tracker=None` and for every process but the main one."""

    def log(self, values: dict, step: int) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def _numbers(values: dict) -> dict:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, numbers.Number) and not isinstance(v, bool)}


def _run_dir(config: Config) -> Path:
    t = config.train
    folder = Path(t.logging_dir) / t.run_name if t.run_name else Path(t.logging_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class JsonlTracker(Tracker):
    """`<logging_dir>[/<run_name>]/metrics.jsonl`: one JSON object per `log` call, with "step";
    tables go to `tables.jsonl` beside it. Each line is flushed as it is written."""

    def __init__(self, config: Config):
        folder = _run_dir(config)
        self.path = folder / "metrics.jsonl"
        self._metrics = open(self.path, "a", encoding="utf-8")
        self._tables = open(folder / "tables.jsonl", "a", encoding="utf-8")
        (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))

    def log(self, values: dict, step: int) -> None:
        row = {"step": step, **{k: _json_safe(v) for k, v in values.items() if k != "step"}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        row = {"step": step, "name": name, "columns": columns, "rows": _json_safe(rows)}
        self._tables.write(json.dumps(row) + "\n")
        self._tables.flush()

    def finish(self) -> None:
        self._metrics.close()
        self._tables.close()


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan"/"inf": JSON has no literal for them
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


class TensorBoardTracker(Tracker):
    """Event files under `<logging_dir>[/<run_name>]`; scalars by name, tables as Markdown text."""

    def __init__(self, config: Config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(_run_dir(config)))
        self.writer.add_text("config", "```\n" + config.to_yaml() + "\n```", 0)

    def log(self, values: dict, step: int) -> None:
        for name, value in _numbers(values).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        def cell(v):
            return str(v).replace("|", "\\|").replace("\n", "<br>")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text(name, "\n".join(lines), step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run named by `train.project_name`, `run_name` and `tags`, with the config; set
    WANDB_MODE=offline to write it under `<logging_dir>/wandb/` with no network."""

    def __init__(self, config: Config):
        import wandb

        t = config.train
        self.wandb = wandb
        self.run = wandb.init(project=t.project_name, name=t.run_name, tags=list(t.tags) or None,
                              config=config.to_dict(), dir=str(_run_dir(config)))

    def log(self, values: dict, step: int) -> None:
        self.run.log(_numbers(values), step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({name: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        self.run.finish()


TRACKERS = {None: lambda config: Tracker(), "jsonl": JsonlTracker, "tensorboard": TensorBoardTracker,
            "wandb": WandbTracker}


def build_tracker(config: Config, is_main_process: bool = True) -> Tracker:
    if not is_main_process:
        return Tracker()
    return TRACKERS[config.train.tracker](config)


def format_log_line(values: dict, step: int, total_steps: int | None = None) -> str:
    """`step 10/100 | loss 2.3456 | learning_rate 1e-04 | ...` for a terminal or a log file."""
    head = f"step {step}" + (f"/{total_steps}" if total_steps else "")
    parts = [head]
    for name, v in values.items():
        if name == "step" or v is None:
            continue
        if isinstance(v, float):
            if abs(v) >= 1000:
                v = f"{v:,.0f}"  # throughputs and counts: whole units
            else:
                v = f"{v:.4g}" if abs(v) < 1e-3 else f"{v:.4f}"
        parts.append(f"{name} {v}")
    return " | ".join(parts)
