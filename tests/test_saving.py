"""save_pretrained writes an ordinary Hugging Face folder, atomically."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer_lib import train
from trainer_lib.runtime.files import atomic_directory


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    from trainer_lib import default_sft_config

    config = default_sft_config().evolve(
        model=dict(model_path=tiny_model_dir),
        train=dict(seq_length=32, batch_size=2, total_steps=2, progress_bar=False,
                   checkpoint_dir=str(tmp_path_factory.mktemp("ckpts"))),
    )
    return train(samples=[["Hello\n", "world"], ["Good\n", "morning"]], config=config)


def test_saved_folder_is_an_ordinary_hf_folder(trained, tmp_path):
    out = tmp_path / "model"
    trained.save_pretrained(str(out))
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == trained.tokenizer.chat_template is not None
    model = AutoModelForCausalLM.from_pretrained(out)
    in_memory = trained.accelerator.unwrap_model(trained.model)
    for name, p in in_memory.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["pad_token_id"] == tok.pad_token_id


def test_a_crash_mid_save_keeps_the_previous_folder(trained, tmp_path, monkeypatch):
    out = tmp_path / "model"
    trained.save_pretrained(str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(trained.tokenizer, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        trained.save_pretrained(str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left
    AutoModelForCausalLM.from_pretrained(out)


def test_a_full_disk_keeps_the_previous_folder_and_says_what_it_needs(trained, tmp_path,
                                                                     monkeypatch):
    import errno

    import transformers.modeling_utils as modeling

    from trainer_lib.errors import CheckpointWriteError

    out = tmp_path / "model"
    trained.save_pretrained(str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modeling, "safe_save_file", full_disk)
    with pytest.raises(CheckpointWriteError) as e:
        trained.save_pretrained(str(out))
    message = str(e.value)
    assert message.startswith(f"could not write the model folder {out}: the disk is full: the "
                              "model takes about ")
    # the weights' size (what model.safetensors takes, less its small header)
    said = float(message.split("the model takes about ")[1].split(" KB")[0]) * 1000
    assert 0.95 * len(before["model.safetensors"]) < said <= len(before["model.safetensors"])
    assert f"Nothing of it was kept: {out} is as it was" in message
    assert e.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    target = tmp_path / "folder"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not target.exists()  # nothing appears under the final name while writing
    assert (target / "a.txt").read_text() == "one"
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
