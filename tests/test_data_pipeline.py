"""The data pipeline against plain per-sample tokenisation, and bad input naming the sample.

For every sample kind, the examples the pipeline stores (read back from its Arrow table) must be
token for token, label for label, those that the per-sample functions give one sample at a time,
and the data report's counts those of a plain loop over them. Run with the embedded tokenizer,
and with the real tokenizers and data of the shared fixtures when they are present.
"""

import json
from collections import Counter

import datasets
import pytest
from conftest import fixtures_path
from plain import count_loss_tokens, normalize_kto_samples, normalize_sft_samples

from trainer_lib import DataError, default_kto_config, default_sft_config
from trainer_lib.data import chat_template
from trainer_lib.data.chat_template import RunTemplate
from trainer_lib.data.pipeline import build_data
from trainer_lib.data.tokenize import fit_to_length, tokenize_pair, tokenize_text
from trainer_lib.errors import ChatError
from trainer_lib.methods.kto.loss import mismatched_pairing
from trainer_lib.methods.kto.recipe import KTORecipe, micro_batches, tokenize_kto_pair
from trainer_lib.methods.sft.recipe import SFTRecipe
from trainer_lib.model.embedded import CHAT_TOOLS_DATA, build_tokenizer, load_default_samples

FIXTURES = fixtures_path()


@pytest.fixture(scope="module")
def tok():
    """The embedded kind of tokenizer (byte-level BPE, BOS, ChatML template with tools)."""
    texts = [v for row in load_default_samples() for v in row.values()]
    texts += [line for line in CHAT_TOOLS_DATA.read_text().splitlines()]
    return build_tokenizer(texts, vocab_size=600)


def fixture_tokenizer(name):
    from transformers import AutoTokenizer

    folder = FIXTURES / "tokenizers" / name
    if not folder.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    return AutoTokenizer.from_pretrained(folder)


def fixture_rows(relative, n):
    path = FIXTURES / relative
    if not path.is_file():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    text = path.read_text(encoding="utf-8")
    rows = [json.loads(l) for l in text.splitlines() if l.strip()] if path.suffix == ".jsonl" \
        else json.loads(text)
    return rows[:n]


def sft_config(**method):
    return default_sft_config().evolve(train=dict(seq_length=96, progress_bar=False),
                                       method=dict(packing=False, **method))


def prepare(tokenizer, config, samples, eval_samples=None):
    if config.method.name == "kto":
        recipe = KTORecipe(tokenizer, RunTemplate(tokenizer, config.tokenizer.chat_template),
                           config.method, config.train.seq_length)
    else:
        recipe = SFTRecipe(tokenizer, RunTemplate(tokenizer, config.tokenizer.chat_template),
                           config.method, config.train.seq_length)
    return build_data(None, config, recipe, samples, eval_samples), recipe


# ---------------------------------------------------------------------- the references


def reference_sft(tokenizer, config, samples):
    """One sample at a time, with the functions the pipeline is built on; and the report."""
    m, seq_length = config.method, config.train.seq_length
    template = RunTemplate(tokenizer, config.tokenizer.chat_template).template
    records = normalize_sft_samples(samples, m.text_key, m.input_key, m.output_key)
    examples, counts = [], Counter()
    for i, r in enumerate(records):
        if r["kind"] == "text":
            ex, kind = tokenize_text(tokenizer, r["text"], m.add_eos), "text"
        elif r["kind"] == "pair":
            ex, kind = tokenize_pair(tokenizer, r["prompt"], r["completion"], m.add_eos), "pair"
        elif r["kind"] == "conversation":
            ex = chat_template.tokenize_conversation(tokenizer, r["messages"], r["tools"], template,
                                            loss_on=m.loss_on, index=i)
            kind = "chat"
        else:
            ex = chat_template.tokenize_prompt_completion_messages(tokenizer, r["prompt"], r["completion"],
                                                          r["tools"], template, index=i)
            kind = "chat"
        pieces, what = fit_to_length(ex, seq_length, kind, m.overlong)
        counts[what or "fits"] += 1
        for piece in pieces:
            if count_loss_tokens(piece["labels"]) == 0:
                counts["dropped:no_loss_tokens"] += 1
            else:
                examples.append(piece)
    return examples, counts


def assert_same_examples(got, expected):
    got = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in got]
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == {"input_ids": list(e["input_ids"]), "labels": list(e["labels"])}, i


def assert_report(report, examples, counts, n_samples):
    assert report.num_samples == n_samples
    assert report.num_examples == len(examples)
    assert report.num_tokens == sum(len(e["input_ids"]) for e in examples)
    assert report.num_loss_tokens == sum(count_loss_tokens(e["labels"]) for e in examples)
    assert report.truncated == counts["truncated"] and report.split == counts["split"]
    assert dict(report.dropped) == {k.split(":", 1)[1]: v for k, v in counts.items()
                                    if k.startswith("dropped:")}


