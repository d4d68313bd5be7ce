"""Pre-tokenised samples are trained on exactly as given: the stored examples are the ids with the
loss where the sample's mask says, and the first step's loss is the one plain torch computes on
the model's logits for those tokens; KTO's ids train, and their KL pairs join ids as text pairs
join texts. Bad ids and masks are refused in test_bad_input.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from trainer_lib import default_kto_config, train
from trainer_lib.data.chat_template import RunTemplate
from trainer_lib.data.pipeline import build_data
from trainer_lib.methods.kto.loss import mismatched_pairing
from trainer_lib.methods.sft.recipe import SFTRecipe
from trainer_lib.methods.sft.trainer import SFTTrainer

VOCAB = 512  # the tiny model's


def token_samples(form: str, n: int = 6, seed: int = 0) -> tuple[list[dict], list[set]]:
    """Samples of one mask form and, for each, the positions that must carry loss."""
    rng = np.random.default_rng(seed)
    samples, loss_at = [], []
    for i in range(n):
        length = int(rng.integers(6, 20))
        ids = rng.integers(0, VOCAB, length).tolist()
        mask = [1] * length
        if form == "completion_mask":  # a prompt, then the completion
            cut = int(rng.integers(1, length - 1))
            mask = [0] * cut + [1] * (length - cut)
        elif form in ("assistant_masks", "labels"):  # turns: loss here and there
            mask = [int(b) for b in rng.integers(0, 2, length)]
            mask[-1] = 1
        sample = {"input_ids": ids}
        if form == "labels":
            sample["labels"] = [t if m else -100 for t, m in zip(ids, mask)]
        elif form != "input_ids":
            sample[form] = mask
        samples.append(sample)
        # the first token is never a target: nothing comes before it
        loss_at.append({t for t in range(1, length) if mask[t]})
    return samples, loss_at


def plain_loss(model, samples, loss_at) -> float:
    """Mean next-token loss over the marked tokens, with the model's own logits."""
    total, count = 0.0, 0
    for sample, positions in zip(samples, loss_at):
        ids = torch.tensor([sample["input_ids"]])
        with torch.no_grad():
            logp = F.log_softmax(model(ids).logits[0].double(), dim=-1)
        for t in positions:
            total -= logp[t - 1, sample["input_ids"][t]].item()
            count += 1
    return total / count


def stored_examples(items) -> list[dict]:
    flat = []
    for item in items:
        flat.extend(item if isinstance(item, list) else [item])
    return sorted(flat, key=lambda ex: ex["sample"])


@pytest.mark.parametrize("form,packing", [
    ("input_ids", True), ("completion_mask", True), ("assistant_masks", True), ("labels", True),
    ("labels", False),
])
def test_the_loss_is_plain_torchs_on_the_given_tokens(form, packing, tiny_config):
    samples, loss_at = token_samples(form)
    config = tiny_config.evolve(train=dict(total_steps=1, batch_size=8),
                                method=dict(packing=packing))
    trainer = SFTTrainer(config, samples=samples)

    # stored token for token as given (nothing added), loss where the mask says
    examples = stored_examples(trainer.train_items)
    assert len(examples) == len(samples)
    for sample, positions, ex in zip(samples, loss_at, examples):
        assert ex["input_ids"] == sample["input_ids"]
        carries = {t for t, label in enumerate(ex["labels"]) if label != -100 and t > 0}
        assert carries == positions
    assert trainer.data_report.kinds == {"pretokenised": len(samples)}
    assert trainer.data_report.num_loss_tokens == sum(map(len, loss_at))

    model = AutoModelForCausalLM.from_pretrained(config.model.model_path)
    trainer.train()
    assert trainer.log_history[0]["loss"] == pytest.approx(plain_loss(model, samples, loss_at),
                                                           rel=1e-5)


def test_masks_given_together_keep_the_loss_where_all_of_them_do(tiny_config):
    sample = {"input_ids": [5, 6, 7, 8, 9, 10], "completion_mask": [0, 0, 1, 1, 1, 1],
              "assistant_masks": [True, True, True, True, False, True],  # true/false work too
              "labels": [5, 6, 7, -100, 9, 10]}
    data = build_data(None, tiny_config, recipe(tiny_config), [sample])
    assert list(data.train)[0]["labels"] == [-100, -100, 7, -100, -100, 10]


def recipe(config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.model_path)
    return SFTRecipe(tokenizer, RunTemplate(tokenizer, "default"), config.method,
                     config.train.seq_length)


