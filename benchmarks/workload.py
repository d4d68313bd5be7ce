"""What the benchmark scripts share: the fixtures' instruction data, the random-init Llama they
train, the memory of a process tree, and how a child run reports its figures to the driver
(one `RESULT {json}` line) and the driver summarises rounds. Imported as `workload` (the scripts run from this
folder: `python benchmarks/bench_*.py`)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("TRAINER_LIB_FIXTURES", REPO.parent / "shared" / "fixtures"))


def instructions() -> tuple[list[dict], list[dict]]:
    """(GSM8K rows, Alpaca rows) of the fixtures, each {"instruction", "input", "output"}."""
    folder = FIXTURES / "instruction_alpaca"
    gsm = json.loads((folder / "gsm_8k_train_alpaca_format.json").read_text())
    alpaca = json.loads((folder / "alpaca_en_demo.json").read_text())
    return gsm, alpaca


def llama_config(tokenizer, hidden: int = 256, layers: int = 4, intermediate: int = 704,
                 heads: int = 4):
    """A Llama shape for `tokenizer` (untied head, the tokenizer's special ids); small unless
    told otherwise."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       intermediate_size=intermediate, max_position_embeddings=2048,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def save_random_llama(folder: Path, tokenizer, **shape) -> tuple[Path, int]:
    """Writes a seeded random-init Llama (`llama_config(tokenizer, **shape)`) and the tokenizer
    to folder/model; returns (that folder, the number of parameters)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tokenizer, **shape))
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, sum(p.numel() for p in model.parameters())


def tree_memory(pid: int, pss: bool = True) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over process `pid` and all its descendants (PSS 0 unless
    `pss`: /proc/PID/smaps_rollup counts a page shared by several processes once across them)."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    rss = total_pss = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            if pss:
                with open(f"/proc/{p.pid}/smaps_rollup") as f:
                    total_pss += next(int(line.split()[1]) * 1024 for line in f
                                      if line.startswith("Pss:"))
        except (psutil.Error, FileNotFoundError, ProcessLookupError, PermissionError,
                StopIteration):
            pass
    return rss, total_pss


def report(values: dict) -> None:
    """A child run's figures, as the one line the driver reads."""
    print("RESULT " + json.dumps(values), flush=True)


def result_of(cmd: list[str], returncode: int, out: str, err: str) -> dict:
    """The figures a child printed with `report`; stops the driver with the child's output when
    it failed or printed none."""
    line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
    if returncode != 0 or line is None:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{out[-2000:]}\n{err[-4000:]}")
    return json.loads(line[len("RESULT "):])


def run_measured(cmd: list[str], env: dict, every: float, pss: bool = False,
                 cwd=None) -> tuple[dict, int, int]:
    """Runs a child that `report`s, sampling its process tree's memory every `every` seconds;
    returns (its figures, peak summed RSS, peak summed PSS) with the memory in bytes (PSS 0
    unless `pss`)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, pss_ = tree_memory(proc.pid, pss)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss_)
            done.wait(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    return result_of(cmd, proc.returncode, out, err), peak[0], peak[1]


def alternating(systems: list[str], rounds: int):
    """(round, system) in the order the drivers run them: the systems' order reverses every
    other round, so that drifts in the machine's speed fall on all of them alike."""
    for r in range(rounds):
        for system in (systems if r % 2 == 0 else systems[::-1]):
            yield r, system


def medians(results: dict[str, list[dict]], keys) -> dict[str, dict[str, float]]:
    """{system: {key: median over the rounds}} of {system: [figures of each round]}."""
    return {s: {k: statistics.median(r[k] for r in rs) for k in keys}
            for s, rs in results.items()}
