"""Prepared data is tokenised once: cached under a key of everything that shapes it, and shared
by the processes of a run (one prepares, the others read the same files)."""

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from trainer_lib import default_sft_config
from trainer_lib.data.chat_template import RunTemplate
from trainer_lib.data.pipeline import build_data
from trainer_lib.methods.sft.recipe import SFTRecipe
from trainer_lib.model.embedded import CHAT_TOOLS_DATA, build_tokenizer, load_default_samples

REPO = Path(__file__).resolve().parents[1]
PAIRS = [{"prompt": f"Question {i}?\n", "completion": f"Answer {i}."} for i in range(20)]
CHATS = [json.loads(l) for l in CHAT_TOOLS_DATA.read_text().splitlines()[:6]]
OTHER_TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}"
                  "{% for c in m.tool_calls or [] %}{{ c.function | tojson }}{% endfor %}\n"
                  "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


def _texts():
    return [v for row in load_default_samples() for v in row.values()] + \
        CHAT_TOOLS_DATA.read_text().splitlines()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(_texts(), vocab_size=600)


@pytest.fixture
def calls(monkeypatch):
    """How many records the SFT recipe tokenised."""
    seen = []
    tokenize = SFTRecipe.tokenize

    def counting(self, records, indices):
        seen.append(len(records))
        return tokenize(self, records, indices)

    monkeypatch.setattr(SFTRecipe, "tokenize", counting)
    return seen


def prepare(tok, samples, **changes):
    config = default_sft_config().evolve(train=dict(seq_length=300, progress_bar=False),
                                         method=dict(packing=False)).evolve(**changes)
    tok = copy.deepcopy(tok)  # a template other than "default" is set on the tokenizer
    recipe = SFTRecipe(tok, RunTemplate(tok, config.tokenizer.chat_template), config.method,
                       config.train.seq_length)
    return build_data(None, config, recipe, samples)


def examples(data):
    return [(ex["input_ids"], ex["labels"]) for ex in data.train]


def test_a_second_run_reads_the_cache_without_tokenising(tok, calls, data_cache, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in PAIRS))
    for source in (str(path), PAIRS):
        calls.clear()
        first = prepare(tok, source)
        assert sum(calls) == len(PAIRS)
        again = prepare(tok, source)
        assert sum(calls) == len(PAIRS)  # nothing tokenised the second time
        assert examples(again) == examples(first)
        assert again.report == first.report
    assert len([p for p in data_cache.iterdir() if (p / "done.json").exists()]) == 2


def test_a_damaged_cache_is_prepared_again_and_said(tok, calls, data_cache):
    """A prepared table cut short (a full disk, a copy interrupted) and derived arrays of another
    dtype are found when the cache is opened: the entry is prepared again, with a warning that
    names the damage, and the examples are those of the first run."""
    first = examples(prepare(tok, PAIRS))
    entry = next(p for p in data_cache.iterdir() if (p / "done.json").exists())
    arrow = entry / "prepared.arrow"
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    calls.clear()
    with pytest.warns(UserWarning, match=r"prepared data cached in .* is damaged \(prepared\.arrow "
                      r"is [\d,]+ bytes; [\d,]+ were written\): preparing it again"):
        again = prepare(tok, PAIRS)
    assert sum(calls) == len(PAIRS) and examples(again) == first

    def compute():
        return {"rows": np.arange(7, dtype=np.int64)}

    assert again.derived_arrays("packed", ["k"], compute)["rows"].tolist() == list(range(7))
    npy = next(entry.rglob("rows.npy"))
    for damage, said in ((np.arange(7, dtype=np.float64), r"rows\.npy holds <f8 \[7\], not the "
                          r"<i8 \[7\] written"),  # the same size, another dtype
                         (np.array([None] * 7, dtype=object), r"rows\.npy is [\d,]+ bytes")):
        np.save(npy, damage, allow_pickle=True)
        with pytest.warns(UserWarning, match=said):
            rows = again.derived_arrays("packed", ["k"], compute)["rows"]
        assert rows.dtype == np.int64 and rows.tolist() == list(range(7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact cache says nothing
        assert examples(prepare(tok, PAIRS)) == first


def test_what_shapes_the_examples_keys_the_cache(tok, calls, tmp_path):
    """A changed template, tokenizer, seq_length, method setting or file is tokenised afresh."""
    prepare(tok, CHATS)
    base = sum(calls)
    other_tok = build_tokenizer(_texts(), vocab_size=640)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in CHATS))
    changes = [
        dict(tokenizer=dict(chat_template=OTHER_TEMPLATE)),
        dict(train=dict(seq_length=280)),
        dict(method=dict(loss_on="last_assistant")),
        dict(method=dict(add_eos=False)),
        dict(method=dict(overlong="drop")),
    ]
    for change in changes:
        calls.clear()
        prepare(tok, CHATS, **change)
        assert sum(calls) == base, change
    calls.clear()
    prepare(other_tok, CHATS)
    assert sum(calls) == base
    calls.clear()
    prepare(tok, str(path))
    prepare(tok, str(path))
    path.write_text("".join(json.dumps(s) + "\n" for s in CHATS[:3]))
    prepare(tok, str(path))
    assert calls == [base, 3]
    calls.clear()
    prepare(tok, CHATS, train=dict(batch_size=2, eval_split=0.5))  # does not change the examples
    assert calls == []


