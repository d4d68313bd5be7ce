"""KTO throughput and memory: trainer_lib against TRL's KTOTrainer, side by side.

    pip install -e ".[bench]"
    python benchmarks/bench_kto.py                         # 3 rounds, alternating the systems
    python benchmarks/bench_kto.py --rounds 1 --examples 160   # a quick look

One driver writes the workload once: a random-init Llama (hidden 256, 4 layers, 4 heads,
intermediate 704, untied head) with a byte-level BPE tokenizer of 8,192 tokens trained on the
data, and 400 feedback examples built from GSM8K and Alpaca instructions in the Alpaca prompt
format: each instruction once with its own answer (label true) and once with the answer of
another instruction (label false). Both systems train one epoch on the same examples with
8 examples per step, max length 512, fp32, AdamW, the reference log-probs precomputed
(trainer_lib's default for a full model; TRL's `precompute_ref_log_probs=True`), dropout off,
no activation checkpointing. Each system runs in a fresh child process with empty caches, and
the order alternates between rounds.

Figures per run:
- tokens/s: the tokens of the training examples (prompt + completion, the same count for both
  systems) over the wall time from before the trainer is built to the end of `train()`:
  tokenisation, model loading, the reference pass and the KL passes are all inside it;
- peak RSS: the highest resident memory of the child's process tree, sampled every 20 ms with
  psutil by the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workload import alternating, instructions, medians, report, run_measured, save_random_llama

SYSTEMS = ["trainer_lib", "trl"]
MAX_LENGTH, BATCH_SIZE, VOCAB = 512, 8, 8192


# ----------------------------------------------------------------------------- workload


def feedback_rows(n_examples: int) -> list[dict]:
    """n/2 instructions, each with its own answer (true) and another one's answer (false)."""
    from trainer_lib.methods.sft.samples import alpaca_prompt

    gsm, alpaca = instructions()
    n = n_examples // 2
    n_alpaca = n // 4
    pairs = gsm[: n - n_alpaca] + alpaca[:n_alpaca]
    wrong = list(range(len(pairs)))
    random.Random(0).shuffle(wrong)
    rows = []
    for i, r in enumerate(pairs):
        prompt = alpaca_prompt(r["instruction"], r.get("input"))
        other = pairs[wrong[i] if wrong[i] != i else (i + 1) % len(pairs)]["output"]
        rows.append({"prompt": prompt, "completion": r["output"], "label": True})
        rows.append({"prompt": prompt, "completion": other, "label": False})
    return rows


def write_workload(folder: Path, n_examples: int, **shape) -> tuple[Path, Path, int]:
    """The model (`save_random_llama`'s shape unless `shape` says otherwise), the data, and the
    tokens of its examples."""
    from trainer_lib.data.tokenize import tokenize_pair
    from trainer_lib.model.embedded import build_tokenizer

    rows = feedback_rows(n_examples)
    gsm, alpaca = instructions()  # the tokenizer learns from all of them: 8,192 tokens whatever n
    tok = build_tokenizer([" ".join(r.values()) for r in gsm + alpaca], vocab_size=VOCAB)
    model_dir, n_params = save_random_llama(folder, tok, **shape)
    data = folder / "data.jsonl"
    with open(data, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    lengths = sorted(min(len(tokenize_pair(tok, r["prompt"], r["completion"])["input_ids"]),
                         MAX_LENGTH) for r in rows)
    print(f"workload: {len(rows)} examples ({sum(r['label'] for r in rows)} desirable), tokens "
          f"per example mean {statistics.mean(lengths):.0f}, median {lengths[len(lengths) // 2]}, "
          f"max {lengths[-1]}; vocabulary {len(tok):,}; {n_params:,} parameters", flush=True)
    return model_dir, data, sum(lengths)


# ----------------------------------------------------------------------------- workers


def run_trainer_lib(model_dir: str, data: str, mixed_precision: str = "no",
                    attention: str | None = None, batch_size: int = BATCH_SIZE,
                    max_length: int = MAX_LENGTH) -> None:
    """`attention` None: the default (SDPA, switched to per-document attention for packed rows)."""
    from trainer_lib import default_kto_config
    from trainer_lib.methods.kto.trainer import KTOTrainer

    config = default_kto_config().evolve(
        model=dict(model_path=model_dir, attn_implementation=attention),
        train=dict(seq_length=max_length, batch_size=batch_size, epochs=1, total_steps=10**6,
                   log_interval=10**6, eval_interval=10**6, checkpoint_interval=10**6,
                   checkpoint_dir=tempfile.mkdtemp(), progress_bar=False,
                   mixed_precision=mixed_precision),
        optimizer=dict(kwargs=dict(lr=1e-5)),
        method=dict(ref_model="precompute"),
    )
    KTOTrainer(config, samples=data).train()


def run_trl(model_dir: str, data: str, bf16: bool = False, attention: str | None = None,
            liger: bool = False, batch_size: int = BATCH_SIZE, max_length: int = MAX_LENGTH) -> None:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, **({"attn_implementation": attention} if attention else {}))
    dataset = datasets.load_dataset("json", data_files=data, split="train")
    args = KTOConfig(output_dir=tempfile.mkdtemp(), max_length=max_length,
                     per_device_train_batch_size=batch_size, num_train_epochs=1,
                     learning_rate=1e-5, precompute_ref_log_probs=True, bf16=bf16,
                     use_liger_kernel=liger, gradient_checkpointing=False, logging_steps=10**6,
                     save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                     dataloader_num_workers=0, disable_tqdm=True, seed=1000)
    KTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok).train()


