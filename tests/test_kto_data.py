"""KTO samples -> normalised records, on hand-made and real data."""

import json
import os
from pathlib import Path

import pytest
from plain import fixed_micro_batches, normalize_kto_samples

from trainer_lib.errors import KTODataError

FIXTURES = Path(os.environ.get("TRAINER_LIB_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"real data fixtures not found at {FIXTURES} (set TRAINER_LIB_FIXTURES)"
)

USER = {"role": "user", "content": "What is 2+2?"}


def test_labelled_dicts():
    records = normalize_kto_samples([
        {"prompt": "2+2=", "completion": "4", "label": True},
        {"prompt": [USER], "completion": [{"role": "assistant", "content": "5"}], "label": False},
    ])
    assert records == [
        {"prompt": "2+2=", "completion": "4", "label": True},
        {"prompt": [USER], "completion": [{"role": "assistant", "content": "5"}], "label": False},
    ]


def test_remapped_keys():
    records = normalize_kto_samples([{"q": "2+2=", "a": "4", "good": False}], input_key="q", output_key="a",
                                    label_key="good")
    assert records == [{"prompt": "2+2=", "completion": "4", "label": False}]


def test_tuples_and_lists():
    records = normalize_kto_samples([("2+2=", "4", True), ["3+3=", "7", False]])
    assert records == [
        {"prompt": "2+2=", "completion": "4", "label": True},
        {"prompt": "3+3=", "completion": "7", "label": False},
    ]


def test_preference_pairs_are_unpaired():
    records = normalize_kto_samples([{"prompt": "2+2=", "chosen": "4", "rejected": "5"},
                                     {"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    assert records == [
        {"prompt": "2+2=", "completion": "4", "label": True},
        {"prompt": "2+2=", "completion": "5", "label": False},
        {"prompt": "1+1=", "completion": "2", "label": True},
        {"prompt": "1+1=", "completion": "3", "label": False},
    ]


def test_conversational_pairs_with_implicit_prompt():
    system = {"role": "system", "content": "Be brief."}
    records = normalize_kto_samples([{
        "chosen": [system, USER, {"role": "assistant", "content": "4"}],
        "rejected": [system, USER, {"role": "assistant", "content": "5"}],
    }])
    assert [r["prompt"] for r in records] == [[system, USER]] * 2
    assert [r["completion"] for r in records] == [[{"role": "assistant", "content": "4"}],
                                                  [{"role": "assistant", "content": "5"}]]
    assert [r["label"] for r in records] == [True, False]


def test_text_transcripts_sharing_a_start_are_split_at_the_last_assistant_turn():
    """Anthropic HH-RLHF style: the prompt ends with the last shared "Assistant:", so the whole
    final answer is judged even where both answers begin alike."""
    convo = "\n\nHuman: Can you help?\n\nAssistant: Sure.\n\nHuman: Paint it red?\n\nAssistant:"
    records = normalize_kto_samples([{"chosen": convo + " I would rather not.",
                                      "rejected": convo + " I would paint it."}])
    assert [r["prompt"] for r in records] == [convo, convo]
    assert [r["completion"] for r in records] == [" I would rather not.", " I would paint it."]
    assert [r["label"] for r in records] == [True, False]
    # no turn headers: cut at the last whitespace, never inside a word
    records = normalize_kto_samples([{"chosen": "The sky is blue today", "rejected": "The sky is blank"}])
    assert [r["prompt"] for r in records] == ["The sky is"] * 2
    assert [r["completion"] for r in records] == [" blue today", " blank"]


@needs_fixtures
def test_real_hh_rlhf_transcripts_are_unpaired():
    import gzip

    with gzip.open(FIXTURES / "preference_pairs" / "harmless-base-test.jsonl.gz", "rt",
                   encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    records = normalize_kto_samples(rows)
    assert len(records) == 2 * len(rows) == 4624
    for row, good, bad in zip(rows, records[0::2], records[1::2]):
        assert good["prompt"] == bad["prompt"] and good["prompt"].endswith("\n\nAssistant:")
        assert good["prompt"] + good["completion"] == row["chosen"]
        assert bad["prompt"] + bad["completion"] == row["rejected"]
        # cut at the last assistant turn both share (the answers may differ in an earlier turn)
        assert "Assistant:" not in os.path.commonprefix([good["completion"], bad["completion"]])
        assert (good["label"], bad["label"]) == (True, False)


def test_messages_with_label():
    messages = [USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "Yes."}]
    tools = [{"type": "function", "function": {"name": "add"}}]
    records = normalize_kto_samples([{"messages": messages, "label": True, "tools": tools}])
    assert records == [{"prompt": messages[:3], "completion": messages[3:], "label": True, "tools": tools}]


def test_sharegpt_pair_and_conversation():
    pair = {
        "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"}],
        "chosen": {"from": "gpt", "value": "4"},
        "rejected": {"from": "gpt", "value": "5"},
    }
    records = normalize_kto_samples([pair])
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert records == [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": "4"}], "label": True},
        {"prompt": prompt, "completion": [{"role": "assistant", "content": "5"}], "label": False},
    ]
    labelled = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "label": False}
    assert normalize_kto_samples([labelled]) == [
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}],
         "label": False}
    ]


