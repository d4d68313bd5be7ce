"""Bad input is refused before the model loads, with the error type a user can catch and words
that name the sample, setting or file and the fix; nothing is written. One table of mistakes
through the public `train()`, the same through the command line, and what is accepted with a
warning."""

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from trainer_lib import (
    ConfigError,
    DataError,
    EarlyStopping,
    Mixture,
    default_kto_config,
    default_sft_config,
    train,
)
from trainer_lib.checkpointing.layout import list_checkpoints
from trainer_lib.config import Config
from trainer_lib.errors import ChatError, CheckpointError, EvalPromptError, KTODataError

PAIRS = [{"prompt": f"word{i} ", "completion": f"token{i} word{i + 1}"} for i in range(8)]
KTO = [{"prompt": f"word{i} ", "completion": f" token{i}", "label": i % 2 == 0} for i in range(8)]


class Ctx:
    """What a case needs: the tiny model, a fresh folder, a config with files under it."""

    def __init__(self, model: str, tmp: Path):
        self.model, self.tmp = model, tmp
        self.ckpts = tmp / "ckpts"

    def config(self, kind: str = "sft", **sections):
        base = default_kto_config() if kind == "kto" else default_sft_config()
        config = base.evolve(
            model=dict(model_path=self.model),
            train=dict(seq_length=32, batch_size=2, total_steps=2, progress_bar=False,
                       checkpoint_dir=str(self.ckpts), logging_dir=str(self.tmp / "logs")))
        return config.evolve(**sections)

    def train(self, samples=PAIRS, kind: str = "sft", **kwargs):
        """train() with `kwargs` that name config sections applied to the config."""
        sections = {k: kwargs.pop(k) for k in list(kwargs)
                    if k in ("train", "optimizer", "method", "model", "scheduler", "data",
                             "tokenizer")}
        return train(samples=samples, config=self.config(kind, **sections), **kwargs)

    def file(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def raw(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)

    def parquet(self, name: str, rows: list) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.tmp / name
        columns = {"prompt": pa.array([r["prompt"] for r in rows], pa.string()),
                   "completion": pa.array([r["completion"] for r in rows], pa.string())}
        pq.write_table(pa.table(columns), path)
        return str(path)

    def legacy_checkpoint(self) -> str:
        """old/step_3 as an earlier trainer_lib wrote it: a state file, no manifest."""
        folder = self.tmp / "old" / "step_3"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": 3}))
        return str(folder)

    def gpt2_like(self) -> str:
        """A model folder whose positions are learned embeddings, 32 of them (config only: it
        must never load)."""
        folder = self.tmp / "gpt2-like"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "model_type": "gpt2", "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2,
            "vocab_size": 512}))
        return str(folder)


def chat(*messages, **extra):
    return {"messages": list(messages), **extra}


def user(text="Weather in Paris?"):
    return {"role": "user", "content": text}


def assistant(text="Sunny.", **extra):
    return {"role": "assistant", "content": text, **extra}


def call(name="get_weather", call_id=None, arguments='{"city": "Paris"}'):
    c = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {**c, "id": call_id} if call_id else c


