"""Trackers through accelerate: what a run logs can be read back from jsonl, TensorBoard and
offline W&B files; a resumed run repeats nothing; bad or missing trackers fail before loading."""

import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest

import trainer_lib.training.trainer as base
from trainer_lib import ConfigError, default_sft_config, train
from trainer_lib.config.trackers import TRACKER_PACKAGES
from trainer_lib.training.tracking import format_log_line

SAMPLES = [{"prompt": f"word{i} ", "completion": f"token{i}"} for i in range(16)]


def _metric(samples, prompts, outputs):
    return {"length": [float(len(o)) for o in outputs]}


def _run(tiny_config, tracker, **train_kw):
    config = tiny_config.evolve(train=dict(total_steps=3, eval_interval=3, tracker=tracker,
                                           run_name="run1", **train_kw),
                                method=dict(gen_kwargs=dict(max_new_tokens=3)))
    trainer = train(samples=SAMPLES, eval_prompts=["word1", "word2"], metric_fn=_metric,
                    config=config)
    return trainer, Path(config.train.logging_dir) / "run1"


def test_jsonl_has_every_logged_entry_and_the_samples_table(tiny_config):
    trainer, folder = _run(tiny_config, "jsonl")
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    merged = {}
    for line in lines:
        merged.setdefault(line["step"], {}).update(line)
    data = merged.pop(0)  # the data report, logged before the first step
    assert data["data/samples"] == trainer.data_report.num_samples
    assert 0 < data["data/loss_token_share"] < 1
    assert [merged[e["step"]] for e in trainer.log_history] == trainer.log_history
    assert "metrics/length" in merged[3] and "loss" in merged[1]
    table = json.loads((folder / "tables.jsonl").read_text().splitlines()[-1])
    assert table["name"] == "samples" and table["columns"][:2] == ["prompt", "output"]
    assert [row[0] for row in table["rows"]] == ["word1", "word2"]


def test_tensorboard_and_jsonl_together_hold_the_same_metrics(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, folder = _run(tiny_config, ["tensorboard", "jsonl"])
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in lines if "loss" in e] == [e["loss"] for e in trainer.log_history]
    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss", "learning_rate", "metrics/length"} <= set(scalars)
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    expected = [e["loss"] for e in trainer.log_history]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(expected, rel=1e-6)
    assert any(t.startswith("samples") for t in events.Tags()["tensors"])
    assert any(t.startswith("config") for t in events.Tags()["tensors"])


def test_a_resumed_run_does_not_repeat_the_steps_after_its_checkpoint(tiny_config):
    """The first run logged steps 1-4 and checkpointed at 2; a run resumed from step 2 logs
    3 and 4 again: metrics.jsonl then holds every step once, the resumed run's figures.
    TensorBoard's own arguments (train.tracker_kwargs) reach its writer in both runs."""
    config = tiny_config.evolve(train=dict(total_steps=4, checkpoint_interval=2, run_name="r",
                                           tracker=["jsonl", "tensorboard"],
                                           tracker_kwargs={"tensorboard": {
                                               "filename_suffix": ".trainer_lib"}}))
    train(samples=SAMPLES, config=config)
    checkpoint = Path(config.train.checkpoint_dir) / "step_2"
    resumed = train(samples=SAMPLES, config=config.evolve(
        train=dict(resume_from_checkpoint=str(checkpoint))))
    path = Path(config.train.logging_dir) / "r" / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4]
    assert lines[1:] == resumed.log_history
    # TensorBoard hides the first run's events after the checkpoint (its purge_step)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path.parent))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(
        [e["loss"] for e in resumed.log_history])
    written = sorted(f.name for f in path.parent.glob("events.out.tfevents.*"))
    assert len(written) == 2 and all(name.endswith(".trainer_lib") for name in written)


def test_unknown_and_missing_trackers_fail_before_anything_loads(tiny_config, monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbaord'; did you mean "
                                          r"'tensorboard'\?"):
        default_sft_config().evolve(train=dict(tracker=["jsonl", "tensorbaord"]))
    missing = [n for n in TRACKER_PACKAGES if importlib.util.find_spec(n) is None]
    assert missing, "every optional tracker is installed here"
    for stage in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(base, stage, lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(ConfigError) as err:
        train(samples=SAMPLES, config=tiny_config.evolve(train=dict(tracker=[missing[0]])))
    assert f"pip install {TRACKER_PACKAGES[missing[0]]}" in str(err.value)


def _wandb_records(path: Path):
    """Records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-style blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        if pos + 7 + length > len(data):
            return  # a record still being written
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_run_holds_config_metrics_and_table(tiny_config, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer, folder = _run(tiny_config, "wandb", project_name="proj", tags=["tiny"])
    [run_file] = folder.glob("wandb/offline-run-*/run-*.wandb")
    # the wandb service process may still be flushing the log when finish() returns
    deadline = time.monotonic() + 30
    records = list(_wandb_records(run_file))
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, "the offline W&B log never got its exit record"
        time.sleep(0.2)
        records = list(_wandb_records(run_file))
    history, run = {}, None
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
    assert run.project == "proj" and run.display_name == "run1" and list(run.tags) == ["tiny"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["total_steps"] == 3
    assert [history[s]["loss"] for s in (1, 2, 3)] == pytest.approx(
        [e["loss"] for e in trainer.log_history])
    assert history[3]["metrics/length"] == trainer.log_history[-1]["metrics/length"]
    assert history[3]["samples/_type"] == "table-file"


def test_a_line_per_log_step_without_the_progress_bar(tiny_config, capsys):
    train(samples=SAMPLES, config=tiny_config.evolve(train=dict(total_steps=2)))
    out = capsys.readouterr().out
    assert "step 1/2 | loss" in out and "step 2/2 | loss" in out
    assert format_log_line({"step": 5, "loss": 1.23456, "x": None}, 5) == "step 5 | loss 1.2346"
