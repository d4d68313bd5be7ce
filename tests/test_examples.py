"""The examples and the quick-start notebook run offline, to the end."""

import os
import subprocess
import sys
from pathlib import Path

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
