"""Every recipe in configs/ loads, validates, and means what its name says."""

from pathlib import Path

import pytest

from trainer_lib.cli import load_config
from trainer_lib.config import Config
from trainer_lib.methods.kto.config import KTOConfig
from trainer_lib.methods.sft.config import SFTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_the_recipes_are_there():
    names = {p.name for p in RECIPES}
    assert {"sft_alpaca.yaml", "sft_chat_tools.yaml", "sft_lora.yaml", "kto_feedback.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path):
    config = Config.load_yaml(path).validate()
    method = path.name.split("_")[0]
    assert config.method.name == method
    # the CLI's loader (the command's defaults, then the file) agrees with Config.load_yaml
    assert load_config(method, str(path), []) == config
    # and the recipe survives a round trip through its full YAML
    assert Config.from_dict(config.to_dict()) == config


def test_recipe_contents():
    alpaca = Config.load_yaml(CONFIGS / "sft_alpaca.yaml")
    assert isinstance(alpaca.method, SFTConfig) and alpaca.train.seq_length == 256
    assert alpaca.optimizer.kwargs["lr"] == 2e-5

    chat = Config.load_yaml(CONFIGS / "sft_chat_tools.yaml")
    assert chat.tokenizer.chat_template == "default" and chat.method.loss_on == "assistant"

    kto = Config.load_yaml(CONFIGS / "kto_feedback.yaml")
    assert isinstance(kto.method, KTOConfig)


def test_lora_recipe_is_a_valid_peft_lora_config():
    config = Config.load_yaml(CONFIGS / "sft_lora.yaml")
    peft_config = config.model.peft_config
    assert {"r", "lora_alpha", "lora_dropout", "target_modules"} <= set(peft_config)
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(**peft_config, task_type="CAUSAL_LM")
    assert lora.r == peft_config["r"]
