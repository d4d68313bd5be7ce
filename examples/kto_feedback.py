"""Align an SFT model with thumbs-up / thumbs-down feedback (KTO); measure it on held-out feedback.

    python examples/sft_alpaca.py && python examples/kto_feedback.py --sft_model outputs/sft_alpaca
    python examples/kto_feedback.py                  # offline: trains a quick SFT model first
    python examples/kto_feedback.py --feedback my.jsonl method.beta=0.2 train.total_steps=200

The feedback that ships with trainer_lib (trainer_lib/assets/feedback.jsonl, written by
examples/data/make_feedback.py) holds every instruction of the shipped instruction set twice: its
correct answer (label true) and a wrong one (label false). One prompt in five is held out; on those
the script prints, before and after KTO, how much more likely the model makes the correct answers
than the wrong ones, and that margin relative to the SFT model (the reference).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer_lib import ConfigError, DataError, default_kto_config, default_sft_config, train
from trainer_lib.data.tokenize import tokenize_pair
from trainer_lib.model.embedded import ASSETS, DEFAULT_DATA, tiny_model
from trainer_lib.runtime.hub import model_source

FEEDBACK = ASSETS / "feedback.jsonl"


def split_feedback(path):
    """Rows of one prompt stay together; every fifth prompt is held out."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    held = set(prompts[::5])
    return ([r for r in rows if r["prompt"] not in held], [r for r in rows if r["prompt"] in held])


@torch.no_grad()
def completion_logps(model, tokenizer, rows):
    """log p(completion | prompt) of each row, summed over the completion's tokens."""
    model.eval()
    out = []
    for row in rows:
        ex = tokenize_pair(tokenizer, row["prompt"], row["completion"])
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        logps = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
        target = labels[:, 1:]
        picked = logps.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append(float(picked[target != -100].sum()))
    return out


def margin(logps, rows):
    good = [lp for lp, r in zip(logps, rows) if r["label"]]
    bad = [lp for lp, r in zip(logps, rows) if not r["label"]]
    return sum(good) / len(good) - sum(bad) / len(bad)


def quick_sft(output, epochs):
    """The SFT step of examples/sft_alpaca.py, on the embedded tiny model, shortened."""
    print(f"no --sft_model: fine-tuning the embedded tiny Llama on {DEFAULT_DATA.name} "
          f"for {epochs} epochs first")
    config = default_sft_config().evolve(
        model=dict(model_path=tiny_model()),
        train=dict(seq_length=128, batch_size=16, epochs=epochs, total_steps=100_000,
                   log_interval=10_000, eval_interval=10_000, progress_bar=False,
                   checkpoint_dir=f"{output}_ckpts"),
        optimizer=dict(kwargs=dict(lr=3e-3, weight_decay=0.01)),
        scheduler=dict(name="cosine", kwargs=dict(warmup_steps=10)),
    )
    trainer = train(samples=str(DEFAULT_DATA), config=config)
    trainer.save_pretrained(output)
    return output


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft_model", default=None, help="an SFT model folder")
    parser.add_argument("--feedback", default=str(FEEDBACK), help="prompt/completion/label .jsonl")
    parser.add_argument("--output", default="outputs/kto_feedback")
    parser.add_argument("--sft_epochs", type=int, default=20, help="for the quick SFT step")
    parser.add_argument("--steps", type=int, default=40, help="KTO optimiser steps")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. method.beta=0.2")
    args = parser.parse_args()

    if args.sft_model:
        model_source(args.sft_model, "--sft_model")  # a missing folder or an unreachable hub
    sft_model = args.sft_model or quick_sft(f"{args.output}/sft", args.sft_epochs)
    train_rows, held_rows = split_feedback(args.feedback)
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    reference = completion_logps(AutoModelForCausalLM.from_pretrained(sft_model), tokenizer,
                                 held_rows)

    config = default_kto_config().evolve(
        model=dict(model_path=sft_model),
        train=dict(seq_length=128, batch_size=8, epochs=100, total_steps=args.steps,
                   log_interval=10, eval_interval=100_000, progress_bar=False,
                   checkpoint_dir=f"{args.output}/ckpts"),
        optimizer=dict(kwargs=dict(lr=1e-4)),
        scheduler=dict(name="constant"),
        method=dict(beta=0.1, desirable_weight="auto", ref_model="auto"),
    ).apply_overrides(args.overrides)
    trainer = train(samples=train_rows, config=config)
    trainer.save_pretrained(f"{args.output}/model")
    if not trainer.accelerator.is_main_process:
        return

    policy = completion_logps(trainer.accelerator.unwrap_model(trainer.model).cpu(), tokenizer,
                              held_rows)
    beta = config.method.beta
    rewards = [beta * (p - r) for p, r in zip(policy, reference)]
    last = trainer.log_history[-1]
    print(f"training: step {last['step']}, loss {last['loss']:.4f}, "
          f"rewards/margins {last.get('rewards/margins', float('nan')):.4f}, kl {last['kl']:.4f}")
    print(f"held-out feedback: {len(held_rows)} completions of {len(held_rows) // 2} prompts")
    print(f"log-prob margin, mean logp(desirable) - mean logp(undesirable): "
          f"before {margin(reference, held_rows):.3f}, after {margin(policy, held_rows):.3f}")
    print(f"reward margin vs the SFT reference, beta * (r(desirable) - r(undesirable)): "
          f"before 0.000, after {margin(rewards, held_rows):.4f}")
    print(f"saved to {args.output}/model")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:  # a setting or the data: one line, no traceback
        sys.exit(f"error: {e}")