GOOD_CHAT = chat(user(), assistant())
RAISING_TEMPLATE = ("{% for m in messages %}{% if m.role == 'tool' %}"
                    "{{ raise_exception('no tools') }}{% endif %}"
                    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")


def exact_match(samples, prompts, outputs):
    return {"exact": [0.0] * len(outputs)}


def _dataset_dict(**splits):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


@dataclass
class Case:
    name: str
    run: Callable[[Ctx], object]
    error: type
    words: list = field(default_factory=list)


CASES = [
    # ---------------------------------------------------------------- settings
    Case("lr is NaN", lambda c: c.train(optimizer=dict(kwargs=dict(lr=math.nan))), ConfigError,
         [r"optimizer\.kwargs\.lr must be a non-negative number, got nan", "must be finite"]),
    Case("lr is infinite", lambda c: c.train(optimizer=dict(kwargs=dict(lr=math.inf))),
         ConfigError, [r"optimizer\.kwargs\.lr", "got inf; a learning rate must be finite"]),
    Case("lr is negative", lambda c: c.train(optimizer=dict(kwargs=dict(lr=-1e-4))), ConfigError,
         [r"optimizer\.kwargs\.lr must be a non-negative number, got -0\.0001"]),
    Case("warmup_steps given as text",
         lambda c: c.train(scheduler=dict(name="cosine", kwargs=dict(warmup_steps="10"))),
         ConfigError, [r"scheduler\.kwargs\.warmup_steps must be a whole number >= 0, got '10'"]),
    Case("lr is a word", lambda c: c.train(optimizer=dict(kwargs=dict(lr="fast"))), ConfigError,
         [r"optimizer\.kwargs\.lr must be a (non-negative )?number, got 'fast'"]),
    Case("batch size 0", lambda c: c.train(train=dict(batch_size=0)), ConfigError,
         [r"train\.batch_size must be at least 1, got 0"]),
    Case("a misspelt setting", lambda c: c.train(train=dict(batch_sise=4)), ConfigError,
         [r"unknown key 'train\.batch_sise'", "did you mean 'batch_size'"]),
    Case("negative skip_nonfinite_steps", lambda c: c.train(train=dict(skip_nonfinite_steps=-1)),
         ConfigError, [r"train\.skip_nonfinite_steps must be >= 0", "stop at the first"]),
    Case("seq_length beyond learned positions",
         lambda c: c.train(model=dict(model_path=c.gpt2_like()), train=dict(seq_length=64)),
         ConfigError, [r"train\.seq_length=64 is above the model's max_position_embeddings=32",
                       r"lower train\.seq_length to 32"]),
    Case("save_best eval/loss without evaluation data",
         lambda c: c.train(train=dict(save_best="eval/loss")), ConfigError,
         [r"train\.save_best='eval/loss'", "no evaluation data", r"eval_samples=",
          r"train\.eval_split"]),
    Case("save_best a metric without metric_fn",
         lambda c: c.train(train=dict(save_best="metrics/accuracy")), ConfigError,
         [r"train\.save_best='metrics/accuracy'", "no metric_fn", r"pass metric_fn="]),
    Case("a misspelt peft_config key",
         lambda c: c.train(model=dict(peft_config=dict(r=4, target_modulez=["q_proj"]))),
         ConfigError, [r"model\.peft_config has unknown keys 'target_modulez' \(did you mean "
                       r"'target_modules'\?\)"]),
    Case("LoRA with num_layers_unfrozen",
         lambda c: c.train(model=dict(peft_config=dict(r=4), num_layers_unfrozen=1)),
         ConfigError, [r"model\.peft_config and model\.num_layers_unfrozen both limit"]),
    Case("betas of the wrong length",
         lambda c: c.train(optimizer=dict(kwargs=dict(lr=1e-4, betas=[0.9]))), ConfigError,
         [r"optimizer\.kwargs\.betas must hold 2 values, like torch\.optim\.AdamW's default "
          r"\[0\.9, 0\.999\]; got \[0\.9\]"]),
    Case("a beta of 1.5",
         lambda c: c.train(optimizer=dict(kwargs=dict(lr=1e-4, betas=[0.9, 1.5]))), ConfigError,
         [r"are refused by torch\.optim\.AdamW: Invalid beta parameter at index 1: 1\.5"]),
    Case("SGD momentum without its settings",
         lambda c: c.train(optimizer=dict(name="sgd", kwargs=dict(lr=0.1, nesterov=True))),
         ConfigError, ["refused by torch.optim.SGD: Nesterov momentum requires a momentum"]),
    Case("a schedule that fails at its first step",
         lambda c: c.train(scheduler=dict(name="StepLR", kwargs=dict(step_size=0))), ConfigError,
         [r"scheduler\.name='StepLR' .* fails at step 1: ZeroDivisionError"]),
    Case("a schedule missing its floor",
         lambda c: c.train(scheduler=dict(name="cosine_with_min_lr")), ConfigError,
         [r"scheduler\.name='cosine_with_min_lr' .* cannot be built: ValueError: One of min_lr "
          "or min_lr_rate"]),
    Case("a misspelt attn_implementation",
         lambda c: c.train(model=dict(attn_implementation="sdpaa")), ConfigError,
         [r"model\.attn_implementation='sdpaa' is not an attention implementation; did you mean "
          r"'sdpa'\?"]),
    Case("num_layers_unfrozen above the model's layers",
         lambda c: c.train(model=dict(num_layers_unfrozen=3)), ConfigError,
         [r"model\.num_layers_unfrozen=3 but the model has only 2 layers; set it to 2 or less"]),
    Case("a stop sequence that is not text",
         lambda c: c.train(method=dict(stop_sequences=["\n", 7])), ConfigError,
         [r"method\.stop_sequences must be a list of non-empty strings, got 7"]),
    Case("a misspelt TensorBoard argument",
         lambda c: c.train(train=dict(tracker="tensorboard", tracker_kwargs={
             "tensorboard": {"filename_sufix": ".x"}})), ConfigError,
         [r"train\.tracker_kwargs\.tensorboard\.filename_sufix is not an argument of "
          r"TensorBoard's SummaryWriter; did you mean 'filename_suffix'\?"]),
    Case("a misspelt DeepSpeed section",
         lambda c: c.train(train=dict(deepspeed_config={"zero_optimisation": {"stage": 3}})),
         ConfigError, ["the DeepSpeed config has a key DeepSpeed does not know, "
                       "'zero_optimisation', which it would ignore in silence; did you mean "
                       "'zero_optimization'"]),
    Case("a misspelt key inside zero_optimization",
         lambda c: c.train(train=dict(deepspeed_config={"zero_optimization": {
             "stage": 3, "stage3_gather_16bit_weights_on_model_sav": True}})),
         ConfigError, ["the DeepSpeed config's 'zero_optimization' has a key DeepSpeed does not "
                       "know, 'stage3_gather_16bit_weights_on_model_sav'; did you mean "
                       "'stage3_gather_16bit_weights_on_model_save'"]),
    Case("a ZeRO stage that does not exist",
         lambda c: c.train(train=dict(deepspeed_config={"zero_optimization": {"stage": 4}})),
         ConfigError, [r"the DeepSpeed config's 'zero_optimization\.stage' is refused by "
                       r"DeepSpeed: .*\(got 4\)"]),
    Case("a YAML file that does not parse",
         lambda c: Config.load_yaml(c.file("bad.yaml", "train:\n  batch_size: 4\n lr: 3\n")),
         ConfigError, [r"bad\.yaml:3:2: not valid YAML: expected <block end>, but found "
                       r"'<block mapping start>' \(while parsing a block mapping that starts at "
                       r"line 1\)"]),
    Case("early stopping on eval/loss without evaluation data",
         lambda c: c.train(train=dict(early_stopping=dict(patience=2))), ConfigError,
         [r"train\.early_stopping\.metric='eval/loss'", "no evaluation data",
          "would never stop early", r"eval_samples=", r"train\.eval_split"]),
    Case("EarlyStopping on a metric without metric_fn",
         lambda c: c.train(eval_samples=PAIRS[:2], callbacks=[EarlyStopping("metrics/exact")]),
         ConfigError, [r"EarlyStopping\(metric='metrics/exact'\)", "no metric_fn",
                       r"pass metric_fn="]),
    Case("early stopping on a training figure",
         lambda c: c.train(train=dict(early_stopping=dict(metric="loss"))), ConfigError,
         [r"train\.early_stopping\.metric must name an evaluation figure", "'eval/loss'",
          "got 'loss'"]),
    Case("a callback that is a plain function",
         lambda c: c.train(callbacks=[lambda trainer: None]), ConfigError,
         [r"callbacks\[0\] is a function, not a trainer_lib\.Callback", "subclass Callback"]),
    # ---------------------------------------------------------------- generation settings
    Case("max_new_tokens 0", lambda c: c.train(method=dict(gen_kwargs=dict(max_new_tokens=0))),
         ConfigError, [r"method\.gen_kwargs\.max_new_tokens must be an integer >= 1, got 0"]),
    Case("max_new_tokens as text",
         lambda c: c.train(method=dict(gen_kwargs=dict(max_new_tokens="64"))), ConfigError,
         [r"method\.gen_kwargs\.max_new_tokens must be an integer >= 1, got '64'"]),
    Case("a misspelt generate argument",
         lambda c: c.train(method=dict(gen_kwargs=dict(max_new_token=8))), ConfigError,
         [r"unknown key 'method\.gen_kwargs\.max_new_token'", "did you mean 'max_new_tokens'"]),
    Case("do_sample as text", lambda c: c.train(method=dict(gen_kwargs=dict(do_sample="yes"))),
         ConfigError, [r"method\.gen_kwargs\.do_sample must be true or false, got 'yes'"]),
    Case("several outputs per prompt",
         lambda c: c.train(method=dict(gen_kwargs=dict(num_return_sequences=2))), ConfigError,
         [r"method\.gen_kwargs\.num_return_sequences must be 1", "one output per prompt"]),
    Case("a negative temperature",
         lambda c: c.train(method=dict(gen_kwargs=dict(temperature=-1.0, do_sample=True))),
         ConfigError, [r"method\.gen_kwargs\.temperature must be a non-negative number"]),
    Case("stop_strings in gen_kwargs",
         lambda c: c.train(method=dict(gen_kwargs=dict(stop_strings=["\n"]))), ConfigError,
         [r"method\.gen_kwargs\.stop_strings", r"use method\.stop_sequences"]),
    # ---------------------------------------------------------------- eval prompts and metric_fn
    Case("eval_prompts is a number", lambda c: c.train(eval_prompts=5), EvalPromptError,
         ["eval_prompts must be a list of prompts", "got an int: 5"]),
    Case("eval_prompts is one string", lambda c: c.train(eval_prompts="Hello"), EvalPromptError,
         ["eval_prompts must be a list", "got a str: 'Hello'", "wrap it in a list"]),
    Case("eval_prompts is one dict", lambda c: c.train(eval_prompts={"prompt": "Hi"}),
         EvalPromptError, ["got a dict", "wrap it in a list"]),
    Case("eval_prompts is empty", lambda c: c.train(eval_prompts=[]), EvalPromptError,
         ["eval_prompts is empty", "at least one prompt, or None"]),
    Case("an eval prompt that is a number", lambda c: c.train(eval_prompts=["Hi", 7]),
         EvalPromptError,
         [r"eval_prompts\[1\] must be a string, a list of messages", "got an int"]),
    Case("an eval prompt dict without 'prompt'",
         lambda c: c.train(eval_prompts=["Hi", {"text": "Hello", "answer": "x"}]), EvalPromptError,
         [r"eval_prompts\[1\] is a dict without a 'prompt' key \(keys: \['answer', 'text'\]\)",
          "put the text to complete under 'prompt'"]),
    Case("an eval message without a role",
         lambda c: c.train(eval_prompts=[[{"content": "Hi"}]]), EvalPromptError,
         [r"eval_prompts\[0\]\[0\] must be a message dict with a 'role' and a 'content'"]),
    Case("an eval message whose content is a number",
         lambda c: c.train(eval_prompts=[{"prompt": [{"role": "user", "content": 3}]}]),
         EvalPromptError, [r"eval_prompts\[0\]\['prompt'\]\[0\]\['content'\] must be a string"]),
    Case("metric_fn is a name", lambda c: c.train(metric_fn="accuracy"), EvalPromptError,
         ["metric_fn must be a function", "got a str: 'accuracy'"]),
    Case("an eval message without content",
         lambda c: c.train(eval_prompts=[[{"role": "user"}]]), EvalPromptError,
         [r"eval_prompts\[0\]\[0\] has no 'content'; give the message's text"]),
    Case("a metric_fn that takes two arguments",
         lambda c: c.train(eval_prompts=["Hi"], metric_fn=lambda samples, prompts: {}),
         EvalPromptError, [r"metric_fn '<lambda>' \(samples, prompts\) cannot take \(samples, "
                           r"prompts, outputs\): too many positional arguments",
                           r"\(samples, prompts, outputs, \*\*metadata\)"]),
    Case("a metric_fn that does not take the eval prompts' keys",
         lambda c: c.train(eval_prompts=[{"prompt": "Hi", "answer": "Hello"}],
                           metric_fn=exact_match),
         EvalPromptError, [r"metric_fn 'exact_match' .* cannot take \(samples, prompts, outputs, "
                           r"answer=\.\.\.\): got an unexpected keyword argument 'answer'",
                           "keys besides 'prompt' come as keyword arguments"]),
    # ---------------------------------------------------------------- where output goes
    Case("checkpoint_dir is a file",
         lambda c: c.train(train=dict(checkpoint_dir=c.file("ckpt-file", "x"))), ConfigError,
         [r"train\.checkpoint_dir='.*ckpt-file' is a file, not a folder",
          r"set train\.checkpoint_dir to a folder you can write to"]),
    Case("checkpoint_dir inside a file",
         lambda c: c.train(train=dict(checkpoint_dir=c.file("blocker", "x") + "/ckpts")),
         ConfigError, [r"train\.checkpoint_dir=.* cannot be made: .*blocker is a file"]),
    Case("checkpoint_dir where nobody may write",
         lambda c: c.train(train=dict(checkpoint_dir="/sys/trainer_lib_ckpts")), ConfigError,
         [r"train\.checkpoint_dir='/sys/trainer_lib_ckpts' is not writable",
          "a folder you can write to"]),
    Case("logging_dir is a file",
         lambda c: c.train(train=dict(tracker="jsonl", logging_dir=c.file("logs-file", "x"))),
         ConfigError, [r"train\.logging_dir='.*logs-file' is a file, not a folder"]),
    # ---------------------------------------------------------------- resuming
    Case("resume from a folder that does not exist",
         lambda c: c.train(train=dict(resume_from_checkpoint=str(c.tmp / "nope"))),
         CheckpointError, [r"train\.resume_from_checkpoint='.*nope' does not exist",
                           r"step_<N> folder under train\.checkpoint_dir, or \"latest\""]),
    Case("resume from a folder that is no checkpoint",
         lambda c: c.train(train=dict(resume_from_checkpoint=str(c.tmp))), CheckpointError,
         ["is not a checkpoint folder", "no manifest.json"]),
    Case("resume a checkpoint of an earlier trainer_lib",
         lambda c: c.train(train=dict(resume_from_checkpoint=c.legacy_checkpoint())),
         CheckpointError, ["step_3' has no manifest.json: it was written by an earlier "
                           "trainer_lib", r"model\.model_path=.*step_3/hf_model"]),
    Case("resume 'latest' among checkpoints of an earlier trainer_lib",
         lambda c: (c.legacy_checkpoint(), c.train(train=dict(
             resume_from_checkpoint="latest", checkpoint_dir=str(c.tmp / "old")))),
         CheckpointError, [r"'latest': .*old holds checkpoints written by an earlier "
                           r"trainer_lib \(step_3\)", r"model\.model_path=.*step_3/hf_model",
                           "its own train.checkpoint_dir"]),
    # ---------------------------------------------------------------- samples
    Case("no samples", lambda c: c.train(samples=[]), DataError,
         ["samples is empty", "at least one training sample"]),
    Case("samples is one dict", lambda c: c.train(samples=PAIRS[0]), DataError,
         ["got a single dict; wrap it in a list"]),
    Case("a data file that does not exist",
         lambda c: c.train(samples=str(c.tmp / "missing.jsonl")), DataError,
         [r"samples file .*missing\.jsonl does not exist \(relative paths start from .*\); "
          "check the path"]),
    Case("a line of a .jsonl file that is not JSON",
         lambda c: c.train(samples=c.file("data.jsonl", json.dumps(PAIRS[0]) + "\n{oops\n")),
         DataError, [r"data\.jsonl:2: not valid JSON \(Expecting property name enclosed in "
                     r"double quotes: column 2\); fix the line or remove it"]),
    Case("an empty completion",
         lambda c: c.train(samples=PAIRS[:2] + [{"prompt": "x", "completion": " "}]), DataError,
         ["sample 2: field 'completion' is empty", "remove the sample or fill it in"]),
    Case("a prompt that is a number",
         lambda c: c.train(samples=[PAIRS[0], {"prompt": 12, "completion": "x"}]), DataError,
         ["sample 1: field 'prompt' is a int", "expected a string"]),
    Case("a sample of no known kind", lambda c: c.train(samples=PAIRS[:3] + [5]), DataError,
         ["sample 3: cannot tell what it is", r"expected a string, a \{'text': ...\} dict"]),
    Case("two kinds of sample in one dataset",
         lambda c: c.train(samples=[PAIRS[0], "plain text"]), DataError,
         ["sample 1 is a text sample but sample 0 is a pair sample",
          "one dataset must hold one kind of sample"]),
    Case("a missing completion field",
         lambda c: c.train(samples=[{"prompt": "x", "answer": "y"}]), DataError,
         ["sample 0: missing field 'completion'", r"method\.output_key"]),
    Case("a file that is not UTF-8",
         lambda c: c.train(samples=c.raw("latin1.jsonl", b'{"prompt": "a", "completion": "b"}\n'
                                         b'{"prompt": "caf\xe9", "completion": "x"}\n')),
         DataError, [r"latin1\.jsonl:2: not UTF-8", "save the file as UTF-8"]),
    Case("a DatasetDict without a train split",
         lambda c: c.train(samples=_dataset_dict(a=PAIRS[:4], b=PAIRS[4:])), DataError,
         [r"splits \['a', 'b'\] but no 'train' split", r"dataset\['a'\]"]),
    Case("a bad sample met by a tokenising worker process",
         lambda c: c.train(samples=PAIRS * 5 + [{"prompt": "x", "completion": ""}] + PAIRS * 5,
                           data=dict(num_proc=2)),
         DataError, ["^sample 40: field 'completion' is empty"]),
    Case("a chat template that cannot render a sample",
         lambda c: c.train(samples=[GOOD_CHAT] * 3 + [chat(user(), {"role": "tool",
                                                                    "content": "x"}, assistant())],
                           tokenizer=dict(chat_template=RAISING_TEMPLATE)),
         ChatError, ["^sample 3: the chat template cannot render", "no tools"]),
    Case("method.overlong='split' on a pair too long",
         lambda c: c.train(samples=PAIRS[:2] + [{"prompt": "word " * 40, "completion": "x"}],
                           method=dict(overlong="split")),
         DataError, [r"^sample 2: \d+ tokens, more than train\.seq_length=32",
                     'method\\.overlong="split" cuts only text']),
    Case("every sample longer than seq_length, dropped",
         lambda c: c.train(samples=[{"prompt": "word1 " * 40, "completion": "x"}] * 3,
                           method=dict(overlong="drop")),
         DataError, ["no sample is left to train on: data: 3 samples", r"3 dropped \(3 too_long\)",
                     r"raise train\.seq_length \(now 32\), or set method\.overlong=\"truncate\""]),
    Case("a string left open on a line of a .jsonl file",
         lambda c: c.train(samples=c.file("open.jsonl",
                                          json.dumps(PAIRS[0]) + '\n{"prompt": "a\n')),
         DataError, [r"open\.jsonl:2: not valid JSON \(Unterminated string starting at: column "
                     r"12\); fix the line or remove it"]),
    Case("a Parquet file with no rows",
         lambda c: c.train(samples=c.parquet("empty.parquet", [])), DataError,
         [r"samples file .*empty\.parquet: the file has no rows; give a file with at least one "
          "sample"]),
    Case("a file that is not Parquet",
         lambda c: c.train(samples=c.file("fake.parquet", "prompt,completion\n")), DataError,
         [r"samples file .*fake\.parquet cannot be read as Parquet"]),
    Case("a bad sample in an eval file",
         lambda c: c.train(eval_samples=c.file("eval.jsonl", json.dumps(PAIRS[0]) + "\n"
                                               + json.dumps({"prompt": 3, "completion": "x"}))),
         DataError, ["^eval_samples: sample 1: field 'prompt' is a int"]),
    Case("an empty eval file",
         lambda c: c.train(eval_samples=c.file("none.jsonl", "\n")), DataError,
         [r"^eval_samples \(.*none\.jsonl\) is empty: give at least one evaluation sample"]),
    Case("a bad validation sample",
         lambda c: c.train(eval_samples=[PAIRS[0], {"prompt": "x", "completion": ""}]),
         DataError, ["^eval_samples: sample 1: field 'completion' is empty"]),
    # ---------------------------------------------------------------- pre-tokenised samples
    Case("a token id outside the vocabulary",
         lambda c: c.train(samples=[{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5000, 6]}]),
         DataError, [r"^sample 1: field 'input_ids' holds 5000 at position 1, outside the "
                     r"tokenizer's vocabulary \(ids 0 to 511\)", r"tokenizer\.tokenizer_path"]),
    Case("a completion_mask shorter than the ids",
         lambda c: c.train(samples=[{"input_ids": [1, 2, 3], "completion_mask": [0, 1]}]),
         DataError, [r"^sample 0: field 'completion_mask' has 2 values but 'input_ids' has 3 "
                     "tokens", r"one value per token \(1 = loss, 0 = none\)"]),
    Case("assistant_masks that are not 0 or 1",
         lambda c: c.train(samples=[{"input_ids": [1, 2, 3], "assistant_masks": [0, 2, 1]}]),
         DataError, [r"^sample 0: field 'assistant_masks' holds 2 at position 1",
                     "a mask holds 1"]),
    Case("labels longer than the ids",
         lambda c: c.train(samples=[{"input_ids": [1, 2, 3]},
                                    {"input_ids": [1, 2], "labels": [-100, 2, 3]}]),
         DataError, [r"^sample 1: field 'labels' has 3 values but 'input_ids' has 2 tokens",
                     r"aligned \(not shifted\), with -100 where there is no loss"]),
    Case("labels shifted by one",
         lambda c: c.train(samples=[{"input_ids": [1, 2, 3, 4], "labels": [2, 3, 4, -100]}]),
         DataError, [r"^sample 0: field 'labels' is 2 at position 0 where 'input_ids' is 1",
                     "look shifted left by one position"]),
    Case("ids that are text",
         lambda c: c.train(samples=[{"input_ids": "1 2 3"}]), DataError,
         [r"^sample 0: field 'input_ids' is a str", "expected a list of token ids"]),
    Case("padding in pre-tokenised ids",
         lambda c: c.train(samples=[{"input_ids": [1, 2, 0], "attention_mask": [1, 1, 0]}]),
         DataError, [r"^sample 0: field 'attention_mask' is 0 at position 2",
                     "give the ids without padding"]),
    Case("ids and text samples in one dataset",
         lambda c: c.train(samples=[{"input_ids": [1, 2, 3]}, "plain text"]), DataError,
         ["sample 1 is a text sample but sample 0 is a pretokenised sample",
          "one dataset must hold one kind of sample"]),
    Case("a KTO completion id outside the vocabulary",
         lambda c: c.train(samples=[{"prompt_input_ids": [1, 2], "completion_input_ids": [3],
                                     "label": True},
                                    {"prompt_input_ids": [1, 2], "completion_input_ids": [-3],
                                     "label": False}], kind="kto"),
         KTODataError, [r"^sample 1: field 'completion_input_ids' holds -3 at position 0, "
                        "outside the tokenizer's vocabulary"]),
    Case("a KTO sample of ids without its completion",
         lambda c: c.train(samples=[{"prompt_input_ids": [1, 2], "label": True}], kind="kto"),
         KTODataError, [r"^sample 0: field 'completion_input_ids' is missing"]),
    # ---------------------------------------------------------------- mixtures
    Case("a bad sample in a source of a mixture",
         lambda c: c.train(samples=Mixture({"pairs": (PAIRS, 3), "chats": (
             [GOOD_CHAT, chat(user(), {"role": "robot", "content": "x"})], 1)})),
         ChatError, [r"^mixture source 'chats': sample 1: messages\[1\]\.role is 'robot'"]),
    Case("a bad line in a file of a mixture",
         lambda c: c.train(samples=Mixture({"pairs": (PAIRS, 1), "file": (c.file(
             "mix.jsonl", json.dumps(PAIRS[0]) + "\n{oops\n"), 1)})),
         DataError, [r"^mixture source 'file': .*mix\.jsonl:2: not valid JSON"]),
    Case("a missing file in a mixture",
         lambda c: c.train(samples=Mixture({"gone": (str(c.tmp / "gone.jsonl"), 1)})), DataError,
         [r"mixture source 'gone' file .*gone\.jsonl does not exist"]),
    Case("a mixture source too small to hold out from",
         lambda c: c.train(samples=Mixture({"pairs": (PAIRS, 1), "one": (PAIRS[:1], 1)}),
                           train=dict(eval_split=0.5)),
         DataError, [r"^mixture source 'one': train\.eval_split=0\.5 leaves no training samples"]),
    Case("a mixture weight of 0",
         lambda c: c.train(samples=Mixture({"pairs": (PAIRS, 0)})), DataError,
         [r"Mixture: source 'pairs': the weight must be a number > 0, got 0"]),
    Case("samples and data.mixture both given",
         lambda c: c.train(data=dict(mixture=[{"name": "a", "path": "a.jsonl"}])), ConfigError,
         ["both samples and data.mixture are given"]),
    Case("a mixture streamed",
         lambda c: c.train(samples=Mixture({"pairs": (PAIRS, 1)}), data=dict(streaming=True)),
         ConfigError, [r"data\.streaming=True with a mixture", r"set data\.streaming=False"]),
    # ---------------------------------------------------------------- conversations
    Case("a conversation ending with the user's turn, refused",
         lambda c: c.train(samples=[GOOD_CHAT, chat(user(), assistant(), user("And Rome?"))],
                           method=dict(require_assistant_last=True)),
         ChatError, ["^sample 1: the conversation ends with a user turn, after the assistant's "
                     "last, which trains nothing", r"method\.require_assistant_last=false"]),
    Case("an unknown role",
         lambda c: c.train(samples=[GOOD_CHAT, chat(user(), {"role": "robot", "content": "x"})]),
         ChatError, [r"sample 1: messages\[1\]\.role is 'robot'",
                     "expected one of system, user, assistant, tool"]),
    Case("a conversation with no assistant turn", lambda c: c.train(samples=[chat(user())]),
         ChatError, ["sample 0: the conversation has no assistant turn", "add one"]),
    Case("content as a list of parts",
         lambda c: c.train(samples=[chat({"role": "user", "content": [{"text": "hi"}]},
                                         assistant())]),
         ChatError, [r"sample 0: messages\[0\]\.content is a list", "join text parts"]),
    Case("a tool call without a name",
         lambda c: c.train(samples=[chat(user(), assistant("", tool_calls=[
             {"type": "function", "function": {"arguments": {}}}]))]),
         ChatError, [r"sample 0: messages\[1\]\.tool_calls\[0\] has no function name"]),
    Case("tool-call arguments that are not JSON",
         lambda c: c.train(samples=[chat(user(), assistant("", tool_calls=[
             call(arguments="{city: Paris")]), {"role": "tool", "content": "sunny"},
             assistant())]),
         ChatError, [r"sample 0: messages\[1\]\.tool_calls\[0\]\.function\.arguments is not "
                     "valid JSON"]),
    Case("a tool_call_id that answers no call",
         lambda c: c.train(samples=[GOOD_CHAT, chat(
             user(), assistant("", tool_calls=[call(call_id="call_1")]),
             {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}, assistant())]),
         ChatError, [r"sample 1: messages\[2\]\.tool_call_id is 'call_9', which answers no tool "
                     r"call made before it \(the calls' ids: call_1\)",
                     "give it the id of the call it answers"]),
    # ---------------------------------------------------------------- KTO
    Case("a KTO label that is text",
         lambda c: c.train(samples=KTO[:1] + [{**KTO[1], "label": "yes"}], kind="kto"),
         KTODataError, ["sample 1: field 'label' is 'yes'", "expected true or false"]),
    Case("KTO with one class only",
         lambda c: c.train(samples=[{**s, "label": True} for s in KTO], kind="kto"),
         KTODataError, ["undesirable"]),
    Case("KTO pairs of identical transcripts",
         lambda c: c.train(samples=[{"chosen": "Human: hi Assistant: yo",
                                     "rejected": "Human: hi Assistant: hey"},
                                    {"chosen": "Human: a Assistant: b",
                                     "rejected": "Human: a Assistant: b"}], kind="kto"),
         KTODataError, ["sample 1: field 'rejected' is the same transcript as 'chosen'",
                        "remove the pair, or correct one of its answers"]),
    Case("a KTO sample without its label",
         lambda c: c.train(samples=KTO[:1] + [{"prompt": "a", "completion": " b"}], kind="kto"),
         KTODataError, ["sample 1: field 'label' is missing; add it: true for a desirable "
                        r"completion, false for an undesirable one \(or name the field that "
                        r"holds it with method\.label_key\)"]),
    Case("an empty KTO completion",
         lambda c: c.train(samples=KTO[:1] + [{**KTO[1], "completion": " "}], kind="kto"),
         KTODataError, ["sample 1: field 'completion' is empty; fill it in or remove the "
                        "sample"]),
    Case("a KTO pair whose chosen answer is its rejected one",
         lambda c: c.train(samples=[{"prompt": "hi", "chosen": " yo", "rejected": " no"},
                                    {"prompt": "hi", "chosen": " yo", "rejected": " yo"}],
                           kind="kto"),
         KTODataError, ["sample 1: field 'rejected' is the same as 'chosen', so there is "
                        "nothing to prefer; remove the pair"]),
    Case("too few KTO examples",
         lambda c: c.train(samples=KTO[:1], kind="kto"), DataError,
         [r"too few examples to train on \(1; at least 2 are needed\): data: 1 samples",
          "give at least 2 samples"]),
    Case("KTO from a stream",
         lambda c: c.train(samples=c.file("kto.jsonl", "".join(json.dumps(s) + "\n" for s in KTO)),
                           kind="kto", data=dict(streaming=True)),
         DataError, ["KTO cannot train from a stream", "data.streaming=False"]),
    Case("KTO micro-batches of one",
         lambda c: c.train(samples=KTO, kind="kto", train=dict(batch_size=1)), ConfigError,
         [r"train\.batch_size=1", "at least 2 examples", "apo_zero_unpaired"]),
]


