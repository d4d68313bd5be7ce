"""Labels and masks of text and prompt/completion samples, checked against an independent
tokenisation, and the loss checked against plain torch on the same logits."""

import pytest
import torch
import torch.nn.functional as F
from plain import normalize_sft_samples
from transformers import AutoTokenizer

from trainer_lib import DataError, train
from trainer_lib.data.tokenize import fit_to_length, tokenize_pair, tokenize_text
from trainer_lib.methods.sft.samples import alpaca_prompt
from trainer_lib.methods.sft.trainer import SFTTrainer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_text_sample_has_loss_on_every_token_and_ends_with_eos(tok):
    ex = tokenize_text(tok, "The capital of France is Paris.")
    expected = [tok.bos_token_id] + tok("The capital of France is Paris.",
                                        add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == expected
    assert ex["labels"] == expected


def test_pair_sample_has_loss_on_the_completion_only(tok):
    prompt, completion = "What is the capital of Peru?\n", "The capital of Peru is Lima."
    ex = tokenize_pair(tok, prompt, completion)
    # independently: the prompt and the completion tokenised apart (the newline ends a
    # pre-token, so nothing merges across the seam), loss on the completion and the EOS
    p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == p + c
    assert ex["labels"] == [-100] * len(p) + c


def test_alpaca_rows_become_pairs_with_the_alpaca_prompt():
    records = normalize_sft_samples([{"instruction": "Add.", "input": "1 and 2", "output": "3"}])
    assert records == [{"kind": "pair", "prompt": alpaca_prompt("Add.", "1 and 2"),
                        "completion": "3"}]
    assert "### Input:\n1 and 2" in records[0]["prompt"]


def test_remapped_keys(tok):
    records = normalize_sft_samples([{"q": "Hi\n", "a": "Hello"}], input_key="q", output_key="a")
    assert records[0] == {"kind": "pair", "prompt": "Hi\n", "completion": "Hello"}


def test_truncation_keeps_the_completion_and_drops_prompt_tokens_from_the_left(tok):
    prompt = " ".join(f"word{i}" for i in range(40)) + "\n"
    ex = tokenize_pair(tok, prompt, "The capital of Peru is Lima.")
    completion = [l for l in ex["labels"] if l != -100]
    (fitted,), what = fit_to_length(ex, 20, "pair", "truncate")
    assert what == "truncated" and len(fitted["input_ids"]) == 20
    assert fitted["input_ids"][0] == tok.bos_token_id
    assert [l for l in fitted["labels"] if l != -100] == completion
    assert fitted["input_ids"][-len(completion):] == completion
    # the prompt tokens kept are the ones just before the completion
    n_prompt = len(ex["input_ids"]) - len(completion)
    assert fitted["input_ids"][1:20 - len(completion)] == ex["input_ids"][
        n_prompt - (19 - len(completion)):n_prompt]
    assert fit_to_length(ex, 20, "pair", "drop") == ([], "dropped:too_long")


def test_text_split_policy_cuts_into_consecutive_pieces(tok):
    ex = tokenize_text(tok, " ".join(f"word{i}" for i in range(30)))
    pieces, what = fit_to_length(ex, 16, "text", "split")
    assert what == "split"
    assert sum((p["input_ids"] for p in pieces), []) == ex["input_ids"][:sum(
        len(p["input_ids"]) for p in pieces)]
    assert all(len(p["input_ids"]) <= 16 for p in pieces)


def test_the_run_reports_truncated_and_dropped_samples(tiny_config, capsys):
    long = " ".join(f"word{i}" for i in range(200))
    samples = [["short prompt\n", "answer"], [long + "\n", "answer"]] * 2
    cfg = tiny_config.evolve(train=dict(seq_length=32, total_steps=1))
    trainer = SFTTrainer(cfg, samples=samples)
    assert trainer.data_report.truncated == 2
    assert "2 truncated" in capsys.readouterr().out
    trainer = SFTTrainer(cfg.evolve(method=dict(overlong="drop")), samples=samples)
    assert trainer.data_report.dropped["too_long"] == 2
    assert len(trainer.train_items) == 2


def test_masked_tokens_carry_no_loss(tiny_config):
    samples = [["What is 1 + 1?\n", "2"], ["Name a colour.\n", "Blue is a colour."]]
    trainer = SFTTrainer(tiny_config, samples=samples)
    batch = trainer.collate(trainer.train_items)
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        loss_sum, _ = trainer.compute_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # plain torch on the same logits, counting by hand which positions carry loss
    total, count = 0.0, 0
    for row, ex in enumerate(trainer.train_items):
        for t in range(1, len(ex["labels"])):
            if ex["labels"][t] != -100:
                total += F.cross_entropy(logits[row, t - 1], torch.tensor(ex["labels"][t])).item()
                count += 1
    assert count == batch["num_loss_tokens"]
    assert loss_sum.item() == pytest.approx(total, rel=1e-5)
    # changing the tokens at positions without loss (the prompt) changes nothing about which
    # targets are scored: the prompt targets are -100 and padding is -100
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.mark.parametrize("samples, message", [
    ([], "samples is empty"),
    ([["a prompt\n", "an answer"], "plain text"], "sample 1 is a text sample but sample 0 is a pair"),
    ([{"prompt": 3, "completion": "x"}], "sample 0: field 'prompt' is a int"),
    ([{"prompt": "p", "completion": ""}], "sample 0: field 'completion' is empty"),
    ([{"prompt": "p"}], "sample 0: missing field 'completion'"),
    ([{"question": "p"}], "sample 0: cannot tell what it is"),
])
def test_bad_input_is_a_clear_error_before_training(tiny_config, samples, message):
    with pytest.raises(DataError, match=message):
        train(samples=samples, config=tiny_config)


def test_a_missing_model_path_is_a_clear_error(tiny_config):
    from trainer_lib import ConfigError

    with pytest.raises(ConfigError, match="model_path"):
        train(samples=["hello"], config=tiny_config.evolve(model=dict(model_path=None),
                                                           tokenizer=dict(tokenizer_path=None)))


def test_a_method_config_with_no_trainer_is_a_clear_error(tiny_config):
    from dataclasses import dataclass

    from trainer_lib.config import MethodConfig

    @dataclass
    class DPOConfig(MethodConfig):
        name: str = "dpo"

    with pytest.raises(ValueError, match="no trainer is registered for DPOConfig"):
        train(samples=["hello"], config=tiny_config.evolve(method=DPOConfig()))
