"""Generation-based evaluation: sample from `eval_prompts`, score with `metric_fn`.

`eval_prompts` may hold strings, message lists (rendered with the chat template and a generation
prompt), or dicts with a "prompt" key (a string or a message list; a "tools" key is used to render
messages) whose other keys are handed to `metric_fn` as keyword arguments, each a list aligned with
the prompts. `metric_fn(samples, prompts, outputs, **metadata)` returns `{name: [one float per
sample]}` or `{name: float}`; each is logged as `metrics/<name>` (lists averaged).

With no `eval_prompts` but a `metric_fn`, the prompts are the prompt parts of the first few training
examples (the tokens before the first loss-carrying one), so an example with no prompt, plain text,
gives a BOS-only prompt. With neither, there is no generation.

Several processes: the prompts are sorted by length (little padding), dealt out across processes,
generated in batches of `train.eval_batch_size` with LEFT padding, and gathered back in their
original order. Every process runs the same number of `generate` calls (a ZeRO-3 model needs all
ranks in each forward pass), padding with a dummy prompt whose output is dropped.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional

import torch
from accelerate.utils import broadcast_object_list, gather_object

from trainer_lib.data.constants import IGNORE_INDEX
from trainer_lib.distributed import is_zero3

NUM_DEFAULT_PROMPTS = 8
NUM_PRINTED_ROWS = 3


class MetricFnError(RuntimeError):
    """`metric_fn` raised, or returned something that is not {name: float | [float per sample]}."""


def function_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


# --------------------------------------------------------------------------- prompts


def normalize_eval_prompts(eval_prompts: list, tokenizer, chat_template: Any = None
                           ) -> tuple[list[dict], dict[str, list]]:
    """→ ([{"text": str, "ids": [int]}], metadata {key: [value per prompt]})."""
    if isinstance(eval_prompts, (str, dict)) or not hasattr(eval_prompts, "__iter__"):
        raise ValueError("eval_prompts must be a list of strings, message lists, or dicts with a "
                         f"'prompt' key; got a {type(eval_prompts).__name__}")
    eval_prompts = list(eval_prompts)
    keys: list[str] = []
    for p in eval_prompts:
        if isinstance(p, dict):
            keys += [k for k in p if k != "prompt" and k not in keys]
    prompts, metadata = [], {k: [] for k in keys}
    for i, p in enumerate(eval_prompts):
        tools = None
        if isinstance(p, dict):
            if "prompt" not in p:
                raise ValueError(f"eval_prompts[{i}] is a dict without a 'prompt' key "
                                 f"(keys: {sorted(p)}); put the text to complete under 'prompt'")
            for k in keys:
                metadata[k].append(p.get(k))
            tools, p = p.get("tools"), p["prompt"]
        prompts.append(_encode_prompt(p, i, tokenizer, tools, chat_template))
    return prompts, metadata


def _encode_prompt(prompt: Any, i: int, tokenizer, tools, chat_template) -> dict:
    if isinstance(prompt, str):
        # the way training encodes a prompt (BOS added), so the model sees what it learned from
        return {"text": prompt, "ids": tokenizer(prompt, add_special_tokens=True)["input_ids"]}
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt) and prompt:
        from trainer_lib.data.chat import render_generation_prompt

        text = render_generation_prompt(tokenizer, list(prompt), tools, chat_template)
        # the template writes its own special tokens (BOS included, where it has one)
        return {"text": text, "ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
    raise ValueError(f"eval_prompts[{i}] must be a string, a list of messages "
                     f"({{'role': ..., 'content': ...}}), or a dict with a 'prompt' key; "
                     f"got {type(prompt).__name__}: {str(prompt)[:60]!r}")


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
    if world > 1 and is_zero3(accelerator):
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
            # scored once, on the main process (a metric may be costly), then shared
            payload = [None]
            if acc.is_main_process:
                try:
                    payload = [("ok", score(self.metric_fn, samples, prompts, outputs,
                                            self.metadata))]
                except MetricFnError as e:
                    payload = [("error", str(e))]
            if acc.num_processes > 1:
                broadcast_object_list(payload)
            status, result = payload[0]
            if status == "error":
                raise MetricFnError(result)
            values, per_sample = result
        columns = ["prompt", "output", *per_sample]
        rows = [[p, o, *(per_sample[k][i] for k in per_sample)]
                for i, (p, o) in enumerate(zip(prompts, outputs))]
        return values, columns, rows


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
