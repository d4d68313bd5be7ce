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
    out = tmp_path / "sft"
    stdout = _run_example(tmp_path, "sft_alpaca.py", out)
    assert "embedded tiny Llama" in stdout
    assert "-> The capital of France is Paris." in stdout
    AutoModelForCausalLM.from_pretrained(out)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    for key, value in _env(tmp_path).items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "Italy" in printed or "Rome" in printed
    AutoModelForCausalLM.from_pretrained(tmp_path / "outputs" / "quickstart")


def test_chat_tools_example_learns_to_call_the_tools(tmp_path):
    out = tmp_path / "chat"
    stdout = _run_example(tmp_path, "sft_chat_tools.py", out)
    # the reloaded model answers each new question with a call of the right tool
    assert '-> <tool_call>{"name": "get_weather", "arguments": {"city": ' in stdout
    assert '-> <tool_call>{"name": "convert_units", "arguments": {"value": ' in stdout
    AutoModelForCausalLM.from_pretrained(out)


def test_lora_zero3_example_on_two_processes(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    env = {**_env(tmp_path), "OMP_NUM_THREADS": "1"}
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                "--config_file", "configs/accelerate/zero3.yaml")
    stdout = _run_example(tmp_path, "sft_lora_zero3.py", out, ["train.epochs=10"], launcher, env)
    assert "2 process(es), DistributedType.DEEPSPEED" in stdout
    line = next(l for l in stdout.splitlines() if "; loss " in l)
    before, after = (float(x) for x in line.split("; loss ")[1].split(";")[0].split(" -> "))
    assert after < before
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in k for k in merged.state_dict())


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
    from trainer_lib.modeling import model_source

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
