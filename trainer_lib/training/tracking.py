"""Where logged figures go: accelerate's trackers, plus a JSON-lines file of our own.

Nothing is written before `Tracking.start(step)`: a run resumed at step N keeps what the files
already hold up to N and writes only what comes after, so a resumed run duplicates nothing.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process

from trainer_lib.config import Config, ConfigError
from trainer_lib.config.trackers import check_installed, tracker_names
from trainer_lib.errors import did_you_mean


def run_dir(config: Config) -> Path:
    t = config.train
    return Path(t.logging_dir) / t.run_name if t.run_name else Path(t.logging_dir)


def _numbers(values: dict) -> dict:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, numbers.Number) and not isinstance(v, bool)}


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan"/"inf": JSON has no literal for them
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _flat(d: dict, prefix: str = "") -> dict:
    """{"train": {"batch_size": 8}} -> {"train.batch_size": 8}; lists become JSON text, since
    the trackers' hyper-parameter tables take scalars only."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        elif isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(_json_safe(value))
        else:
            out[name] = _json_safe(value)
    return out


def _markdown(columns: list[str], rows: list[list]) -> str:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


class JsonlTracker(GeneralTracker):
    """`metrics.jsonl` in the run's folder: one JSON object per `log` call, with "step"; tables
    in `tables.jsonl`, the config in `config.json`. Every line is flushed as it is written.

    `resume_step`: the step a resumed run starts from. The files keep their lines up to that
    step; later lines (written after the checkpoint by the run that stopped) are dropped, and
    entries the resumed run logs again for steps the file already holds are not repeated."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | Path, **kwargs):
        super().__init__()
        self.folder = Path(logging_dir)
        self.resume_step: int | None = None
        self._written_steps: set[int] = set()

    @property
    def tracker(self):
        return self

    @on_main_process
    def start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"
        if self.resume_step is not None:
            self._written_steps = self._keep_up_to(self.path, self.resume_step)
            self._keep_up_to(self.folder / "tables.jsonl", self.resume_step)
        self._metrics = open(self.path, "a", encoding="utf-8")
        self._tables = open(self.folder / "tables.jsonl", "a", encoding="utf-8")

    @staticmethod
    def _keep_up_to(path: Path, step: int) -> set[int]:
        if not path.is_file():
            return set()
        kept, steps = [], set()
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short when the earlier run was killed
            if row_step <= step:
                kept.append(line)
                steps.add(row_step)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
        return steps

    @on_main_process
    def store_init_configuration(self, values: dict):
        (self.folder / "config.json").write_text(json.dumps(values, indent=2, default=str),
                                                 encoding="utf-8")

    def _repeated(self, step) -> bool:
        return (self.resume_step is not None and step is not None and step <= self.resume_step
                and step in self._written_steps)

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        if self._repeated(step):
            return
        row = {"step": step, **{k: _json_safe(v) for k, v in values.items() if k != "step"}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    @on_main_process
    def log_table(self, table_name: str, columns: list[str], data: list[list], step=None):
        if self._repeated(step):
            return
        row = {"step": step, "name": table_name, "columns": columns, "rows": _json_safe(data)}
        self._tables.write(json.dumps(row) + "\n")
        self._tables.flush()

    @on_main_process
    def finish(self):
        self._metrics.close()
        self._tables.close()


def log_with(config: Config) -> list | None:
    """`Accelerator(log_with=...)` for the run: accelerate's tracker names, and tracker objects
    where the files go to our folder layout (TensorBoard: `<logging_dir>[/<run_name>]`). Raises
    a ConfigError naming the pip package of a tracker that is not installed."""
    from accelerate.tracking import TensorBoardTracker

    names = tracker_names(config.train.tracker)
    check_installed(names)
    check_tracker_kwargs(config)
    t = config.train
    out: list = []
    for name in names:
        if name == "jsonl":
            out.append(JsonlTracker(t.run_name or "", run_dir(config)))
        elif name == "tensorboard":
            # an object, which accelerate starts without init_kwargs: they are given here
            out.append(TensorBoardTracker(t.run_name or "", t.logging_dir,
                                          **t.tracker_kwargs.get("tensorboard", {})))
        else:
            out.append(name)
    return out or None  # None: accelerate warns about an empty list


def _constructor(name: str) -> tuple[Any, str, int]:
    """(what receives `train.tracker_kwargs[name]`, its name, how many of its leading arguments
    accelerate fills: the project, the folder)."""
    if name == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError:
            from tensorboardX import SummaryWriter
        return SummaryWriter.__init__, "TensorBoard's SummaryWriter", 1
    if name == "wandb":
        import wandb

        return wandb.init, "wandb.init", 1
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    return cls.__init__, f"accelerate's {cls.__name__}", 1 + cls.requires_logging_directory


def check_tracker_kwargs(config: Config) -> None:
    """`train.tracker_kwargs` of the trackers in use against what each takes, before anything
    loads: a misspelt argument would otherwise fail when the trackers start, once the model is
    loaded. (Arguments of a tracker not in use are left alone: a config may keep them while
    tracking is turned off.)"""
    t = config.train
    names = tracker_names(t.tracker)
    for name, kwargs in t.tracker_kwargs.items():
        if name not in names:
            continue
        if kwargs and name == "jsonl":
            raise ConfigError("train.tracker_kwargs.jsonl: the jsonl tracker takes no arguments "
                              "(it writes to train.logging_dir); remove it")
        if not kwargs or name == "jsonl":
            continue
        function, owner, filled = _constructor(name)
        params = [p for n, p in inspect.signature(function).parameters.items() if n != "self"]
        if any(p.kind == p.VAR_KEYWORD for p in params):
            continue  # passed on to the tracker's library, which says what it takes
        valid = [p.name for p in params[filled:]]
        for key in kwargs:
            if key not in valid:
                taken = ", ".join(p.name for p in params[:filled])
                raise ConfigError(
                    f"train.tracker_kwargs.{name}.{key} is not an argument of {owner}"
                    f"{did_you_mean(key, valid)} (it takes: {', '.join(valid)}; "
                    f"{taken} {'comes' if filled == 1 else 'come'} from the run's settings)")


def _init_kwargs(config: Config) -> dict:
    """Per tracker: the run's name, tags, folder and config where the tracker takes them, then
    whatever `train.tracker_kwargs` adds or overrides."""
    t = config.train
    folder = str(run_dir(config))
    defaults = {
        "wandb": {"name": t.run_name, "tags": list(t.tags) or None, "dir": folder,
                  "config": config.to_dict()},
        "mlflow": {"run_name": t.run_name},
        "aim": {"experiment": t.project_name},
        "dvclive": {"dir": str(run_dir(config) / "dvclive")},
        "swanlab": {"experiment_name": t.run_name, "tags": list(t.tags) or None,
                    "logdir": folder},
        "trackio": {"name": t.run_name},
    }
    out = {}
    for name in tracker_names(t.tracker):
        kwargs = {k: v for k, v in defaults.get(name, {}).items() if v is not None}
        kwargs.update(t.tracker_kwargs.get(name, {}))
        out[name] = kwargs
    return out


class Tracking:
    """The training loop's handle on its trackers: `log`, `log_table`, `finish`. What is logged
    before `start` waits in memory; only the main process writes."""

    def __init__(self, accelerator, config: Config):
        self.accelerator, self.config = accelerator, config
        self.names = tracker_names(config.train.tracker)
        self.started = False
        self._pending: list[tuple] = []

    def start(self, resume_step: int | None = None) -> None:
        """Opens the trackers. `resume_step`: the step a resumed run starts from (None or 0 for
        a fresh run)."""
        if self.started:
            return
        self.started = True
        acc = self.accelerator
        if self.names and acc.is_main_process:
            for tracker in acc.log_with:
                if isinstance(tracker, JsonlTracker) and resume_step:
                    tracker.resume_step = resume_step
                elif isinstance(tracker, GeneralTracker) and tracker.name == "tensorboard" \
                        and resume_step:
                    # TensorBoard's own way: events past the resumed step in older files
                    # are hidden
                    tracker.init_kwargs["purge_step"] = resume_step + 1
            acc.init_trackers(self.config.train.project_name, init_kwargs=_init_kwargs(self.config))
            self._store_config()
        pending, self._pending = self._pending, []
        for method, args in pending:
            getattr(self, method)(*args)

    def _store_config(self) -> None:
        config = self.config.to_dict()
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                continue  # given whole to wandb.init
            if tracker.name == "tensorboard":
                tracker.writer.add_text("config", "```\n" + self.config.to_yaml() + "\n```", 0)
            elif tracker.name == "jsonl":
                tracker.store_init_configuration(config)
            else:
                tracker.store_init_configuration(_flat(config))

    def log(self, values: dict, step: int) -> None:
        if not self.started:
            self._pending.append(("log", (values, step)))
            return
        numbers_ = _numbers({k: v for k, v in values.items() if k != "step"})
        if self.names and numbers_:
            self.accelerator.log(numbers_, step=step)  # main process only

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        if not self.started:
            self._pending.append(("log_table", (name, columns, rows, step)))
            return
        if not self.names or not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            _log_table(tracker, name, columns, rows, step)

    def finish(self) -> None:
        if not self.started:
            self.start()
        if self.accelerator.is_main_process:
            # each tracker's finish, as accelerator.end_training does, but without destroying
            # the process group: saving after training still needs every process
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []


def _log_table(tracker, name: str, columns: list[str], rows: list[list], step: int) -> None:
    """A table where the tracker holds one; Markdown text where it holds text."""
    kind = tracker.name
    if kind in ("wandb", "clearml", "jsonl"):
        tracker.log_table(name, columns=columns, data=rows, step=step)
    elif kind == "tensorboard":
        tracker.writer.add_text(name, _markdown(columns, rows), step)
        tracker.writer.flush()
    elif kind == "mlflow":
        import mlflow

        mlflow.log_table({c: [row[i] for row in rows] for i, c in enumerate(columns)},
                         artifact_file=f"{name}/step_{step}.json")
    elif kind == "comet_ml":
        tracker.writer.log_table(f"{name}_step_{step}.csv", tabular_data=rows, headers=columns)
    elif kind == "aim":
        from aim import Text

        tracker.writer.track(Text(_markdown(columns, rows)), name=name, step=step)


def build_tracker(config: Config, accelerator) -> Tracking:
    return Tracking(accelerator, config)


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
