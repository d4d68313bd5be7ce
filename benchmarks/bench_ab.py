"""trainer_lib against another checkout of itself: the SFT and KTO benchmark workloads, paired.

    git worktree add ../baseline main          # or any other checkout of trainer_lib
    python benchmarks/bench_ab.py --baseline ../baseline --rounds 5
    python benchmarks/bench_ab.py --baseline ../baseline --only kto --examples 96

Whether a change slows the library down is a ratio of a few percent, smaller than what a shared
machine drifts in a minute. So this driver writes the workloads once (`bench_sft.py`'s and
`bench_kto.py`'s, with `--examples` of each), then runs each checkout's own trainer_lib on them in
fresh child processes, one after the other, the order alternating every round, and takes the
ratio pair by pair: this checkout / the baseline, for SFT's tokens/s over the training loop and
KTO's seconds from before the trainer is built to the end of `train()`. Both read the same warm
data cache (a folder of the driver's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from workload import FIXTURES, alternating, result_of

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run(checkout: Path, bench: str, workload: Path, env: dict) -> dict:
    cmd = [sys.executable, str(checkout / "benchmarks" / bench), "--worker", "trainer_lib",
           "--model_dir", str(workload / "model"), "--data", str(workload / "data.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=checkout,
                          env={**env, "PYTHONPATH": str(checkout)})
    return result_of(cmd, proc.returncode, proc.stdout, proc.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, help="another checkout of trainer_lib")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--examples", type=int, default=96, help="examples of each workload")
    p.add_argument("--only", choices=["sft", "kto"], default=None)
    p.add_argument("--tokenizer", default=str(FIXTURES / "tokenizers" / "phi-3-mini-instruct"))
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    import bench_kto
    import bench_sft

    folder = Path(tempfile.mkdtemp(prefix="bench_ab_"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "TRAINER_LIB_DATA_CACHE": str(folder / "cache")}
    checkouts = {"this": REPO, "baseline": Path(args.baseline).resolve()}
    jobs = []
    if args.only in (None, "sft"):
        bench_sft.write_workload(folder / "sft", args.examples, Path(args.tokenizer))
        jobs.append(("sft", "bench_sft.py", folder / "sft", "tokens_per_second", True))
    if args.only in (None, "kto"):
        bench_kto.write_workload(folder / "kto", args.examples)
        jobs.append(("kto", "bench_kto.py", folder / "kto", "seconds", False))
    for name, bench, workload, figure, higher_is_faster in jobs:
        for checkout in checkouts.values():  # a first run each, not counted: the cache fills
            run(checkout, bench, workload, env)
        figures = {k: [] for k in checkouts}
        for r, which in alternating(list(checkouts), args.rounds):
            figures[which].append(run(checkouts[which], bench, workload, env)[figure])
            print(f"{name} round {r + 1} {which:8s} {figure} {figures[which][-1]:,.2f}",
                  flush=True)
        speed = [a / b if higher_is_faster else b / a
                 for a, b in zip(figures["this"], figures["baseline"])]
        print(f"{name}: {figure} median this {statistics.median(figures['this']):,.2f}, "
              f"baseline {statistics.median(figures['baseline']):,.2f}; speed this / baseline, "
              f"pair by pair: median {statistics.median(speed):.3f} "
              f"(min {min(speed):.3f}, max {max(speed):.3f})", flush=True)


if __name__ == "__main__":
    main()
