"""The embedded default: a small instruction dataset that ships with the package, and a tiny
Llama built deterministically on the spot, so the examples and tests run with no model hub.

`tiny_model(folder)` trains a byte-level BPE tokenizer on the shipped data and initialises a
`LlamaForCausalLM` from a fixed seed: the same folder comes out on every machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer_lib.runtime.files import atomic_directory

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_DATA = ASSETS / "instructions.jsonl"
CHAT_TOOLS_DATA = ASSETS / "chat_tools.jsonl"

# ChatML with tools (in the style of Qwen2.5's template), so conversations with tool calls render
# with the embedded tokenizer too
CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' and loop.first %}"
    "{% elif m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for call in m.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def load_default_samples() -> list[dict]:
    with open(DEFAULT_DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer with BOS/EOS/PAD and a ChatML template, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llama(folder: str | os.PathLike, texts: list[str], hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4, vocab_size: int = 1024,
                     seed: int = 0) -> str:
    """Writes a randomly initialised tiny Llama and its tokenizer to `folder`; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return str(folder)


def tiny_model(folder: str | os.PathLike | None = None) -> str:
    """The embedded default model: built once into `folder` (default: a cache folder). Its
    tokenizer is trained on the shipped instruction and tool-call data, rendered as the
    examples render them."""
    if folder is None:
        cache = Path(os.environ.get("TRAINER_LIB_CACHE", Path.home() / ".cache" / "trainer_lib"))
        folder = cache / "tiny-llama-v1"
    folder = Path(folder)
    if not (folder / "config.json").exists():
        texts = []
        for row in load_default_samples():
            texts.extend([row["instruction"], row.get("input", ""), row["output"]])
        with open(CHAT_TOOLS_DATA, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts.append(json.dumps(row["tools"]))
                for m in row["messages"]:
                    texts.append(m["content"])
                    texts.extend(json.dumps(c["function"]) for c in m.get("tool_calls", []))
        build_tiny_llama(folder, texts)
    return str(folder)
