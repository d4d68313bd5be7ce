"""The model card a saved folder carries: README.md with the Hub's YAML front matter (base model,
library, tags, datasets) and how the model was trained, from the run's config, data report and
logged figures.

A README.md already in the folder that trainer_lib did not write (or that was edited since) is
the user's: it is kept as it is. The card ends with a line holding a checksum of the rest, which
tells an untouched card of ours from anything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import yaml

from trainer_lib.data.mixture import Mixture
from trainer_lib.model.loading import adapter_base
from trainer_lib.runtime.hub import looks_like_hub_id

CARD_FILE = "README.md"
_MARK = re.compile(r"\n<!-- trainer_lib model card ([0-9a-f]{16}) -->\n?$")
# a folder in the hub's cache: .../models--<owner>--<name>/snapshots/<revision>
_HUB_CACHE = re.compile(r"models--(?P<repo>[^/\\]+)[/\\]snapshots[/\\][^/\\]+[/\\]?$")
_METHODS = {"sft": "supervised fine-tuning (SFT)",
            "kto": "KTO (Kahneman-Tversky Optimisation) on binary feedback"}
_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")
# method settings that do not shape the model (evaluation, speed, sample keys)
_NOT_TRAINING = {"name", "gen_kwargs", "stop_sequences", "loss_chunk_size", "text_key",
                 "input_key", "output_key", "label_key", "precompute_ref_batch_size"}


@dataclass
class ModelCard:
    """What a run says about itself; `render(kind)` writes it for a full, adapter or merged
    folder."""

    base_model: Optional[str]
    method: str
    settings: list[tuple[str, str]] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    data_report: Optional[str] = None
    figures: list[str] = field(default_factory=list)
    folder: Optional[str] = None  # where the folder is written, for the loading snippet

    def render(self, kind: str = "full", lora: Any = None) -> str:
        """`kind`: "full", "adapter" (a LoRA adapter folder) or "merged" (adapters merged into
        the base weights); `lora`: the adapter's peft config, when there is one."""
        tags = ["trainer_lib", self.method] + (["lora"] if lora is not None else [])
        meta: dict = {}
        if self.base_model:
            meta["base_model"] = self.base_model
            meta["base_model_relation"] = "adapter" if kind == "adapter" else "finetune"
        meta["library_name"] = "trainer_lib"
        meta["pipeline_tag"] = "text-generation"
        meta["tags"] = tags + (["peft"] if kind == "adapter" else [])
        if self.datasets:
            meta["datasets"] = list(self.datasets)
        body = [f"# {self._title()}", "", self._summary(kind),
                "", "## How to load it", "", self._loading(kind), "", "## Training", "",
                "| setting | value |", "|---|---|"]
        settings = list(self.settings)
        if lora is not None:
            settings.append(("LoRA", _lora_line(lora, kind)))
        body += [f"| {name} | {_cell(value)} |" for name, value in settings]
        if self.datasets or self.data_report:
            body += ["", "## Data", ""]
            body += [f"- dataset: [{d}](https://huggingface.co/datasets/{d})"
                     for d in self.datasets]
            if self.data_report:
                body += ["- " + self.data_report]
        if self.figures:
            body += ["", "## Results", ""] + [f"- {line}" for line in self.figures]
        body += ["", "## Framework versions", ""] + [f"- {v}" for v in _versions(lora)]
        text = ("---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"
                + "\n".join(body) + "\n")
        return text + f"\n<!-- trainer_lib model card {_checksum(text)} -->\n"

    def _title(self) -> str:
        if not self.folder:
            return "Model"
        folder = Path(self.folder)
        # a checkpoint's copy: named by its step
        return folder.parent.name if folder.name == "hf_model" else folder.name

    def _summary(self, kind: str) -> str:
        method = _METHODS.get(self.method, f"the {self.method} method")
        base = f"`{self.base_model}`" if self.base_model else "its base model"
        what = {"full": f"A fine-tune of {base}",
                "adapter": f"A LoRA adapter for {base} (this folder holds the adapter only)",
                "merged": f"A fine-tune of {base} (LoRA adapters merged into its weights)"}[kind]
        return f"{what}, trained with trainer_lib by {method}."

    def _loading(self, kind: str) -> str:
        where = json.dumps(str(self.folder or "path/to/this/folder"))
        if kind == "adapter":
            return ("```python\nfrom peft import AutoPeftModelForCausalLM\n"
                    "from transformers import AutoTokenizer\n\n"
                    f"# loads the base model named in adapter_config.json, then the adapter\n"
                    f"model = AutoPeftModelForCausalLM.from_pretrained({where})\n"
                    f"tokenizer = AutoTokenizer.from_pretrained({where})\n```")
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({where})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({where})  # with its chat template\n"
                "```")


# --------------------------------------------------------------------------- from a run