# ---------------------------------------------------------------------- SFT, every kind


def tool_conversations():
    return [json.loads(l) for l in CHAT_TOOLS_DATA.read_text().splitlines() if l.strip()]


def embedded_sets():
    """kind -> (samples, method settings, seq_length): every kind, with over-long samples."""
    alpaca = load_default_samples()[:20]
    long_text = " ".join(f"word{i}" for i in range(150))
    pairs = [["What is 2 + 2?\n", " 4"], {"prompt": long_text + "\n", "completion": "ok"},
             {"prompt": "", "completion": "no prompt at all"}]
    return {
        "text": (["The capital of France is Paris.", long_text, {"text": "hello there"}],
                 dict(overlong="split"), 96),
        "pairs": (pairs, {}, 96),
        "pairs_dropped": (pairs, dict(overlong="drop"), 96),
        "alpaca": (alpaca, {}, 96),
        # two tools with different argument schemas, tool calls and tool turns; the longest
        # conversations are cut, some of their assistant tokens with them
        "conversations": (tool_conversations()[:12], dict(loss_on="assistant"), 262),
        "last_assistant": (tool_conversations()[:12], dict(loss_on="last_assistant"), 262),
        "sharegpt": ([{"conversations": [{"from": "human", "value": "Hi"},
                                         {"from": "gpt", "value": "Hello!"},
                                         {"from": "human", "value": "Weather?"},
                                         {"from": "function_call", "value":
                                          '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
                                         {"from": "observation", "value": "sunny"},
                                         {"from": "gpt", "value": "Sunny in Rome."}]}] * 3, {}, 96),
        "chat_pairs": ([{"prompt": [{"role": "user", "content": f"Question {i}?"}],
                         "completion": [{"role": "assistant", "content": f"Answer {i}."}]}
                        for i in range(5)], {}, 96),
    }


@pytest.mark.parametrize("kind", list(embedded_sets()))
def test_every_sft_kind_matches_per_sample_tokenisation(tok, kind):
    samples, method, seq_length = embedded_sets()[kind]
    config = sft_config(**method).evolve(train=dict(seq_length=seq_length))
    data, _ = prepare(tok, config, samples)
    expected, counts = reference_sft(tok, config, samples)
    assert expected  # the comparison is not of two empty lists
    assert_same_examples(data.train, expected)
    assert_report(data.report, expected, counts, len(samples))


def test_a_file_a_dataset_and_a_list_give_the_same_examples(tok, tmp_path):
    """JSON files keep nested schemas exactly; a Dataset's Arrow-unified rows are cleaned."""
    samples = tool_conversations()[:10]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    expected, _ = reference_sft(tok, sft_config(), samples)
    for source in (str(path), datasets.Dataset.from_list(samples), samples):
        data, _ = prepare(tok, sft_config(), source)
        assert_same_examples(data.train, expected)


REAL = [
    ("qwen3", "tools", lambda: tool_conversations()),
    ("qwen3", "sharegpt", lambda: fixture_rows("chat_toolcalls/glaive_toolcall_en_demo.json", 40)),
    ("llama-3-instruct", "alpaca", lambda: fixture_rows("instruction_alpaca/alpaca_en_demo.json",
                                                        200)),
    ("llama-3-instruct", "chat_pairs", lambda: [
        {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
        for r in fixture_rows("kto_feedback/kto_en_demo.json", 40)]),
    ("phi-3-mini-instruct", "alpaca", lambda: fixture_rows(
        "instruction_alpaca/gsm_8k_train_alpaca_format.json", 200)),
    ("phi-3-mini-instruct", "conversations", lambda: [
        {"messages": r["messages"]} for r in fixture_rows("kto_feedback/kto_en_demo.json", 40)]),
]


@pytest.mark.parametrize("name, kind, rows", REAL, ids=[f"{n}-{k}" for n, k, _ in REAL])
def test_real_tokenizers_and_data_match_per_sample_tokenisation(name, kind, rows):
    tokenizer = fixture_tokenizer(name)
    samples = rows()
    config = sft_config().evolve(train=dict(seq_length=256))
    data, _ = prepare(tokenizer, config, samples)
    expected, counts = reference_sft(tokenizer, config, samples)
    assert_same_examples(data.train, expected)
    assert_report(data.report, expected, counts, len(samples))


# ---------------------------------------------------------------------- KTO, every format


def kto_sets():
    user = {"role": "user", "content": "What is 2 + 2?"}
    return {
        "labelled": [{"prompt": f"Q{i}: ", "completion": f" A{i}", "label": i % 2 == 0}
                     for i in range(6)],
        "tuples": [(f"Q{i}: ", f" A{i}", i % 3 != 0) for i in range(6)],
        "messages": [{"messages": [user, {"role": "assistant", "content": f"{i}"}],
                      "label": i % 2 == 1} for i in range(6)],
        "pairs": [{"prompt": f"Q{i}: ", "chosen": " good", "rejected": " bad"} for i in range(4)],
        "chat_pairs": [{"chosen": [user, {"role": "assistant", "content": "4"}],
                        "rejected": [user, {"role": "assistant", "content": "5"}]}] * 3,
    }


def kto_config(**train):
    return default_kto_config().evolve(train=dict(seq_length=64, batch_size=3, progress_bar=False,
                                                  **train))


def kto_example(tokenizer, template, prompt, completion, tools, seq_length, overlong,
                index=None):
    """One KTO record as the pipeline stores it, computed alone: `tokenize_kto_pair` fitted to
    `seq_length` (None when the policy drops it), with `truncated`."""
    example = tokenize_kto_pair(tokenizer, template, prompt, completion, tools, index)
    fitted, what = fit_to_length(example, seq_length, "pair", overlong)
    if not fitted:
        return None
    return {**fitted[0], "truncated": int(what == "truncated")}


def reference_kto(tokenizer, config, samples):
    template = RunTemplate(tokenizer, config.tokenizer.chat_template)
    out = []
    for r in normalize_kto_samples(samples):
        ex = kto_example(tokenizer, template, r["prompt"], r["completion"], r.get("tools"),
                         config.train.seq_length, config.method.overlong)
        out.append({**ex, "label": r["label"], "prompt": r["prompt"],
                    "completion": r["completion"], "tools": r.get("tools")})
    return out


@pytest.mark.parametrize("kind", list(kto_sets()))
def test_every_kto_format_and_its_kl_pairs_match_per_sample_tokenisation(tok, kind):
    samples = kto_sets()[kind]
    config = kto_config()
    data, recipe = prepare(tok, config, samples)
    expected = reference_kto(tok, config, samples)
    got = list(data.train)
    assert_same_examples(got, expected)
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert data.report.kinds == Counter("desirable" if e["label"] else "undesirable"
                                        for e in expected)
    # the mismatched pairs, tokenised in the pipeline: prompt i, completion of p[i], same batch
    template = RunTemplate(tok, "default")
    train, _ = micro_batches(data, recipe, 3, 3, config.train.seed, True, None)
    seen, row_of = 0, train.layout.flat  # the table row of each position
    for number, group in enumerate(train):
        span = train.layout.positions(int(train.ids[number]))
        for i, j in enumerate(mismatched_pairing(len(group))):
            mine, partner = expected[row_of[span[i]]], expected[row_of[span[j]]]
            want = kto_example(tok, template, mine["prompt"], partner["completion"],
                               mine["tools"], config.train.seq_length, "truncate")
            assert group[i]["kl"] == {"input_ids": want["input_ids"], "labels": want["labels"]}
            seen += 1
    assert seen == len(expected)


def test_real_kto_feedback_and_pairs_match(tmp_path):
    tokenizer = fixture_tokenizer("qwen3")
    for rows in (fixture_rows("kto_feedback/kto_en_demo.json", 30),
                 fixture_rows("preference_pairs/dpo_en_demo.json", 15)):
        config = kto_config().evolve(train=dict(seq_length=256))
        data, _ = prepare(tokenizer, config, rows)
        assert_same_examples(data.train, reference_kto(tokenizer, config, rows))


# ---------------------------------------------------------------------- sources and bad input


def test_a_json_file_holding_json_lines_is_read(tok, tmp_path):
    rows = [{"prompt": f"Q{i}\n", "completion": f"A{i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).to_json(tmp_path / "rows.json")  # JSON Lines, named .json
    data, _ = prepare(tok, sft_config(), str(tmp_path / "rows.json"))
    assert_same_examples(data.train, reference_sft(tok, sft_config(), rows)[0])


@pytest.mark.parametrize("name, write", [
    ("rows.jsonl", lambda rows: "".join(json.dumps(r) + "\n" for r in rows)),
    ("rows.json", lambda rows: json.dumps(rows, indent=1)),
    ("lines.json", lambda rows: "".join(json.dumps(r) + "\n" for r in rows)),  # JSON Lines
])
def test_a_file_saved_with_a_byte_order_mark_is_read(tok, tmp_path, name, write):
    """Spreadsheets and Windows tools start a UTF-8 file with the mark EF BB BF; it is not
    data, whether the file is read whole or streamed."""
    rows = [{"prompt": f"Q{i}\n", "completion": f"A{i}"} for i in range(4)]
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + write(rows).encode("utf-8"))
    data, recipe = prepare(tok, sft_config(), str(path))
    assert_same_examples(data.train, reference_sft(tok, sft_config(), rows)[0])
    if name.endswith(".jsonl"):
        from trainer_lib.data.sources import open_source

        streamed = open_source(str(path), "samples", streaming=True).train.stream
        assert [json.loads(r["json"]) for r in streamed] == rows


def test_a_parquet_file_and_a_folder_of_files_are_read_with_datasets(tok, tmp_path):
    rows = [{"prompt": f"Q{i}\n", "completion": f"A{i}"} for i in range(6)]
    expected = reference_sft(tok, sft_config(), rows)[0]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "rows.parquet")
    data, _ = prepare(tok, sft_config(), str(tmp_path / "rows.parquet"))
    assert_same_examples(data.train, expected)
    folder = tmp_path / "hub_like"  # what load_dataset(name) finds: a DatasetDict by file names
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    data, _ = prepare(tok, sft_config(), str(folder))
    assert_same_examples(data.train, expected[:4])
    assert_same_examples(data.eval, expected[4:])


def test_every_bad_line_of_a_file_is_reported_at_once(tok, tmp_path):
    good = b'{"prompt": "a\\n", "completion": "b"}\n'
    lines = [good, b'{"prompt": "a", \n', b"\n", b'{"prompt": "caf\xe9", "completion": "x"}\n']
    lines += [b"[1,\n"] * 25 + [good]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(lines))
    with pytest.raises(DataError) as caught:
        prepare(tok, sft_config(), str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: 27 lines cannot be read")
    assert "line 2: not valid JSON" in message
    assert "line 4: not UTF-8 (byte 0xe9 at column 16)" in message  # latin-1, not UTF-8
    assert "line 22: not valid JSON" in message and "line 23:" not in message  # 20 listed
    assert "... and 7 more" in message


def test_non_utf8_json_names_the_file_and_the_line(tok, tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"prompt": "a", "completion": "b"},\n {"prompt": "\xe9t\xe9"}]')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 .*save the file as UTF-8"):
        prepare(tok, sft_config(), str(path))
    one_bad = tmp_path / "one.jsonl"
    one_bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{one_bad}:2: not UTF-8"):
        prepare(tok, sft_config(), str(one_bad))


def test_a_dataset_dict_trains_on_train_and_evaluates_on_validation_or_test(tok, capsys):
    rows = [{"prompt": f"Q{i}\n", "completion": f"A{i}"} for i in range(6)]
    splits = {"train": rows[:4], "test": rows[4:5], "validation": rows[5:]}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    data, _ = prepare(tok, sft_config(), dd)
    assert "training on 'train', evaluating eval/loss on 'validation'" in capsys.readouterr().out
    assert_same_examples(data.train, reference_sft(tok, sft_config(), rows[:4])[0])
    assert_same_examples(data.eval, reference_sft(tok, sft_config(), rows[5:])[0])
    del dd["validation"]
    data, _ = prepare(tok, sft_config(), dd)
    assert_same_examples(data.eval, reference_sft(tok, sft_config(), rows[4:5])[0])
    with pytest.raises(DataError, match=r"splits \['a', 'b'\] but no 'train' split.*dataset\['a'\]"):
        prepare(tok, sft_config(), datasets.DatasetDict({"a": dd["train"], "b": dd["test"]}))


def test_a_chat_template_that_fails_names_the_sample(tok):
    template = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
                "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    plain = {"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}
    samples = [plain] * 3 + tool_conversations()[:1]
    config = sft_config().evolve(tokenizer=dict(chat_template=template))
    with pytest.raises(ChatError, match=r"^sample 3: the chat template cannot render .*no tools"):
        prepare(tok, config, samples)


def test_split_on_pairs_names_the_first_overlong_sample(tok):
    samples = [["short\n", "answer"]] * 2 + [[" ".join(["word"] * 200), "answer"]] * 2
    with pytest.raises(DataError, match=r'^sample 2: \d+ tokens, more than train.seq_length=96, '
                                        r'and method.overlong="split" cuts only text'):
        prepare(tok, sft_config(overlong="split"), samples)


def test_bad_samples_are_named_from_worker_processes(tok):
    """With two tokenising processes the error still names the sample, in the user's numbering."""
    samples = [["Q\n", "A"]] * 40 + [["Q\n", ""]] + [["Q\n", "A"]] * 40
    config = sft_config().evolve(data=dict(num_proc=2))
    with pytest.raises(DataError, match=r"^sample 40: field '\[1\] \(completion\)' is empty"):
        prepare(tok, config, samples)
    kto = kto_config().evolve(data=dict(num_proc=2))
    bad = kto_sets()["labelled"] * 10
    bad[47] = {"prompt": "p", "completion": "c", "label": "yes"}
    with pytest.raises(DataError, match=r"^sample 47: field 'label' is 'yes'; expected true or fa"):
        prepare(tok, kto, bad)