@pytest.fixture
def ctx(tiny_model_dir, tmp_path, monkeypatch):
    def refuse(config):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr("trainer_lib.training.trainer.load_model", refuse)
    return Ctx(tiny_model_dir, tmp_path)


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_before_the_model_loads(case, ctx):
    with pytest.raises(Exception) as e:
        case.run(ctx)
    assert type(e.value) is case.error, f"{type(e.value).__name__}: {e.value}"
    message = str(e.value)
    for words in case.words:
        assert re.search(words, message), f"{words!r} not in: {message}"
    assert "\n" not in message  # one line
    assert list_checkpoints(ctx.ckpts) == []
    assert not ctx.ckpts.exists() or not any(ctx.ckpts.iterdir())  # nothing written


# ---------------------------------------------------------------- the command line


CLI_CASES = {
    "a data file that does not exist": (
        lambda c: ["--data", str(c.tmp / "missing.jsonl")],
        "data file .*missing.jsonl does not exist"),
    "a bad sample in the data file": (
        lambda c: ["--data", c.file("d.jsonl", json.dumps(PAIRS[0]) + "\n" + json.dumps(
            {"prompt": "x", "completion": ""}) + "\n")], "sample 1: field 'completion' is empty"),
    "save_best that is never logged": (
        lambda c: ["--data", c.file("d.jsonl", json.dumps(PAIRS[0]) + "\n"),
                   "train.save_best=eval/loss"], r"train\.save_best='eval/loss'.*--eval-data"),
    "early stopping that is never logged": (
        lambda c: ["--data", c.file("d.jsonl", json.dumps(PAIRS[0]) + "\n"),
                   "train.early_stopping.patience=2"],
        r"train\.early_stopping\.metric='eval/loss'.*--eval-data"),
    "a NaN learning rate": (
        lambda c: ["--data", c.file("d.jsonl", json.dumps(PAIRS[0]) + "\n"),
                   "optimizer.kwargs.lr=.nan"], "optimizer.kwargs.lr .*must be finite"),
    "an --output that is a file": (
        lambda c: ["--data", c.file("d.jsonl", json.dumps(PAIRS[0]) + "\n"), "--output",
                   c.file("out-file", "x")], "--output .*out-file is a file"),
    "a token id outside the vocabulary": (
        lambda c: ["--data", c.file("ids.jsonl", json.dumps({"input_ids": [1, 999]}) + "\n")],
        "sample 0: field 'input_ids' holds 999 at position 1, outside the tokenizer's "
        "vocabulary"),
    "a mixture with a weight that is not a number": (
        lambda c: ["--mix", "a", c.file("a.jsonl", json.dumps(PAIRS[0]) + "\n"), "heavy"],
        "--mix a .*a.jsonl heavy: the weight must be a number"),
    "a bad sample in a mixture": (
        lambda c: ["--mix", "a", c.file("a.jsonl", json.dumps(PAIRS[0]) + "\n"), "1",
                   "--mix", "b", c.file("b.jsonl", json.dumps({"input_ids": [1], "labels": []})
                                        + "\n"), "1"],
        "mixture source 'b': sample 0: field 'labels' has 0 values"),
    "--data and a mixture": (
        lambda c: ["--data", c.file("d.jsonl", json.dumps(PAIRS[0]) + "\n"), "--mix", "a",
                   c.file("a.jsonl", json.dumps(PAIRS[0]) + "\n"), "1"],
        "--data and a mixture .* are both given"),
    "a checkpoint folder that cannot be written": (
        lambda c: ["--data", c.file("d.jsonl", json.dumps(PAIRS[0]) + "\n"),
                   "train.checkpoint_dir=/sys/trainer_lib_ckpts"], "is not writable"),
    "a YAML file that does not parse": (
        lambda c: ["--config", c.file("bad.yaml", "train:\n  batch_size: [4\n")],
        r"bad\.yaml:3:1: not valid YAML: expected ',' or ']'"),
    "a Parquet file with no rows": (
        lambda c: ["--data", c.parquet("empty.parquet", [])], "the file has no rows"),
    "a bad sample in --eval-data": (
        lambda c: ["--data", c.file("d.jsonl", json.dumps(PAIRS[0]) + "\n"), "--eval-data",
                   c.file("e.jsonl", json.dumps(PAIRS[1]) + "\n" + json.dumps(
                       {"prompt": "x", "completion": ""}) + "\n")],
        "error: eval_samples: sample 1: field 'completion' is empty"),
    "betas of the wrong length": (
        lambda c: ["--data", c.file("d.jsonl", json.dumps(PAIRS[0]) + "\n"),
                   "optimizer.kwargs.betas=[0.9]"], r"optimizer\.kwargs\.betas must hold 2"),
    "a misspelt peft_config key": (
        lambda c: ["--data", c.file("d.jsonl", json.dumps(PAIRS[0]) + "\n"),
                   "model.peft_config.target_modulez=[q_proj]"], "did you mean 'target_modules'"),
    "a misspelt DeepSpeed section": (
        lambda c: ["--data", c.file("d.jsonl", json.dumps(PAIRS[0]) + "\n"),
                   "train.deepspeed_config={zero_optimisation: {stage: 3}}"],
        "did you mean 'zero_optimization'"),
}


