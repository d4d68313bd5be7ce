"""Data at scale: trainer_lib against TRL's SFTTrainer (packing), side by side.

    pip install -e ".[bench]"
    python benchmarks/bench_data.py                                 # 100k, 400k and 1M pairs
    python benchmarks/bench_data.py --sizes 20000 --systems trainer_lib   # a quick look

One driver writes the workload once: generated instruction pairs (GSM8K questions and answers
from the fixtures in the Alpaca prompt format, each made unique; about 175 tokens with the Phi-3
tokenizer) as one .jsonl per size, and a small random-init Llama (hidden 64, 2 layers, the
tokenizer's 32k vocabulary), so that the 2 optimiser steps of a run do not dominate. Each run is
a fresh child process (or, for "2 processes", `accelerate launch --num_processes 2`), from a
`.jsonl` path to the end of the 2nd optimiser step with seq_length 512 and 8 rows per step:

- first step: wall time from the child's start to the end of its first optimiser step;
- peak RSS: the highest sum of the resident memory of the child's whole process tree (tokenising
  workers and launched ranks included), sampled every 0.25 s with psutil;
- peak PSS: the same tree's proportional set size (/proc/PID/smaps_rollup), which counts pages
  shared between processes (libraries, memory-mapped Arrow files, copy-on-write pages of forked
  workers) once across them instead of once per process.

"cold" starts from empty caches (trainer_lib's data cache and, for TRL, datasets' cache);
"warm" runs again with the caches the cold run left. TRL runs with its defaults for data
preparation (one process); trainer_lib with its own (data.num_proc: the CPU cores available).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from workload import FIXTURES, REPO, instructions, report, run_measured, save_random_llama

SEQ_LENGTH, BATCH_SIZE, STEPS = 512, 8, 2


# ----------------------------------------------------------------------------- workload


def write_workload(folder: Path, sizes: list[int], tokenizer_dir: Path) -> tuple[Path, dict]:
    import statistics

    from transformers import AutoTokenizer

    from trainer_lib.methods.sft.samples import alpaca_prompt

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model_dir, _ = save_random_llama(folder, tok, hidden=64, layers=2, intermediate=256)
    gsm, _ = instructions()
    files = {n: open(folder / f"pairs_{n}.jsonl", "w") for n in sizes}
    lengths = []
    for i in range(max(sizes)):
        row = gsm[i % len(gsm)]
        prompt = alpaca_prompt(f"{row['instruction']} (case {i})", row.get("input"))
        line = json.dumps({"prompt": prompt, "completion": row["output"]}) + "\n"
        for n, f in files.items():
            if i < n:
                f.write(line)
        if i < 2000:
            lengths.append(len(tok(prompt + row["output"]).input_ids) + 1)
    for f in files.values():
        f.close()
    print(f"workload: {', '.join(f'{n:,}' for n in sizes)} pairs; tokens per pair (first 2,000) "
          f"mean {statistics.mean(lengths):.0f}, median {statistics.median(lengths):.0f}; "
          f"vocabulary {len(tok):,}; file of {max(sizes):,} pairs "
          f"{(folder / f'pairs_{max(sizes)}.jsonl').stat().st_size / 2**20:,.0f} MiB", flush=True)
    return model_dir, {n: folder / f"pairs_{n}.jsonl" for n in sizes}


# ----------------------------------------------------------------------------- workers


def since_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def run_trainer_lib(model_dir: str, data: str, cache: str) -> None:
    from trainer_lib import default_sft_config, train
    from trainer_lib.training.trainer import Trainer

    first = []
    step = Trainer.training_step

    def timed(self, micro):
        out = step(self, micro)
        if not first:
            first.append(since_start())
        return out

    Trainer.training_step = timed
    config = default_sft_config().evolve(
        model=dict(model_path=model_dir, attn_implementation="sdpa"),
        train=dict(seq_length=SEQ_LENGTH, batch_size=BATCH_SIZE, total_steps=STEPS,
                   log_interval=STEPS, eval_interval=10**6, checkpoint_interval=10**6,
                   checkpoint_dir=tempfile.mkdtemp(), progress_bar=False),
        data=dict(cache_dir=cache))
    trainer = train(samples=data, config=config)
    if trainer.accelerator.is_main_process:
        report(dict(first_step=first[0], total=since_start(), rows=len(trainer.train_items)))


def run_trl(model_dir: str, data: str, cache: str) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    first = []

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if not first:
                first.append(since_start())

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    dataset = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=SEQ_LENGTH,
                     per_device_train_batch_size=BATCH_SIZE, max_steps=STEPS, packing=True,
                     learning_rate=1e-4, logging_steps=10**6, save_strategy="no", report_to=[],
                     use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=1000)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                         callbacks=[FirstStep()])
    trainer.train()
    report(dict(first_step=first[0], total=since_start(), rows=len(trainer.train_dataset)))


# ----------------------------------------------------------------------------- measuring


def measure(cmd: list[str], env: dict) -> dict:
    values, rss, pss = run_measured(cmd, env, every=0.25, pss=True, cwd=REPO)
    return {**values, "peak_rss": rss, "peak_pss": pss}


# ----------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000,400000,1000000")
    p.add_argument("--systems", default="trainer_lib,trl")
    p.add_argument("--two_processes", default="largest",
                   help="sizes run with 2 processes too: 'largest', 'all' or 'none'")
    p.add_argument("--tokenizer", default=str(FIXTURES / "tokenizers" / "phi-3-mini-instruct"))
    p.add_argument("--folder", default=None, help="where the workload and caches go")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run = run_trainer_lib if args.worker == "trainer_lib" else run_trl
        run(args.model_dir, args.data, args.cache)
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    folder = Path(args.folder or tempfile.mkdtemp(prefix="bench_data_"))
    folder.mkdir(parents=True, exist_ok=True)
    model_dir, files = write_workload(folder, sizes, Path(args.tokenizer))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    runs = []
    for n in sizes:
        for system in args.systems.split(","):
            launches = [("1 process", [])]
            two = args.two_processes == "all" or (args.two_processes == "largest"
                                                  and n == max(sizes))
            if system == "trainer_lib" and two:
                launches.append(("2 processes", ["-m", "accelerate.commands.launch",
                                                 "--num_processes", "2", "--config_file",
                                                 str(REPO / "configs/accelerate/ddp.yaml")]))
            for launch, prefix in launches:
                cache = folder / f"cache_{system}_{n}_{launch[0]}"
                shutil.rmtree(cache, ignore_errors=True)
                for state in ("cold", "warm"):
                    cmd = [sys.executable, *prefix, __file__, "--worker", system,
                           "--model_dir", str(model_dir), "--data", str(files[n]),
                           "--cache", str(cache)]
                    res = measure(cmd, env)
                    res.update(system=system, pairs=n, launch=launch, state=state)
                    runs.append(res)
                    print(f"{n:>9,} {system:12s} {launch:12s} {state:5s} first step "
                          f"{res['first_step']:7.1f} s  total {res['total']:7.1f} s  peak RSS "
                          f"{res['peak_rss'] / 2**30:6.2f} GiB  peak PSS "
                          f"{res['peak_pss'] / 2**30:6.2f} GiB", flush=True)
                shutil.rmtree(cache, ignore_errors=True)
    (folder / "results.json").write_text(json.dumps(runs, indent=1))
    summarize(runs)


def summarize(runs: list[dict]) -> None:
    def get(system, n, launch="1 process", state="cold"):
        return next((r for r in runs if (r["system"], r["pairs"], r["launch"], r["state"])
                     == (system, n, launch, state)), None)

    print(f"\n{'pairs':>9s} {'system':12s} {'run':20s} {'first step':>10s} {'peak RSS':>9s} "
          f"{'peak PSS':>9s}")
    for r in runs:
        print(f"{r['pairs']:>9,} {r['system']:12s} {r['launch'] + ', ' + r['state']:20s} "
              f"{r['first_step']:9.1f}s {r['peak_rss'] / 2**30:8.2f}G {r['peak_pss'] / 2**30:8.2f}G")
    for n in sorted({r["pairs"] for r in runs}):
        ours, trl = get("trainer_lib", n), get("trl", n)
        warm = get("trainer_lib", n, state="warm")
        lines = []
        if ours and trl:
            lines.append(f"peak RSS {ours['peak_rss'] / trl['peak_rss']:.2f}x TRL's "
                         f"(PSS {ours['peak_pss'] / trl['peak_pss']:.2f}x); first step "
                         f"{ours['first_step'] / trl['first_step']:.2f}x TRL's wall time")
        if ours and warm:
            lines.append(f"warm first step {warm['first_step'] / ours['first_step']:.1%} of the cold one")
        for state in ("cold", "warm"):
            two, one = get("trainer_lib", n, "2 processes", state), get("trainer_lib", n, state=state)
            if two and one:
                lines.append(f"2 processes ({state}): RSS {two['peak_rss'] / one['peak_rss']:.2f}x "
                             f"one process's, PSS {two['peak_pss'] / one['peak_pss']:.2f}x")
        if lines:
            print(f"{n:,} pairs: " + "; ".join(lines))


if __name__ == "__main__":
    main()