def test_truncation_split_the_cache_and_the_report_work_as_for_any_sample(tiny_config,
                                                                          data_cache):
    config = tiny_config.evolve(train=dict(seq_length=8))
    long_ids = list(range(100, 120))
    masked = [{"input_ids": long_ids, "completion_mask": [0] * 4 + [1] * 16},
              {"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}]
    data = build_data(None, config, recipe(config), masked)
    # cut at the end, like a conversation, keeping its mask
    assert [ex["input_ids"] for ex in data.train] == [long_ids[:8], [1, 2, 3]]
    assert list(data.train)[0]["labels"] == [-100] * 4 + long_ids[4:8]
    assert data.report.truncated == 1

    # ids without a mask are text: method.overlong="split" cuts them into pieces
    split = config.evolve(method=dict(overlong="split"))
    data = build_data(None, split, recipe(split), [{"input_ids": long_ids}])
    assert [ex["input_ids"] for ex in data.train] == [long_ids[i:i + 8] for i in (0, 8, 16)]
    assert data.report.split == 1 and data.report.num_examples == 3

    # prepared once: the same samples again are read from the cache
    entries = sorted(p.name for p in data_cache.iterdir() if (p / "done.json").exists())
    build_data(None, split, recipe(split), [{"input_ids": long_ids}])
    assert sorted(p.name for p in data_cache.iterdir()
                  if (p / "done.json").exists()) == entries


def test_examples_tokenised_once_train_again_as_they_are(tiny_config):
    """Documents tokenised once for many runs: the examples of text samples, given back as
    ids and labels, are the same examples."""
    pairs = [{"prompt": f"word{i} ", "completion": f"token{i} word{i + 1}"} for i in range(6)]
    first = list(build_data(None, tiny_config, recipe(tiny_config), pairs).train)
    again = build_data(None, tiny_config, recipe(tiny_config),
                       [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in first])
    assert [(ex["input_ids"], ex["labels"]) for ex in again.train] == \
        [(ex["input_ids"], ex["labels"]) for ex in first]


def test_a_dataset_of_ids_as_trl_leaves_it_gives_the_examples_of_the_list(tiny_config):
    import datasets

    samples, _ = token_samples("completion_mask")
    rows = [{**s, "attention_mask": [1] * len(s["input_ids"])} for s in samples]
    from_list = list(build_data(None, tiny_config, recipe(tiny_config), samples).train)
    from_dataset = build_data(None, tiny_config, recipe(tiny_config),
                              datasets.Dataset.from_list(rows)).train
    assert [(e["input_ids"], e["labels"]) for e in from_dataset] == \
        [(e["input_ids"], e["labels"]) for e in from_list]


def test_a_sample_of_ids_wins_over_its_text_and_its_all_ones_attention_mask_is_accepted(
        tiny_config):
    sample = {"text": "ignored", "input_ids": [7, 8, 9], "attention_mask": [1, 1, 1]}
    data = build_data(None, tiny_config, recipe(tiny_config), [sample])
    assert list(data.train)[0]["input_ids"] == [7, 8, 9]


def test_a_pre_tokenised_kto_run_trains_and_pairs_ids_for_the_kl_term(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(1)
    samples = [{"prompt_input_ids": rng.integers(0, VOCAB, 4 + i % 3).tolist(),
                "completion_input_ids": rng.integers(0, VOCAB, 2 + i % 4).tolist(),
                "label": i % 2 == 0} for i in range(12)]
    config = default_kto_config().evolve(
        model=dict(model_path=tiny_model_dir),
        train=dict(seq_length=16, batch_size=4, total_steps=3, log_interval=1,
                   progress_bar=False, checkpoint_dir=str(tmp_path / "ckpts")))
    trainer = train(samples=samples, config=config)
    losses = [h["loss"] for h in trainer.log_history if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert trainer.data_report.num_examples == 12

    # each example is prompt + completion as given, loss on the completion; its KL row is its
    # prompt with the completion of the next example of its micro-batch
    by_sample = {i: s for i, s in enumerate(samples)}
    for group in trainer.train_items:
        for i, j in enumerate(mismatched_pairing(len(group))):
            mine, partner = by_sample[group[i]["sample"]], by_sample[group[j]["sample"]]
            prompt, completion = mine["prompt_input_ids"], mine["completion_input_ids"]
            assert group[i]["input_ids"] == prompt + completion
            assert group[i]["labels"] == [-100] * len(prompt) + completion
            assert group[i]["label"] == mine["label"]
            assert group[i]["kl"]["input_ids"] == prompt + partner["completion_input_ids"]


def test_kto_pairs_of_text_and_ids_join_the_prompts_tokens_to_the_completions(tiny_config):
    """In a mixture, a micro-batch may hold a text example and a pre-tokenised one: the KL row
    joins the tokens of one's prompt to the tokens of the other's completion."""
    from transformers import AutoTokenizer

    from trainer_lib.methods.kto.recipe import KTORecipe

    tokenizer = AutoTokenizer.from_pretrained(tiny_config.model.model_path)
    config = default_kto_config().evolve(train=dict(seq_length=64, progress_bar=False))
    kto = KTORecipe(tokenizer, RunTemplate(tokenizer, "default"), config.method, 64)
    text = {"prompt": "word1 ", "completion": "token1", "tools": None}
    ids = {"prompt": [3, 4, 5], "completion": [6, 7], "tools": None, "tokens": True}
    text_example = kto.tokenize([text], [0])[0]
    cut = next(i for i, label in enumerate(text_example["labels"]) if label != -100)
    records = kto.kl_records([text, ids], [ids, text])
    assert records[0] == {"prompt": text_example["input_ids"][:cut], "completion": [6, 7],
                          "tokens": True}
    assert records[1] == {"prompt": [3, 4, 5], "completion": text_example["input_ids"][cut:],
                          "tokens": True}
    # both sides text: a text pair, tokenised as one text like the examples
    assert kto.kl_records([text], [text])[0] == {**text, "tokens": False}
