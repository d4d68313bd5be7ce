"""Conversations as users write them → checked OpenAI-format messages.

OpenAI `{"messages": [...], "tools": [...]}` and ShareGPT `{"conversations": [{"from", "value"}]}`
samples become `{"messages": [...], "tools": [...] | None}`; tool schemas are kept exactly as
written, tool-call arguments given as JSON strings become dicts (templates `tojson` them), and every
problem is a ChatError naming the sample, the field and the fix.
"""

import json

from trainer_lib.errors import ChatError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool",
}


def conversation_error(index, text):
    return ChatError(f"{'conversation' if index is None else f'sample {index}'}: {text}")


# ---------------------------------------------------------------- rows read back from a datasets.Dataset


def _drop_none(value):
    """Remove None-valued dict keys at every depth; list items are kept (Arrow never invents those)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def clean_dataset_row(row: dict) -> dict:
    """Undo Arrow's struct unification in a row read back from a `datasets.Dataset`.

    Arrow gives every struct in a column the union of all keys, filled with None: one tool's argument
    names appear in every other tool, `tool_calls=None` in every user turn. None-valued keys are
    dropped from messages (templates treat a None and a missing key alike; transformers drops them
    too) and, at every depth, from `tools` and `tool_calls`. Arrow cannot tell those from a None the
    user wrote (a JSON-schema `"default": null`, an argument set to null), nor restore key order where
    two dicts list shared keys differently: store tools and arguments as JSON strings to keep them exact.
    """
    out = {k: v for k, v in row.items() if v is not None}
    if isinstance(out.get("tools"), list):
        out["tools"] = _drop_none(out["tools"])
    if isinstance(out.get("conversations"), list):
        out["conversations"] = [_drop_none(t) if isinstance(t, dict) else t for t in out["conversations"]]
    if isinstance(out.get("messages"), list):
        messages = []
        for message in out["messages"]:
            if isinstance(message, dict):
                message = {k: v for k, v in message.items() if v is not None}
                if isinstance(message.get("tool_calls"), list):
                    message["tool_calls"] = _drop_none(message["tool_calls"])
            messages.append(message)
        out["messages"] = messages
    return out


# ---------------------------------------------------------------- normalisation


def _json_object(value, field, index):
    """Tool-call arguments as a dict: templates `tojson` them, so a JSON string would be encoded twice."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise conversation_error(index, f"{field} is not valid JSON ({err}); expected a JSON object") from None
    if not isinstance(value, dict):
        raise conversation_error(index, f"{field} is a {type(value).__name__}; expected a JSON object (dict)")
    return value


def _parse_tools(tools, index):
    """Tools as a list of dicts, each kept exactly as written; a JSON string (or list of them) is parsed."""
    if tools is None or (isinstance(tools, str) and not tools.strip()):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise conversation_error(index, f"tools is not valid JSON ({err}); expected a list of tool schemas") from None
        if tools is None:  # "null": a row without tools in a column of JSON strings
            return None
    if not isinstance(tools, list):
        raise conversation_error(index, f"tools is a {type(tools).__name__}; expected a list of tool schemas")
    parsed = []
    for pos, tool in enumerate(tools):
        if isinstance(tool, str):
            tool = _json_object(tool, f"tools[{pos}]", index)
        if not isinstance(tool, dict):
            raise conversation_error(index, f"tools[{pos}] is a {type(tool).__name__}; expected a tool schema dict")
        parsed.append(tool)
    return parsed or None


def _normalize_tool_call(call, field, index):
    """OpenAI form `{"type": "function", "function": {"name", "arguments": dict}}`; a flat call is wrapped."""
    if not isinstance(call, dict):
        raise conversation_error(index, f"{field} is a {type(call).__name__}; expected a tool call dict")
    function = call.get("function", call if "name" in call else None)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        expected = '{"type": "function", "function": {"name": ..., "arguments": {...}}}'
        raise conversation_error(index, f"{field} has no function name; expected {expected}")
    arguments = _json_object(function.get("arguments"), f"{field}.function.arguments", index)
    function = {**function, "arguments": arguments}
    if "function" in call:
        return {**call, "function": function}
    return {"type": "function", "function": function}


