"""The GPU benchmark is one command; without a GPU it says so in one line and exits 0."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_without_a_gpu_says_so_in_one_line_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a GPU machine's CI too
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "bench_gpu.py needs a CUDA GPU and torch sees none here: nothing measured (run it on a "
        "machine with one; --smoke checks the script on CPU)"]
