"""LoRA through peft (and NeMo RL's LoRA keys), num_layers_unfrozen, and gradient
checkpointing, in one process."""

import math

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from test_saving import read_card, run_loading_snippet
from transformers import AutoModelForCausalLM

from trainer_lib import ConfigError, train
from trainer_lib.model.loading import count_parameters
from trainer_lib.model.lora import apply_lora, build_lora_config

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

    # the model cards: the adapter folder's replaces the template peft writes there
    meta, body = read_card(tmp_path / "adapter")
    assert meta["base_model"] == tiny_model_dir and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "trainer_lib"
    assert meta["tags"] == ["trainer_lib", "sft", "lora", "peft"]
    assert "A LoRA adapter for" in body and "| LoRA | r 4, alpha 8, dropout 0.0, on " in body
    via_card = run_loading_snippet(body)["model"]  # AutoPeftModelForCausalLM, as the card says
    torch.testing.assert_close(logits_of(via_card.eval(), ids), expected, atol=1e-5, rtol=1e-4)
    meta, body = read_card(tmp_path / "merged")
    assert meta["base_model"] == tiny_model_dir and meta["base_model_relation"] == "finetune"
    assert meta["tags"] == ["trainer_lib", "sft", "lora"]
    assert "LoRA adapters merged into its weights" in body and "; merged into the weights" in body
    assert "AutoModelForCausalLM.from_pretrained" in body and "Peft" not in body


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
    with pytest.raises(ConfigError, match="num_layers_unfrozen"):  # as the config is built
        tiny_config.evolve(model=dict(peft_config=dict(rank=4), num_layers_unfrozen=1))
    # disabled adapters leave num_layers_unfrozen in charge
    tiny_config.evolve(model=dict(peft_config=dict(rank=4, enabled=False), num_layers_unfrozen=1))


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


# --------------------------------------------------------------------------- NeMo RL's keys


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_nemo_rl_lora_keys_map_onto_peft(tiny_model_dir):
    """A NeMo RL `lora_cfg` block as written there: dim, alpha, dropout, dropout_position,
    match_all_linear, exclude_modules, lora_A_init, use_triton."""
    nemo = dict(enabled=True, target_modules=[], exclude_modules=["gate_proj"],
                match_all_linear=True, dim=8, alpha=32, dropout=0.1, dropout_position="pre",
                lora_A_init="kaiming", use_triton=True)
    cfg = build_lora_config(nemo)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 32, 0.1)
    assert cfg.target_modules == "all-linear" and cfg.exclude_modules == {"gate_proj"}
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), nemo)
    kinds = {name.rsplit(".", 1)[-1] for name in _lora_layers(model)}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    layer = next(iter(_lora_layers(model).values()))
    assert layer.scaling["default"] == 32 / 8 and layer.lora_dropout["default"].p == 0.1

    # NeMo's wildcard module patterns: only layer 0's q_proj
    wild = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                      dict(dim=4, target_modules=["*.layers.0.*.q_proj"]))
    assert list(_lora_layers(wild)) == ["base_model.model.model.layers.0.self_attn.q_proj"]
    # disabled: no adapters at all
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert apply_lora(plain, dict(nemo, enabled=False)) is plain


@pytest.mark.parametrize("spec, message", [
    (dict(dim=8, dropout=0.1, dropout_position="post", match_all_linear=True),
     "dropout_position='post' .* cannot be done with peft"),
    (dict(dim=8, lora_A_init="normal", match_all_linear=True), "lora_A_init must be one of"),
    (dict(dim=8, match_all_linear=True, target_modules=["q_proj"]), "keep one"),
    (dict(dim=8, match_all_linear=False, target_modules=[]), "names no modules to adapt"),
    (dict(dim=8, r=4), "gives both 'dim' and 'r'"),
    (dict(dim=8, lora_dtype="bf16", match_all_linear=True), "lora_dtype is not supported"),
])
def test_nemo_keys_that_peft_cannot_follow_are_clear_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_lora_config(spec)


@pytest.mark.parametrize("init", ["xavier", "kaiming"])
def test_lora_a_initialisation_follows_the_choice(tiny_model_dir, init):
    """xavier: lora_A ~ N(0, 2 / (fan_in + fan_out)); kaiming (peft's, NeMo's other choice):
    uniform within 1/sqrt(fan_in). lora_B is zero either way."""
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       dict(dim=16, alpha=16, match_all_linear=True, lora_A_init=init))
    for name, layer in _lora_layers(model).items():
        a = layer.lora_A["default"].weight
        fan_out, fan_in = a.shape
        bound = 1 / math.sqrt(fan_in)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        if init == "xavier":
            expected = math.sqrt(2 / (fan_in + fan_out))
            assert a.std().item() == pytest.approx(expected, rel=0.15), name
            assert a.abs().max() > bound  # a uniform within the bound could not do this
        else:
            assert a.abs().max() <= bound
            assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15), name


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("lora", [None, dict(rank=4, alpha=8, dropout=0.0,
                                             target_modules="all-linear")])
def test_gradient_checkpointing_gives_the_gradients_of_a_run_without_it(tiny_config, lora):
    """Two SGD steps (the update is the gradient itself) with and without recomputing
    activations: the same weights, so the same gradients, with and without LoRA."""
    config = tiny_config.evolve(
        model=dict(peft_config=lora),
        train=dict(total_steps=2, max_grad_norm=None),
        optimizer=dict(name="sgd", kwargs=dict(lr=0.5, weight_decay=0.0)))
    runs = {}
    for checkpointing in (False, True):
        trainer = train(samples=SAMPLES, config=config.evolve(
            model=dict(gradient_checkpointing=checkpointing)))
        model = trainer.accelerator.unwrap_model(trainer.model)
        assert any(getattr(m, "gradient_checkpointing", False)
                   for m in model.modules()) == checkpointing
        runs[checkpointing] = {k: v.clone() for k, v in model.state_dict().items()}
    base = load_file(f"{tiny_config.model.model_path}/model.safetensors")
    trained = [k for k, v in runs[False].items() if k.replace("base_model.model.", "") not in base
               or not torch.equal(v, base[k.replace("base_model.model.", "")])]
    assert trained  # the steps moved something
    for key, value in runs[False].items():
        torch.testing.assert_close(runs[True][key], value, atol=1e-6, rtol=1e-5)