def describe_run(config, *, step: int, total_steps: int, processes: int, log_history: list,
                 data_report: Any = None, datasets: Optional[list] = None,
                 folder: Optional[str] = None) -> ModelCard:
    """The card of a run at `step`, from its config, data report and `log_history`."""
    t, o, s = config.train, config.optimizer, config.scheduler
    method = config.method
    stop = next((h["stop_reason"] for h in reversed(log_history) if "stop_reason" in h), None)
    epoch = next((h["epoch"] for h in reversed(log_history) if "epoch" in h), None)
    steps = f"{step} of {total_steps}" + (f", {epoch + 1} epoch(s) of the data (at most "
                                          f"{t.epochs})" if epoch is not None else "")
    if stop:
        steps += f"; stopped early: {stop}"
    lr = o.kwargs.get("lr")
    optimiser = o.name + (f", learning rate {lr:g}" if isinstance(lr, (int, float)) else "")
    optimiser += "".join(f", {k} {v}" for k, v in o.kwargs.items() if k != "lr")
    schedule = s.name + "".join(f", {k} {v}" for k, v in s.kwargs.items())
    per_step = t.batch_size * t.gradient_accumulation_steps * processes
    batch = (f"{per_step} sequences per step ({t.batch_size} per micro-batch x "
             f"{t.gradient_accumulation_steps} accumulated x {processes} process(es)), "
             f"{t.seq_length} tokens each" + (", packed" if getattr(method, "packing", False)
                                              else ""))
    settings = [("method", method.name), ("steps", steps), ("optimiser", optimiser),
                ("schedule", schedule), ("batch", batch),
                ("precision", config.model.torch_dtype + (
                    f" weights, {t.mixed_precision} mixed precision"
                    if t.mixed_precision != "no" else "")), ("seed", str(t.seed))]
    if config.model.num_layers_unfrozen >= 0:
        settings.append(("trained layers", f"the top {config.model.num_layers_unfrozen}"))
    changed = _changed_settings(method)
    if changed:
        settings.append((f"{method.name} settings", changed))
    return ModelCard(base_model=base_model_of(config.model.model_path), method=method.name,
                     settings=settings, datasets=list(datasets or []),
                     data_report=data_report.summary() if data_report is not None else None,
                     figures=_figures(log_history), folder=None if folder is None else str(folder))


def base_model_of(path: Optional[str]) -> Optional[str]:
    """What `base_model` names: a hub id as given; for a folder, the hub id it is a cached copy
    of, else its absolute path; for a LoRA adapter folder, the base model it names."""
    if not path:
        return None
    path = str(path)
    base = adapter_base(path)
    if base:
        return base_model_of(base)
    if os.path.isdir(path):
        cached = _HUB_CACHE.search(os.path.abspath(path))
        return cached.group("repo").replace("--", "/") if cached else os.path.abspath(path)
    return path


def hub_datasets(*sources: Any) -> list[str]:
    """The sources given by hub name (a string that is not a local path), a Mixture's among
    them: the card's `datasets`."""
    names: list[str] = []
    for source in sources:
        if isinstance(source, Mixture):
            names += [n for n in hub_datasets(*(s for s, _ in source.sources.values()))
                      if n not in names]
        elif isinstance(source, str) and not os.path.exists(os.path.expanduser(source)) \
                and not source.lower().endswith(_LOCAL_SUFFIXES) and looks_like_hub_id(source) \
                and source not in names:
            names.append(source)
    return names


def _changed_settings(method) -> str:
    """The method's settings that differ from its defaults (those that shape training)."""
    try:
        default = type(method)()
    except TypeError:  # a method config whose fields need values
        return ""
    return ", ".join(f"{f.name}={getattr(method, f.name)!r}" for f in dataclasses.fields(method)
                     if f.name not in _NOT_TRAINING
                     and getattr(method, f.name) != getattr(default, f.name))


def _figures(log_history: list) -> list[str]:
    """The training loss from its first log line to its last, and the last evaluation."""
    lines = []
    losses = [h for h in log_history if "loss" in h]
    if losses:
        first, last = losses[0], losses[-1]
        lines.append(f"loss: {first['loss']:.4f} at step {first['step']}"
                     + (f" -> {last['loss']:.4f} at step {last['step']}" if last is not first
                        else ""))
    evaluation = next((h for h in reversed(log_history)
                       if any(k.startswith(("eval/", "metrics/")) for k in h)), None)
    if evaluation is not None:
        values = ", ".join(f"{k} {_number(v)}" for k, v in evaluation.items()
                           if k.startswith(("eval/", "metrics/")))
        lines.append(f"evaluation at step {evaluation['step']}: {values}")
    tokens = next((h["num_tokens"] for h in reversed(log_history) if "num_tokens" in h), None)
    if tokens is not None:
        lines.append(f"tokens trained on: {tokens:,}")
    return lines


# --------------------------------------------------------------------------- the file


def users_card(folder: str | os.PathLike) -> Optional[str]:
    """The README.md in `folder` that is not an untouched card of trainer_lib's (None if there
    is none): a save keeps it instead of writing a card."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    mark = _MARK.search(text)
    if mark and mark.group(1) == _checksum(text[:mark.start()]):
        return None
    return text


def write_card(folder: str | os.PathLike, text: str) -> None:
    (Path(folder) / CARD_FILE).write_text(text, encoding="utf-8")


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _lora_line(lora: Any, kind: str) -> str:
    targets = getattr(lora, "target_modules", None)
    if isinstance(targets, (set, list, tuple)):
        targets = ", ".join(sorted(targets))
    line = (f"r {getattr(lora, 'r', '?')}, alpha {getattr(lora, 'lora_alpha', '?')}, dropout "
            f"{getattr(lora, 'lora_dropout', '?')}, on {targets}")
    return line + ("; merged into the weights" if kind == "merged" else "")


def _versions(lora: Any) -> list[str]:
    names = ["trainer_lib", "transformers", "torch", "accelerate"] + (["peft"] if lora else [])
    out = []
    for name in names:
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def _number(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _cell(value: str) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
