"""SFT on conversations with tool calls: only the assistant's tokens carry loss."""

import random

from transformers import AutoTokenizer

from trainer_lib import train

# ChatML with tools, in the style of Qwen2.5's published template (tool calls as JSON in
# <tool_call> tags, tool results as a user turn in <tool_response> tags)
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{%- endfor %}"
    "<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def _noise(rng, n=6):
    return " ".join(f"word{rng.randint(0, 199)}" for _ in range(n))


def _conversation(rng):
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": _noise(rng)},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": _noise(rng)},
        {"role": "assistant", "content": "It is sunny."},
    ]}


def test_noise_turns_carry_no_loss_so_the_loss_reaches_zero(tiny_config, tmp_path, capsys):
    rng = random.Random(0)
    samples = [_conversation(rng) for _ in range(8)]
    config = tiny_config.evolve(
        tokenizer=dict(chat_template=TEMPLATE),
        train=dict(seq_length=256, batch_size=8, epochs=1000, total_steps=120, log_interval=10),
        optimizer=dict(kwargs=dict(lr=1e-2)),
        method=dict(packing=True),
    )
    trainer = train(samples=samples, config=config)
    losses = [e["loss"] for e in trainer.log_history]
    assert losses[-1] < 0.05 < losses[0]
    report = trainer.data_report
    assert report.kinds["conversation"] == 8
    assert 0 < report.num_loss_tokens < report.num_tokens / 2
    assert "8 conversation" in capsys.readouterr().out

    # the template used is the one saved with the model
    trainer.save_pretrained(str(tmp_path / "out"))
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == TEMPLATE


def test_eval_split_holds_out_conversations(tiny_config):
    rng = random.Random(1)
    samples = [_conversation(rng) for _ in range(10)]
    trainer = train(samples=samples, config=tiny_config.evolve(
        tokenizer=dict(chat_template=TEMPLATE),
        train=dict(seq_length=256, total_steps=2, eval_split=0.2, eval_interval=1)))
    assert len(trainer.eval_items) == 2 and len(trainer.train_items) == 8
    assert "eval/loss" in trainer.log_history[-1]


def test_the_trainer_masks_exactly_the_assistant_turns_with_the_embedded_template(tiny_config):
    """The embedded model's own ChatML template (chat_template="default"), through the SFT
    trainer: the loss-carrying tokens are each assistant turn's content, tool call and <|im_end|>,
    never the "<|im_start|>assistant" header. Runs without the real-data fixtures."""
    from trainer_lib.methods.sft.trainer import SFTTrainer

    sample = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "word1 word2"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "word3"},
        {"role": "assistant", "content": "It is sunny."},
    ]}
    trainer = SFTTrainer(tiny_config.evolve(train=dict(seq_length=512)), samples=[sample] * 2)
    tok = trainer.tokenizer
    [example, _] = trainer.train_items
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == -100 and current:
            runs.append(tok.decode(current))
            current = []
        elif label != -100:
            assert label == token
            current.append(token)
    runs += [tok.decode(current)] if current else []
    assert runs == ['Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": '
                    '"Paris"}}</tool_call><|im_end|>', "It is sunny.<|im_end|>"]