@pytest.mark.parametrize("name", CLI_CASES)
def test_the_command_line_says_each_mistake_in_one_line_with_status_2(name, ctx, capsys):
    from trainer_lib.cli import main

    args, words = CLI_CASES[name]
    status = main(["sft", f"model.model_path={ctx.model}", f"train.checkpoint_dir={ctx.ckpts}",
                   "train.progress_bar=false", *args(ctx)])  # the case's own settings last
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trainer-lib: error: "), err
    assert re.search(words, lines[0]), lines[0]


# ---------------------------------------------------------------- accepted, with a warning


def test_a_learning_rate_of_0_trains_with_a_warning(tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match=r"optimizer\.kwargs\.lr is 0: the weights will not "
                      "change"):
        Ctx(tiny_model_dir, tmp_path).train(optimizer=dict(kwargs=dict(lr=0.0)))


def test_seq_length_beyond_rotary_positions_is_a_warning(tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match=r"train\.seq_length=2048 is above the model's "
                      r"max_position_embeddings=1024: the model uses rotary positions"):
        Ctx(tiny_model_dir, tmp_path).train(train=dict(seq_length=2048))


def test_a_conversation_ending_with_the_users_turn_trains_and_the_report_says_so(
        tiny_model_dir, tmp_path, capsys):
    """As TRL trains it, the conversation trains; its last turn carries no loss, which the data
    report says (method.require_assistant_last=true refuses it instead: in the table)."""
    from trainer_lib.methods.sft.config import SFTConfig
    from trainer_lib.methods.sft.recipe import SFTRecipe

    samples = [GOOD_CHAT, chat(user(), assistant(), user("And Rome?")), GOOD_CHAT]
    trainer = Ctx(tiny_model_dir, tmp_path).train(samples=samples)
    assert trainer.data_report.notes == {"last_turn_not_assistant": 1}
    assert trainer.data_report.as_dict()["notes/last_turn_not_assistant"] == 1
    assert ("; 1 conversation ends with a turn after the assistant's last, which trains "
            "nothing") in capsys.readouterr().out
    record = {"kind": "conversation", "messages": samples[1]["messages"], "tools": None}
    for loss_on, note in (("assistant", "last_turn_not_assistant"),
                          ("last_assistant", "last_turn_not_assistant"),
                          ("all", "")):  # with loss on every token, the last turn trains too
        recipe = SFTRecipe(trainer.tokenizer, None, SFTConfig(loss_on=loss_on), 32)
        assert recipe.note(record) == note


