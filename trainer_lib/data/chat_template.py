"""Chat templates: render conversations and mark exactly the assistant's tokens, for any template.

The spans are found from the rendered text itself (the render before a turn with a generation
prompt, the render through it), so no `{% generation %}` markers or list of model families is
needed. Templates that re-render past turns differently (Qwen3 drops past reasoning) are matched
by the assistant header and the end-of-turn marker learnt from a probe turn.
"""

import os
import weakref
from pathlib import Path

from trainer_lib.data.conversations import conversation_error
from trainer_lib.errors import ChatError
from trainer_lib.ops.cross_entropy import IGNORE_INDEX

LOSS_ON = ("assistant", "last_assistant", "all")
# what works without the tokenizer's own template; "default" is offered only where there is one
OTHER_TEMPLATE_OPTIONS = (
    "None (passthrough: contents concatenated), a Jinja template string, or a path to a .jinja file"
)
TEMPLATE_OPTIONS = '"default" (the tokenizer\'s own template), ' + OTHER_TEMPLATE_OPTIONS
_PROBE = "\u2063PROBE\u2063"  # content no real turn contains, used to learn a template's end-of-turn marker


# ---------------------------------------------------------------- templates


def resolve_chat_template(tokenizer, spec) -> str | None:
    """The Jinja template to render with, or None for passthrough. See TEMPLATE_OPTIONS."""
    if spec is None:
        return None
    if not isinstance(spec, (str, os.PathLike)):
        raise ChatError(f"chat_template is a {type(spec).__name__}; expected {TEMPLATE_OPTIONS}")
    spec = os.fspath(spec)
    if spec == "default":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the one transformers uses by default
            template = template.get("default")
        if not template:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ChatError(
                f"tokenizer {name!r} has no chat template, so chat_template='default' cannot be used; "
                f"set tokenizer.chat_template to {OTHER_TEMPLATE_OPTIONS}"
            )
        return template
    if spec.endswith(".jinja"):
        if not os.path.isfile(spec):
            raise ChatError(f"chat template file {spec!r} does not exist; expected {TEMPLATE_OPTIONS}")
        return Path(spec).read_text(encoding="utf-8")
    if "{{" not in spec and "{%" not in spec:  # a typo such as "defualt" would otherwise render as literal text
        raise ChatError(
            f"chat_template {spec!r} is neither a Jinja template nor a .jinja file; expected {TEMPLATE_OPTIONS}"
        )
    return spec


class RunTemplate:
    """The chat template of a run, resolved once from `tokenizer.chat_template` and stored on the
    tokenizer so it is saved with the model. With "default" and a tokenizer that has no template,
    only samples that are messages fail (with the options), when they need it."""

    def __init__(self, tokenizer, spec):
        self.tokenizer, self.spec = tokenizer, spec
        if spec == "default":  # the tokenizer's own, kept as it is (it may hold several named ones)
            has_one = bool(getattr(tokenizer, "chat_template", None))
            self.template = resolve_chat_template(tokenizer, spec) if has_one else None
        else:
            self.template = resolve_chat_template(tokenizer, spec)
            apply_template_to_tokenizer(tokenizer, self.template)

    def for_messages(self) -> str | None:
        if self.template is None and self.spec == "default":
            resolve_chat_template(self.tokenizer, "default")  # raises the explanatory error
        return self.template


def apply_template_to_tokenizer(tokenizer, template):
    """Store the template used on the tokenizer so it is saved with the model. Passthrough (None) leaves
    the tokenizer's own template in place: removing it would lose the base model's format."""
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _render(tokenizer, messages, tools, template, index, add_generation_prompt=False):
    try:
        if not messages:  # apply_chat_template refuses empty conversations; an assistant may speak first
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template(
                conversations=[[]], tools=tools, chat_template=template,
                add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map,
            )
            return rendered[0]
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as err:  # Jinja errors, raise_exception(), TypeErrors on unexpected fields
        raise conversation_error(
            index,
            f"the chat template cannot render this conversation: {type(err).__name__}: {err}. "
            "Use the roles and turn order the template accepts, or another chat_template"
        ) from err


def render_generation_prompt(tokenizer, messages, tools, template, index=None) -> str:
    """The prompt text a model continues with its answer (evaluation generation, KTO prompts)."""
    if template is None:
        return _passthrough(messages, tools, index)[0]
    return _render(tokenizer, messages, tools, template, index, add_generation_prompt=True)


# ---------------------------------------------------------------- assistant spans


def _common_prefix(a, b):
    return len(os.path.commonprefix([a, b]))


