"""The config: round trips, YAML, strict keys and values, and command-line style overrides."""

import pytest

from trainer_lib.config import (
    Config,
    ConfigError,
    default_kto_config,
    default_sft_config,
    parse_override,
)
from trainer_lib.methods.kto.config import KTOConfig
from trainer_lib.methods.sft.config import SFTConfig


@pytest.mark.parametrize("make", [default_sft_config, default_kto_config])
def test_round_trip_through_dict_and_yaml(make, tmp_path):
    config = make().evolve(**{"train.tags": ["a", "b"], "model.peft_config": {"r": 4}})
    assert Config.from_dict(config.to_dict()) == config
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert Config.load_yaml(path) == config


def test_yaml_file_with_overrides_null_and_scientific_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  model_path: some/model\ntrain:\n  batch_size: 2\n  tracker: null\n"
                    "optimizer:\n  kwargs: {lr: 1e-5}\n")
    config = Config.load_yaml(path, ["train.batch_size=3"])
    assert config.model.model_path == "some/model"
    assert config.train.batch_size == 3
    assert config.train.tracker is None
    assert config.optimizer.kwargs == {"lr": 1e-5, "weight_decay": 0.0}  # merged with defaults


def test_short_kto_yaml_starts_from_kto_defaults(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("method:\n  name: kto\n")
    assert Config.load_yaml(path) == default_kto_config()
    assert Config.from_dict({}) == default_sft_config()


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load_yaml(tmp_path / "nope.yaml")


def test_unknown_keys_name_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"train\.batch_sise.*did you mean 'batch_size'"):
        default_sft_config().apply_overrides(["train.batch_sise=4"])
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train'"):
        default_sft_config().evolve(trian=dict(batch_size=4))
    with pytest.raises(ConfigError, match=r"did you mean 'beta'"):
        Config.from_dict({"method": {"name": "kto", "betta": 0.2}})
    with pytest.raises(ConfigError, match=r"unknown method 'kot'.*did you mean 'kto'"):
        default_sft_config().apply_overrides(["method.name=kot"])


@pytest.mark.parametrize("override, message", [
    ("optimizer.kwargs.lr=-1e-4", r"optimizer\.kwargs\.lr must be a non-negative number"),
    ("train.seq_length=1", r"train\.seq_length must be at least 2"),
    ("train.batch_size=0", r"train\.batch_size must be at least 1"),
    ("train.batch_size=four", r"train\.batch_size must be an integer, got 'four'"),
    ("train.batch_size=2.5", r"train\.batch_size must be an integer"),
    ("train.batch_size=null", r"train\.batch_size must be an integer, got None"),
    ("train.progress_bar=maybe", r"train\.progress_bar must be true or false"),
    ("train.tags=x", r"train\.tags must be a list"),
    ("train.tracker=mlfow", r"train\.tracker: unknown tracker 'mlfow'; did you mean 'mlflow'"),
    ("scheduler.name=step", r"scheduler\.name=.step. is unknown"),
    ("train.batch_size", r"must look like section\.key=value"),
])
def test_bad_values_are_refused_with_the_field_and_what_was_expected(override, message):
    with pytest.raises(ConfigError, match=message):
        default_sft_config().apply_overrides([override])


def test_override_values_are_read_as_yaml():
    assert parse_override("train.batch_size=4") == ("train.batch_size", 4)
    assert parse_override("optimizer.kwargs.lr=2e-5") == ("optimizer.kwargs.lr", 2e-5)
    assert parse_override("train.tags=[a, b]") == ("train.tags", ["a", "b"])
    assert parse_override("train.progress_bar=false") == ("train.progress_bar", False)
    assert parse_override("model.model_path=null") == ("model.model_path", None)
    assert parse_override("train.run_name=a=b") == ("train.run_name", "a=b")
    assert parse_override("train.run_name=") == ("train.run_name", "")


def test_overrides_nested_list_bool_and_null():
    config = default_sft_config().evolve(model=dict(model_path="m"), train=dict(tracker="jsonl"))
    config = config.apply_overrides([
        "train.batch_size=4", "optimizer.kwargs.lr=3e-4", "train.tags=[x, y]",
        "train.progress_bar=false", "method.packing=no", "model.model_path=null",
        "train.tracker=null", "method.gen_kwargs.max_new_tokens=8",
    ])
    assert config.train.batch_size == 4
    assert config.optimizer.kwargs == {"lr": 3e-4, "weight_decay": 0.0}
    assert config.train.tags == ["x", "y"]
    assert config.train.progress_bar is False and config.method.packing is False
    assert config.model.model_path is None and config.train.tracker is None
    assert config.method.gen_kwargs == {"max_new_tokens": 8, "do_sample": False}


def test_dotted_overrides_update_a_peft_dict_instead_of_replacing_it():
    config = default_sft_config().evolve(
        model=dict(peft_config=dict(r=8, lora_alpha=16, target_modules=["q_proj"])))
    config = config.apply_overrides(["model.peft_config.r=32", "model.peft_config.lora_dropout=0.1"])
    assert config.model.peft_config == dict(r=32, lora_alpha=16, target_modules=["q_proj"],
                                            lora_dropout=0.1)
    assert config.apply_overrides(["model.peft_config=null"]).model.peft_config is None


