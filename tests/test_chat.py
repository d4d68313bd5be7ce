"""Conversation rendering: normalisation, templates, and loss on exactly the assistant's tokens.

Masks are checked against strings written by hand from each template's published format: the
loss-carrying tokens are decoded run by run and compared with the exact expected text.
"""

import copy
import functools
import json
import os
from pathlib import Path

import pytest
import torch

from trainer_lib.data.chat_template import (
    apply_template_to_tokenizer,
    render_generation_prompt,
    resolve_chat_template,
    tokenize_conversation,
    tokenize_prompt_completion_messages,
)
from trainer_lib.data.conversations import clean_dataset_row, normalize_conversation
from trainer_lib.errors import ChatError

torch.set_num_threads(1)

FIXTURES = Path(os.environ.get("TRAINER_LIB_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures")

# Qwen2.5-Instruct's template as the model publishes it: it injects a default system prompt.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_web",
        "description": "Search the web",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "max_results": {"type": "integer"}},
            "required": ["query"],
        },
    },
}
CAPITALS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def tool_call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def weather_conversation(arguments='{"city": "Paris"}'):
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call("get_weather", arguments)]},
        {"role": "tool", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 C in Paris."},
    ]


@functools.lru_cache(maxsize=None)
def _load(name):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / name)


def tokenizer(name):
    if not (FIXTURES / "tokenizers" / name).is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES} (set TRAINER_LIB_FIXTURES to the fixtures folder)")
    return _load(name)


def segments(tok, out):
    """Consecutive runs of loss / no-loss tokens, decoded: [(carries_loss, text), ...]."""
    assert len(out["input_ids"]) == len(out["labels"])
    runs = []
    for token, label in zip(out["input_ids"], out["labels"]):
        assert label in (token, -100)
        if runs and runs[-1][0] == (label != -100):
            runs[-1][1].append(token)
        else:
            runs.append((label != -100, [token]))
    return [(loss, tok.decode(ids, skip_special_tokens=False)) for loss, ids in runs]


def loss_texts(tok, out):
    return [text for loss, text in segments(tok, out) if loss]


def check_mask(tok, conversation, template, expected, loss_on="assistant"):
    """Loss text equals `expected` run by run, and the no-loss runs are exactly the rest of the render."""
    out = tokenize_conversation(tok, conversation["messages"], conversation["tools"], template, loss_on, index=0)
    assert loss_texts(tok, out) == expected
    rendered = tok.apply_chat_template(
        conversation["messages"], tools=conversation["tools"], chat_template=template, tokenize=False
    )
    assert "".join(text for _, text in segments(tok, out)) == rendered  # byte-level BPE: pieces decode exactly
    return out, rendered


# ---------------------------------------------------------------- masks on the embedded template
# These need no fixtures: the embedded tokenizer (trainer_lib.model.embedded) has a ChatML template with
# tools, and its byte-level BPE decodes every piece exactly.


@functools.lru_cache(maxsize=None)
def embedded_tokenizer():
    from trainer_lib.model.embedded import build_tokenizer, load_default_samples

    texts = [v for row in load_default_samples() for v in row.values()]
    return build_tokenizer(texts + [json.dumps(WEATHER), "Weather in Paris? It is 21 C."], 600)


def check_embedded_mask(tok, conversation, template, expected, loss_on="assistant"):
    """check_mask for a tokenizer that puts BOS before plain text while the template writes none:
    the example starts with one BOS that carries no loss, then the render, token for token."""
    out = tokenize_conversation(tok, conversation["messages"], conversation["tools"], template,
                                loss_on, index=0)
    assert loss_texts(tok, out) == expected
    rendered = tok.apply_chat_template(conversation["messages"], tools=conversation["tools"],
                                       chat_template=template, tokenize=False)
    assert out["input_ids"][0] == tok.bos_token_id and out["labels"][0] == -100
    assert "".join(text for _, text in segments(tok, out)) == tok.bos_token + rendered
    return out, rendered


