"""The command line: `trainer-lib sft|kto ...` and `trainer-lib config show|validate ...`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer_lib.cli import CLIError, load_config, main, resolve_data
from trainer_lib.config import Config, KTOConfig, default_kto_config, default_sft_config

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


def test_config_show_prints_yaml_that_reads_back_as_the_defaults(tmp_path):
    result = cli("config", "show", "sft")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "sft.yaml"
    path.write_text(result.stdout)
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


def test_errors_print_no_traceback():
    result = cli("sft", "--config", ALPACA, "train.batch_size=four")
    assert result.returncode == 2
    assert "train.batch_size must be an integer, got 'four'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_or_broken_config_file(tmp_path, capsys):
    assert main(["config", "validate", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1\n")
    assert main(["sft", "--config", str(broken)]) == 2
    assert "broken.yaml: not valid YAML" in capsys.readouterr().err
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    assert main(["config", "validate", str(listed)]) == 2
    assert "a config must be a mapping" in capsys.readouterr().err


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


# --------------------------------------------------------------------------- training


def test_sft_end_to_end_in_a_subprocess(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    result = cli("sft", "--config", ALPACA, "train.total_steps=5", "train.progress_bar=false",
                 f"model.model_path={tiny_model_dir}", "train.seq_length=64",
                 f"train.checkpoint_dir={tmp_path / 'ckpts'}", f"train.logging_dir={tmp_path / 'logs'}",
                 "--output", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--data not given: training on the instruction set shipped" in result.stdout
    assert f"saved to {out}" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    AutoTokenizer.from_pretrained(out)


def test_sft_in_process_with_data_eval_data_and_the_default_output(tiny_model_dir, tmp_path,
                                                                    capsys):
    rows = [{"prompt": f"Say {w}.", "completion": f"{w} {w}"} for w in ["red", "blue", "green"] * 4]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps(rows[:4]))
    args = ["sft", "--data", str(data), *fast(tmp_path, tiny_model_dir), "--eval-data", str(evals),
            "train.eval_interval=5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    final = tmp_path / "ckpts" / "final"
    assert (final / "config.json").is_file()
    assert f"data: {data}" in out and "eval/loss" in out and f"saved to {final}" in out


def test_kto_command_trains_or_says_no_trainer_is_registered(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"Say {w}.", "completion": f"{w}", "label": i % 2 == 0}
            for i, w in enumerate(["red", "blue", "green", "gold"] * 2)]
    data = tmp_path / "feedback.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = cli("kto", "--config", REPO / "configs" / "kto_feedback.yaml", "--data", data,
                 *fast(tmp_path, tiny_model_dir), "train.total_steps=2", "--output", out,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "config.json").is_file()


def test_kto_needs_data(capsys):
    assert main(["kto"]) == 2
    assert "needs --data" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("trainer-lib") is None, reason="the console script is not installed")
def test_console_script():
    result = subprocess.run(["trainer-lib", "config", "show", "kto"], env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Config.from_dict(yaml.safe_load(result.stdout)) == default_kto_config()
