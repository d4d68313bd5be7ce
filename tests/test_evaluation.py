"""Generation-based evaluation: prompts, metric_fn, stop sequences, averaging, failures."""

from pathlib import Path

import pytest

from trainer_lib import train
from trainer_lib.checkpointing.layout import list_checkpoints
from trainer_lib.errors import MetricFnError
from trainer_lib.training.evaluation import cut_at_stop, normalize_eval_prompts, score

SAMPLES = [{"prompt": f"word{i} ", "completion": f"token{i}"} for i in range(16)]


def test_cut_at_stop_uses_the_earliest_stop_sequence():
    assert cut_at_stop("abc\nUser: x ### y", ["###", "\nUser:"]) == "abc"
    assert cut_at_stop("abc", ["###"]) == "abc"
    assert cut_at_stop("abc", []) == "abc"


def test_score_averages_lists_and_checks_shapes():
    means, per_sample = score(lambda s, p, o: {"a": [1.0, 0.0], "b": 0.5}, ["x", "y"], ["", ""],
                              ["x", "y"], {})
    assert means == {"metrics/a": 0.5, "metrics/b": 0.5} and per_sample == {"a": [1.0, 0.0]}

    def too_short(samples, prompts, outputs):
        return {"acc": [1.0]}

    with pytest.raises(MetricFnError, match=r"'too_short'.*'acc'.*list of 2 floats"):
        score(too_short, ["x", "y"], ["", ""], ["x", "y"], {})
    with pytest.raises(MetricFnError, match="must return a dict"):
        score(lambda s, p, o: 1.0, ["x"], [""], ["x"], {})


def test_metric_fn_gets_samples_prompts_outputs_and_metadata(tiny_config):
    seen = {}

    def metric_fn(samples, prompts, outputs, answer, topic):
        seen.update(samples=samples, prompts=prompts, outputs=outputs, answer=answer, topic=topic)
        return {"right": [float(a in o) for o, a in zip(outputs, answer)],
                "n": float(len(outputs)), "per": [1.0, 0.0, 0.5]}

    eval_prompts = [{"prompt": "word1 ", "answer": "token1", "topic": "t1"},
                    {"prompt": "word22 word3", "answer": "token3", "topic": "t2"},
                    {"prompt": "word5", "answer": "token5", "topic": "t3"}]
    config = tiny_config.evolve(train=dict(total_steps=4, eval_interval=2, eval_batch_size=2),
                                method=dict(gen_kwargs=dict(max_new_tokens=6, do_sample=False),
                                            stop_sequences=["o"]))
    trainer = train(samples=SAMPLES, eval_prompts=eval_prompts, metric_fn=metric_fn,
                    config=config)
    assert seen["prompts"] == ["word1 ", "word22 word3", "word5"]  # original order kept
    assert seen["answer"] == ["token1", "token3", "token5"] and seen["topic"] == ["t1", "t2", "t3"]
    assert seen["samples"] == [p + o for p, o in zip(seen["prompts"], seen["outputs"])]
    assert all("o" not in out for out in seen["outputs"])  # cut at the stop sequence
    evals = [e for e in trainer.log_history if "metrics/per" in e]
    assert [e["step"] for e in evals] == [2, 4]
    assert evals[-1]["metrics/per"] == pytest.approx(0.5)
    assert "metrics/right" in evals[-1] and "metrics/n" in evals[-1]


def test_outputs_do_not_depend_on_batching(tiny_config):
    """Left padding and length grouping: each prompt's greedy output is the same alone or
    batched with longer and shorter prompts."""
    prompts = ["word1", "word2 word3 word4 word5", "word7 word8", "token9"]
    got = {}

    def metric_fn(samples, prompts, outputs):
        got.setdefault("runs", []).append(outputs)
        return {}

    for bs in (1, 4):
        config = tiny_config.evolve(train=dict(total_steps=1, eval_batch_size=bs),
                                    optimizer=dict(kwargs=dict(lr=0.0)),
                                    method=dict(gen_kwargs=dict(max_new_tokens=5)))
        train(samples=SAMPLES, eval_prompts=prompts, metric_fn=metric_fn, config=config)
    alone, batched = got["runs"]
    assert alone == batched


def test_default_eval_prompts_are_the_first_training_prompts(tiny_config):
    seen = {}

    def metric_fn(samples, prompts, outputs):
        seen["prompts"] = prompts
        return {"len": [float(len(o)) for o in outputs]}

    config = tiny_config.evolve(train=dict(total_steps=1),
                                method=dict(gen_kwargs=dict(max_new_tokens=3), packing=False))
    train(samples=SAMPLES, metric_fn=metric_fn, config=config)
    assert seen["prompts"] and set(seen["prompts"]) <= {s["prompt"].strip() for s in SAMPLES} | {
        s["prompt"] for s in SAMPLES}


def test_a_failing_metric_fn_stops_the_run_after_a_checkpoint(tiny_config):
    def broken_metric(samples, prompts, outputs):
        raise KeyError("reward")

    config = tiny_config.evolve(train=dict(total_steps=6, eval_interval=3),
                                method=dict(gen_kwargs=dict(max_new_tokens=2)))
    with pytest.raises(MetricFnError, match=r"metric_fn '.*broken_metric' raised KeyError.*step 3"):
        train(samples=SAMPLES, eval_prompts=["word1"], metric_fn=broken_metric, config=config)
    ckpts = list_checkpoints(Path(config.train.checkpoint_dir))
    assert [p.name for p in ckpts] == ["step_3"]


def test_message_list_prompts_are_rendered_with_the_chat_template(tiny_config):
    seen = {}

    def metric_fn(samples, prompts, outputs):
        seen["prompts"] = prompts
        return {"len": [float(len(o)) for o in outputs]}

    eval_prompts = [[{"role": "user", "content": "word1 word2"}],
                    {"prompt": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "word3"}]}]
    config = tiny_config.evolve(train=dict(total_steps=1),
                                method=dict(gen_kwargs=dict(max_new_tokens=3)))
    train(samples=SAMPLES, eval_prompts=eval_prompts, metric_fn=metric_fn, config=config)
    # the embedded tokenizer's ChatML template, ending with the generation prompt
    assert seen["prompts"] == [
        "<|im_start|>user\nword1 word2<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nword3<|im_end|>\n"
        "<|im_start|>assistant\n",
    ]


def test_metadata_stays_aligned_when_plain_and_dict_prompts_are_mixed():
    from trainer_lib.model.embedded import build_tokenizer

    tokenizer = build_tokenizer(["word1 word2 token1 token2"], vocab_size=300)
    prompts, metadata = normalize_eval_prompts(
        ["word1 ", {"prompt": "word2 ", "answer": "token2"},
         [{"role": "user", "content": "word1"}]], tokenizer, tokenizer.chat_template)
    assert [p["text"] for p in prompts][:2] == ["word1 ", "word2 "]
    assert metadata == {"answer": [None, "token2", None]}  # one value per prompt, in order
