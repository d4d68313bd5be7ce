"""SFT and KTO on one GPU in bf16: trainer_lib against TRL, with and without Liger, one table.

    pip install -e ".[bench]"                   # TRL; add liger-kernel and flash-attn if you can
    python benchmarks/bench_gpu.py              # SFT and KTO, 2 rounds, alternating the systems
    python benchmarks/bench_gpu.py --methods sft --rounds 1    # a quick look

Without a CUDA GPU it says so in one line and exits 0.

The workloads are those of bench_sft.py and bench_kto.py (their writers, with a larger model:
a random-init Llama with hidden 1024, 12 layers, 8 heads of 128, intermediate 2816, untied
head), trained for one epoch in bf16 by each system in a fresh child process, the order
alternating between rounds:

- SFT: the Phi-3 tokenizer (32k vocabulary), 4,000 GSM8K/Alpaca instructions,
  prompt/completion loss, rows of 2,048 tokens, 8 rows per step. trainer_lib packs
  (best-fit decreasing), TRL packs too (`packing=True`, its BFD with position ids).
- KTO: the 8k-token BPE tokenizer, 2,000 feedback examples, 32 examples per step, max length
  512, the reference log-probs precomputed by both.

Attention: flash-attention 2 (varlen over the packed documents) where `flash_attn` is installed,
for both systems; otherwise trainer_lib's per-document SDPA against TRL's SDPA. Liger: TRL once
without and, where `liger_kernel` is installed, once with `use_liger_kernel=True`.

Figures per run: tokens/s (SFT: the tokens of the epoch over the training loop's wall time;
KTO: the examples' tokens over the time from before the trainer is built to the end of
`train()`, reference pass included, as in bench_kto.py) and the peak GPU memory allocated by
torch (`torch.cuda.max_memory_allocated`). `--smoke` runs the same code on a tiny model, on
CPU if need be, to check the script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import bench_kto
import bench_sft
from workload import FIXTURES, alternating, medians, report, run_measured

GPU_SHAPE = dict(hidden=1024, layers=12, heads=8, intermediate=2816)
SMOKE_SHAPE = dict(hidden=64, layers=2, heads=4, intermediate=128)


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def systems(methods: list[str]) -> list[str]:
    trl = ["trl", "trl_liger"] if has("liger_kernel") else ["trl"]
    return [f"{m}/{s}" for m in methods for s in ["trainer_lib", *trl]]


# ----------------------------------------------------------------------------- workers


def worker(system: str, model_dir: str, data: str, settings: dict) -> None:
    import torch

    method, name = system.split("/")
    cuda = torch.cuda.is_available()
    flash = has("flash_attn") and cuda
    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if method == "sft":
        size = dict(seq_length=settings["sft_seq_length"], batch_size=settings["sft_batch_size"])
        if name == "trainer_lib":
            out = bench_sft.run_trainer_lib(
                model_dir, data, mixed_precision="bf16",
                attention="flash_attention_2" if flash else "sdpa_per_document", **size)
        else:
            out = bench_sft.run_trl(model_dir, data, packing=True, bf16=True,
                                    attention="flash_attention_2" if flash else "sdpa",
                                    liger=name == "trl_liger", **size)
        out.pop("model")
        seconds, tokens = out["seconds"], out["tokens"]
    else:
        size = dict(batch_size=settings["kto_batch_size"], max_length=bench_kto.MAX_LENGTH)
        if name == "trainer_lib":  # None: SDPA, switched to per-document attention
            bench_kto.run_trainer_lib(model_dir, data, mixed_precision="bf16",
                                      attention="flash_attention_2" if flash else None, **size)
        else:
            bench_kto.run_trl(model_dir, data, bf16=True,
                              attention="flash_attention_2" if flash else "sdpa",
                              liger=name == "trl_liger", **size)
        if cuda:
            torch.cuda.synchronize()
        seconds, tokens = time.perf_counter() - start, settings["kto_tokens"]
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    report({"tokens_per_second": tokens / seconds, "peak_gpu_mb": peak / 2**20,
            "seconds": seconds, "attention": "flash_attention_2" if flash else "sdpa"})


# ----------------------------------------------------------------------------- driver


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="sft,kto")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sft_examples", type=int, default=4000)
    p.add_argument("--kto_examples", type=int, default=2000)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny model and a few examples (on CPU if there is no GPU), to check "
                        "the script; the figures mean nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args()
    import json

    if args.worker:
        worker(args.worker, args.model_dir, args.data, json.loads(args.settings))
        return 0
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bench_gpu.py needs a CUDA GPU and torch sees none here: nothing measured "
              "(run it on a machine with one; --smoke checks the script on CPU)")
        return 0
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    settings = dict(sft_seq_length=256 if args.smoke else 2048, sft_batch_size=8,
                    kto_batch_size=8 if args.smoke else 32)
    n_sft, n_kto = (64, 32) if args.smoke else (args.sft_examples, args.kto_examples)
    methods = args.methods.split(",")
    folder = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    workloads = {}
    if "sft" in methods:
        (folder / "sft").mkdir()
        workloads["sft"] = bench_sft.write_workload(
            folder / "sft", n_sft, FIXTURES / "tokenizers" / "phi-3-mini-instruct",
            seq_length=settings["sft_seq_length"], **shape)
    if "kto" in methods:
        (folder / "kto").mkdir()
        model_dir, data, settings["kto_tokens"] = bench_kto.write_workload(folder / "kto", n_kto,
                                                                           **shape)
        workloads["kto"] = (model_dir, data)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke)"
    attention = ("flash-attention 2 varlen" if has("flash_attn") and torch.cuda.is_available()
                 else "per-document SDPA (trainer_lib) / SDPA (TRL)")
    print(f"{device}; bf16; {attention}; Liger {'installed' if has('liger_kernel') else 'absent'}",
          flush=True)

    names = systems(methods)
    results: dict[str, list[dict]] = {s: [] for s in names}
    for r, system in alternating(names, args.rounds):
        cache = Path(tempfile.mkdtemp(prefix="cache_", dir=folder))  # fresh caches each run
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache / "datasets"),
               "TRAINER_LIB_CACHE": str(cache / "trainer_lib")}
        model_dir, data = workloads[system.split("/")[0]]
        cmd = [sys.executable, __file__, "--worker", system, "--model_dir", str(model_dir),
               "--data", str(data), "--settings", json.dumps(settings)]
        res, peak_rss, _ = run_measured(cmd, env, every=0.1)
        res["peak_rss_mb"] = peak_rss / 2**20
        results[system].append(res)
        print(f"round {r + 1} {system:16s} {res['tokens_per_second']:10,.0f} tok/s  "
              f"peak GPU {res['peak_gpu_mb']:8,.0f} MB  peak RSS {res['peak_rss_mb']:7,.0f} MB  "
              f"({res['seconds']:.1f} s)", flush=True)

    print(f"\nmedian of {args.rounds} rounds; SFT: {n_sft} examples, rows of "
          f"{settings['sft_seq_length']}, {settings['sft_batch_size']} rows per step; KTO: "
          f"{n_kto} examples, {settings['kto_batch_size']} per step; bf16")
    print(f"{'method/system':18s} {'tokens/s':>10s} {'peak GPU':>10s} {'peak RSS':>10s}  "
          "trainer_lib vs it")
    med = medians(results, ("tokens_per_second", "peak_gpu_mb", "peak_rss_mb"))
    for s, m in med.items():
        base = med[s.split("/")[0] + "/trainer_lib"]
        ratio = ("" if s.endswith("trainer_lib") else
                 f"{base['tokens_per_second'] / m['tokens_per_second']:.2f}x tokens/s, "
                 f"{base['peak_gpu_mb'] / max(m['peak_gpu_mb'], 1e-9):.2f}x peak GPU memory")
        print(f"{s:18s} {m['tokens_per_second']:10,.0f} {m['peak_gpu_mb']:7,.0f} MB "
              f"{m['peak_rss_mb']:7,.0f} MB  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
