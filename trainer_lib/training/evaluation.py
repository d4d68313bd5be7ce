"""Generation-based evaluation: generate from `eval_prompts`, score with `metric_fn`.

Prompts are sorted by length, dealt out across processes and gathered back in order; every
process runs the same number of `generate` calls, since a ZeRO-3 model needs all of them in each
forward pass.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from typing import Any, Callable, Optional

import torch
from accelerate.utils import gather_object

from trainer_lib.data.chat_template import render_generation_prompt
from trainer_lib.errors import ConfigError, EvalPromptError, MetricFnError, did_you_mean
from trainer_lib.ops.cross_entropy import IGNORE_INDEX
from trainer_lib.runtime.deepspeed import is_zero3
from trainer_lib.runtime.fsdp import is_fsdp
from trainer_lib.runtime.processes import on_main_process

NUM_DEFAULT_PROMPTS = 8
NUM_PRINTED_ROWS = 3


# --------------------------------------------------------------------------- checks before loading


_PROMPT_FORMS = ("a string, a list of messages ({'role': ..., 'content': ...}), or a dict with a "
                 "'prompt' key")


def check_eval_inputs(eval_prompts: Any, metric_fn: Any) -> None:
    """The shape of `eval_prompts` and `metric_fn`, checked before anything loads (encoding the
    prompts needs the tokenizer and comes later)."""
    if metric_fn is not None and not callable(metric_fn):
        raise EvalPromptError(f"metric_fn must be a function (samples, prompts, outputs, "
                              f"**metadata) -> dict, got {_kind(metric_fn)}")
    if eval_prompts is None:
        _check_metric_signature(metric_fn, [])
        return
    if not isinstance(eval_prompts, (list, tuple)):
        raise EvalPromptError(
            f"eval_prompts must be a list of prompts, each {_PROMPT_FORMS}; got "
            f"{_kind(eval_prompts)}"
            + ("; wrap it in a list" if isinstance(eval_prompts, (str, dict)) else ""))
    if not eval_prompts:
        raise EvalPromptError("eval_prompts is empty; give at least one prompt, or None")
    for i, p in enumerate(eval_prompts):
        if isinstance(p, dict):
            if "prompt" not in p:
                raise EvalPromptError(f"eval_prompts[{i}] is a dict without a 'prompt' key "
                                      f"(keys: {sorted(map(str, p))}); put the text to complete "
                                      "under 'prompt'")
            _check_prompt(p["prompt"], f"eval_prompts[{i}]['prompt']")
            if p.get("tools") is not None and not isinstance(p["tools"], list):
                raise EvalPromptError(f"eval_prompts[{i}]['tools'] must be a list of tool "
                                      f"schemas, got {_kind(p['tools'])}")
        else:
            _check_prompt(p, f"eval_prompts[{i}]")
    _check_metric_signature(metric_fn, metadata_keys(eval_prompts))


def metadata_keys(eval_prompts: list) -> list[str]:
    """The keys besides 'prompt' of the dict prompts, in order of appearance: metric_fn gets each
    as a keyword argument (a list, one value per prompt)."""
    keys: list[str] = []
    for p in eval_prompts:
        if isinstance(p, dict):
            keys += [k for k in p if k != "prompt" and k not in keys]
    return keys


def _check_metric_signature(metric_fn: Any, keys: list[str]) -> None:
    """metric_fn must take (samples, prompts, outputs) and a keyword argument for every extra key
    of the eval prompts: found here, not at the first evaluation."""
    if metric_fn is None:
        return
    try:
        signature = inspect.signature(metric_fn)
    except (TypeError, ValueError):  # a builtin or extension without a signature: trust it
        return
    try:
        signature.bind([], [], [], **{k: [] for k in keys})
    except TypeError as e:
        takes = ", ".join(["samples", "prompts", "outputs", *(f"{k}=..." for k in keys)])
        why = ("; the eval prompts' keys besides 'prompt' come as keyword arguments, one list "
               "each" if keys else "")
        raise EvalPromptError(
            f"metric_fn '{function_name(metric_fn)}' {signature} cannot take ({takes}): {e}{why}; "
            "give it the parameters (samples, prompts, outputs, **metadata)") from None


def _check_prompt(prompt: Any, where: str) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, (list, tuple)) and prompt:
        for j, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise EvalPromptError(f"{where}[{j}] must be a message dict with a 'role' and a "
                                      f"'content', got {str(m)[:60]!r}")
            if m.get("content") is None and not m.get("tool_calls"):
                raise EvalPromptError(f"{where}[{j}] has no 'content'; give the message's text "
                                      "(only an assistant turn with tool_calls may leave it out)")
            if m.get("content") is not None and not isinstance(m["content"], str):
                raise EvalPromptError(f"{where}[{j}]['content'] must be a string, got "
                                      f"{_kind(m['content'])}")
        return
    raise EvalPromptError(f"{where} must be {_PROMPT_FORMS}; got {_kind(prompt)}")


def _kind(value: Any) -> str:
    name = type(value).__name__
    text = repr(value)
    return (f"{'an' if name[0] in 'aeiou' else 'a'} {name}: "
            f"{text if len(text) <= 60 else text[:57] + '...'}")


# generate() arguments that set what the loop relies on: one output per prompt, token ids back
_FIXED = {"num_return_sequences": 1, "return_dict_in_generate": False}
_POSITIVE_INTS = ("max_new_tokens", "max_length", "num_beams", "num_beam_groups")
_NON_NEGATIVE_INTS = ("min_new_tokens", "min_length", "top_k", "no_repeat_ngram_size")
_BOOLS = ("do_sample", "use_cache", "output_scores", "output_logits", "renormalize_logits")
# model.generate's own arguments besides the GenerationConfig fields (listed rather than read
# from its signature: importing GenerationMixin takes seconds, too long for a config check)
_GENERATE_ARGUMENTS = {"generation_config", "logits_processor", "stopping_criteria",
                       "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model", "streamer",
                       "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate",
                       "tokenizer", "assistant_tokenizer", "use_model_defaults"}


def check_gen_kwargs(gen_kwargs: Any) -> None:
    """`method.gen_kwargs` against what `model.generate` takes, before the model loads: unknown
    keys (with the closest valid one), wrong types and values, and transformers' own checks
    (`GenerationConfig.validate`)."""
    from transformers import GenerationConfig

    if not isinstance(gen_kwargs, dict):
        raise ConfigError(f"method.gen_kwargs must be a mapping of generate() arguments, got "
                          f"{gen_kwargs!r}")
    known = set(GenerationConfig().to_dict()) | _GENERATE_ARGUMENTS
    for key, value in gen_kwargs.items():
        where = f"method.gen_kwargs.{key}"
        if key not in known:
            hint = did_you_mean(key, sorted(known)) or (
                "; it must be an argument of model.generate / transformers.GenerationConfig")
            raise ConfigError(f"unknown key '{where}'{hint}")
        if key in _FIXED and value != _FIXED[key]:
            raise ConfigError(f"{where} must be {_FIXED[key]} (evaluation scores one output "
                              f"per prompt), got {value!r}")
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if key in _POSITIVE_INTS and value is not None and not (is_int and value >= 1):
            raise ConfigError(f"{where} must be an integer >= 1, got {value!r}")
        if key in _NON_NEGATIVE_INTS and value is not None and not (is_int and value >= 0):
            raise ConfigError(f"{where} must be an integer >= 0, got {value!r}")
        if key in _BOOLS and not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        if key in ("temperature", "top_p", "repetition_penalty", "min_p", "typical_p") and (
                value is not None and (not isinstance(value, (int, float)) or isinstance(
                    value, bool) or not math.isfinite(value) or value < 0)):
            raise ConfigError(f"{where} must be a non-negative number, got {value!r}")
    if gen_kwargs.get("stop_strings"):
        raise ConfigError("method.gen_kwargs.stop_strings needs the tokenizer inside generate(); "
                          "use method.stop_sequences, which cuts each output at the first one")
    try:
        GenerationConfig(**gen_kwargs).validate()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"method.gen_kwargs: {str(e).strip().splitlines()[0]}") from None


def function_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


# --------------------------------------------------------------------------- prompts


def normalize_eval_prompts(eval_prompts: list, tokenizer, chat_template: Any = None
                           ) -> tuple[list[dict], dict[str, list]]:
    """→ ([{"text": str, "ids": [int]}], metadata {key: [value per prompt]})."""
    check_eval_inputs(eval_prompts, None)  # done before the model loads too; cheap
    eval_prompts = list(eval_prompts)
    keys = metadata_keys(eval_prompts)
    prompts, metadata = [], {k: [] for k in keys}
    for p in eval_prompts:
        tools = None
        for k in keys:  # one value per prompt (None where a prompt has no such key)
            metadata[k].append(p.get(k) if isinstance(p, dict) else None)
        if isinstance(p, dict):
            tools, p = p.get("tools"), p["prompt"]
        prompts.append(_encode_prompt(p, tokenizer, tools, chat_template))
    return prompts, metadata


def _encode_prompt(prompt: Any, tokenizer, tools, chat_template) -> dict:
    """A checked prompt (`check_eval_inputs`): a string or a list of messages."""
    if isinstance(prompt, str):
        # the way training encodes a prompt (BOS added), so the model sees what it learned from
        return {"text": prompt, "ids": tokenizer(prompt, add_special_tokens=True)["input_ids"]}

    text = render_generation_prompt(tokenizer, list(prompt), tools, chat_template)
    # the template writes its own special tokens (BOS included, where it has one)
    return {"text": text, "ids": tokenizer(text, add_special_tokens=False)["input_ids"]}


def default_eval_prompts(train_items: list, tokenizer, n: int = NUM_DEFAULT_PROMPTS) -> list[dict]:
    """The prompt parts of the first `n` training examples, or a BOS-only prompt."""
    prompts = []
    for item in train_items[:n]:
        ids = _prompt_prefix(item)
        if ids:
            prompts.append({"text": tokenizer.decode(ids, skip_special_tokens=True), "ids": ids})
    if not prompts:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        prompts = [{"text": "", "ids": [bos]}]
    return prompts


def _prompt_prefix(item: Any) -> list[int]:
    if not isinstance(item, dict) or "input_ids" not in item or "labels" not in item:
        return []
    ids, labels = list(item["input_ids"]), list(item["labels"])
    first = next((j for j, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return [int(t) for t in ids[:first]]


# --------------------------------------------------------------------------- generation


def cut_at_stop(text: str, stop_sequences: list[str]) -> str:
    """`text` up to the earliest stop sequence (which is left out)."""
    cuts = [text.find(s) for s in stop_sequences if s and s in text]
    return text[:min(cuts)] if cuts else text


@torch.no_grad()
def generate_outputs(accelerator, model, tokenizer, prompts: list[dict], batch_size: int,
                     gen_kwargs: dict, stop_sequences: list[str]) -> list[str]:
    """Completions of `prompts` (in their order), sharded over processes; every process gets all."""
    rank, world = accelerator.process_index, accelerator.num_processes
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]["ids"]))
    mine = order[rank::world]
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    n_calls = math.ceil(math.ceil(len(prompts) / world) / batch_size)  # the same on every rank
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    kwargs = dict(gen_kwargs)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    if world > 1 and (is_zero3(accelerator) or is_fsdp(accelerator)):
        # sharded weights: every process takes part in every forward pass until all are done
        kwargs["synced_gpus"] = True
    results = []
    for b in range(n_calls):
        idx = batches[b] if b < len(batches) else []
        rows = [prompts[i]["ids"] for i in idx] or [prompts[0]["ids"]]  # dummy: output dropped
        input_ids, mask = _left_pad(rows, tokenizer.pad_token_id, accelerator.device)
        out = unwrapped.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        for i, row in zip(idx, out[:, input_ids.shape[1]:]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            results.append((i, cut_at_stop(text, stop_sequences)))
    unwrapped.train(was_training)
    if world > 1:
        results = gather_object(results)
    outputs = dict(results)
    return [outputs[i] for i in range(len(prompts))]


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        if r:
            ids[j, width - len(r):] = torch.tensor(r)
            mask[j, width - len(r):] = 1
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------- metrics


def score(metric_fn: Callable, samples: list[str], prompts: list[str], outputs: list[str],
          metadata: dict[str, list]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Calls metric_fn and checks its answer → ({"metrics/<name>": mean}, {name: per-sample})."""
    name = function_name(metric_fn)
    try:
        result = metric_fn(samples, prompts, outputs, **metadata)
    except Exception as e:  # noqa: BLE001 - re-raised with the function's name
        raise MetricFnError(f"metric_fn '{name}' raised {type(e).__name__}: {e}") from e
    if not isinstance(result, dict):
        raise MetricFnError(f"metric_fn '{name}' must return a dict of name -> float or list of "
                            f"floats (one per sample); it returned {type(result).__name__}")
    means, per_sample = {}, {}
    for key, value in result.items():
        if isinstance(value, torch.Tensor) or hasattr(value, "tolist"):
            value = value.tolist()
        if _is_number(value):
            means[f"metrics/{key}"] = float(value)
        elif (isinstance(value, (list, tuple)) and len(value) == len(samples)
              and all(_is_number(v) for v in value)):
            per_sample[key] = [float(v) for v in value]
            means[f"metrics/{key}"] = sum(per_sample[key]) / max(len(value), 1)
        else:
            got = (f"a list of {len(value)} items" if isinstance(value, (list, tuple))
                   else f"a {type(value).__name__}")
            raise MetricFnError(f"metric_fn '{name}' returned {got} for '{key}'; expected a float "
                                f"or a list of {len(samples)} floats (one per sample)")
    return means, per_sample


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# --------------------------------------------------------------------------- the whole evaluation


