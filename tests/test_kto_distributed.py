"""KTO on 2 processes ends where 1 process with the same global batch ends: DDP with a reference
copy, ZeRO-3 with the precomputed reference (two micro-batches per pass), ZeRO-3 with a
reference that follows the policy (TR-DPO), and FSDP2 with each reference: precomputed, the LoRA
policy with its adapter off, and a sharded copy that follows the policy; each against a
single-process run of 2 micro-batches per step. The last step is uneven (5 micro-batches of 2): one process joins
it with a stand-in batch, whose KL pairs must not count in z. Loss and z step by step, and the
final weights, must agree."""

import json

import pytest
from test_distributed import (
    LORA,
    NUM_SAMPLES,
    REPO,
    _script_module,
    assert_each_sample_once,
    assert_same_weights,
    launch,
    load_state,
    read_ranks,
)

# a seed and rate at which z is positive at the uneven last step, so a stand-in counted in it shows
COMMON = ["--override", "train.seed=2", "--override", "optimizer.kwargs.lr=3e-3"]
SYNC = COMMON + ["--override", "method.sync_ref_model=true",
                 "--override", "method.ref_model_sync_steps=1"]
ADAPTER = COMMON + ["--peft", json.dumps(LORA), "--override", "method.ref_model=adapter"]
RUNS = {  # name: (accelerate config, arguments, the single-process run it must equal)
    "ddp_copy": ("ddp", COMMON + ["--override", "method.ref_model=copy"], "precompute"),
    "zero3_precompute": ("zero3", COMMON + ["--override", "method.ref_model=precompute",
                                            "--override", "method.precompute_ref_batch_size=4"],
                         "precompute"),
    "zero3_sync": ("zero3", SYNC, "sync"),
    "fsdp2_precompute": ("fsdp2", COMMON + ["--override", "method.ref_model=precompute"],
                         "precompute"),
    "fsdp2_adapter": ("fsdp2", ADAPTER, "adapter"),
    "fsdp2_sync": ("fsdp2", SYNC, "sync"),
}


@pytest.fixture(scope="module")
def single_kto_runs(tiny_model_dir, tmp_path_factory):
    """One process, 2 micro-batches of 2 per step: the same micro-batches, in the same order, as
    2 processes with 2 each."""
    script = _script_module()
    base = tmp_path_factory.mktemp("single_kto")
    histories = {}
    for name, extra in (("precompute", COMMON + ["--override", "method.ref_model=precompute"]),
                        ("sync", SYNC), ("adapter", ADAPTER)):
        script.main(["--model", tiny_model_dir, "--out", str(base / name), "--method", "kto",
                     "--batch_size", "2", "--grad_accum", "2", "--num_samples", str(NUM_SAMPLES),
                     *extra])
        histories[name] = [h for h in _history(base / name) if "loss" in h]
    return base, histories


def _history(out):
    import json

    return json.loads((out / "ids_rank0.json").read_text())["log_history"]


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_give_the_loss_z_and_weights_of_one(name, tiny_model_dir, single_kto_runs,
                                                          tmp_path):
    accelerate_config, extra, reference = RUNS[name]
    base, histories = single_kto_runs
    out = launch("accelerate", tiny_model_dir, tmp_path / name, method="kto",
                 config_file=REPO / "configs" / "accelerate" / f"{accelerate_config}.yaml",
                 batch_size=2, extra=extra)
    ranks = read_ranks(out)
    assert_each_sample_once(ranks)
    steps = [h for h in ranks[0]["log_history"] if "loss" in h]
    want = histories[reference]
    assert len(steps) == len(want) == 3  # the last step: one process has no data of its own
    assert [h["loss"] for h in steps] == pytest.approx([h["loss"] for h in want], abs=1e-5)
    assert [h["kl"] for h in steps] == pytest.approx([h["kl"] for h in want], abs=1e-5)
    assert min(h["kl"] for h in steps[1:]) > 0.1
    assert steps[0]["loss"] == 0.5
    if reference == "adapter":  # the adapter folder, and the merged model beside it
        from safetensors.torch import load_file

        adapter = load_file(out / "model" / "adapter_model.safetensors")
        single = load_file(base / reference / "model" / "adapter_model.safetensors")
        assert_same_weights(adapter, single)
        assert_same_weights(load_state(out / "merged"), load_state(base / reference / "merged"))
    else:
        assert_same_weights(load_state(out / "model"), load_state(base / reference / "model"))