@needs_fixtures
def test_real_kto_feedback_file():
    rows = json.loads((FIXTURES / "kto_feedback" / "kto_en_demo.json").read_text(encoding="utf-8"))
    records = normalize_kto_samples(rows)
    assert len(records) == len(rows) == 300
    assert sum(r["label"] for r in records) == 150
    for row, record in zip(rows, records):
        assert record["prompt"] == row["messages"][:-1]
        assert record["completion"] == row["messages"][-1:]
        assert record["completion"][0]["role"] == "assistant"
        assert record["label"] is row["label"]


@needs_fixtures
def test_real_preference_pairs_file():
    rows = json.loads((FIXTURES / "preference_pairs" / "dpo_en_demo.json").read_text(encoding="utf-8"))
    records = normalize_kto_samples(rows)
    assert len(records) == 2 * len(rows) == 600
    assert [r["label"] for r in records[:4]] == [True, False, True, False]
    first = rows[0]
    assert records[0]["prompt"] == [{"role": "user", "content": first["conversations"][0]["value"]}]
    assert records[0]["completion"] == [{"role": "assistant", "content": first["chosen"]["value"]}]
    assert records[1]["completion"] == [{"role": "assistant", "content": first["rejected"]["value"]}]
    roles = {m["role"] for r in records for m in r["prompt"]}
    assert roles <= {"system", "user", "assistant"}
    assert all(r["prompt"][-1]["role"] == "user" for r in records)


@pytest.mark.parametrize("label", ["yes", "true", 1, 0, None, 1.0])
def test_labels_must_be_booleans(label):
    samples = [{"prompt": "p", "completion": "c", "label": True}] * 7 + [{"prompt": "p", "completion": "c",
                                                                          "label": label}]
    with pytest.raises(KTODataError) as err:
        normalize_kto_samples(samples)
    assert str(err.value) == f"sample 7: field 'label' is {label!r}; expected true or false"


def test_label_error_names_remapped_key_and_tuple_field():
    with pytest.raises(KTODataError, match="sample 0: field 'good' is 'yes'; expected true or false"):
        normalize_kto_samples([{"prompt": "p", "completion": "c", "good": "yes"}], label_key="good")
    with pytest.raises(KTODataError, match="sample 1: field 'label' is 1"):
        normalize_kto_samples([("p", "c", True), ("p", "c", 1)])
    with pytest.raises(KTODataError, match="sample 0: field 'label' is missing"):
        normalize_kto_samples([{"messages": [USER, {"role": "assistant", "content": "4"}]}])


@pytest.mark.parametrize("sample,message", [
    ({"prompt": "", "completion": "c", "label": True}, "sample 1: field 'prompt' is empty"),
    ({"prompt": "p", "completion": "  ", "label": True}, "sample 1: field 'completion' is empty"),
    ({"prompt": [], "completion": "c", "label": True}, "sample 1: field 'prompt' is empty"),
    ({"prompt": "p", "completion": None, "label": True}, "sample 1: field 'completion' is empty"),
    ({"prompt": "p", "label": True}, "sample 1: field 'completion' is missing"),
    ({"prompt": [USER], "completion": [{"role": "assistant", "content": ""}], "label": True},
     r"sample 1: field 'completion\[-1\].content' is empty"),
    ({"prompt": [USER], "completion": [USER], "label": True},
     r"sample 1: field 'completion\[-1\].role' is 'user'; a completion must be an assistant turn"),
    ({"prompt": [{"content": "hi"}], "completion": "c", "label": True}, r"sample 1: field 'prompt\[0\]' is"),
])
def test_bad_prompt_or_completion(sample, message):
    with pytest.raises(KTODataError, match=message):
        normalize_kto_samples([{"prompt": "p", "completion": "c", "label": False}, sample])


