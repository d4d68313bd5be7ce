"""What a launcher asks for is honoured or refused in one line that names it, before the model
loads: FSDP1 and FSDP1-only settings, Megatron-LM, accelerate's parallelism config, a mixed
precision that contradicts train.mixed_precision, DeepSpeed and FSDP together, FSDP without a
launcher, and an output head FSDP2 cannot use. FSDP2 itself trains in tests/test_distributed.py."""

import pytest

from trainer_lib import ConfigError, train
from trainer_lib.config import TrainConfig
from trainer_lib.runtime.accelerator import build_accelerator
from trainer_lib.runtime.fsdp import build_fsdp_plugin, check_sharded_model

LAUNCHED_FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "LOCAL_RANK": "0"}


def _env(monkeypatch, values: dict) -> None:
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_MEGATRON_LM",
                 "ACCELERATE_USE_PARALLELISM_CONFIG", "ACCELERATE_MIXED_PRECISION",
                 "FSDP_SHARDING_STRATEGY", "FSDP_BACKWARD_PREFETCH", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("env,named", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "LOCAL_RANK": "0"},
     r"the accelerate config asks for FSDP version 1; .* FSDP2 only .* fsdp_version: 2"),
    ({**LAUNCHED_FSDP2, "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"},
     r"fsdp_sharding_strategy=SHARD_GRAD_OP, an FSDP1 setting .* reshard_after_forward"),
    ({**LAUNCHED_FSDP2, "FSDP_BACKWARD_PREFETCH": "BACKWARD_PRE"},
     r"fsdp_backward_prefetch=BACKWARD_PRE, an FSDP1 setting"),
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, r"Megatron-LM, which trainer_lib does not run"),
    ({"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_TP_SIZE": "2"},
     r"parallelism config \(\{'tp_size': '2'\}"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"},
     r"mixed precision 'bf16' .* train\.mixed_precision is 'no'"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
     r"FSDP shards the model across the processes a launcher starts"),
])
def test_a_launcher_setting_the_trainer_does_not_honour_is_refused_by_name(env, named,
                                                                           monkeypatch,
                                                                           tiny_config):
    _env(monkeypatch, env)
    # before anything is loaded: the model path does not even exist
    config = tiny_config.evolve(model=dict(model_path="/nonexistent/model"))
    with pytest.raises(ConfigError, match=named) as caught:
        train(samples=["a b c"] * 4, config=config)
    assert "\n" not in str(caught.value)


def test_the_same_mixed_precision_from_the_launcher_is_accepted(monkeypatch, tiny_config):
    _env(monkeypatch, {"ACCELERATE_MIXED_PRECISION": "bf16"})
    accelerator = build_accelerator(tiny_config.evolve(train=dict(mixed_precision="bf16")))
    assert accelerator.mixed_precision == "bf16"


@pytest.mark.parametrize("fsdp,named", [
    ({"sharding_strategy": "FULL_SHARD"},
     r"train\.fsdp\.sharding_strategy is an FSDP1 setting .* reshard_after_forward"),
    ({"fsdp_use_orig_params": True}, r"train\.fsdp\.fsdp_use_orig_params is an FSDP1 setting"),
    ({"reshard_after_froward": True},
     r"not an FSDP2 setting; did you mean 'reshard_after_forward'\?"),
    ({"fsdp_version": 1}, r"train\.fsdp asks for FSDP version 1"),
])
def test_fsdp_settings_fsdp2_cannot_apply_are_refused(fsdp, named, monkeypatch):
    _env(monkeypatch, {})
    with pytest.raises(ConfigError, match=named):
        build_fsdp_plugin(TrainConfig(fsdp=fsdp))


def test_fsdp_settings_in_either_spelling_reach_the_plugin(monkeypatch):
    _env(monkeypatch, {})
    assert build_fsdp_plugin(TrainConfig()) is None
    plugin = build_fsdp_plugin(TrainConfig(fsdp={"fsdp_reshard_after_forward": False,
                                                 "state_dict_type": "FULL_STATE_DICT"}))
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    # train.fsdp=true alone wraps each transformer block, as configs/accelerate/fsdp2.yaml does
    assert build_fsdp_plugin(TrainConfig(fsdp=True)).auto_wrap_policy.__name__ == (
        "transformer_auto_wrap_policy")
    # under an FSDP config, train.fsdp's settings take precedence over the file's
    _env(monkeypatch, {**LAUNCHED_FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "true"})
    assert build_fsdp_plugin(TrainConfig(fsdp={"reshard_after_forward": False})
                             ).reshard_after_forward is False


def test_deepspeed_and_fsdp_together_are_refused(monkeypatch, tiny_config):
    _env(monkeypatch, {})
    with pytest.raises(ConfigError, match="train.fsdp and train.deepspeed_config both"):
        tiny_config.evolve(train=dict(fsdp=True, deepspeed_config={"zero_optimization": {}}))
    _env(monkeypatch, LAUNCHED_FSDP2)
    with pytest.raises(ConfigError, match="both DeepSpeed and FSDP are asked for"):
        build_accelerator(tiny_config.evolve(train=dict(deepspeed_config={})))


def test_fsdp2_refuses_a_lora_wrapped_output_head(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    check_sharded_model(model)  # a plain linear head is what FSDP2's loss path reads
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ConfigError, match="output head must be a plain linear layer.*LoRA"):
        check_sharded_model(lora)
