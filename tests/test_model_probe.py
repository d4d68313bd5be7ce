"""The load-time check (`trainer_lib.model.probe`): a head nobody listed and packed rows that leak
are found on the model's own forward and trained exactly anyway; a mixture-of-experts model's
load-balancing loss is added as transformers adds it, the same on any split into micro-batches."""

import pytest
import torch
import torch.nn.functional as F
from test_architectures import PAIRS, build_folder, examples, own_completion_logps, quick_machine
from test_architectures import tokenizer as tokenizer  # noqa: F401 - the module's fixture
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers import LlamaForCausalLM

from trainer_lib import Mixture, default_config, train
from trainer_lib.methods.sft.trainer import SFTTrainer
from trainer_lib.model.probe import POSITION_IDS, check_model, packing_from_config
from trainer_lib.ops.head import Head

assert quick_machine  # one thread, no fsync: shared with the architectures module


class ScaledLogitsConfig(LlamaConfig):
    model_type = "scaled_logits_llama"


class ScaledLogitsLlama(LlamaForCausalLM):
    """A Llama whose forward triples its logits after the head: a head no config names."""

    config_class = ScaledLogitsConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


class LeakyConfig(LlamaConfig):
    model_type = "leaky_llama"


def _running_mean(module, args, out):
    return out + out.cumsum(1) / torch.arange(1, out.shape[1] + 1, dtype=out.dtype)[:, None]


class LeakyLlama(LlamaForCausalLM):
    """A Llama that adds the running mean of all earlier embeddings to each one: a mixer that
    ignores position ids, so documents packed in one row see each other (padding on the right
    changes nothing)."""

    config_class = LeakyConfig

    def __init__(self, config):
        super().__init__(config)
        self.model.embed_tokens.register_forward_hook(_running_mean)


for _config, _model in ((ScaledLogitsConfig, ScaledLogitsLlama), (LeakyConfig, LeakyLlama)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)


def custom_folder(cls, tokenizer, folder) -> str:
    """The tiny Llama of the architectures test as `cls` (same weights), saved."""
    llama = build_folder("llama", tokenizer, folder / "llama")
    config = cls.config_class(**AutoConfig.from_pretrained(llama).to_dict())
    model = cls(config)
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(llama).state_dict())
    model.save_pretrained(folder / cls.__name__)
    tokenizer.save_pretrained(folder / cls.__name__)
    return str(folder / cls.__name__)


def sft_config(folder, tmp_path, **method):
    return default_config("sft").evolve(
        model=dict(model_path=folder),
        train=dict(seq_length=64, batch_size=len(PAIRS), total_steps=1, progress_bar=False,
                   max_grad_norm=None, checkpoint_dir=str(tmp_path / "ckpts"),
                   logging_dir=str(tmp_path / "logs"), eval_interval=1000),
        optimizer=dict(name="sgd", kwargs=dict(lr=0.5, weight_decay=0.0)),
        data=dict(num_proc=1), method=method)


SAMPLES = [{"prompt": p, "completion": c} for p, c in PAIRS]


def pytest_approx(value):
    return pytest.approx(value, rel=5e-6)


def mean_nll(model, exs) -> torch.Tensor:
    """Mean NLL of the loss-carrying tokens, each example alone, with gradients."""
    total, count = 0.0, 0
    for ids, loss in exs:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        keep = torch.tensor(loss[1:])
        total = total + F.cross_entropy(logits[keep], torch.tensor(ids[1:])[keep], reduction="sum")
        count += int(keep.sum())
    return total / count


def test_a_head_nobody_listed_trains_on_the_models_own_logits_exactly(tokenizer, tmp_path,
                                                                      capsys):
    folder = custom_folder(ScaledLogitsLlama, tokenizer, tmp_path)
    exs = examples(AutoTokenizer.from_pretrained(folder))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is ScaledLogitsLlama
    expected = mean_nll(model, exs)
    expected.backward()  # one plain SGD step of lr 0.5, the run's
    with torch.no_grad():
        stepped = {n: p - 0.5 * p.grad for n, p in model.named_parameters()}

    trainer = train(samples=SAMPLES, config=sft_config(folder, tmp_path))
    said = capsys.readouterr().out
    notes = [line for line in said.splitlines() if "own logits" in line]
    assert len(notes) == 1 and "ScaledLogitsLlama" in notes[0], said
    assert trainer.loss_path.head.own_logits and trainer.loss_path.packing == POSITION_IDS
    assert trainer.log_history[0]["loss"] == pytest_approx(expected.item())
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for name, value in stepped.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_whose_packed_rows_leak_trains_padded_exactly(tokenizer, tmp_path, capsys):
    folder = custom_folder(LeakyLlama, tokenizer, tmp_path)
    exs = examples(AutoTokenizer.from_pretrained(folder))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = float(mean_nll(model, exs))

    trainer = SFTTrainer(sft_config(folder, tmp_path, packing=True), samples=SAMPLES)
    said = capsys.readouterr().out
    notes = [line for line in said.splitlines() if "padded, length-grouped batches" in line]
    assert len(notes) == 1 and "LeakyLlama" in notes[0], said
    assert trainer.loss_path.packing is None
    batch = next(iter(trainer.train_loader))
    assert "attention_mask" in batch and "position_ids" not in batch
    trainer.train()
    assert trainer.log_history[0]["loss"] == pytest_approx(expected)

    # a mixture's epochs, packed epoch by epoch, fall back to its epochs' examples
    mixture = Mixture({"a": (SAMPLES[:3], 1), "b": (SAMPLES[3:], 1)})
    trainer = train(samples=mixture, config=sft_config(folder, tmp_path, packing=True))
    assert "LeakyLlama" in capsys.readouterr().out and trainer.loss_path.packing is None
    assert trainer.epoch_ranges.sizes() == [len(SAMPLES)]  # examples, not packed rows
    assert trainer.log_history[0]["loss"] == pytest_approx(expected)

    # KTO packs its examples and KL rows too: the same check, the same fallback
    labels = [i % 2 == 0 for i in range(len(PAIRS))]
    kto = sft_config(folder, tmp_path).evolve(method=dict(name="kto"))
    trainer = train(samples=[dict(s, label=l) for s, l in zip(SAMPLES, labels)], config=kto)
    assert "LeakyLlama" in capsys.readouterr().out and trainer.loss_path.packing is None
    logps = own_completion_logps(model, exs)
    chosen = [x for x, l in zip(logps, labels) if l]
    rejected = [x for x, l in zip(logps, labels) if not l]
    assert trainer.log_history[0]["logps/chosen"] == pytest_approx(sum(chosen) / len(chosen))
    assert trainer.log_history[0]["logps/rejected"] == pytest_approx(
        sum(rejected) / len(rejected))


