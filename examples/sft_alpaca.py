"""Fine-tune a causal LM on instruction data, save it, reload it and generate.

    python examples/sft_alpaca.py                       # offline: the embedded tiny model and data
    python examples/sft_alpaca.py --model_path HuggingFaceTB/SmolLM2-135M --data my.jsonl
    accelerate launch examples/sft_alpaca.py            # the same script, several processes
    python examples/sft_alpaca.py --config configs/sft_alpaca.yaml train.batch_size=8

With no --model_path, a tiny Llama is built deterministically on the spot from the instruction
set that ships with trainer_lib, and the output says so. A --model_path that does not exist, or a
hub id while the hub cannot be reached (and the model is not cached), is an error at once.
"""

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer_lib import Config, ConfigError, DataError, default_sft_config, train
from trainer_lib.methods.sft.samples import alpaca_prompt
from trainer_lib.model.embedded import DEFAULT_DATA, tiny_model
from trainer_lib.runtime.hub import model_source


def pick_model(model_path):
    """(path, embedded): the embedded tiny model only when no model is given; a given one is
    used as it is, and train() refuses one that does not exist or cannot be reached."""
    if model_path is None:
        path = tiny_model()
        print(f"model: the embedded tiny Llama (built at {path})")
        return path, True
    model_source(model_path, "--model_path")  # a missing folder or an unreachable hub: now
    print(f"model: {model_path}")
    return model_path, False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None,
                        help="a YAML config (e.g. configs/sft_alpaca.yaml) instead of the settings below")
    parser.add_argument("--model_path", default=None)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help=".json/.jsonl, Alpaca format")
    parser.add_argument("--output", default="outputs/sft_alpaca")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=4")
    args = parser.parse_args()

    recipe = Config.load_yaml(args.config, args.overrides) if args.config else None
    model_path, embedded = pick_model(args.model_path or (recipe and recipe.model.model_path))
    config = default_sft_config().evolve(
        model=dict(model_path=model_path),
        train=dict(seq_length=256, batch_size=4, epochs=args.epochs or (80 if embedded else 3),
                   total_steps=100_000, log_interval=20, eval_interval=10_000,
                   checkpoint_dir="outputs/sft_alpaca_ckpts"),
        optimizer=dict(kwargs=dict(lr=3e-3 if embedded else 2e-5, weight_decay=0.01)),
        scheduler=dict(name="cosine", kwargs=dict(warmup_steps=20)),
    ).apply_overrides(args.overrides)
    if recipe is not None:  # the YAML config replaces the settings above
        config = recipe.evolve(model=dict(model_path=model_path))
        if args.epochs:
            config = config.evolve(train=dict(epochs=args.epochs))

    trainer = train(samples=args.data, config=config)
    trainer.save_pretrained(args.output)
    if not trainer.accelerator.is_main_process:
        return
    first, last = trainer.log_history[0], trainer.log_history[-1]
    print(f"loss: {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
          f"{last['step']}; saved to {args.output}")

    # an ordinary Hugging Face folder: reload it with transformers alone and generate
    tokenizer = AutoTokenizer.from_pretrained(args.output)
    model = AutoModelForCausalLM.from_pretrained(args.output)
    for instruction, extra in [("What is the capital of France?", ""),
                               ("Give the opposite of the word.", "hot")]:
        prompt = alpaca_prompt(instruction, extra)
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"prompt: {instruction} {extra}".rstrip() + f"\n  -> {answer.strip()}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:  # a setting or the data: one line, no traceback
        sys.exit(f"error: {e}")
