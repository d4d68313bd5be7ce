"""LoRA fine-tuning under DeepSpeed ZeRO-3: adapters only, parameters sharded across processes;
saves the adapter folder and a merged full model, then reloads the merged one and generates.

    accelerate launch --num_processes 2 --config_file configs/accelerate/zero3.yaml \\
        examples/sft_lora_zero3.py
    deepspeed --num_gpus 2 examples/sft_lora_zero3.py --deepspeed configs/deepspeed/zero3.json
    python examples/sft_lora_zero3.py                  # one process, no DeepSpeed: plain LoRA

Offline it trains the embedded tiny Llama on the shipped instruction set; --model_path and
--data point it at a real model and dataset.
"""

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from trainer_lib import ConfigError, DataError, default_sft_config, train
from trainer_lib.methods.sft.samples import alpaca_prompt
from trainer_lib.model.embedded import DEFAULT_DATA, tiny_model
from trainer_lib.runtime.hub import model_source


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_path", default=None, help="default: the embedded tiny Llama")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--output", default="outputs/sft_lora_zero3")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON (deepspeed launcher)")
    parser.add_argument("--local_rank", type=int, default=None)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=2")
    args = parser.parse_args()

    embedded = args.model_path is None
    if not embedded:
        model_source(args.model_path, "--model_path")  # a missing folder or an unreachable hub
    model_path = tiny_model() if embedded else args.model_path
    lora = dict(rank=16, alpha=32, dropout=0.0, target_modules="all-linear")
    if embedded:
        # The embedded model is random-init: its frozen output head is too weak to express any
        # answer, so it trains in full next to the adapters. A pretrained model needs no such thing.
        lora["modules_to_save"] = ["lm_head"]
    config = default_sft_config().evolve(
        model=dict(model_path=model_path, peft_config=lora),
        train=dict(seq_length=256, batch_size=2, epochs=80 if embedded else 2,
                   total_steps=100_000, log_interval=20, eval_interval=100_000,
                   checkpoint_dir="outputs/sft_lora_zero3_ckpts",
                   deepspeed_config=args.deepspeed),
        optimizer=dict(kwargs=dict(lr=5e-3 if embedded else 2e-4)),
        scheduler=dict(name="cosine", kwargs=dict(warmup_steps=10)),
    ).apply_overrides(args.overrides)

    trainer = train(samples=args.data, config=config)
    # every process takes part in both saves (ZeRO-3 gathers the shards); the main one writes
    trainer.save_pretrained(f"{args.output}/adapter")
    trainer.save_pretrained(f"{args.output}/merged", merge_adapters=True)
    acc = trainer.accelerator
    if not acc.is_main_process:
        return
    losses = [e for e in trainer.log_history if "loss" in e]
    print(f"{acc.num_processes} process(es), {acc.distributed_type}; loss "
          f"{losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}; adapter in {args.output}/adapter, "
          f"merged model in {args.output}/merged")

    # transformers would build any model loaded in this process sharded, as it did for training
    # under ZeRO-3; the merged folder is an ordinary model, so load it the ordinary way
    unset_hf_deepspeed_config()
    tokenizer = AutoTokenizer.from_pretrained(f"{args.output}/merged")
    model = AutoModelForCausalLM.from_pretrained(f"{args.output}/merged")
    ids = tokenizer(alpaca_prompt("What is the capital of France?"), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    print("generation:", tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                          skip_special_tokens=True).strip())


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:  # a setting or the data: one line, no traceback
        sys.exit(f"error: {e}")
