"""The command line: `trainer-lib METHOD [--config FILE] [--data ...] [key=value ...]` for any
registered method (`--import MODULE` for one's own), and `trainer-lib config show|validate`.

Nothing here depends on the launcher, so `accelerate launch -m trainer_lib sft ...` and
`deepspeed --module trainer_lib sft ...` run the same code as `trainer-lib sft ...`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from trainer_lib.api import train
from trainer_lib.config import Config, ConfigError, default_config
from trainer_lib.config.trlx import from_trlx_names
from trainer_lib.config.yaml_io import read_yaml
from trainer_lib.data.sources import LOCAL_SUFFIXES, check_exists, load_dataset_named
from trainer_lib.errors import CheckpointError, CheckpointWriteError, DataError, NonFiniteLossError
from trainer_lib.methods.sft import SFTTrainer
from trainer_lib.model.card import hub_datasets
from trainer_lib.model.embedded import DEFAULT_DATA, tiny_model
from trainer_lib.registry import (
    ENTRY_POINT_GROUP,
    get_trainer_class,
    method_config_class,
    method_names,
)
from trainer_lib.runtime.deepspeed import zero_stage
from trainer_lib.runtime.fsdp import is_fsdp
from trainer_lib.training.preflight import check_writable

EPILOG = """\
overrides: section.key=value, the value read as YAML, e.g.
  train.batch_size=4  optimizer.kwargs.lr=2e-5  model.model_path=HuggingFaceTB/SmolLM2-135M
  train.tags=[a,b]  train.progress_bar=false  train.tracker=null  model.peft_config.r=16