def test_a_llama_passes_the_check_silently_and_keeps_its_path(tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(build_folder("llama", tokenizer, tmp_path))
    path = check_model(model, tokenizer.pad_token_id, packing=True)
    assert path.notes == [] and path.checked
    assert path.head == Head() and path.packing == POSITION_IDS and not path.router.coef
    assert model.config._attn_implementation == "sdpa" and not model.training


def test_a_model_sharded_as_it_loads_is_decided_from_its_config(tokenizer, tmp_path):
    """Under ZeRO-3 with zero3_init no forward pass can run at load: the head comes from the
    config, packing from its layer kinds, and the run says it was not checked."""
    for model_type, packs in (("cohere", True), ("mamba", False)):
        model = AutoModelForCausalLM.from_pretrained(
            build_folder(model_type, tokenizer, tmp_path / model_type))
        for p in model.parameters():
            p.ds_id = 0  # what a ZeRO-3 partitioned parameter carries

        def no_forward(*args, **kwargs):
            raise AssertionError("a forward pass ran on a sharded model")

        model.forward = no_forward
        path = check_model(model, tokenizer.pad_token_id, packing=True)
        assert not path.checked and len(path.notes) == 1 and "cannot run" in path.notes[0]
        assert (path.packing == POSITION_IDS) == packs
        assert path.head == Head.of(model.config)
    assert Head.of(AutoConfig.for_model("cohere", logit_scale=0.5)).scale == 0.5
    assert Head.of(AutoConfig.for_model("granite", logits_scaling=4.0)).scale == 0.25
    assert Head.of(AutoConfig.for_model("minicpm3")).scale is None  # scales the head's input
    assert not packing_from_config(AutoConfig.for_model("lfm2"))
    assert not packing_from_config(AutoConfig.for_model("bloom"))
    assert packing_from_config(AutoConfig.for_model("gemma3_text"))


class Recording(SFTTrainer):
    """Keeps the micro-batches it trains on."""

    def collate(self, items):
        batch = super().collate(items)
        self.__dict__.setdefault("seen", []).append(batch)
        return batch


def test_the_load_balancing_loss_is_the_token_weighted_mean_over_micro_batches(
        tokenizer, tmp_path):
    folder = build_folder("mixtral", tokenizer, tmp_path / "mixtral")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    coef = model.router_aux_loss_coef
    base = sft_config(folder, tmp_path, packing=False, group_by_length=False).evolve(
        train=dict(batch_size=2, gradient_accumulation_steps=3))
    results = {}
    for setting in (None, 0.5, 0.0):
        trainer = Recording(base.evolve(method=dict(router_aux_loss_coef=setting)),
                            samples=SAMPLES)
        trainer.train()
        results[setting] = (trainer.log_history[0], trainer.seen[:3])
    first, micro = results[None]
    auxes, weights, nll, tokens = [], [], 0.0, 0
    with torch.no_grad():
        for batch in micro:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], output_router_logits=True)
            n = batch["num_loss_tokens"]
            auxes.append(float(out.aux_loss))
            weights.append(n)
            nll += float(out.loss - coef * out.aux_loss) * n
            tokens += n
    aux = sum(a * w for a, w in zip(auxes, weights)) / sum(weights)
    assert len(set(auxes)) == 3  # three different micro-batches, three different figures
    assert first["aux_loss"] == pytest_approx(aux)
    assert first["loss"] == pytest_approx(nll / tokens + coef * aux)
    assert results[0.5][0]["loss"] == pytest_approx(nll / tokens + 0.5 * aux)
    assert results[0.0][0]["loss"] == pytest_approx(nll / tokens)
    assert "aux_loss" not in results[0.0][0]