def test_embedded_chatml_masks_tool_calls_exactly():
    tok = embedded_tokenizer()
    conversation = normalize_conversation({"messages": weather_conversation(), "tools": [WEATHER]}, 0)
    out, rendered = check_embedded_mask(tok, conversation, resolve_chat_template(tok, "default"), [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>',
        "It is 21 C in Paris.<|im_end|>",
    ])
    no_loss = [text for loss, text in segments(tok, out) if not loss]
    # the role headers are context: each assistant turn's loss starts right after its header
    assert no_loss[0].startswith("<s><|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert no_loss[0].endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert no_loss[1] == '\n<|im_start|>tool\n{"temp_c": 21}<|im_end|>\n<|im_start|>assistant\n'
    assert rendered.count("<|im_start|>assistant") == 2


def test_embedded_chatml_last_assistant_and_prompt_completion_messages():
    tok = embedded_tokenizer()
    template = resolve_chat_template(tok, "default")
    conversation = normalize_conversation({"messages": CAPITALS}, 0)
    check_embedded_mask(tok, conversation, template, ["The capital of France is Paris.<|im_end|>",
                                                      "Rome.<|im_end|>"])
    check_embedded_mask(tok, conversation, template, ["Rome.<|im_end|>"], loss_on="last_assistant")
    out = tokenize_prompt_completion_messages(tok, CAPITALS[:4], [CAPITALS[4]], None, template)
    assert loss_texts(tok, out) == ["Rome.<|im_end|>"]  # the earlier assistant turn is context
    assert render_generation_prompt(tok, CAPITALS[:4], None, template).endswith(
        "<|im_start|>assistant\n")


def test_a_tokenizer_without_template_is_offered_only_what_can_work():
    tok = copy.deepcopy(embedded_tokenizer())
    tok.chat_template = None
    with pytest.raises(ChatError) as caught:
        resolve_chat_template(tok, "default")
    message = str(caught.value)
    assert "has no chat template, so chat_template='default' cannot be used" in message
    assert message.endswith("set tokenizer.chat_template to None (passthrough: contents "
                            "concatenated), a Jinja template string, or a path to a .jinja file")
    assert '"default"' not in message


# ---------------------------------------------------------------- masks on real templates


def test_qwen3_tools_tool_calls_and_tool_turn():
    tok = tokenizer("qwen3")
    conversation = normalize_conversation({"messages": weather_conversation(), "tools": [WEATHER]}, 0)
    template = resolve_chat_template(tok, "default")
    _, rendered = check_mask(tok, conversation, template, [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\nIt is 21 C in Paris.<|im_end|>",
    ])
    assert '"arguments": {"city": "Paris"}' in rendered  # JSON-string arguments were not encoded twice


def test_llama3_headers_are_not_trained_on():
    tok = tokenizer("llama-3-instruct")
    conversation = normalize_conversation({"messages": CAPITALS}, 0)
    out = tokenize_conversation(tok, conversation["messages"], None, resolve_chat_template(tok, "default"))
    assert loss_texts(tok, out) == ["The capital of France is Paris.<|eot_id|>", "Rome.<|eot_id|>"]
    assert out["input_ids"][0] == tok.bos_token_id and out["input_ids"].count(tok.bos_token_id) == 1
    no_loss = [text for loss, text in segments(tok, out) if not loss]
    assert no_loss[1] == "<|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>" \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_template_that_injects_a_system_prompt(tmp_path):
    tok = tokenizer("qwen3")
    path = tmp_path / "qwen25.jinja"
    path.write_text(QWEN25_TEMPLATE, encoding="utf-8")
    template = resolve_chat_template(tok, str(path))
    assert template == QWEN25_TEMPLATE
    plain = normalize_conversation({"messages": CAPITALS[1:]}, 0)
    _, rendered = check_mask(tok, plain, template, ["The capital of France is Paris.<|im_end|>", "Rome.<|im_end|>"])
    assert rendered.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    tools = normalize_conversation({"messages": weather_conversation()[1:], "tools": [WEATHER, SEARCH]}, 0)
    check_mask(tok, tools, template, [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 C in Paris.<|im_end|>",
    ])


def test_phi3_end_of_conversation_eos_is_not_trained_on():
    tok = tokenizer("phi-3-mini-instruct")
    conversation = normalize_conversation({"messages": CAPITALS}, 0)
    out = tokenize_conversation(tok, conversation["messages"], None, resolve_chat_template(tok, "default"))
    assert loss_texts(tok, out) == ["The capital of France is Paris.<|end|>", "Rome.<|end|>"]
    assert out["input_ids"][-1] == tok.eos_token_id and out["labels"][-1] == -100


def test_qwen3_drops_past_reasoning_and_masks_follow_the_full_render():
    tok = tokenizer("qwen3")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I need the tool.",
         "tool_calls": [tool_call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 C.", "reasoning_content": "Got it."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome.", "reasoning_content": "Be polite."},
    ]
    conversation = normalize_conversation({"messages": messages, "tools": [WEATHER]}, 0)
    _, rendered = check_mask(tok, conversation, tok.chat_template, [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 C.<|im_end|>",
        "<think>\nBe polite.\n</think>\n\nYou're welcome.<|im_end|>",
    ])
    assert "I need the tool." not in rendered and "Got it." not in rendered  # the template drops past reasoning


def test_loss_on_last_assistant_and_all():
    tok = tokenizer("llama-3-instruct")
    conversation = normalize_conversation({"messages": CAPITALS}, 0)
    template = resolve_chat_template(tok, "default")
    check_mask(tok, conversation, template, ["Rome.<|eot_id|>"], loss_on="last_assistant")
    out = tokenize_conversation(tok, conversation["messages"], None, template, loss_on="all")
    assert out["labels"] == out["input_ids"]
    with pytest.raises(ChatError, match="loss_on"):
        tokenize_conversation(tok, conversation["messages"], None, template, loss_on="assistants")


