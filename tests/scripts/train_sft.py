"""Trains the tiny model (SFT or KTO: --method) on numbered samples and saves it; run under
python, `accelerate launch` or `deepspeed` by tests/test_distributed.py.

Each process records the ids of the samples it trained on (ids_rank<N>.json in --out) so the test
can check that every sample was seen exactly once per epoch.
"""

import argparse
import json
import os
import re
import sys

import torch


def make_samples(n: int, method: str = "sft") -> list[dict]:
    """Numbered samples: "sample 007" in every one lets a process tell which it trained on."""
    words = ["alpha", "beta", "gamma", "delta", "word1", "token2", "word3", "token4"]
    tails = [" ".join(words[(i + j) % len(words)] for j in range(2 + i % 5)) for i in range(n)]
    if method == "kto":
        return [{"prompt": f"sample {i:03d}", "completion": " " + tails[i], "label": i % 2 == 0}
                for i in range(n)]
    return [{"text": f"sample {i:03d} {tails[i]}"} for i in range(n)]


def build_config(args):
    from trainer_lib import default_kto_config, default_sft_config

    base = default_kto_config() if args.method == "kto" else default_sft_config()
    config = base.evolve(
        model=dict(model_path=args.model),
        train=dict(seq_length=32, batch_size=args.batch_size,
                   gradient_accumulation_steps=args.grad_accum, epochs=args.epochs,
                   total_steps=1000, log_interval=1, eval_interval=1000, progress_bar=False,
                   checkpoint_interval=1000, checkpoint_dir=os.path.join(args.out, "ckpts"),
                   logging_dir=os.path.join(args.out, "logs")),
        optimizer=dict(kwargs=dict(lr=1e-2)),
        scheduler=dict(name="constant"),
    )
    if args.method == "sft":
        config = config.evolve(method=dict(packing=False))
    if args.deepspeed_config:
        config = config.evolve(train=dict(deepspeed_config=args.deepspeed_config))
    if args.peft:
        config = config.evolve(model=dict(peft_config=json.loads(args.peft)))
    for override in args.override:
        config = config.apply_overrides([override])
    return config


def run(args):
    import trainer_lib.methods  # noqa: F401
    from trainer_lib.registry import get_trainer_class

    config = build_config(args)
    base_cls = get_trainer_class(config.method)
    seen: list[int] = []

    class Recording(base_cls):
        def training_step(self, micro):
            for batch in micro:
                if batch is not None:
                    for row in batch["input_ids"]:
                        text = self.tokenizer.decode(row, skip_special_tokens=True)
                        seen.extend(int(m) for m in re.findall(r"sample (\d+)", text))
            return super().training_step(micro)

    evaluation = {}
    if args.metric:
        # 3 prompts, uneven over 2 processes; scored once on the main process, then shared
        def metric_fn(samples, prompts, outputs):
            return {"output_chars": [float(len(o)) for o in outputs],
                    "prompts_seen": float(len(prompts))}
        evaluation = dict(eval_prompts=["sample 001", "sample 002", "sample 003"],
                          metric_fn=metric_fn)
    trainer = Recording(config, samples=make_samples(args.num_samples, args.method), **evaluation)
    trainer.train()
    acc = trainer.accelerator
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"ids_rank{acc.process_index}.json"), "w") as f:
        json.dump({"ids": seen, "num_processes": acc.num_processes, "steps": trainer.step,
                   "distributed_type": str(acc.distributed_type),
                   "log_history": trainer.log_history}, f)
    trainer.save_pretrained(os.path.join(args.out, "model"))
    if args.peft:
        trainer.save_pretrained(os.path.join(args.out, "merged"), merge_adapters=True)
        from trainer_lib.model.lora import is_peft_model

        unwrapped = acc.unwrap_model(trainer.model)
        assert is_peft_model(unwrapped)
    if args.check_reference:
        check_reference(args, trainer)
    return trainer


def check_reference(args, trainer):
    """A frozen reference copy (sharded like the policy under ZeRO-3) gives the base model's
    logits."""
    from transformers import AutoModelForCausalLM

    from trainer_lib.runtime.deepspeed import prepare_reference_model

    acc = trainer.accelerator
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]], device=acc.device)
    ref = prepare_reference_model(acc, AutoModelForCausalLM.from_pretrained(args.model))
    with torch.no_grad():
        logits = ref(input_ids=ids).logits.float().cpu()
    torch.save({"logits": logits, "type": type(ref).__name__},
               os.path.join(args.out, f"ref_logits_rank{acc.process_index}.pt"))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="sft", choices=["sft", "kto"])
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--deepspeed_config", default=None)
    p.add_argument("--peft", default=None, help="a JSON dict for model.peft_config")
    p.add_argument("--check_reference", action="store_true")
    p.add_argument("--metric", action="store_true", help="evaluate with eval_prompts and a metric")
    p.add_argument("--override", action="append", default=[], help="e.g. train.seed=3")
    p.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
