"""SFT throughput, padding and memory: trainer_lib against TRL's SFTTrainer, side by side.

    pip install -e ".[bench]"
    python benchmarks/bench_sft.py                      # 3 rounds, alternating the systems
    python benchmarks/bench_sft.py --rounds 1 --examples 256   # a quick look

One process tree: this driver writes the workload once (a random-init Llama with hidden 256,
4 layers, 4 heads, intermediate 704, the Phi-3 tokenizer's 32k vocabulary; instruction data
from GSM8K and Alpaca in the Alpaca prompt format), then runs each system in a fresh child
process per round, alternating them so that machine noise spreads evenly. Every system trains
one epoch over the same examples with seq_length 512 and 8 sequences per step, prompt/completion
loss, fp32. Each child reports:

- tokens/s: non-padding tokens of the epoch / wall time of the training loop (setup excluded);
- padding: the share of token positions fed to the model that are padding;
- peak RSS: the child's peak resident memory (ru_maxrss);
- MFU: model FLOPs per second (6 x parameters per token, plus attention) over the machine's
  fp32 matmul peak, measured by the driver before and after the runs (the best of square
  matmuls of 1024 to 4096 in a fresh process; `--peak_gflops` gives it instead).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workload import (
    FIXTURES,
    alternating,
    instructions,
    medians,
    report,
    result_of,
    save_random_llama,
)

SYSTEMS = ["trainer_lib", "trl_default", "trl_packing"]
SEQ_LENGTH, BATCH_SIZE = 512, 8


# ----------------------------------------------------------------------------- workload


def write_workload(folder: Path, n_examples: int, tokenizer_dir: Path, seq_length: int = SEQ_LENGTH,
                   **shape) -> tuple[Path, Path]:
    """The model (`save_random_llama`'s shape unless `shape` says otherwise) and the data."""
    from transformers import AutoTokenizer

    from trainer_lib.methods.sft.samples import alpaca_prompt

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model_dir, n_params = save_random_llama(folder, tok, **shape)
    gsm, alpaca = instructions()
    n_alpaca = n_examples // 4  # the long tail comes from Alpaca
    rows = gsm[: n_examples - n_alpaca] + alpaca[:n_alpaca]
    data = folder / "data.jsonl"
    lengths = []
    with open(data, "w") as f:
        for r in rows:
            prompt = alpaca_prompt(r["instruction"], r.get("input"))
            f.write(json.dumps({"prompt": prompt, "completion": r["output"]}) + "\n")
            lengths.append(len(tok(prompt + r["output"]).input_ids) + 1)  # + EOS
    lengths.sort()
    print(f"workload: {len(lengths)} examples, tokens per example mean "
          f"{statistics.mean(lengths):.0f}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}, "
          f"{sum(n > seq_length for n in lengths)} over {seq_length}; vocabulary {len(tok):,}; "
          f"{n_params:,} parameters", flush=True)
    return model_dir, data


# ----------------------------------------------------------------------------- workers


class FeedCounter:
    """Counts the token positions fed to the model in training forward passes."""

    def __init__(self, model):
        self.positions = 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and ids is not None:
            self.positions += ids.numel()


def flops_per_token(config, avg_context: float) -> float:
    """6 x (parameters touched per token: every matrix but the embedding lookup) plus the
    attention scores and values (causal: a token attends to half its context on average)."""
    h, layers, inter, vocab = (config.hidden_size, config.num_hidden_layers,
                               config.intermediate_size, config.vocab_size)
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    matmul_params = layers * per_layer + h * vocab
    attention = 2 * 2 * layers * h * avg_context / 2
    return 6 * matmul_params + 3 * attention


def run_trainer_lib(model_dir: str, data: str, seq_length: int = SEQ_LENGTH,
                    batch_size: int = BATCH_SIZE, mixed_precision: str = "no",
                    attention: str = "sdpa") -> dict:
    from trainer_lib import default_sft_config
    from trainer_lib.methods.sft.trainer import SFTTrainer

    config = default_sft_config().evolve(
        model=dict(model_path=model_dir, attn_implementation=attention),
        train=dict(seq_length=seq_length, batch_size=batch_size, epochs=1, total_steps=10**6,
                   log_interval=10**6, eval_interval=10**6, checkpoint_interval=10**6,
                   checkpoint_dir=tempfile.mkdtemp(), progress_bar=False,
                   mixed_precision=mixed_precision),
        optimizer=dict(kwargs=dict(lr=1e-4)),
    )
    trainer = SFTTrainer(config, samples=data)
    model = trainer.accelerator.unwrap_model(trainer.model)
    counter = FeedCounter(model)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, positions=counter.positions, model=model,
                tokens=trainer.data_report.num_tokens)


