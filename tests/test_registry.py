"""A method registered from a module outside the package is first-class: Config.from_dict, YAML,
default_config(name), `trainer-lib config show NAME`, and training from the command line, with
`--import MODULE` or a package's entry point."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_lib import ConfigError, default_config, register_trainer
from trainer_lib.config import Config
from trainer_lib.methods.sft import SFTConfig
from trainer_lib.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

# A method of one's own, as a user writes it in a file of their own.
METHOD = '''
from dataclasses import dataclass

from trainer_lib import register_trainer
from trainer_lib.methods.sft import SFTConfig, SFTTrainer


@dataclass
class LoudConfig(SFTConfig):
    name: str = "{name}"
    volume: float = 2.0

    @classmethod
    def defaults(cls):
        return {{"optimizer": {{"kwargs": {{"lr": 0.003}}}}}}


@register_trainer(LoudConfig)
class LoudTrainer(SFTTrainer):
    def compute_loss(self, model, batch):
        loss, metrics = super().compute_loss(model, batch)
        volume = self.config.method.volume
        return loss * volume, {{**metrics, "loud/volume": (volume * batch["num_loss_tokens"],
                                                         batch["num_loss_tokens"])}}
'''


def write_method(folder: Path, module: str, name: str) -> Path:
    path = folder / f"{module}.py"
    path.write_text(METHOD.format(name=name))
    return path


def run(args, cwd, env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *(env_extra or [])]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "trainer_lib", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_registered_method_is_accepted_by_from_dict_yaml_and_default_config(tmp_path,
                                                                               monkeypatch):
    write_method(tmp_path, "quiet_methods", "quiet_sft")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("quiet_methods")
    config = Config.from_dict({"method": {"name": "quiet_sft", "volume": 0.5}})
    assert type(config.method) is module.LoudConfig and config.method.volume == 0.5
    assert config.optimizer.kwargs["lr"] == 0.003  # the method's own defaults
    (tmp_path / "quiet.yaml").write_text("method:\n  name: quiet_sft\n  volume: 4\n")
    assert Config.load_yaml(tmp_path / "quiet.yaml").method.volume == 4.0
    assert default_config("quiet_sft").method == module.LoudConfig()
    assert default_config("quiet_sft").optimizer.kwargs["lr"] == 0.003
    with pytest.raises(ConfigError, match="unknown key 'method.volum'; did you mean 'volume'"):
        Config.from_dict({"method": {"name": "quiet_sft", "volum": 1}})


def test_an_unknown_method_says_what_is_registered_and_how_to_add_one():
    with pytest.raises(ConfigError, match=r"unknown method 'sfft'; did you mean 'sft'\?.*--import"):
        Config.from_dict({"method": {"name": "sfft"}})
    with pytest.raises(ConfigError, match="unknown method"):
        default_sft_with_method("nothing_like_it")


def default_sft_with_method(name):
    return default_config("sft").evolve(method={"name": name})


def test_a_method_name_cannot_be_taken_twice():
    class Other(SFTConfig):
        pass

    with pytest.raises(ConfigError, match="the method name 'sft' .* is taken"):
        register_trainer(Other)(Trainer)


def test_the_cli_trains_a_method_imported_with_import_through_yaml(tiny_model_dir, tmp_path):
    write_method(tmp_path, "loud_methods", "loud_sft")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"word{i} ", "completion": f"token{i}"}) + "\n"
                            for i in range(16)))
    (tmp_path / "loud.yaml").write_text(
        "method:\n  name: loud_sft\n  volume: 3.0\n  packing: false\n"
        f"model:\n  model_path: {tiny_model_dir}\n"
        "train:\n  seq_length: 32\n  batch_size: 4\n  total_steps: 3\n  log_interval: 1\n"
        "  progress_bar: false\n  tracker: jsonl\n  checkpoint_dir: ckpts\n  logging_dir: logs\n")

    shown = run(["--import", "loud_methods", "config", "show", "loud_sft"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "name: loud_sft" in shown.stdout and "volume: 2.0" in shown.stdout
    assert "lr: 0.003" in shown.stdout

    proc = run(["--import", "loud_methods", "loud_sft", "--config", "loud.yaml", "--data",
                str(data), "--output", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").open()]
    volumes = [row["loud/volume"] for row in logged if "loud/volume" in row]
    assert volumes == [3.0, 3.0, 3.0]  # the YAML's volume, through the method's own loss
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")

    unknown = run(["loud_sft", "--data", str(data)], tmp_path)  # without --import
    assert unknown.returncode == 2
    assert "unknown method 'loud_sft'" in unknown.stderr and "--import" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_an_installed_package_declares_its_method_as_an_entry_point(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    write_method(site, "ep_methods", "ep_sft")
    info = site / "ep_methods-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[trainer_lib.methods]\nep_sft = ep_methods\n")
    proc = run(["config", "show", "ep_sft"], tmp_path, [str(site)])
    assert proc.returncode == 0, proc.stderr
    assert "name: ep_sft" in proc.stdout and "volume: 2.0" in proc.stdout