def test_prompt_completion_messages_and_generation_prompt():
    tok = tokenizer("llama-3-instruct")
    template = resolve_chat_template(tok, "default")
    prompt, completion = CAPITALS[:4], [{"role": "assistant", "content": "Rome."}]
    out = tokenize_prompt_completion_messages(tok, prompt, completion, None, template)
    assert loss_texts(tok, out) == ["Rome.<|eot_id|>"]  # the assistant turn inside the prompt is context
    prompt_text = render_generation_prompt(tok, prompt, None, template)
    assert prompt_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert out["input_ids"][: len(prompt_ids)] == prompt_ids
    assert loss_texts(tok, tokenize_prompt_completion_messages(tok, "Hi", "Hello!", None, template)) == [
        "Hello!<|eot_id|>"
    ]


# ---------------------------------------------------------------- datasets and formats


def render(tok, conversation):
    return tok.apply_chat_template(conversation["messages"], tools=conversation["tools"], tokenize=False)


def _tool_rows():
    return [
        {"messages": [
            {"role": "user", "content": "Weather in Paris, in celsius?"},
            {"role": "assistant", "content": None,
             "tool_calls": [tool_call("get_weather", {"city": "Paris", "unit": "celsius"})]},
            {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_0"},
            {"role": "assistant", "content": "It is 21 C."},
        ], "tools": [WEATHER, SEARCH]},
        {"messages": [
            {"role": "user", "content": "Find pasta recipes."},
            {"role": "assistant", "content": "Searching.",
             "tool_calls": [tool_call("search_web", {"query": "pasta", "max_results": 3})]},
            {"role": "tool", "content": "[]"},
            {"role": "assistant", "content": "Nothing found.", "reasoning_content": "Empty result."},
        ], "tools": [SEARCH]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    ]


def _as_json_strings(row):
    row = copy.deepcopy(row)
    for message in row["messages"]:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    row["tools"] = json.dumps(row.get("tools"))
    return row


@pytest.mark.parametrize("stored_as", ["objects", "json_strings"])
def test_dataset_round_trip_renders_byte_identical(tmp_path, stored_as):
    datasets = pytest.importorskip("datasets")
    tok = tokenizer("qwen3")
    rows = _tool_rows() if stored_as == "objects" else [_as_json_strings(r) for r in _tool_rows()]
    jsonl = tmp_path / "tools.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    from_json = datasets.load_dataset(
        "json", data_files=str(jsonl), split="train", cache_dir=str(tmp_path / "cache")
    )
    from_list = datasets.Dataset.from_list(rows)
    if stored_as == "objects":  # Arrow really did unify the tool schemas
        assert from_list[1]["tools"][0]["function"]["parameters"]["properties"]["city"] is None
    for index, original in enumerate(_tool_rows()):
        expected = normalize_conversation(original, index)
        for dataset in (from_json, from_list):
            got = normalize_conversation(clean_dataset_row(dataset[index]), index)
            assert json.dumps(got["tools"]) == json.dumps(expected["tools"])  # same keys, same order
            for want, have in zip(expected["messages"], got["messages"]):
                assert have == want
            assert render(tok, got) == render(tok, expected)
            assert tokenize_conversation(tok, got["messages"], got["tools"], tok.chat_template) == \
                tokenize_conversation(tok, expected["messages"], expected["tools"], tok.chat_template)
    tools = normalize_conversation(clean_dataset_row(from_list[0]), 0)["tools"]
    assert set(tools[0]["function"]["parameters"]["properties"]) == {"city", "unit"}
    assert set(tools[1]["function"]["parameters"]["properties"]) == {"query", "max_results"}


def test_sharegpt_glaive_rows_render_with_assistant_loss():
    path = FIXTURES / "chat_toolcalls" / "glaive_toolcall_en_demo.json"
    if not path.is_file():
        pytest.skip(f"shared fixtures not found at {FIXTURES} (set TRAINER_LIB_FIXTURES to the fixtures folder)")
    tok = tokenizer("qwen3")
    rows = json.loads(path.read_text(encoding="utf-8"))
    with_call = [i for i, r in enumerate(rows) if any(t["from"] == "function_call" for t in r["conversations"])]
    for index in [with_call[0], with_call[1], 1]:
        conversation = normalize_conversation(rows[index], index)
        roles = [m["role"] for m in conversation["messages"]]
        assert roles[0] == "user" and "assistant" in roles
        messages, tools = conversation["messages"], conversation["tools"]
        out = tokenize_conversation(tok, messages, tools, tok.chat_template, index=index)
        trained = loss_texts(tok, out)
        assert trained and all(text.endswith("<|im_end|>") for text in trained)
        assert not any("<|im_start|>" in text for text in trained)
        if index in with_call:
            turns = rows[index]["conversations"]
            call = json.loads(next(t["value"] for t in turns if t["from"] == "function_call"))
            assert any(f'{{"name": "{call["name"]}", "arguments": ' in text for text in trained)
            assert any(m["role"] == "tool" for m in conversation["messages"])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("sample, index, message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, 12,
     "sample 12: messages[1].role is 'bot'; expected one of system, user, assistant, tool"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, 5,
     "sample 5: messages[0].content is missing"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"arguments": "{}"}}]}]}, 7,
     "sample 7: messages[1].tool_calls[0] has no function name"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}, 2,
     "sample 2: the conversation has no assistant turn"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}, 4,
     "sample 4: conversations[1].from is 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": "[{"}, 8,
     "sample 8: tools is not valid JSON"),
])
def test_bad_conversations_name_sample_and_field(sample, index, message):
    with pytest.raises(ChatError) as caught:
        normalize_conversation(sample, index)
    assert message in str(caught.value)