def test_save_best_naming_a_figure_that_is_not_logged_warns_at_the_first_log(tiny_model_dir,
                                                                           tmp_path):
    with pytest.warns(UserWarning, match=r"train\.save_best='los' is not among the figures "
                      r"logged at step 1 \(.*loss.*\)"):
        Ctx(tiny_model_dir, tmp_path).train(train=dict(save_best="los", log_interval=1))


def test_a_metric_fn_returning_nan_warns_and_never_counts_as_best(tiny_model_dir, tmp_path):
    values = iter([math.nan, 0.5, math.nan])
    c = Ctx(tiny_model_dir, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = c.train(train=dict(total_steps=3, epochs=3, eval_interval=1,
                                     save_best="metrics/score",
                                     save_best_mode="max"),
                          method=dict(gen_kwargs=dict(max_new_tokens=2)), eval_prompts=["word1"],
                          metric_fn=lambda samples, prompts, outputs: {"score": next(values)})
    messages = [str(w.message) for w in caught]
    assert any("metric_fn '<lambda>' returned metrics/score=nan at step 1" in m for m in messages)
    assert any("at step 3" in m for m in messages)
    best = json.loads((c.ckpts / "best" / "trainer_state.json").read_text())
    assert (best["step"], best["best_value"]) == (2, 0.5)
    assert trainer.checkpoints.best_value == 0.5