@pytest.mark.parametrize("sample,message", [
    ({"messages": [USER], "label": True}, r"sample 0: field 'messages\[-1\].role' is 'user'"),
    ({"messages": [{"role": "assistant", "content": "4"}], "label": True},
     "sample 0: field 'messages' has no prompt before the assistant completion"),
    ({"messages": [USER, {"role": "assistant", "content": ""}], "label": True},
     r"sample 0: field 'messages\[-1\].content' is empty"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "sample 0: field 'chosen' is empty"),
    ({"prompt": "p", "chosen": "c"}, "sample 0: field 'rejected' is missing"),
    ({"chosen": "Same words.", "rejected": "Same words."},
     "sample 0: field 'rejected' is the same transcript as 'chosen'"),
    ({"chosen": "Yes, I can.", "rejected": "No."}, "sample 0: field 'chosen' shares no prompt"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": [USER, {"role": "assistant", "content": "b"}]},
     "sample 0: field 'rejected' must have the same form as 'chosen'"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "robot", "value": "b"}}, r"sample 0: field 'rejected\[0\].from' is 'robot'"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "human", "value": "b"}},
     r"sample 0: field 'rejected\[-1\].role' is 'user'; a completion must be an assistant turn"),
    ({"text": "hello"}, "sample 0: unrecognised keys"),
    ("just text", "sample 0: expected a dict or a"),
    (("p", "c"), r"sample 0: a tuple must be \(prompt, completion, label\), got 2 items"),
])
def test_bad_conversations_and_pairs(sample, message):
    with pytest.raises(KTODataError, match=message):
        normalize_kto_samples([sample])


def test_mixed_formats_are_an_error():
    with pytest.raises(KTODataError, match="sample 1 is a preference pair .* but sample 0 is a labelled example"):
        normalize_kto_samples([{"prompt": "p", "completion": "c", "label": True},
                               {"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(KTODataError, match="all samples must have the same format"):
        normalize_kto_samples([("p", "c", True), {"prompt": "p", "completion": "c", "label": True}])


def test_no_samples_is_an_error():
    with pytest.raises(KTODataError, match="no KTO samples"):
        normalize_kto_samples([])


@pytest.mark.parametrize("n, size", [(8, 4), (9, 4), (10, 3), (5, 8), (2, 1)])
def test_fixed_micro_batches_cover_every_example_once_and_never_leave_one_alone(n, size):
    batches = fixed_micro_batches(n, size, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(len(b) <= size + 1 for b in batches)  # a lone last example joins one batch
    assert all(len(b) >= 2 for b in batches) if size > 1 else all(len(b) == 1 for b in batches)
    assert batches == fixed_micro_batches(n, size, seed=3)  # decided by the seed alone


def test_tool_calls_take_the_form_sft_conversations_take():
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    [record] = normalize_kto_samples([{
        "messages": [USER, {"role": "assistant", "content": None, "tool_calls": [call]}],
        "label": True}])
    # arguments written as a JSON string become a dict (templates tojson them once), no content: ""
    assert record["completion"] == [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}]

    # a ShareGPT function_call turn is a tool call, not assistant text
    turns = [{"from": "human", "value": "Weather in Rome?"},
             {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Rome"}}'}]
    [record] = normalize_kto_samples([{"conversations": turns, "label": False}])
    assert record["completion"] == [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}]
    assert record["prompt"] == [{"role": "user", "content": "Weather in Rome?"}]


@pytest.mark.parametrize("n, size", [(8, 4), (9, 4), (10, 3), (5, 8), (2, 1), (1, 2)])
def test_the_pipelines_micro_batches_are_fixed_micro_batches(n, size):
    import numpy as np

    from trainer_lib.methods.kto.recipe import micro_batch_offsets

    order = np.random.default_rng(3).permutation(n)
    offsets = micro_batch_offsets(n, size)
    batches = [order[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert batches == fixed_micro_batches(n, size, seed=3)
