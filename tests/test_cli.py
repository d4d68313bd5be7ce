"""The command line: `trainer-lib sft|kto ...` and `trainer-lib config show|validate ...`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer_lib.cli import CLIError, load_config, main, parse_args, pop_local_rank, resolve_data
from trainer_lib.config import Config, default_kto_config, default_sft_config
from trainer_lib.methods.kto.config import KTOConfig

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO / "configs" / "sft_alpaca.yaml"


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def cli(*args, cwd=None, timeout=300):
    """`python -m trainer_lib ARGS` in a subprocess, with this checkout's trainer_lib."""
    return subprocess.run([sys.executable, "-m", "trainer_lib", *map(str, args)], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def fast(tmp_path, model_dir):
    """Overrides for a run of a few seconds, writing only under tmp_path."""
    return [f"model.model_path={model_dir}", "train.total_steps=5", "train.progress_bar=false",
            "train.seq_length=64", "train.batch_size=4", "train.log_interval=1",
            f"train.checkpoint_dir={tmp_path / 'ckpts'}", f"train.logging_dir={tmp_path / 'logs'}"]


# --------------------------------------------------------------------------- config show/validate


def test_config_show_prints_yaml_that_reads_back_as_the_defaults(tmp_path, capsys):
    assert main(["config", "show", "sft"]) == 0
    path = tmp_path / "sft.yaml"
    path.write_text(capsys.readouterr().out)
    assert Config.load_yaml(path) == default_sft_config()


def test_config_show_kto_and_with_overrides(capsys):
    assert main(["config", "show", "kto"]) == 0
    assert Config.from_dict(yaml.safe_load(capsys.readouterr().out)) == default_kto_config()
    assert main(["config", "show", "sft", "train.batch_size=2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["batch_size"] == 2


def _validated(capsys, *args) -> dict:
    assert main(["config", "validate", str(ALPACA), "--show", *args]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first.endswith("a valid sft config")
    return yaml.safe_load(rest)


def test_overrides_nested_list_bool_and_null(capsys):
    config = _validated(capsys, "optimizer.kwargs.lr=1e-3", "model.peft_config.r=4",
                        "train.tags=[a, b]", "method.packing=false", "train.tracker=jsonl",
                        "model.model_path=some/model", "tokenizer.chat_template=null")
    assert config["optimizer"]["kwargs"] == {"lr": 1e-3, "weight_decay": 0.01}  # the file's wd kept
    assert config["model"]["peft_config"] == {"r": 4}
    assert config["train"]["tags"] == ["a", "b"]
    assert config["method"]["packing"] is False
    assert config["train"]["tracker"] == "jsonl"
    assert config["tokenizer"]["chat_template"] is None
    # options and overrides mix in any order, and the overrides apply on top of the file
    config = _validated(capsys, "train.tracker=null")
    assert config["train"]["tracker"] is None and config["train"]["seq_length"] == 256


def test_yaml_null_sets_a_field_to_none(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tokenizer:\n  chat_template: null\ntrain:\n  max_grad_norm: null\n")
    config = load_config("sft", str(path), [])
    assert config.tokenizer.chat_template is None and config.train.max_grad_norm is None


@pytest.mark.parametrize("override, message", [
    ("train.batch_sise=4", "unknown key 'train.batch_sise'; did you mean 'batch_size'?"),
    ("trian.batch_size=4", "unknown config section 'trian'; did you mean 'train'?"),
    ("train.batch_size=four", "train.batch_size must be an integer, got 'four'"),
    ("train.progress_bar=3", "train.progress_bar must be true or false, got 3"),
    ("optimizer.kwargs.lr=-1", "optimizer.kwargs.lr must be a non-negative number"),
    ("train.batch_size", "must look like section.key=value"),
])
def test_bad_overrides_exit_2_with_a_clear_message(override, message, capsys):
    assert main(["config", "validate", str(ALPACA), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trainer-lib: error: ") and message in err


def test_errors_print_one_line_and_no_traceback(capsys):
    assert main(["sft", "--config", str(ALPACA), "train.batch_size=four"]) == 2  # not raised
    assert capsys.readouterr().err == ("trainer-lib: error: train.batch_size must be an integer, "
                                       "got 'four'\n")


def test_a_mistake_is_said_once_but_a_bad_sample_met_by_one_process_by_that_one(monkeypatch,
                                                                                  capsys):
    from types import SimpleNamespace

    from trainer_lib import DataError

    def run_raising(error):
        def fail(args):
            raise error
        monkeypatch.setattr("trainer_lib.cli.parse_args",
                            lambda argv: SimpleNamespace(func=fail))
        assert main([]) == 2
        return capsys.readouterr().err

    monkeypatch.setenv("RANK", "1")
    assert run_raising(DataError("sample 3: field 'completion' is empty")) == ""  # rank 0 says it
    error = DataError("sample 300: field 'completion' is empty")
    error.process = 1  # met in a stream while training, by this process alone
    assert run_raising(error) == "trainer-lib: error: sample 300: field 'completion' is empty\n"


def test_missing_or_broken_config_file(tmp_path, capsys):
    assert main(["config", "validate", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1\n")
    assert main(["sft", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml:2:1: not valid YAML: expected ',' or ']'" in err  # the file's line, column
    assert len(err.strip().splitlines()) == 1
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    assert main(["config", "validate", str(listed)]) == 2
    assert "a config must be a mapping" in capsys.readouterr().err


def test_a_trlx_yaml_validates_as_an_sft_config(tmp_path, capsys):
    path = tmp_path / "trlx_sft.yml"  # trlX's SFT settings as its YAML files write them
    path.write_text("train: {total_steps: 10, seq_length: 64, epochs: 1, batch_size: 8, "
                    "minibatch_size: 4, checkpoint_interval: 100, eval_interval: 100, "
                    "pipeline: PromptPipeline, trainer: AccelerateSFTTrainer}\n"
                    "tokenizer: {tokenizer_path: gpt2, truncation_side: right}\n"
                    "scheduler: {name: cosine_annealing, "
                    "kwargs: {T_max: 1.0e+12, eta_min: 1.0e-4}}\n"
                    "method: {name: sftconfig, gen_kwargs: {max_new_tokens: 40}}\n")
    config = _validated_file(capsys, path)
    assert config["train"]["batch_size"] == 4
    assert config["train"]["gradient_accumulation_steps"] == 2
    # the sft command takes the file (and stops at the bad override, not at trlX's names)
    assert main(["sft", "--config", str(path), "train.batch_size=x"]) == 2
    assert "train.batch_size must be an integer" in capsys.readouterr().err


def _validated_file(capsys, path) -> dict:
    assert main(["config", "validate", str(path), "--show"]) == 0
    first, rest = capsys.readouterr().out.split("\n", 1)
    assert first.endswith("a valid sft config")
    return yaml.safe_load(rest)


def test_a_config_runs_only_under_its_own_method(capsys):
    kto_file = REPO / "configs" / "kto_feedback.yaml"
    assert main(["sft", "--config", str(kto_file)]) == 2
    assert "run `trainer-lib kto`" in capsys.readouterr().err
    assert main(["sft", "method.name=kto"]) == 2
    assert "run `trainer-lib kto` instead" in capsys.readouterr().err
    assert isinstance(load_config("kto", None, []).method, KTOConfig)
    assert load_config("kto", None, []) == default_kto_config()


# --------------------------------------------------------------------------- data


def test_missing_local_file_and_unreachable_hub_dataset_are_clear_errors(tmp_path):
    with pytest.raises(CLIError, match="data file .*missing.jsonl does not exist"):
        resolve_data(str(tmp_path / "missing.jsonl"), "train")
    with pytest.raises(CLIError, match="could not load the dataset 'no-such-user/no-such-set'"):
        resolve_data("no-such-user/no-such-set", "train")
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hi"}\n')
    assert resolve_data(str(path), "train") == str(path)


# --------------------------------------------------------------------------- launchers


@pytest.mark.parametrize("argv", [
    ["--local_rank=1", "sft", "--config", "c.yaml", "train.epochs=2"],   # DeepSpeed's launcher
    ["sft", "--config", "c.yaml", "--local_rank", "1", "train.epochs=2"],
    ["sft", "--local-rank=1", "--config", "c.yaml", "train.epochs=2"],
])
def test_a_launchers_local_rank_is_accepted_wherever_it_is_put(argv):
    args = parse_args(argv)
    assert (args.command, args.config, args.overrides) == ("sft", "c.yaml", ["train.epochs=2"])
    assert pop_local_rank(argv) == ([a for a in argv if "local" not in a and a != "1"], 1)


def test_a_bad_local_rank_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--local_rank=x", "sft"])
    assert exit_.value.code == 2 and "--local_rank takes a process index" in capsys.readouterr().err


# The documented command for DeepSpeed's launcher (docs/cli-and-examples.md), run as written
# (2 CPU processes), with overrides that make it small and quick
README_DEEPSPEED = ("deepspeed --num_gpus 2 --module trainer_lib sft --config "
                    "configs/sft_lora.yaml --data my_instructions.jsonl "
                    "train.deepspeed_config=configs/deepspeed/zero3.json")


def test_the_readme_deepspeed_command_trains_on_two_processes(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    assert README_DEEPSPEED in (REPO / "docs" / "cli-and-examples.md").read_text()
    data = tmp_path / "my_instructions.jsonl"
    rows = [{"instruction": f"Repeat word{i}.", "input": "", "output": f"word{i} word{i}"}
            for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = tmp_path / "eval.jsonl"  # 5: the two processes evaluate 3 and 2 of them
    eval_rows = [{"instruction": f"Say word{i}.", "input": "", "output": f"word{i}"}
                 for i in range(5)]
    evals.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    command = README_DEEPSPEED.replace("my_instructions.jsonl", str(data)).split()
    command[1:1] = ["--master_port", str(_free_port())]
    out = tmp_path / "out"
    command += [*fast(tmp_path, tiny_model_dir), "train.total_steps=2", "train.batch_size=2",
                "train.tracker=jsonl", "--eval-data", str(evals), "--output", str(out)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**_env(), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes (DeepSpeed ZeRO-3)" in proc.stdout
    assert proc.stdout.count("trainer-lib: model:") == 1  # said once, by the main process
    metrics = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").open()]
    assert metrics[0]["data/samples"] == 8
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    adapter = load_file(out / "adapter_model.safetensors")  # configs/sft_lora.yaml is LoRA
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    # eval/loss over both processes' shares is the saved model's mean token loss on all 5
    from trainer_lib.methods.sft.samples import alpaca_prompt

    pairs = [(alpaca_prompt(r["instruction"], r["input"]), r["output"]) for r in eval_rows]
    assert metrics[-1]["eval/loss"] == pytest.approx(_eval_loss_in_torch(out, pairs), rel=1e-4)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- training


def _eval_loss_in_torch(model_dir, pairs) -> float:
    """eval/loss by hand: the summed cross-entropy of every completion token of every pair,
    divided by their count (the library's tokenisation, plain torch for the loss)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer_lib.data.tokenize import tokenize_pair

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(
        model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, completion in pairs:
            ex = tokenize_pair(tok, prompt, completion)
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def _completion_nll(model_dir, rows) -> float:
    """Mean NLL of the completions under a saved model, in plain torch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(
        model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tok(row["prompt"])["input_ids"]
            ids = tok(row["prompt"] + row["completion"])["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            targets = torch.tensor(ids[1:])
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            total += float(losses[len(prompt) - 1:].sum())
            count += len(ids) - len(prompt)
    return total / count


def test_sft_trains_on_data_with_the_overrides_applied(tiny_model_dir, tmp_path, capsys):
    rows = [{"prompt": f"Say {w}.", "completion": f" {w} {w}"}
            for w in ["red", "blue", "green"] * 4]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps(rows[:4]))
    args = ["sft", "--data", str(data), *fast(tmp_path, tiny_model_dir), "--eval-data", str(evals),
            "train.eval_interval=6", "train.total_steps=6", "train.batch_size=2",
            "train.epochs=100",
            "optimizer.kwargs.lr=5e-3", "scheduler.name=constant", "train.tracker=jsonl"]
    assert main(args) == 0
    out = capsys.readouterr().out
    final = tmp_path / "ckpts" / "final"
    assert f"data: {data}" in out and "eval/loss" in out and f"saved to {final}" in out
    metrics = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").open()]
    assert metrics[0]["data/samples"] == 12 and metrics[0]["data/kind/pair"] == 12  # --data
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]  # train.total_steps=6
    assert {m["learning_rate"] for m in steps} == {5e-3}  # the constant schedule's lr
    saved = Config.load_yaml(tmp_path / "ckpts" / "step_6" / "config.yaml")
    assert saved.train.batch_size == 2 and saved.optimizer.kwargs["lr"] == 5e-3
    # eval/loss at the last step is the final model's mean token loss on --eval-data
    expected = _eval_loss_in_torch(final, [(r["prompt"], r["completion"]) for r in rows[:4]])
    assert metrics[-1]["eval/loss"] == pytest.approx(expected, rel=1e-5)
    # it learned --data: the completions are likelier than under the model it started from
    assert _completion_nll(final, rows) < _completion_nll(tiny_model_dir, rows) - 0.5


def test_kto_trains_on_data_with_the_overrides_applied(tiny_model_dir, tmp_path, capsys):
    rows = [{"prompt": f"Say {w}.", "completion": f" {w}", "label": i % 3 != 0}
            for i, w in enumerate(["red", "blue", "green", "gold"] * 2)]
    data = tmp_path / "feedback.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["kto", "--config", str(REPO / "configs" / "kto_feedback.yaml"), "--data", str(data),
            *fast(tmp_path, tiny_model_dir), "train.total_steps=2", "train.batch_size=8",
            "train.epochs=2", "method.beta=0.2",
            "method.desirable_weight=0.6", "train.tracker=jsonl", "--output", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "KTO data: 5 desirable, 3 undesirable examples; desirable_weight=0.6" in out
    metrics = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").open()]
    assert metrics[0]["data/samples"] == 8
    first = next(m for m in metrics if "loss" in m)
    # the first step, all 8 examples: policy = reference, so each loss is half its weight
    assert first["loss"] == pytest.approx(0.5 * (5 * 0.6 + 3 * 1.0) / 8, rel=1e-5)
    assert Config.load_yaml(tmp_path / "ckpts" / "step_2" / "config.yaml").method.beta == 0.2
    assert (tmp_path / "out" / "config.json").is_file()


def test_kto_needs_data(capsys):
    assert main(["kto"]) == 2
    assert "needs --data" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("trainer-lib") is None, reason="the console script is not installed")
def test_console_script():
    result = subprocess.run(["trainer-lib", "config", "show", "kto"], env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Config.from_dict(yaml.safe_load(result.stdout)) == default_kto_config()