class GenerationEval:
    """Prompts encoded once; `run()` generates, scores and returns the figures and a table."""

    def __init__(self, prompts: list[dict], metadata: dict[str, list],
                 metric_fn: Optional[Callable]):
        self.prompts, self.metadata, self.metric_fn = prompts, metadata, metric_fn

    @classmethod
    def build(cls, trainer, eval_prompts: Any, metric_fn: Optional[Callable]
              ) -> Optional["GenerationEval"]:
        if eval_prompts is None and metric_fn is None:
            return None
        if eval_prompts is None:
            examples = getattr(trainer, "train_examples", trainer.train_items)
            return cls(default_eval_prompts(examples, trainer.tokenizer), {}, metric_fn)
        template = None
        if any(isinstance(p.get("prompt") if isinstance(p, dict) else p, (list, tuple))
               for p in eval_prompts):  # message lists need the run's chat template
            template = trainer.chat_template.for_messages()
        prompts, metadata = normalize_eval_prompts(eval_prompts, trainer.tokenizer, template)
        if not prompts:
            raise ValueError("eval_prompts is empty; give at least one prompt, or None")
        return cls(prompts, metadata, metric_fn)

    def run(self, trainer) -> tuple[dict, list[str], list[list]]:
        acc, cfg = trainer.accelerator, trainer.config
        outputs = generate_outputs(acc, trainer.model, trainer.tokenizer, self.prompts,
                                   cfg.train.eval_batch_size or cfg.train.batch_size,
                                   cfg.method.gen_kwargs, cfg.method.stop_sequences)
        prompts = [p["text"] for p in self.prompts]
        samples = [p + o for p, o in zip(prompts, outputs)]
        values, per_sample = {}, {}
        if self.metric_fn is not None:
            # scored once, on the main process (a metric may be costly), then shared; an error
            # there is raised on every process
            values, per_sample = on_main_process(acc, lambda: score(
                self.metric_fn, samples, prompts, outputs, self.metadata))
            _warn_non_finite(values, function_name(self.metric_fn), trainer.step,
                             acc.is_main_process)
        columns = ["prompt", "output", *per_sample]
        rows = [[p, o, *(per_sample[k][i] for k in per_sample)]
                for i, (p, o) in enumerate(zip(prompts, outputs))]
        return values, columns, rows


def _warn_non_finite(values: dict, name: str, step: int, is_main: bool) -> None:
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad and is_main:
        warnings.warn(f"metric_fn '{name}' returned {', '.join(f'{k}={values[k]}' for k in bad)} "
                      f"at step {step}: logged as is, and never counted as the best value "
                      "(train.save_best)", stacklevel=2)


def format_table(columns: list[str], rows: list[list], n: int = NUM_PRINTED_ROWS,
                 width: int = 60) -> str:
    def cell(v):
        s = f"{v:.4g}" if isinstance(v, float) else str(v)
        s = s.replace("\n", "\\n")
        return s if len(s) <= width else s[:width - 1] + "…"

    lines = [" | ".join(columns)]
    lines += [" | ".join(cell(v) for v in row) for row in rows[:n]]
    if len(rows) > n:
        lines.append(f"... ({len(rows) - n} more)")
    return "\n".join(lines)