def test_caching_off_prepares_in_a_temporary_folder_removed_once_opened(tok, calls, data_cache):
    data = prepare(tok, PAIRS, data=dict(cache=False))
    folder = data.context.temporary
    assert folder.is_dir() and folder.parent == data_cache
    data.release()
    assert not folder.exists() and list(data_cache.iterdir()) == []
    assert len(examples(data)) == len(PAIRS)  # still readable: the files were memory-mapped
    prepare(tok, PAIRS, data=dict(cache=False))
    assert sum(calls) == 2 * len(PAIRS)


def test_two_processes_share_one_preparation_and_see_disjoint_complete_shards(tiny_model_dir,
                                                                             tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
           "--config_file", str(REPO / "configs" / "accelerate" / "ddp.yaml"),
           str(REPO / "tests" / "scripts" / "data_ranks.py"), "--model", tiny_model_dir,
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["tokenised"] == 40 and ranks[1]["tokenised"] == 0  # the other one read
    assert ranks[0]["entries"] == ranks[1]["entries"] and len(ranks[0]["entries"]) == 1
    # a Dataset with a random fingerprint in each process is still prepared once, by one of them
    assert [r["unhashable_tokenised"] for r in ranks] == [10, 0]
    assert ranks[0]["entries_after"] == ranks[1]["entries_after"]
    assert len(ranks[0]["entries_after"]) == 2
    assert ranks[0]["all_rows"] == ranks[1]["all_rows"]  # identical rows
    mine = [set(r["loader_rows"]) for r in ranks]
    assert not mine[0] & mine[1]  # disjoint
    assert sorted(ranks[0]["loader_rows"] + ranks[1]["loader_rows"]) == sorted(ranks[0]["all_rows"])
    streamed = [r["streamed"] for r in ranks]
    assert not set(streamed[0]) & set(streamed[1])
    assert sorted(streamed[0] + streamed[1]) == list(range(40))
    # a mixture: each source prepared once, by one process; both draw the same rows every epoch
    # (a new draw each epoch), and their loaders share each epoch out between them
    assert [r["mixture_tokenised"] for r in ranks] == [40, 0]
    assert len(ranks[0]["entries_mixed"]) == 4  # one more per source
    assert ranks[1]["entries_mixed"] == ranks[0]["entries_mixed"]
    assert ranks[0]["mixture_drawn"] == ranks[1]["mixture_drawn"]
    assert ranks[0]["mixture_report"]["sources/a/examples"] == 12
    assert ranks[0]["mixture_drawn"][0] != ranks[0]["mixture_drawn"][1]
    for epoch, drawn in enumerate(ranks[0]["mixture_drawn"]):
        given = [r["mixture_given"][epoch] for r in ranks]
        assert not set(given[0]) & set(given[1]) and given[0] and given[1]
        assert sorted(given[0] + given[1]) == sorted(drawn)
