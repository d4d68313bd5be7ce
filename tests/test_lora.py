"""LoRA through peft and num_layers_unfrozen, in one process."""

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trainer_lib import ConfigError, train
from trainer_lib.modeling import count_parameters
from trainer_lib.peft_utils import build_lora_config

SAMPLES = [f"word{i} token{i} word{i + 1} token{i + 2}" for i in range(16)]


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_lora_trains_only_adapters_and_saves_adapter_and_merged(tiny_config, tiny_model_dir,
                                                                 tmp_path, capsys):
    config = tiny_config.evolve(
        model=dict(peft_config=dict(rank=4, alpha=8, dropout=0.0, target_modules="all_linear")),
        train=dict(total_steps=3))
    trainer = train(samples=SAMPLES, config=config)
    assert "trainable parameters: 5,888 of 71,584 (8.2253%)" in capsys.readouterr().out
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(model, PeftModel)
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    base = load_file(f"{tiny_model_dir}/model.safetensors")
    state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in model.state_dict().items()}
    for key, value in base.items():  # base weights unchanged
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)
    assert any(v.abs().max() > 0 for k, v in model.state_dict().items() if "lora_B" in k)

    trainer.save_pretrained(tmp_path / "adapter")
    trainer.save_pretrained(tmp_path / "merged", merge_adapters=True)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    ids = torch.tensor([[1, 7, 30, 99, 4, 12]])
    model.eval()
    expected = logits_of(model, ids)
    via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         tmp_path / "adapter")
    via_auto = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    for loaded in (via_peft, via_auto, merged):
        torch.testing.assert_close(logits_of(loaded.eval(), ids), expected, atol=1e-5, rtol=1e-4)


def test_lora_config_forms():
    cfg = build_lora_config(dict(rank=8, alpha=16, dropout=0.1, target_modules=["q_proj"],
                                 exclude_modules=["k_proj"]))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)
    assert cfg.task_type == "CAUSAL_LM" and cfg.exclude_modules == {"k_proj"}
    assert build_lora_config(dict(target_modules="all_linear")).target_modules == "all-linear"
    given = LoraConfig(r=2, target_modules=["v_proj"])
    assert build_lora_config(given) is given
    # a config's own to_dict() round-trips (as Config.to_dict/from_dict do)
    assert build_lora_config(cfg.to_dict()).r == 8
    with pytest.raises(ConfigError, match="'rnak'.*did you mean 'rank'"):
        build_lora_config(dict(rnak=8))
    with pytest.raises(ConfigError, match="both 'rank' and 'r'"):
        build_lora_config(dict(rank=8, r=4))


def test_target_modules_matching_nothing_are_named(tiny_config):
    config = tiny_config.evolve(model=dict(peft_config=dict(target_modules=["q_proj", "qkv"])))
    with pytest.raises(ConfigError) as err:
        train(samples=SAMPLES, config=config)
    message = str(err.value)
    assert "['qkv']" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message
    assert "lm_head" not in message


def test_lora_and_num_layers_unfrozen_together_is_an_error(tiny_config):
    config = tiny_config.evolve(model=dict(peft_config=dict(rank=4), num_layers_unfrozen=1))
    with pytest.raises(ConfigError, match="num_layers_unfrozen"):
        train(samples=SAMPLES, config=config)


def test_num_layers_unfrozen_trains_top_layers_norm_and_head(tiny_config, tiny_model_dir):
    config = tiny_config.evolve(model=dict(num_layers_unfrozen=1), train=dict(total_steps=2))
    trainer = train(samples=SAMPLES, config=config)
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm.", "lm_head."))
                             for n in trainable)
    assert "lm_head.weight" in trainable and "model.norm.weight" in trainable
    base = load_file(f"{tiny_model_dir}/model.safetensors")
    state = model.state_dict()
    for key, value in base.items():
        same = torch.equal(state[key], value)
        assert same == (key not in trainable), key
    with pytest.raises(ConfigError, match="only 2 layers"):
        train(samples=SAMPLES, config=tiny_config.evolve(model=dict(num_layers_unfrozen=3)))
