"""save_pretrained writes an ordinary Hugging Face folder, atomically."""

import json
from pathlib import Path

import pytest
import torch
import yaml
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


# --------------------------------------------------------------------------- the model card


def read_card(folder) -> tuple[dict, str]:
    """(front matter, body) of folder/README.md."""
    text = (Path(folder) / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def run_loading_snippet(body: str) -> dict:
    """Runs the card's "How to load it" code as a user would paste it."""
    code = body.split("## How to load it")[1].split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(code, scope)
    return scope


def test_the_saved_folder_has_a_model_card_naming_its_base_model(trained, tiny_model_dir,
                                                                 tmp_path):
    out = tmp_path / "model"
    trained.save_pretrained(str(out))
    meta, body = read_card(out)
    assert meta["base_model"] == tiny_model_dir  # a folder: its absolute path
    assert meta["library_name"] == "trainer_lib" and meta["base_model_relation"] == "finetune"
    assert meta["tags"] == ["trainer_lib", "sft"] and "datasets" not in meta
    assert "trained with trainer_lib by supervised fine-tuning (SFT)" in body
    assert f"| steps | {trained.step} of {trained.total_steps}, 1 epoch(s)" in body
    assert "| optimiser | adamw, learning rate 0.0001, weight_decay 0.0 |" in body
    assert trained.data_report.summary() in body
    last = [h for h in trained.log_history if "loss" in h][-1]
    assert f"loss: {last['loss']:.4f} at step {last['step']}" in body
    loaded = run_loading_snippet(body)
    assert loaded["tokenizer"].chat_template == trained.tokenizer.chat_template
    in_memory = trained.accelerator.unwrap_model(trained.model).state_dict()
    assert all(torch.equal(loaded["model"].state_dict()[k], v) for k, v in in_memory.items())


def test_a_readme_the_user_put_in_the_folder_is_left_alone(trained, tmp_path):
    out = tmp_path / "model"
    trained.save_pretrained(str(out))
    card = (out / "README.md").read_text()
    trained.save_pretrained(str(out))  # its own untouched card is written afresh
    assert (out / "README.md").read_text() == card
    (out / "README.md").write_text(card.replace("# model", "# my model, edited"))
    edited = (out / "README.md").read_text()
    trained.save_pretrained(str(out))
    assert (out / "README.md").read_text() == edited  # edited: the user's now
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# My model\n\nWritten by hand.\n")
    trained.save_pretrained(str(mine))
    assert (mine / "README.md").read_text() == "# My model\n\nWritten by hand.\n"
    AutoModelForCausalLM.from_pretrained(mine)  # and the model was written beside it


def test_each_checkpoint_holds_the_card_of_the_run_at_its_step(trained):
    from trainer_lib.checkpointing.manifest import damage

    step = trained.checkpoints.last_saved
    meta, body = read_card(step / "hf_model")
    assert meta["base_model"] == trained.config.model.model_path
    assert f'from_pretrained("{step / "hf_model"}")' in body
    assert f"| steps | {trained.step} of {trained.total_steps}" in body
    assert damage(step) is None  # the card is one of the files the manifest checks


def test_base_model_and_datasets_are_named_as_the_hub_knows_them(tiny_model_dir, tmp_path):
    from trainer_lib import Mixture, default_kto_config
    from trainer_lib.model.card import base_model_of, describe_run, hub_datasets

    assert base_model_of("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert base_model_of(str(snapshot)) == "HuggingFaceTB/SmolLM2-135M"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "Qwen/Qwen3-0.6B"}))
    assert base_model_of(str(adapter)) == "Qwen/Qwen3-0.6B"  # training on: the adapter's base

    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    assert hub_datasets("trl-lib/kto-mix-14k", str(data), "missing.jsonl", "./local",
                        [{"text": "a list"}], None, "trl-lib/kto-mix-14k") == ["trl-lib/kto-mix-14k"]
    mixture = Mixture({"chat": ("HuggingFaceH4/ultrachat_200k", 3), "mine": (str(data), 1),
                       "again": ("trl-lib/kto-mix-14k", 1)})
    assert hub_datasets(mixture, "trl-lib/kto-mix-14k") == ["HuggingFaceH4/ultrachat_200k",
                                                            "trl-lib/kto-mix-14k"]

    config = default_kto_config().evolve(model=dict(model_path="HuggingFaceTB/SmolLM2-135M"),
                                         method=dict(beta=0.2))
    card = describe_run(config, step=3, total_steps=10, processes=2, log_history=[],
                        datasets=["trl-lib/kto-mix-14k"], folder=str(tmp_path / "out"))
    meta, body = yaml.safe_load(card.render().split("---\n")[1]), card.render()
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M", "base_model_relation": "finetune",
                    "library_name": "trainer_lib", "pipeline_tag": "text-generation",
                    "tags": ["trainer_lib", "kto"], "datasets": ["trl-lib/kto-mix-14k"]}
    assert "by KTO" in body and "| kto settings | beta=0.2 |" in body
    assert "x 2 process(es)" in body
