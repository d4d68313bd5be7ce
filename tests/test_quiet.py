"""The dependencies' known-harmless messages are silenced, and only those: a run's output lacks
them, while other warnings from the same places still show."""

import logging
import warnings
from pathlib import Path

import torch

from trainer_lib import default_sft_config, train
from trainer_lib.runtime.quiet import _DropMessages

DEEPSPEED_CPU = "Setting accelerator to CPU. If you have GPU or other accelerator"
NOISE = ("Removed shared tensor", "Token indices sequence length is longer",
         "is_gradient_checkpointing", "Writing model shards", "Loading weights",
         "torch.distributed.all_gather_into_tensor", DEEPSPEED_CPU)


def _tied_tiny_llama(folder: Path) -> str:
    """A tiny Llama whose output head is tied to its embeddings, with a 24-token tokenizer
    limit, so saving and tokenising meet the messages silenced."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer_lib.model.embedded import build_tokenizer, load_default_samples

    texts = [v for row in load_default_samples() for v in row.values()]
    tok = build_tokenizer(texts, vocab_size=300)
    tok.model_max_length = 24
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).model_max_length == 24
    return str(folder)


def test_a_run_prints_none_of_the_known_noise(tmp_path, capfd, caplog):
    model = _tied_tiny_llama(tmp_path / "tied")
    capfd.readouterr()  # building the model above is not part of the run
    config = default_sft_config().evolve(
        model=dict(model_path=model, gradient_checkpointing=True,
                   peft_config=dict(r=2, target_modules=["q_proj"])),
        train=dict(seq_length=24, batch_size=2, total_steps=2, checkpoint_interval=1,
                   progress_bar=False, checkpoint_dir=str(tmp_path / "ckpts")),
        method=dict(packing=False))
    long_text = " ".join(f"word{i}" for i in range(60))  # far over the tokenizer's 24
    with warnings.catch_warnings(record=True) as caught:
        trainer = train(samples=[long_text, "short one", long_text, "and two"], config=config)
        trainer.save_pretrained(str(tmp_path / "merged"), merge_adapters=True)
        warnings.warn("an unrelated FutureWarning", FutureWarning)
    out, err = capfd.readouterr()
    assert trainer.data_report.truncated == 2  # the long texts were cut, not refused
    printed = out + err + caplog.text + "".join(str(w.message) for w in caught)
    assert [n for n in NOISE if n in printed] == []
    # the same kinds of message, about anything else, still show
    assert [str(w.message) for w in caught] == ["an unrelated FutureWarning"]
    logging.getLogger("accelerate.utils.other").warning(
        "Removed shared tensor {'model.layers.0.mlp.weight'} while saving")  # not the head
    assert "Removed shared tensor {'model.layers.0.mlp.weight'}" in caplog.text


def test_deepspeeds_cpu_notice_is_silenced_and_its_other_warnings_are_not(monkeypatch):
    """DeepSpeed prints its notice when accelerate imports it, in every run on a CPU machine:
    with trainer_lib imported it is gone, and DeepSpeed's logger still says everything else."""
    import io

    from deepspeed.accelerator import real_accelerator
    from deepspeed.utils import logger

    seen = io.StringIO()  # what the logger passes on to its handlers (stdout, for DeepSpeed)
    handler = logging.StreamHandler(seen)
    logger.addHandler(handler)

    def detect() -> str:  # DeepSpeed's detection, as at its first use in a process
        seen.seek(0)
        seen.truncate()
        monkeypatch.setattr(real_accelerator, "ds_accelerator", None)
        real_accelerator.get_accelerator()
        logger.warning("another DeepSpeed warning")
        return seen.getvalue()

    try:
        quiet = detect()
        assert DEEPSPEED_CPU not in quiet and "another DeepSpeed warning" in quiet
        if not torch.cuda.is_available():  # where DeepSpeed finds a GPU it has nothing to say
            monkeypatch.setattr(logger, "filters", [f for f in logger.filters
                                                    if not isinstance(f, _DropMessages)])
            assert DEEPSPEED_CPU in detect()  # the notice is real; the filter is what hides it
    finally:
        logger.removeHandler(handler)