methods of your own: --import MODULE (a module name, or a .py file) before the method name
imports the module that registers them; installed packages declare theirs under the
entry-point group '""" + ENTRY_POINT_GROUP + """'.
"""


class CLIError(Exception):
    """A problem with the command line: printed without a traceback, exit status 2."""


# --------------------------------------------------------------------------- config


def load_config(method: Optional[str], path: Optional[str], overrides: Sequence[str]) -> Config:
    """The config for a run: the method's defaults, then the YAML file, then the overrides.

    `method` (the command, e.g. "sft") must agree with `method.name` in the file, if any;
    None takes the method from the file.
    """
    data = read_yaml(path) if path is not None else {}
    data = from_trlx_names(data)  # a trlX file names its method "sftconfig"
    section = data.get("method") or {}
    if method is not None and isinstance(section, dict):
        named = section.get("name", method)
        if named != method:
            raise CLIError(f"{path} is a '{named}' config; run `trainer-lib {named}` with it")
        data["method"] = {**section, "name": method}
    config = Config.from_dict(data).apply_overrides(overrides)
    if method is not None and config.method.name != method:
        raise CLIError(f"method.name={config.method.name} does not fit the '{method}' command; "
                       f"run `trainer-lib {config.method.name}` instead")
    return config.validate()


def import_methods(modules: Sequence[str]) -> None:
    """Imports the modules named by `--import` (their `@register_trainer` registers their
    methods): a module name, found from the current folder first as `python -m` would, or the
    path of a .py file."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            if name.endswith(".py"):
                if not Path(name).is_file():
                    raise CLIError(f"--import {name}: no such file")
                spec = importlib.util.spec_from_file_location(Path(name).stem, name)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except CLIError:
            raise
        except Exception as e:  # noqa: BLE001 - said with the module that failed
            raise CLIError(f"--import {name}: the module cannot be imported "
                           f"({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------- data and model


def resolve_data(source: str, split: str) -> Any:
    """A local .json/.jsonl/.parquet file as its path (train() reads it, with every bad line
    reported), anything else that exists on disk or a hub name through `datasets.load_dataset`."""
    path = Path(source)
    if path.is_file() and path.suffix in LOCAL_SUFFIXES:
        return str(path)
    try:
        check_exists(source, "data")
        return load_dataset_named(source, "--data", split=split)
    except DataError as e:
        raise CLIError(str(e)) from None


def _say(message: str) -> None:
    # launchers set RANK; one copy of each note is enough
    if os.environ.get("RANK", "0") == "0":
        print(f"trainer-lib: {message}", flush=True)


# --------------------------------------------------------------------------- commands


def mixture_entries(mix: Sequence[Sequence[str]]) -> list[dict]:
    """`--mix NAME PATH WEIGHT` (repeated) -> `data.mixture` entries."""
    entries = []
    for name, path, weight in mix:
        try:
            value = float(weight)
        except ValueError:
            raise CLIError(f"--mix {name} {path} {weight}: the weight must be a number, e.g. "
                           f"--mix {name} {path} 1") from None
        entries.append({"name": name, "path": path, "weight": value})
    return entries


def run_training(args: argparse.Namespace) -> int:
    config = load_config(args.command, args.config, args.overrides)
    if args.mix:
        config = config.evolve(data=dict(mixture=mixture_entries(args.mix)))
    try:
        trainer_cls = get_trainer_class(config.method)
    except ValueError as e:  # no trainer registered for this method
        raise CLIError(f"`trainer-lib {args.command}` cannot train: {e}") from None
    output = args.output or str(Path(config.train.checkpoint_dir) / "final")
    _check_output(output)

    if config.data.mixture:
        if args.data is not None:
            raise CLIError("--data and a mixture (--mix or data.mixture) are both given; train "
                           "on one of them")
        samples = None  # train() reads data.mixture
        _say("data: a mixture of " + ", ".join(
            f"{e['name']} ({e['path']}, weight {e.get('weight', 1):g})"
            for e in config.data.mixture))
    elif args.data is None:
        if not issubclass(trainer_cls, SFTTrainer):
            raise CLIError(f"`trainer-lib {args.command}` needs --data (a .json/.jsonl file or a "
                           "datasets hub name)")
        samples = str(DEFAULT_DATA)
        _say(f"--data not given: training on the instruction set shipped with trainer_lib "
             f"({DEFAULT_DATA})")
    else:
        samples = resolve_data(args.data, args.split)
        _say(f"data: {args.data}")
    eval_samples = resolve_data(args.eval_data, args.eval_split) if args.eval_data else None

    if config.model.model_path is None:
        path = tiny_model()
        _say(f"model.model_path is not set: training the embedded tiny Llama (built at {path}); "
             "set model.model_path=<folder or hub id> for a real model")
        config = config.evolve(model=dict(model_path=path))
    else:
        _say(f"model: {config.model.model_path}")

    trainer = train(samples=samples, eval_samples=eval_samples, config=config)
    # read by name above, so the run saw datasets: the model card names them
    trainer.dataset_names = hub_datasets(args.data, args.eval_data)
    trainer.save_pretrained(output)
    if trainer.accelerator.is_main_process:
        print(_summary(trainer.log_history, output, trainer.accelerator), flush=True)
    return 0


def _check_output(output: str) -> None:
    """Where the final model goes can be written: found out before training, not after it."""
    if Path(output).exists() and not Path(output).is_dir():
        raise CLIError(f"--output {output} is a file; give a folder for the model")
    check_writable(Path(output).parent, "the folder of --output")


def _summary(history: list[dict], output: str, accelerator=None) -> str:
    losses = [h for h in history if "loss" in h]
    parts = []
    if accelerator is not None and accelerator.num_processes > 1:
        stage = zero_stage(accelerator)
        engine = (f" (DeepSpeed ZeRO-{stage})" if stage else
                  " (FSDP2)" if is_fsdp(accelerator) else "")
        parts.append(f"{accelerator.num_processes} processes{engine}")
    if len(losses) == 1:
        parts.append(f"loss {losses[0]['loss']:.4f} at step {losses[0]['step']}")
    elif losses:
        first, last = losses[0], losses[-1]
        parts.append(f"loss {first['loss']:.4f} at step {first['step']} -> {last['loss']:.4f} "
                     f"at step {last['step']}")
    evals = [h for h in history if "eval/loss" in h]
    if evals:
        parts.append(f"eval/loss {evals[-1]['eval/loss']:.4f}")
    parts.append(f"saved to {output}")
    return "trainer-lib: " + "; ".join(parts)


def config_show(args: argparse.Namespace) -> int:
    config = default_config(args.method).apply_overrides(args.overrides).validate()
    print(f"# trainer-lib {args.method} config. Save it, edit it, and run: "
          f"trainer-lib {args.method} --config FILE [section.key=value ...]")
    print(config.to_yaml(), end="")
    return 0


def config_validate(args: argparse.Namespace) -> int:
    config = load_config(None, args.file, args.overrides)
    print(f"{args.file}: a valid {config.method.name} config")
    if args.show:
        print(config.to_yaml(), end="")
    return 0


# --------------------------------------------------------------------------- parsers
# One standalone parser per command, so that overrides and options can be mixed in any order
# (argparse's parse_intermixed_args does not work through subparsers).


def _method_parser(method: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"trainer-lib {method}", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Train with {method.upper()}: defaults, then --config FILE, then overrides.")
    p.add_argument("--config", help=f"a YAML config (start from `trainer-lib config show {method}`)")
    p.add_argument("--data", help="training samples: a .json/.jsonl file or a datasets hub name"
                   + (" (default: the shipped instruction set)" if method == "sft" else ""))
    p.add_argument("--split", default="train", help="split of a hub --data (default: train)")
    p.add_argument("--mix", action="append", nargs=3, metavar=("NAME", "PATH", "WEIGHT"),
                   help="a source of a weighted mixture, instead of --data (repeat it: --mix "
                        "chats chats.jsonl 3 --mix tools tools.jsonl 1); the same as "
                        "data.mixture in a config")
    p.add_argument("--eval-data", help="evaluation samples for eval/loss, like --data")
    p.add_argument("--eval-split", default="test", help="split of a hub --eval-data (default: test)")
    p.add_argument("--output", help="where the final model folder goes "
                                    "(default: <train.checkpoint_dir>/final)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=run_training, command=method)
    return p


def _config_show_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer-lib config show", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Print a full default config as YAML.")
    p.add_argument("method", help=f"a registered method ({', '.join(method_names())}, or one "
                   "of your own with --import MODULE)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=config_show)
    return p


def _config_validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer-lib config validate", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Check a YAML config, with overrides applied.")
    p.add_argument("file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--show", action="store_true", help="also print the resolved config")
    p.set_defaults(func=config_validate)
    return p


def _top_parser() -> argparse.ArgumentParser:
    """Only for `trainer-lib --help` and unknown commands; each command parses its own args."""
    p = argparse.ArgumentParser(
        prog="trainer-lib", description="Post-train causal LMs with SFT or KTO from a YAML config.",
        epilog="run `trainer-lib COMMAND --help` for the options of each command\n\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    for method in method_names():
        commands.add_parser(method, help=f"train with {method}")
    cfg = commands.add_parser("config", help="print (show) or check (validate) a config")
    actions = cfg.add_subparsers(dest="action", required=True)
    actions.add_parser("show", help="print a full default config as YAML")
    actions.add_parser("validate", help="check a YAML config and overrides")
    return p


def pop_local_rank(argv: Sequence[str]) -> tuple[list[str], Optional[int]]:
    """Removes a launcher's `--local_rank=N` / `--local_rank N` (or `--local-rank`) from
    wherever it was put: DeepSpeed's launcher puts it right after the module, before the
    command (`python -m trainer_lib --local_rank=0 sft ...`), torch's old launcher before the
    script's own arguments. The process's rank is read from the environment the launchers
    also set (LOCAL_RANK), so the value is only checked and returned."""
    rest, rank, it = [], None, iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            value = value if eq else next(it, "")
            if not value.isdigit():  # a usage error, said the way argparse says its own
                print(f"trainer-lib: error: {name} takes a process index, got {value!r}",
                      file=sys.stderr)
                raise SystemExit(2)
            rank = int(value)
        else:
            rest.append(arg)
    return rest, rank


def pop_imports(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Removes every `--import MODULE` / `--import=MODULE` from the arguments; returns (the rest,
    the modules)."""
    rest, modules, it = [], [], iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name == "--import":
            value = value if eq else next(it, "")
            if not value or value.startswith("-"):
                raise CLIError("--import takes a module name or a .py file, e.g. --import "
                               "my_methods")
            modules.append(value)
        else:
            rest.append(arg)
    return rest, modules


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command's arguments, once the modules of `--import` are imported (so that their
    methods are commands too)."""
    argv, _ = pop_local_rank(argv)  # the launchers also set LOCAL_RANK, which is what is used
    argv, modules = pop_imports(argv)
    import_methods(modules)
    if argv and argv[0] != "config" and not argv[0].startswith("-"):
        method_config_class(argv[0])  # an unknown method: which ones there are, how to add one
        return _method_parser(argv[0]).parse_intermixed_args(argv[1:])
    if argv[:2] == ["config", "show"]:
        return _config_show_parser().parse_intermixed_args(argv[2:])
    if argv[:2] == ["config", "validate"]:
        return _config_validate_parser().parse_intermixed_args(argv[2:])
    _top_parser().parse_args(argv)  # prints help or the usage error, and exits
    raise SystemExit(2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 0 when done; 2 for a mistake in the command, config, data or checkpoint (one
    line, before training starts); 1 for a run that failed (one line: a non-finite step, a
    checkpoint that could not be written); 130 when interrupted (the run said where it saved)."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return args.func(args)
    except (CLIError, ConfigError, DataError, CheckpointError) as e:
        # every process finds the same mistake and one of them says it; but a bad sample met in
        # a stream while training is seen by the process that read it alone
        if getattr(e, "process", None) is not None or os.environ.get("RANK", "0") == "0":
            print(f"trainer-lib: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointWriteError) as e:
        several = int(os.environ.get("WORLD_SIZE", 1)) > 1
        where = f" (process {os.environ.get('RANK', 0)})" if several else ""
        print(f"trainer-lib: error{where}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