def _without_trailer(render, tokenizer, messages, tools, template, index):
    """Cut text written only because the conversation ends here: what differs from the same messages
    followed by a generation prompt (Phi-3's closing eos_token)."""
    with_prompt = _render(tokenizer, messages, tools, template, index, add_generation_prompt=True)
    cut = _common_prefix(render, with_prompt)
    if cut < len(render):  # both may start different tokens with the same characters ("<|"): cut at a token
        offsets = tokenizer(render, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cut = max([b for _, b in offsets if b <= cut], default=0)
    return render[:cut]


def _search_turn(tokenizer, messages, i, tools, template, full, before, lower, index):
    """Locate assistant turn i in `full` when prefix renders do not line up, by its header and end marker."""
    header = before[_common_prefix(before, _render(tokenizer, messages[:i], tools, template, index)) :]
    probing = messages[:i] + [{"role": "assistant", "content": _PROBE}]
    probe = _render(tokenizer, probing, tools, template, index)
    probe = _without_trailer(probe, tokenizer, probing, tools, template, index)
    marker = probe[probe.rfind(_PROBE) + len(_PROBE) :].rstrip() if _PROBE in probe else ""
    found = full.find(header, max(lower, _common_prefix(before, full) - len(header))) if header else -1
    start = found + len(header)
    end = full.find(marker, start) if marker and found >= 0 else -1
    tail = messages[i]["content"].strip()[-20:]
    if end < 0 or (tail and tail not in full[start:end]):
        raise conversation_error(
            index,
            f"cannot locate assistant turn messages[{i}] in the rendered conversation: the template "
            "renders earlier turns differently once later messages follow (e.g. it drops past reasoning), and no "
            "assistant header / end-of-turn marker could be matched. Split the conversation into one sample per "
            "assistant turn, or use a template that renders past turns unchanged"
        )
    return start, end + len(marker)


def _assistant_spans(tokenizer, messages, tools, template, full, index, first=0):
    """Character spans of assistant turns `first..` in the full render `full`."""
    spans = []
    lower = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first:
            continue
        try:
            before = _render(tokenizer, messages[:i], tools, template, index, add_generation_prompt=True)
        except ChatError:
            if i:
                raise
            raise conversation_error(
                index,
                "messages[0] is an assistant turn and this template cannot render the empty "
                "conversation before it, so its start cannot be found; begin with a system or user turn"
            ) from None
        through = _render(tokenizer, messages[: i + 1], tools, template, index)
        through = _without_trailer(through, tokenizer, messages[: i + 1], tools, template, index)
        if full.startswith(before) and full.startswith(through) and len(before) < len(through):
            start, end = len(before), len(through)
        else:
            start, end = _search_turn(tokenizer, messages, i, tools, template, full, before, lower, index)
        while end > start and full[end - 1].isspace():  # the newline after end-of-turn is the template's
            end -= 1
        if start < lower or end <= start:
            raise conversation_error(index, f"assistant turn messages[{i}] renders to no text with this template")
        spans.append((start, end))
        lower = end
    return spans


def _passthrough(messages, tools, index):
    """No template: contents concatenated in order, nothing added; spans of the assistant contents."""
    if tools or any(m.get("tool_calls") for m in messages):
        raise conversation_error(index, "tools and tool_calls need a chat template to be rendered; chat_template is None")
    text, spans = "", []
    for message in messages:
        if message["role"] == "assistant":
            spans.append((len(text), len(text) + len(message["content"])))
        text += message["content"]
    return text, spans


def _tokenize_spans(tokenizer, text, spans, loss_on_all=False):
    """Token ids of `text` and labels carrying loss on tokens that overlap a span."""
    if not getattr(tokenizer, "is_fast", False):
        raise ChatError("assistant masks need a fast tokenizer (offsets mapping); load it with use_fast=True")
    # Templates write BOS themselves, so special tokens are not added; but a tokenizer that adds BOS to
    # plain text (SentencePiece models) expects one, so it is prepended when the render lacks it.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    labels = []
    k = 0
    for token, (a, b) in zip(ids, offsets):  # offsets increase, so one pass over the sorted spans
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        inside = k < len(spans) and (b > spans[k][0] or a == b >= spans[k][0])
        labels.append(token if loss_on_all or inside else IGNORE_INDEX)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and _adds_bos(tokenizer):
        ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    return {"input_ids": ids, "labels": labels}


_ADDS_BOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _adds_bos(tokenizer):
    """Whether the tokenizer puts BOS before plain text; learnt once per tokenizer."""
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    plain = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds = bool(plain) and plain[0] == tokenizer.bos_token_id
    try:
        _ADDS_BOS[tokenizer] = adds
    except TypeError:  # not weakly referenceable: ask again next time
        pass
    return adds


def tokenize_conversation(tokenizer, messages, tools, template, loss_on="assistant", index=None) -> dict:
    """`input_ids` of the rendered conversation and `labels` (-100 where no loss, not shifted).

    loss_on: "assistant" (every assistant turn: content, tool calls, end-of-turn token), "last_assistant"
    (the final assistant turn only) or "all" (every token).
    """
    if loss_on not in LOSS_ON:
        raise ChatError(f"loss_on is {loss_on!r}; expected one of {', '.join(LOSS_ON)}")
    if template is None:
        text, spans = _passthrough(messages, tools, index)
    else:
        text = _render(tokenizer, messages, tools, template, index)
        spans = []
        if loss_on != "all":
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            first = turns[-1] if loss_on == "last_assistant" and turns else 0  # skip renders of unused turns
            spans = _assistant_spans(tokenizer, messages, tools, template, text, index, first)
    if loss_on == "last_assistant":
        spans = spans[-1:]
    return _tokenize_spans(tokenizer, text, spans, loss_on_all=loss_on == "all")


def as_messages(value, role):
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def tokenize_prompt_completion_messages(
    tokenizer, prompt_messages, completion_messages, tools, template, index=None
) -> dict:
    """Loss on the assistant turns of the completion only; a string prompt or completion is one turn."""
    prompt = as_messages(prompt_messages, "user")
    completion = as_messages(completion_messages, "assistant")
    if not any(m.get("role") == "assistant" for m in completion):
        raise conversation_error(index, "the completion has no assistant turn; nothing would be trained on")
    messages = prompt + completion
    if template is None:
        text, spans = _passthrough(messages, tools, index)
        spans = spans[sum(m["role"] == "assistant" for m in prompt) :]
    else:
        text = _render(tokenizer, messages, tools, template, index)
        spans = _assistant_spans(tokenizer, messages, tools, template, text, index, first=len(prompt))
    return _tokenize_spans(tokenizer, text, spans)