def normalize_message(message, field, index):
    if not isinstance(message, dict):
        raise conversation_error(index, f"{field} is a {type(message).__name__}; expected a dict with role and content")
    role = message.get("role")
    if role not in ROLES:
        raise conversation_error(index, f"{field}.role is {role!r}; expected one of {', '.join(ROLES)}")
    out = {k: v for k, v in message.items() if v is not None}
    calls = out.pop("tool_calls", None) or None
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise conversation_error(index, f"{field}.tool_calls must be a list on an assistant turn (role is {role!r})")
        out["tool_calls"] = [_normalize_tool_call(c, f"{field}.tool_calls[{j}]", index) 
                             for j, c in enumerate(calls)]
    content = out.get("content")
    if content is None:
        if calls is None:
            raise conversation_error(
                index,
                f"{field}.content is missing; every {role} turn needs a 'content' string "
                "(only an assistant turn with tool_calls may leave it empty)"
            )
        out["content"] = ""  # templates test or concatenate content; "" renders as "no text" everywhere
    elif not isinstance(content, str):
        kind = type(content).__name__
        raise conversation_error(index, f"{field}.content is a {kind}; expected a string (join text parts into one)")
    if not isinstance(out.get("reasoning_content", ""), str):
        raise conversation_error(index, f"{field}.reasoning_content must be a string")
    return out


def _sharegpt_calls(value, field, index):
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as err:
        raise conversation_error(index, f"{field} is not valid JSON ({err}); expected {{\"name\", \"arguments\"}}") from None
    calls = calls if isinstance(calls, list) else [calls]
    return [_normalize_tool_call(c, field, index) for c in calls]


def from_sharegpt(sample, index):
    turns = sample["conversations"]
    if not isinstance(turns, list):
        raise conversation_error(index, f"conversations is a {type(turns).__name__}; expected a list of turns")
    messages = [{"role": "system", "content": sample["system"]}] if sample.get("system") else []
    for pos, turn in enumerate(turns):
        field = f"conversations[{pos}]"
        source = turn.get("from") if isinstance(turn, dict) else None
        if source not in SHAREGPT_ROLES:
            raise conversation_error(index, f"{field}.from is {source!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise conversation_error(index, f"{field}.value is missing; every turn needs a 'value' string")
        if source == "function_call":
            calls = _sharegpt_calls(value, f"{field}.value", index)
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "assistant" and "tool_calls" not in previous:
                previous["tool_calls"] = calls  # text then a call is one assistant turn, as OpenAI writes it
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": SHAREGPT_ROLES[source], "content": value})
    return messages


def normalize_conversation(sample: dict, index: int) -> dict:
    """OpenAI `messages` or ShareGPT `conversations` as `{"messages": [...], "tools": [...] or None}`."""
    if not isinstance(sample, dict):
        raise conversation_error(index, f"expected a dict with 'messages', got a {type(sample).__name__}")
    if "messages" in sample:
        raw = sample["messages"]
        if not isinstance(raw, list):
            raise conversation_error(index, f"messages is a {type(raw).__name__}; expected a list of turns")
        messages = [normalize_message(m, f"messages[{pos}]", index) for pos, m in enumerate(raw)]
    elif "conversations" in sample:
        messages = from_sharegpt(sample, index)
    else:
        keys = sorted(sample)
        raise conversation_error(index, f"no 'messages' (OpenAI) or 'conversations' (ShareGPT) key; got keys {keys}")
    if not any(m["role"] == "assistant" for m in messages):
        raise conversation_error(index, "the conversation has no assistant turn, so nothing would be trained on; add one")
    _check_tool_call_ids(messages, index)
    return {"messages": messages, "tools": _parse_tools(sample.get("tools"), index)}


def _check_tool_call_ids(messages, index):
    """Each tool turn's tool_call_id answers a call made before it. Checked only when the calls carry
    ids: many datasets leave them out, and then there is nothing to match."""
    if not any("id" in call for m in messages for call in m.get("tool_calls", ())):
        return
    ids = []
    for pos, message in enumerate(messages):
        ids += [str(call["id"]) for call in message.get("tool_calls", ()) if call.get("id") is not None]
        answer = message.get("tool_call_id")
        if message["role"] == "tool" and answer is not None and str(answer) not in ids:
            raise conversation_error(index, f"messages[{pos}].tool_call_id is {answer!r}, which answers no tool call "
                              f"made before it (the calls' ids: {', '.join(ids) or 'none yet'}); give it "
                              "the id of the call it answers")