def run_trl(model_dir: str, data: str, packing: bool, seq_length: int = SEQ_LENGTH,
            batch_size: int = BATCH_SIZE, bf16: bool = False, attention: str = "sdpa",
            liger: bool = False) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention)
    dataset = datasets.load_dataset("json", data_files=data, split="train")
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=seq_length,
                     per_device_train_batch_size=batch_size, num_train_epochs=1,
                     learning_rate=1e-4, packing=packing, logging_steps=10**6,
                     save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                     bf16=bf16, use_liger_kernel=liger,
                     dataloader_num_workers=0, disable_tqdm=True, seed=1000)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    counter = FeedCounter(model)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, positions=counter.positions, model=model, tokens=tokens)


def worker(system: str, model_dir: str, data: str) -> None:
    import torch

    torch.manual_seed(0)
    if system == "trainer_lib":
        out = run_trainer_lib(model_dir, data)
    else:
        out = run_trl(model_dir, data, packing=system == "trl_packing")
    model = out.pop("model")
    n_docs = sum(1 for _ in open(data))
    avg_context = out["tokens"] / n_docs
    flops = flops_per_token(model.config, avg_context) * out["tokens"]
    result = dict(
        system=system,
        tokens=out["tokens"],
        tokens_per_second=out["tokens"] / out["seconds"],
        padding=1 - out["tokens"] / max(out["positions"], 1),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        model_gflops=flops / out["seconds"] / 1e9,
        seconds=out["seconds"],
    )
    report(result)


# ----------------------------------------------------------------------------- driver


def measure_peak_gflops() -> float:
    """Best fp32 GFLOP/s of square matmuls with torch's default threads, in a fresh process."""
    code = """
import time, torch
best = 0.0
for n in (1024, 2048, 4096):
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    for _ in range(5):
        t = time.perf_counter(); a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
print(best)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=1024)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--peak_gflops", type=float, default=None,
                   help="fp32 matmul peak of the machine (default: measured)")
    p.add_argument("--tokenizer", default=str(FIXTURES / "tokenizers" / "phi-3-mini-instruct"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.data)
        return

    peaks = [] if args.peak_gflops else [measure_peak_gflops()]
    folder = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    model_dir, data = write_workload(folder, args.examples, Path(args.tokenizer))
    systems = args.systems.split(",")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1"}
    for r, system in alternating(systems, args.rounds):
        cmd = [sys.executable, __file__, "--worker", system, "--model_dir", str(model_dir),
               "--data", str(data)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        res = result_of(cmd, proc.returncode, proc.stdout, proc.stderr)
        results[system].append(res)
        print(f"round {r + 1} {system:12s} {res['tokens_per_second']:9,.0f} tok/s "
              f"padding {100 * res['padding']:5.1f}%  peak {res['peak_rss_mb']:7,.0f} MB  "
              f"{res['model_gflops']:6.1f} model GFLOP/s", flush=True)

    if not args.peak_gflops:
        peaks.append(measure_peak_gflops())
    peak = args.peak_gflops or max(peaks)
    for rs in results.values():
        for res in rs:
            res["mfu"] = res["model_gflops"] / peak

    print(f"\nmedian of {args.rounds} rounds, {args.examples} examples, seq_length {SEQ_LENGTH}, "
          f"{BATCH_SIZE} sequences per step, fp32, {os.cpu_count()} cores")
    source = "given" if args.peak_gflops else "measured: " + ", ".join(f"{x:.0f}" for x in peaks)
    print(f"fp32 matmul peak {peak:.0f} GFLOP/s ({source})")
    print(f"{'system':14s} {'tokens/s':>10s} {'padding':>8s} {'peak RSS':>10s} {'MFU':>6s}")
    med = medians(results, ("tokens_per_second", "padding", "peak_rss_mb", "mfu"))
    for s, m in med.items():
        print(f"{s:14s} {m['tokens_per_second']:10,.0f} {100 * m['padding']:7.1f}% "
              f"{m['peak_rss_mb']:8,.0f} MB {100 * m['mfu']:5.1f}%")
    if "trainer_lib" in med:
        base = med["trainer_lib"]
        for s in med:
            if s != "trainer_lib":
                print(f"trainer_lib vs {s}: {base['tokens_per_second'] / med[s]['tokens_per_second']:.2f}x "
                      f"tokens/s, {base['peak_rss_mb'] / med[s]['peak_rss_mb']:.2f}x peak memory")


if __name__ == "__main__":
    main()