def test_template_that_rejects_a_role_is_a_chat_error():
    tok = tokenizer("qwen3")
    template = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('tool turns are not supported') }}"
        "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    conversation = normalize_conversation({"messages": weather_conversation()}, 9)
    with pytest.raises(ChatError, match="sample 9: .*tool turns are not supported"):
        tokenize_conversation(tok, conversation["messages"], None, template, index=9)


@pytest.mark.parametrize("name", ["gpt2", "phi-2"])
def test_tokenizer_without_template(name):
    tok = tokenizer(name)
    with pytest.raises(ChatError) as caught:
        resolve_chat_template(tok, "default")
    for option in ["None (passthrough", "Jinja template string", ".jinja file"]:
        assert option in str(caught.value)
    assert '"default"' not in str(caught.value)  # the value that just failed
    template = resolve_chat_template(tok, None)
    assert template is None
    conversation = normalize_conversation({"messages": CAPITALS[1:3] + [{"role": "user", "content": " More?"},
                                                                        {"role": "assistant", "content": " No."}]}, 0)
    out = tokenize_conversation(tok, conversation["messages"], None, template)
    assert loss_texts(tok, out) == ["The capital of France is Paris.", " No."]
    assert tok.decode(out["input_ids"]) == "What is the capital of France?The capital of France is Paris. More? No."
    assert render_generation_prompt(tok, CAPITALS[1:2], None, None) == "What is the capital of France?"
    with pytest.raises(ChatError, match="need a chat template"):
        tokenize_conversation(tok, weather_conversation(), [WEATHER], None, index=3)


def test_resolve_and_apply_template(tmp_path):
    tok = tokenizer("gpt2")
    with pytest.raises(ChatError, match="neither a Jinja template nor a .jinja file"):
        resolve_chat_template(tok, "defualt")
    with pytest.raises(ChatError, match="does not exist"):
        resolve_chat_template(tok, str(tmp_path / "missing.jinja"))
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / "gpt2")
    apply_template_to_tokenizer(fresh, None)
    assert fresh.chat_template is None
    apply_template_to_tokenizer(fresh, QWEN25_TEMPLATE)
    fresh.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == QWEN25_TEMPLATE


def test_clean_dataset_row_keeps_what_the_user_wrote():
    row = {"messages": [{"role": "user", "content": "a", "tool_calls": None},
                        {"role": "assistant", "content": "b", "tool_calls": None, "reasoning_content": None}],
           "tools": None, "system": None}
    assert clean_dataset_row(row) == {"messages": [{"role": "user", "content": "a"},
                                                   {"role": "assistant", "content": "b"}]}


def test_kto_with_a_tokenizer_without_template_names_only_the_settings_that_work(tiny_config,
                                                                                  tmp_path):
    from transformers import AutoTokenizer

    from trainer_lib import default_kto_config, train

    tok = AutoTokenizer.from_pretrained(tiny_config.model.model_path)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "no_template")
    samples = [{"prompt": [{"role": "user", "content": f"word{i}"}], "completion": f" token{i}",
                "label": i % 2 == 0} for i in range(4)]
    config = default_kto_config().evolve(
        model=dict(model_path=tiny_config.model.model_path),
        tokenizer=dict(tokenizer_path=str(tmp_path / "no_template")),
        train=dict(batch_size=2, total_steps=1, checkpoint_dir=str(tmp_path / "ckpts")))
    with pytest.raises(ChatError) as caught:
        train(samples=samples, config=config)
    assert "chat_template='default' cannot be used" in str(caught.value)
    assert '"default"' not in str(caught.value) and "None (passthrough" in str(caught.value)