def worker(system: str, model_dir: str, data: str) -> None:
    import torch

    torch.manual_seed(0)
    start, cpu = time.perf_counter(), time.process_time()
    (run_trainer_lib if system == "trainer_lib" else run_trl)(model_dir, data)
    report({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu})


# ----------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: torch's own, the machine's cores)")
    p.add_argument("--workload", default=None, help="a folder to write the workload to and "
                   "reuse (default: a fresh temporary folder)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.data)
        return

    folder = Path(args.workload or tempfile.mkdtemp(prefix="bench_kto_"))
    folder.mkdir(parents=True, exist_ok=True)
    model_dir, data, tokens = write_workload(folder, args.examples)
    systems = args.systems.split(",")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for r, system in alternating(systems, args.rounds):
        cache = Path(tempfile.mkdtemp(prefix="cache_", dir=folder))  # fresh caches each run
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache / "datasets"),
               "HF_HOME": str(cache / "hf"), "TRAINER_LIB_CACHE": str(cache / "trainer_lib")}
        if args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        cmd = [sys.executable, __file__, "--worker", system, "--model_dir", str(model_dir),
               "--data", str(data)]
        times, peak, _ = run_measured(cmd, env, every=0.02)
        peak /= 2**20
        res = dict(tokens_per_second=tokens / times["seconds"], peak_rss_mb=peak,
                   seconds=times["seconds"], cpu_seconds=times["cpu_seconds"])
        results[system].append(res)
        print(f"round {r + 1} {system:12s} {res['tokens_per_second']:7,.0f} tok/s  "
              f"{res['seconds']:6.1f} s ({res['cpu_seconds']:6.1f} CPU s)  "
              f"peak {peak:7,.0f} MB", flush=True)

    print(f"\nmedian of {args.rounds} rounds: {args.examples} examples, {tokens:,} tokens, one epoch, "
          f"batch {BATCH_SIZE}, fp32, {os.cpu_count()} cores")
    print(f"{'system':14s} {'tokens/s':>9s} {'seconds':>8s} {'CPU s':>7s} {'peak RSS':>10s}")
    med = medians(results, ("tokens_per_second", "seconds", "cpu_seconds", "peak_rss_mb"))
    for s, m in med.items():
        print(f"{s:14s} {m['tokens_per_second']:9,.0f} {m['seconds']:8.1f} {m['cpu_seconds']:7.1f} "
              f"{m['peak_rss_mb']:7,.0f} MB")
    if "trainer_lib" in med:
        base = med["trainer_lib"]
        for s in med:
            if s != "trainer_lib":
                print(f"trainer_lib vs {s}: {base['tokens_per_second'] / med[s]['tokens_per_second']:.2f}x "
                      f"tokens/s, {med[s]['cpu_seconds'] / base['cpu_seconds']:.2f}x fewer CPU "
                      f"seconds, {base['peak_rss_mb'] / med[s]['peak_rss_mb']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