def test_switching_method_by_name():
    config = default_sft_config().apply_overrides(["method.name=kto", "method.beta=0.2"])
    assert isinstance(config.method, KTOConfig) and config.method.beta == 0.2
    back = config.apply_overrides(["method.name=sft"])
    assert isinstance(back.method, SFTConfig)
    with pytest.raises(ConfigError, match=r"method\.beta must be positive"):
        config.apply_overrides(["method.beta=0"])


# --------------------------------------------------------------------------- trlX's names

# trlX's default_sft_config(), as its TRLConfig.to_dict() writes it
TRLX_SFT = {
    "method": {"name": "sftconfig",
               "gen_kwargs": {"max_new_tokens": 4, "top_k": 0, "top_p": 1.0, "do_sample": True}},
    "model": {"model_path": "gpt2", "model_arch_type": "causal", "num_layers_unfrozen": -1,
              "delta_kwargs": None},
    "optimizer": {"name": "adamw",
                  "kwargs": {"lr": 1.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8,
                             "weight_decay": 1.0e-6}},
    "scheduler": {"name": "cosine_annealing", "kwargs": {"T_max": 1e12, "eta_min": 1.0e-4}},
    "tokenizer": {"tokenizer_path": "gpt2", "padding_side": "left", "truncation_side": "right"},
    "train": {"total_steps": 1000, "seq_length": 1024, "epochs": 100, "batch_size": 8,
              "checkpoint_interval": 10000, "eval_interval": 100, "pipeline": "PromptPipeline",
              "trainer": "AccelerateSFTTrainer", "trainer_kwargs": {}, "project_name": "trlx",
              "entity_name": "team", "group_name": None, "checkpoint_dir": "ckpts",
              "rollout_logging_dir": None, "save_best": False, "save_optimizer": True,
              "tracker": "wandb", "logging_dir": None, "tags": [], "seed": 1000,
              "minibatch_size": 2},
}


def test_a_trlx_config_carries_over():
    config = Config.from_dict(TRLX_SFT)
    assert isinstance(config.method, SFTConfig)
    assert config.method.gen_kwargs == TRLX_SFT["method"]["gen_kwargs"]
    # trlX's batch_size is the step's batch, cut into minibatch_size forward passes
    assert (config.train.batch_size, config.train.gradient_accumulation_steps) == (2, 4)
    assert config.train.tracker_kwargs == {"wandb": {"entity": "team"}}
    assert config.train.save_best is None and config.train.logging_dir == "logs"
    assert config.tokenizer.tokenizer_path == "gpt2" and config.model.model_path == "gpt2"
    assert config.optimizer.kwargs["betas"] == [0.9, 0.95]
    lora = Config.from_dict({"model": {"delta_kwargs": {
        "delta_type": "lora", "modified_modules": "all", "lora_r": 8, "lora_alpha": 16,
        "lora_dropout": 0.0}}}).model.peft_config
    assert lora == {"target_modules": "all-linear", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    assert default_sft_config().apply_overrides(["train.minibatch_size=4"]).train.batch_size == 4


@pytest.mark.parametrize("override, message", [
    ("tokenizer.truncation_side=left", "method.overlong"),
    ("train.minibatch_size=3", "must divide train.batch_size=8"),
    ("optimizer.name=adamw_8bit_bnb", "use optimizer.name='adamw'"),
    ("train.save_best=true", "train.save_best names the logged figure"),
    ("train.save_optimizer=false", "a checkpoint always holds the optimiser state"),
    ("method.name=ppoconfig", "trainer_lib trains SFT and KTO"),
    ("train.trainer=AccelerateILQLTrainer", "trainer_lib trains SFT and KTO"),
    ("model.model_arch_type=seq2seq", "causal language models only"),
    ("train.rollout_logging_dir=x", "PPO setting"),
    ("model.delta_kwargs={delta_type: adapter}", "model.peft_config"),
])
def test_trlx_settings_without_an_equivalent_name_the_one_to_use(override, message):
    with pytest.raises(ConfigError) as err:
        default_sft_config().apply_overrides([override])
    assert "(a trlX setting)" in str(err.value) or "train.minibatch_size" in str(err.value)
    assert message in str(err.value)


def test_a_trlx_config_trains_with_its_schedule_and_generation(tiny_config):
    """trlX's cosine_annealing over T_max=1e12 steps with eta_min = lr is a constant rate; its
    sampling gen_kwargs (top_k=0) drive the evaluation."""
    from trainer_lib import train

    config = Config.from_dict(TRLX_SFT).evolve(
        model=dict(model_path=tiny_config.model.model_path), tokenizer=dict(tokenizer_path=None),
        train=dict(tracker=None, total_steps=2, seq_length=32, minibatch_size=2, batch_size=4,
                   eval_interval=2, log_interval=1, progress_bar=False,
                   checkpoint_dir=tiny_config.train.checkpoint_dir))
    trainer = train(samples=[f"word{i} token{i}" for i in range(8)], eval_prompts=["word1"],
                    metric_fn=lambda samples, prompts, outputs: {"n": float(len(outputs))},
                    config=config)
    assert [e["learning_rate"] for e in trainer.log_history] == pytest.approx([1e-4, 1e-4])
    assert trainer.log_history[-1]["metrics/n"] == 1.0
