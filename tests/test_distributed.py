"""Several processes on CPU: DDP, DeepSpeed ZeRO-2/3 and FSDP2, under `accelerate launch`,
`deepspeed` and `torchrun`.

Each launched run must end where a single-process run with the same global batch ends (to float
tolerance), every sample must be trained on exactly once per epoch, and the saved folder must load
with AutoModelForCausalLM. The launch helper takes the method, so KTO runs can reuse it.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_lib import ConfigError, train
from trainer_lib.config import TrainConfig
from trainer_lib.runtime.deepspeed import (
    is_zero3,
    load_deepspeed_config,
    prepare_reference_model,
    resolve_deepspeed_config,
)
from trainer_lib.runtime.processes import align_micro_batches, batches_per_process

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "train_sft.py"
NUM_SAMPLES = 10
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def _script_module():
    spec = importlib.util.spec_from_file_location("train_sft_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(launcher: str, model: str, out: Path, method: str = "sft", config_file=None,
           batch_size: int = 2, grad_accum: int = 1, extra=(), timeout: int = 240) -> Path:
    """Runs tests/scripts/train_sft.py on 2 processes; returns the output folder."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [str(SCRIPT), "--model", model, "--out", str(out), "--method", method,
            "--batch_size", str(batch_size), "--grad_accum", str(grad_accum),
            "--num_samples", str(NUM_SAMPLES), *extra]
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
               "--main_process_port", str(_free_port()), "--config_file", str(config_file), *args]
    elif launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), *args]
    else:
        raise ValueError(launcher)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    # the schedule steps after the optimiser, as torch expects, under DeepSpeed too
    assert "lr_scheduler.step()` before `optimizer.step()`" not in proc.stderr
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_ranks(out: Path) -> list[dict]:
    ranks = [json.loads((out / f"ids_rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["num_processes"] == 2
    return ranks


def assert_each_sample_once(ranks: list[dict], epochs: int = 1) -> None:
    seen = sorted(i for r in ranks for i in r["ids"])
    assert seen == sorted(list(range(NUM_SAMPLES)) * epochs)
    assert ranks[0]["steps"] == ranks[1]["steps"]
    # metrics are reduced over ranks: both report the same figures
    assert [h["loss"] for h in ranks[0]["log_history"]] == pytest.approx(
        [h["loss"] for h in ranks[1]["log_history"]])


def load_state(folder) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_same_weights(a: dict, b: dict, atol: float = 1e-4) -> None:
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < atol, f"weights differ by {worst}"


@pytest.fixture(scope="module")
def single_runs(tiny_model_dir, tmp_path_factory):
    """Single-process references with the global batch of the 2-process runs (4 sequences)."""
    script = _script_module()
    base = tmp_path_factory.mktemp("single")
    script.main(["--model", tiny_model_dir, "--out", str(base / "full"), "--batch_size", "4",
                 "--num_samples", str(NUM_SAMPLES)])
    script.main(["--model", tiny_model_dir, "--out", str(base / "lora"), "--batch_size", "4",
                 "--num_samples", str(NUM_SAMPLES), "--peft", json.dumps(LORA)])
    return base


@pytest.mark.parametrize("name,batch_size,grad_accum", [
    ("ddp", 2, 1),
    ("zero2", 2, 1),
    ("zero3", 1, 2),  # global batch 4 through accumulation; the last step is uneven
])
def test_accelerate_launch_matches_single_process(name, batch_size, grad_accum, tiny_model_dir,
                                                  single_runs, tmp_path):
    out = launch("accelerate", tiny_model_dir, tmp_path / name,
                 config_file=REPO / "configs" / "accelerate" / f"{name}.yaml",
                 batch_size=batch_size, grad_accum=grad_accum)
    ranks = read_ranks(out)
    assert_each_sample_once(ranks)
    assert ranks[0]["distributed_type"].endswith("DEEPSPEED" if "zero" in name else "MULTI_CPU")
    assert_same_weights(load_state(out / "model"), load_state(single_runs / "full" / "model"))
    # the logged loss is the step's mean over both processes' tokens, as one process logs it
    single = json.loads((single_runs / "full" / "ids_rank0.json").read_text())
    assert [h["loss"] for h in ranks[0]["log_history"] if "loss" in h] == pytest.approx(
        [h["loss"] for h in single["log_history"] if "loss" in h], abs=1e-5)


def test_fsdp2_matches_single_process_and_resumes_bit_exact(tiny_model_dir, single_runs,
                                                            tmp_path):
    # the accelerate FSDP config shards with FSDP2 (over gloo here); a checkpoint of it resumed
    # under torchrun with train.fsdp=true (the setting for scripts) ends at the same bits
    first = launch("accelerate", tiny_model_dir, tmp_path / "fsdp2",
                   config_file=REPO / "configs" / "accelerate" / "fsdp2.yaml",
                   extra=["--override", "train.checkpoint_interval=1"])
    ranks = read_ranks(first)
    assert_each_sample_once(ranks)
    assert ranks[0]["distributed_type"].endswith("FSDP") and ranks[0]["steps"] == 3
    final = load_state(first / "model")  # an ordinary folder: AutoModelForCausalLM loads it
    assert_same_weights(final, load_state(single_runs / "full" / "model"))
    shards = sorted(p.name for p in (first / "ckpts" / "step_1" / "accelerate").rglob("*.distcp"))
    assert len(shards) == 4  # the model's and the optimiser's states, one shard per process

    resumed = launch("torchrun", tiny_model_dir, tmp_path / "resumed",
                     extra=["--override", "train.fsdp=true", "--override",
                            f"train.resume_from_checkpoint={first / 'ckpts' / 'step_1'}"])
    ranks = read_ranks(resumed)
    assert ranks[0]["distributed_type"].endswith("FSDP") and ranks[0]["steps"] == 3
    assert [h["step"] for h in ranks[0]["log_history"] if "loss" in h] == [1, 2, 3]
    again = load_state(resumed / "model")
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_deepspeed_launcher_zero3_and_reference_model(tiny_model_dir, single_runs, tmp_path):
    out = launch("deepspeed", tiny_model_dir, tmp_path / "ds",
                 extra=["--deepspeed_config", str(REPO / "configs/deepspeed/zero3.json"),
                        "--check_reference"])
    ranks = read_ranks(out)
    assert_each_sample_once(ranks)
    assert ranks[0]["distributed_type"].endswith("DEEPSPEED")
    assert_same_weights(load_state(out / "model"), load_state(single_runs / "full" / "model"))
    # the frozen reference copy is a sharded DeepSpeed engine giving the base model's logits
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        expected = base(input_ids=torch.tensor([[1, 5, 9, 13, 17, 21]])).logits
    for r in range(2):
        ref = torch.load(out / f"ref_logits_rank{r}.pt")
        assert ref["type"] == "DeepSpeedEngine"
        torch.testing.assert_close(ref["logits"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["zero3", "fsdp2"])
def test_lora_under_sharding_saves_the_trained_adapter(name, tiny_model_dir, single_runs,
                                                       tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = launch("accelerate", tiny_model_dir, tmp_path / name,
                 config_file=REPO / "configs" / "accelerate" / f"{name}.yaml",
                 extra=["--peft", json.dumps(LORA)])
    assert_each_sample_once(read_ranks(out))
    adapter = load_file(out / "model" / "adapter_model.safetensors")
    reference = load_file(single_runs / "lora" / "model" / "adapter_model.safetensors")
    assert set(adapter) == set(reference) and len(adapter) == 28  # 7 linear kinds x 2 layers x A/B
    for key, value in adapter.items():
        assert value.numel() > 0
        torch.testing.assert_close(value, reference[key], atol=1e-4, rtol=1e-4)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained
    merged = load_state(out / "merged")
    assert_same_weights(merged, load_state(single_runs / "lora" / "merged"))
    assert not any("lora" in k for k in merged)
    AutoModelForCausalLM.from_pretrained(out / "model")  # adapter folder finds its base


@pytest.mark.parametrize("engine,caches", [("ddp", "node-local"), ("zero3", "shared")])
def test_two_machines_end_at_one_process_weights(engine, caches, tiny_model_dir, single_runs,
                                                 tmp_path):
    # Two nodes of one process each, simulated on this machine (each process is its node's main
    # process, with LOCAL_RANK 0 and a HOME of its own). Where the prepared data is cached is
    # settled before the model or its engine exists, and the engine does not touch the cache, so
    # the two axes are independent: two runs cover both cache layouts and both engines.
    port, out = _free_port(), tmp_path / "out"
    shared = tmp_path / "shared-cache"
    args = [str(SCRIPT), "--model", tiny_model_dir, "--out", str(out), "--batch_size", "2",
            "--num_samples", str(NUM_SAMPLES)]
    if engine == "zero3":
        args += ["--deepspeed_config", str(REPO / "configs" / "deepspeed" / "zero3.json")]
    procs = []
    for node in range(2):
        home = tmp_path / f"home{node}"
        home.mkdir()
        env = {k: v for k, v in os.environ.items()
               if k not in ("TRAINER_LIB_DATA_CACHE", "TRAINER_LIB_CACHE")}
        env.update(HOME=str(home), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false",
                   # DeepSpeed's compiled CPU op, built once for the whole test session
                   TORCH_EXTENSIONS_DIR=os.environ.get(
                       "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")))
        if caches == "shared":
            env["TRAINER_LIB_DATA_CACHE"] = str(shared)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
               str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(port), *args]
        # to files: a pipe not read while waiting for the other node would stall this one
        log = tmp_path / f"node{node}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                                           stderr=subprocess.STDOUT), log))
    for node, (proc, log) in enumerate(procs):
        proc.wait(timeout=300)
        assert proc.returncode == 0, f"node {node} failed:\n{log.read_text()[-6000:]}"
    ranks = read_ranks(out)
    assert_each_sample_once(ranks)
    assert ranks[0]["distributed_type"].endswith("DEEPSPEED" if engine == "zero3" else "MULTI_CPU")
    assert_same_weights(load_state(out / "model"), load_state(single_runs / "full" / "model"))

    def entries(root: Path) -> list[str]:
        return sorted(p.name for p in root.glob("*") if p.is_dir()) if root.is_dir() else []

    local = [entries(tmp_path / f"home{n}" / ".cache" / "trainer_lib" / "data") for n in range(2)]
    if caches == "shared":  # both nodes prepared into one folder: one whole entry per key
        assert local == [[], []]
        assert entries(shared) and not any(n.startswith(".") for n in entries(shared))
    else:  # each node prepared its own copy, in its own HOME
        assert local[0] and local[0] == local[1]
        assert not shared.exists()


# ------------------------------------------------------------------ in one process


@pytest.mark.parametrize("name", ["zero3", "fsdp2"])
def test_generation_and_metric_fn_under_sharding_match_one_process(name, tiny_model_dir,
                                                                    tmp_path):
    # every process takes part in each generation under ZeRO-3 and FSDP2; the metric is scored
    # once and logged alike everywhere, with the figures one process gives
    extra = ["--metric", "--override", "train.eval_interval=2",
             "--override", "method.gen_kwargs.max_new_tokens=6"]
    _script_module().main(["--model", tiny_model_dir, "--out", str(tmp_path / "one"),
                           "--batch_size", "4", "--num_samples", str(NUM_SAMPLES), *extra])
    out = launch("accelerate", tiny_model_dir, tmp_path / "two",
                 config_file=REPO / "configs" / "accelerate" / f"{name}.yaml", extra=extra)

    def metrics(history):
        return [{k: v for k, v in h.items() if k.startswith("metrics/")} for h in history
                if any(k.startswith("metrics/") for k in h)]

    one = metrics(json.loads((tmp_path / "one" / "ids_rank0.json").read_text())["log_history"])
    ranks = [metrics(r["log_history"]) for r in read_ranks(out)]
    assert len(one) == 2 and one[0]["metrics/prompts_seen"] == 3.0
    assert ranks[0] == ranks[1]
    assert ranks[0] == [pytest.approx(m) for m in one]


# what launchers (torchrun, accelerate launch, deepspeed, mpirun) set in a process they start
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED", "OMPI_COMM_WORLD_SIZE",
                      "PMI_SIZE")


def test_a_deepspeed_config_runs_in_one_process_without_a_launcher(tiny_model_dir, single_runs,
                                                                   tmp_path):
    """`python train.py` with train.deepspeed_config: the process sets up its group of one as a
    launcher would (DeepSpeed would otherwise look for MPI once the model is loaded), trains
    under DeepSpeed and ends where the plain single-process run ends."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "one"
    cmd = [sys.executable, str(SCRIPT), "--model", tiny_model_dir, "--out", str(out),
           "--batch_size", "4", "--num_samples", str(NUM_SAMPLES),
           "--deepspeed_config", str(REPO / "configs/deepspeed/zero2.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "ids_rank0.json").read_text())
    assert info["num_processes"] == 1 and info["distributed_type"].endswith("DEEPSPEED")
    assert sorted(info["ids"]) == list(range(NUM_SAMPLES))
    assert_same_weights(load_state(out / "model"), load_state(single_runs / "full" / "model"))


def test_deepspeed_config_autos_filled_from_the_trainer():
    t = TrainConfig(batch_size=3, gradient_accumulation_steps=2, max_grad_norm=0.5,
                    mixed_precision="bf16")
    ds = resolve_deepspeed_config(load_deepspeed_config(REPO / "configs/deepspeed/zero3.json"),
                                  t, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    z2 = load_deepspeed_config(REPO / "configs/deepspeed/zero2.json")
    z2["zero_optimization"]["stage"] = 3
    z2["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    fixed = resolve_deepspeed_config(z2, t, world_size=1)
    assert fixed["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("key,value,names", [
    ("train_micro_batch_size_per_gpu", 8, "train.batch_size"),
    ("gradient_accumulation_steps", 4, "train.gradient_accumulation_steps"),
    ("train_batch_size", 100, "train.batch_size * train.gradient_accumulation_steps"),
])
def test_contradicting_deepspeed_batch_sizes_fail_before_training(key, value, names,
                                                                  tiny_config):
    ds = load_deepspeed_config(REPO / "configs/deepspeed/zero2.json")
    ds[key] = value
    config = tiny_config.evolve(train=dict(deepspeed_config=ds))
    with pytest.raises(ConfigError, match=rf"{key}={value}.*{names.split()[0]}"):
        train(samples=["a b c"] * 4, config=config)


def test_deepspeed_optimizer_section_is_refused():
    with pytest.raises(ConfigError, match="optimizer"):
        resolve_deepspeed_config({"optimizer": {"type": "AdamW"}, "zero_optimization": {}},
                                 TrainConfig(), world_size=1)


def test_loop_helpers_in_one_process():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    assert align_micro_batches(acc, [1, 2]) == [1, 2]
    assert align_micro_batches(acc, []) == []
    assert batches_per_process(acc, 5) == 5
    assert not is_zero3(acc)


def test_reference_model_is_frozen_in_eval_mode(tiny_model_dir):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    acc = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref = prepare_reference_model(acc, model)
    assert not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    assert next(ref.parameters()).device.type == acc.device.type



def test_a_deepspeed_run_does_not_leave_deepspeed_on_for_the_next_run(tiny_model_dir, tmp_path):
    # a notebook: first a run with a ZeRO config, then one without; the second is plain. In a
    # child process, as DeepSpeed's process group would outlive the test otherwise.
    script = f"""
import os
from accelerate.utils import DistributedType
from trainer_lib import default_sft_config, train
config = default_sft_config().evolve(
    model=dict(model_path={str(tiny_model_dir)!r}),
    train=dict(seq_length=32, batch_size=2, total_steps=1, progress_bar=False,
               checkpoint_dir={str(tmp_path / "ckpts")!r}))
zero2 = config.evolve(train=dict(deepspeed_config={str(REPO / "configs/deepspeed/zero2.json")!r}))
first = train(samples=["a b c"] * 4, config=zero2)
assert first.accelerator.distributed_type == DistributedType.DEEPSPEED
second = train(samples=["a b c"] * 4, config=config)
print("second:", second.accelerator.distributed_type, "ACCELERATE_USE_DEEPSPEED" in os.environ)
"""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_DEEPSPEED"}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "second: DistributedType.NO False" in proc.stdout


def test_the_process_group_is_torn_down_before_the_interpreter(tmp_path):
    # left to interpreter shutdown, gloo's threads can abort a run that succeeded (exit -6,
    # "terminate called without an active exception"); a handler registered before trainer_lib's
    # runs after it and sees the group already gone
    script = f"""
import atexit
import torch.distributed as dist
atexit.register(lambda: print("at exit, process group alive:", dist.is_initialized()))
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
from trainer_lib import default_sft_config
from trainer_lib.runtime.accelerator import build_accelerator
build_accelerator(default_sft_config().evolve(
    train=dict(progress_bar=False, checkpoint_dir={str(tmp_path / "ckpts")!r})))
print("during the run, process group alive:", dist.is_initialized())
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "during the run, process group alive: True" in proc.stdout
    assert "at exit, process group alive: False" in proc.stdout
