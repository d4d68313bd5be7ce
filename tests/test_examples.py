"""The examples and the quick-start notebook run offline, to the end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path):
    return {**os.environ, "TRAINER_LIB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run_example(tmp_path, script, out, overrides=(), launcher=(sys.executable,), env=None):
    """Run `script` with `--output out`, quietly, checkpoints under tmp_path; its stdout."""
    proc = subprocess.run(
        [*launcher, f"examples/{script}", "--output", str(out), "train.progress_bar=false",
         f"train.checkpoint_dir={tmp_path / 'ckpts'}", *overrides],
        cwd=REPO, env=env or _env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_main_example_trains_saves_reloads_and_generates(tmp_path):
    """The main job as shipped, on the first 30 of its instructions (the two it is asked about
    among them) to take a quarter of the time: the reloaded folder answers both."""
    from trainer_lib.model.embedded import DEFAULT_DATA

    data = tmp_path / "instructions30.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:30]))
    out = tmp_path / "sft"
    stdout = _run_example(tmp_path, "sft_alpaca.py", out, ["--data", str(data)])
    assert "embedded tiny Llama" in stdout
    assert "data: 30 samples (30 pair)" in stdout
    assert "-> The capital of France is Paris." in stdout
    assert "-> The opposite of hot is cold." in stdout
    AutoModelForCausalLM.from_pretrained(out)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    for key, value in _env(tmp_path).items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs
                      if o.get("name") == "stdout")  # not transformers' bars on stderr
    assert printed.strip() == "The capital of Italy is Rome."
    AutoModelForCausalLM.from_pretrained(tmp_path / "outputs" / "quickstart")


def test_chat_tools_example_learns_to_call_the_tools(tmp_path):
    """The example as shipped, on 12 of its conversations (6 per tool) to take a third of the
    time: the reloaded model answers each new question with a call of the right tool, its
    arguments in that tool's JSON shape."""
    import re

    from trainer_lib.model.embedded import CHAT_TOOLS_DATA

    lines = CHAT_TOOLS_DATA.read_text().splitlines(keepends=True)
    data = tmp_path / "chats12.jsonl"
    data.write_text("".join(lines[0:6] + lines[15:21]))  # get_weather, then convert_units
    out = tmp_path / "chat"
    stdout = _run_example(tmp_path, "sft_chat_tools.py", out, ["--data", str(data)])
    assert "data: 11 samples (11 conversation)" in stdout  # one held out for eval/loss
    assert re.search(r'-> <tool_call>\{"name": "get_weather", "arguments": \{"city": "\w+"\}\}',
                     stdout), stdout
    assert re.search(r'-> <tool_call>\{"name": "convert_units", "arguments": \{"value": \d+, '
                     r'"from_unit": "\w+", "to_unit": "\w+"\}\}', stdout), stdout
    AutoModelForCausalLM.from_pretrained(out)


def _answer_nll(model, tokenizer, rows) -> float:
    """Mean NLL of the Alpaca answers given their prompts, in plain torch."""
    import torch

    from trainer_lib.data.tokenize import tokenize_pair
    from trainer_lib.methods.sft.samples import alpaca_prompt

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ex = tokenize_pair(tokenizer, alpaca_prompt(row["instruction"], row["input"]),
                               row["output"])
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def test_lora_zero3_example_on_two_processes(tmp_path):
    """Sharded over 2 processes, the adapters (and the random-init model's head) learn the
    shipped answers: the saved merged model and the adapter on its base both give them far
    higher likelihood than the base model, and the same logits as each other."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from trainer_lib.model.embedded import load_default_samples

    out = tmp_path / "lora"
    env = {**_env(tmp_path), "OMP_NUM_THREADS": "1"}
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                "--config_file", "configs/accelerate/zero3.yaml")
    stdout = _run_example(tmp_path, "sft_lora_zero3.py", out, ["train.epochs=10"], launcher, env)
    assert "2 process(es), DistributedType.DEEPSPEED" in stdout
    base_dir = tmp_path / "cache" / "tiny-llama-v1"  # the embedded model it started from
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                        out / "adapter").eval()
    ids = torch.tensor([[1, 30, 99, 7, 12, 200]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
    rows = load_default_samples()[:24]
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    base = _answer_nll(AutoModelForCausalLM.from_pretrained(base_dir).eval(), tokenizer, rows)
    learned = _answer_nll(merged, tokenizer, rows)
    assert learned < base / 2, (base, learned)


# --------------------------------------------------------------------------- where the model is


def test_a_model_path_that_does_not_exist_is_an_error_not_the_embedded_model(tmp_path):
    proc = subprocess.run([sys.executable, "examples/sft_alpaca.py", "--model_path",
                           str(tmp_path / "no-such-model"), "--output", str(tmp_path / "out")],
                          cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: --model_path={str(tmp_path / 'no-such-model')!r}: this local path does not "
        "exist; give an existing folder (as written by save_pretrained) or a Hugging Face hub id "
        "(owner/name)"]
    assert "embedded" not in proc.stdout and not (tmp_path / "out").exists()


def test_a_hub_id_fails_at_once_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    import time

    import huggingface_hub

    from trainer_lib import ConfigError
    from trainer_lib.runtime.hub import model_source

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # refused
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"model.model_path='someone/tiny' is a hub id, but the "
                                          r"Hugging Face hub \(http://127.0.0.1:9\) cannot be "
                                          r"reached .* not in the local cache"):
        model_source("someone/tiny", "model.model_path")
    assert time.monotonic() - start < 10  # instead of a minute of retries
    # the same id, cached: used from the cache without asking the hub
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("abc")
    assert model_source("someone/tiny", "model.model_path") == {"local_files_only": True}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set and it is not in the local cache"):
        model_source("someone/other", "model.model_path")
