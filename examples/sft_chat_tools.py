"""Fine-tune on multi-turn chats with tool calls, loss on the assistant's turns only; save,
reload, and let the reloaded model call a tool for a new question.

    python examples/sft_chat_tools.py                   # offline: the embedded tiny model and data
    python examples/sft_chat_tools.py --model_path Qwen/Qwen2.5-0.5B-Instruct --data chats.jsonl
    accelerate launch examples/sft_chat_tools.py        # several processes

Samples are OpenAI-format conversations ({"messages": [...], "tools": [...]}); they are rendered
with the model's own chat template (tokenizer.chat_template="default").
"""

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer_lib import ConfigError, DataError, default_sft_config, train
from trainer_lib.model.embedded import CHAT_TOOLS_DATA, tiny_model
from trainer_lib.runtime.hub import model_source


def _first_tools(path):
    """The tools of the first conversation of a .jsonl file (None for other files)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.readline()).get("tools")
    except (OSError, ValueError, AttributeError):
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_path", default=None, help="default: the embedded tiny Llama")
    parser.add_argument("--data", default=str(CHAT_TOOLS_DATA), help=".json/.jsonl conversations")
    parser.add_argument("--output", default="outputs/sft_chat_tools")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=2")
    args = parser.parse_args()

    embedded = args.model_path is None
    if not embedded:
        model_source(args.model_path, "--model_path")  # a missing folder or an unreachable hub
    model_path = tiny_model() if embedded else args.model_path
    if embedded:
        print(f"model: the embedded tiny Llama (built at {model_path})")
    config = default_sft_config().evolve(
        model=dict(model_path=model_path),
        tokenizer=dict(chat_template="default"),
        train=dict(seq_length=512, batch_size=2, epochs=60 if embedded else 3,
                   total_steps=100_000, log_interval=25, eval_interval=100_000,
                   checkpoint_dir="outputs/sft_chat_tools_ckpts", eval_split=0.1),
        optimizer=dict(kwargs=dict(lr=3e-3 if embedded else 1e-5, weight_decay=0.01)),
        scheduler=dict(name="cosine", kwargs=dict(warmup_steps=20)),
        method=dict(loss_on="assistant"),
    ).apply_overrides(args.overrides)

    trainer = train(samples=args.data, config=config)
    trainer.save_pretrained(args.output)
    if not trainer.accelerator.is_main_process:
        return
    losses = [e for e in trainer.log_history if "loss" in e]
    print(f"loss: {losses[0]['loss']:.3f} at step {losses[0]['step']} -> {losses[-1]['loss']:.3f} "
          f"at step {losses[-1]['step']}; eval/loss {trainer.log_history[-1].get('eval/loss', 0):.3f}")

    tools = _first_tools(CHAT_TOOLS_DATA)
    if _first_tools(args.data) != tools:  # the questions below are about the shipped tools
        print(f"saved to {args.output}")
        return
    tokenizer = AutoTokenizer.from_pretrained(args.output)
    model = AutoModelForCausalLM.from_pretrained(args.output)
    # stop at the end of the assistant's turn as well as at EOS
    stop = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>"])]
    stop = [t for t in stop if t is not None and t != tokenizer.unk_token_id]
    for question in ["What is the weather in Rome?", "How many miles is 12 km?"]:
        messages = [{"role": "system", "content": "You are a helpful assistant with tools."},
                    {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=40, do_sample=False, eos_token_id=stop)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"user: {question}\n  -> {answer.strip()}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:  # a setting or the data: one line, no traceback
        sys.exit(f"error: {e}")
