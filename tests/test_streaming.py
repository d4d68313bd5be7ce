"""Training from a stream: read as it trains (a bounded buffer, never the whole), the same
examples as a prepared dataset, repeated until total_steps, and resumed exactly."""

import datasets
import pytest
import torch

from trainer_lib import DataError, train
from trainer_lib.data.chat_template import RunTemplate
from trainer_lib.data.pipeline import build_data
from trainer_lib.data.streaming import CHECKED, StreamItems
from trainer_lib.methods.sft.recipe import SFTRecipe
from trainer_lib.methods.sft.trainer import SFTTrainer


def numbered(n):
    return [{"prompt": f"word{i % 200} word{(7 * i) % 200}\n", "completion": f"token{i % 200}"}
            for i in range(n)]


class CountingStream:
    """A generator-backed IterableDataset that counts the samples read from it."""

    def __init__(self, samples):
        self.samples, self.read = samples, 0

    def dataset(self):
        def generate():
            for sample in self.samples:
                self.read += 1
                yield sample

        return datasets.IterableDataset.from_generator(generate)


def test_a_stream_trains_on_the_same_examples_reading_only_what_it_needs(tiny_config):
    samples = numbered(5000)
    source = CountingStream(samples)
    config = tiny_config.evolve(train=dict(total_steps=3, batch_size=2),
                                method=dict(packing=True), data=dict(stream_buffer=16))
    trainer = train(samples=source.dataset(), config=config)
    assert len(trainer.log_history) == 3 and all(h["loss"] > 0 for h in trainer.log_history)
    # the up-front check, then a few buffers: nothing like the whole stream
    assert source.read <= CHECKED + 4 * 16 + 64 < len(samples)
    # what the stream gives is what the prepared dataset gives, example for example
    recipe = SFTRecipe(trainer.tokenizer, RunTemplate(trainer.tokenizer, "default"),
                       config.method, config.train.seq_length)
    streamed = StreamItems(CountingStream(samples[:300]).dataset(), "records", recipe,
                           packing=False, seed=0, buffer_size=16)
    prepared = build_data(None, config, recipe, samples[:300])
    assert list(streamed.examples(0)) == list(prepared.train)


def test_a_stream_is_read_again_until_total_steps(tiny_config, tmp_path):
    path = tmp_path / "six.jsonl"
    path.write_text("".join(f'{{"text": "word{i} token{i} word{i + 1}"}}\n' for i in range(6)))
    config = tiny_config.evolve(train=dict(total_steps=5, batch_size=2),
                                data=dict(streaming=True))
    trainer = train(samples=str(path), config=config)  # a path, streamed by the setting
    assert [(h["step"], h["epoch"]) for h in trainer.log_history] == [
        (1, 0), (2, 0), (3, 0), (4, 1), (5, 1)]
    assert trainer.log_history[2]["num_tokens"] == trainer.data_report.num_tokens  # one pass


def _weights(trainer):
    return {k: v.clone() for k, v in
            trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_a_resumed_stream_ends_with_the_weights_of_an_uninterrupted_run(tiny_config, tmp_path):
    """As the README says: the stream is read again from the start of the checkpointed epoch and
    the batches already trained on are skipped, so the same batches follow."""
    samples = numbered(40)
    config = tiny_config.evolve(train=dict(total_steps=6, batch_size=2, checkpoint_interval=2,
                                           gradient_accumulation_steps=2),
                                method=dict(packing=True), data=dict(stream_buffer=8))
    stream = datasets.Dataset.from_list(samples).to_iterable_dataset(num_shards=2)
    whole = _weights(train(samples=stream, config=config.evolve(
        train=dict(checkpoint_dir=str(tmp_path / "whole")))))

    class Crash(SFTTrainer):
        def training_step(self, micro):
            if self.step == 3:
                raise KeyboardInterrupt  # after step 2's checkpoint, inside the epoch
            return super().training_step(micro)

    crashed = config.evolve(train=dict(checkpoint_dir=str(tmp_path / "crash")))
    with pytest.raises(KeyboardInterrupt):
        Crash(crashed, samples=stream).train()
    resumed = train(samples=stream, config=crashed.evolve(
        train=dict(resume_from_checkpoint="latest")))
    assert resumed.step == 6
    got = _weights(resumed)
    assert all(torch.equal(whole[k], got[k]) for k in whole)


def test_what_a_stream_cannot_do_is_said_before_the_model_loads(tiny_config, tmp_path):
    stream = datasets.Dataset.from_list(numbered(10)).to_iterable_dataset()
    with pytest.raises(DataError, match="KTO cannot train from a stream"):
        train(samples=stream, config=tiny_config.evolve(method=dict(name="kto")))
    with pytest.raises(DataError, match="train.eval_split .* pass eval_samples"):
        train(samples=stream, config=tiny_config.evolve(train=dict(eval_split=0.1)))
    bad = numbered(10)
    bad[4] = {"prompt": "p\n", "completion": ""}
    with pytest.raises(DataError, match=r"^sample 4: field 'completion' is empty"):
        train(samples=datasets.Dataset.from_list(bad).to_iterable_dataset(), config=tiny_config)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a b"}\n{"text": "b c"}\n{"text": "c \xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not UTF-8"):
        train(samples=str(path), config=tiny_config.evolve(data=dict(streaming=True)))


def test_a_bad_sample_met_while_training_names_the_process_that_read_it(tiny_config):
    # past the samples checked up front, in the share of process 1 of 2: only it meets the
    # error, which says so (the command line then prints it from that process)
    samples = numbered(CHECKED + 40)
    samples[CHECKED + 11] = {"prompt": "p\n", "completion": ""}
    stream = datasets.Dataset.from_list(samples).to_iterable_dataset()
    tokenizer = train(samples=numbered(8), config=tiny_config.evolve(
        train=dict(total_steps=1))).tokenizer
    recipe = SFTRecipe(tokenizer, RunTemplate(tokenizer, "default"), tiny_config.method,
                       tiny_config.train.seq_length)
    shares = [StreamItems(stream, "records", recipe, packing=False, seed=0, buffer_size=8,
                          rank=rank, world=2) for rank in (0, 1)]
    assert len(list(shares[0].examples(0))) == (CHECKED + 40) // 2
    with pytest.raises(DataError, match=rf"^sample {CHECKED + 11}: field 'completion' is empty") \
            as raised:
        list(shares[1].examples(0))
    assert raised.value.process == 1
