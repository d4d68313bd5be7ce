"""Every architecture family trains with the right loss: tiny random models of transformers'
own architectures (dense, mixture-of-experts, soft-capped and scaled heads, ALiBi, learned
positions, hybrid SSM, convolution and linear attention), each trained through `train()`.

For each: the first SFT loss, packed and padded, equals the mean NLL of the model's own forward
on the same tokens (plus, for a MoE model, its load-balancing loss times its coefficient, as
transformers adds it); KTO's logged `logps/chosen` and `logps/rejected` equal the model's own
completion log-probs; LoRA on all linear layers trains; the saved folder reloads with the
trained weights. Expected values come from the model's own forward in plain torch, on tokens
from `AutoTokenizer.from_pretrained` of the model folder (a Qwen2 folder tokenises differently
from its tokenizer.json). A model whose packed rows would leak trains padded, saying so.
"""

import os
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from trainer_lib import default_config, train
from trainer_lib.model.embedded import build_tokenizer, load_default_samples

RTOL = 5e-6

# model type -> its config beyond the shared tiny sizes (layer patterns where it needs them)
MOE = dict(num_experts=4, num_experts_per_tok=2)
ARCHITECTURES = {
    # dense
    "llama": {},
    "qwen2": {},  # its tokenizer class re-splits digits: the expected tokens come from it
    "gemma": dict(head_dim=16),
    # mixture of experts (load-balancing loss added)
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(MOE, moe_intermediate_size=32),
    "olmoe": dict(MOE),
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                        topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4, head_dim=16),
    # soft-capped and scaled heads
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16, sliding_window=4),
    "cohere": dict(logit_scale=0.5),
    "granite": dict(logits_scaling=4.0),
    "granitemoe": dict(logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2),
    "minicpm3": dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    # ALiBi and learned positions
    "bloom": dict(n_layer=2, n_head=4),
    "mpt": {},
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "gpt2": dict(n_layer=2, n_head=4, n_embd=64),
    # hybrid SSM, convolution, linear attention
    "mamba": dict(state_size=8),
    "jamba": dict(MOE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, mamba_d_state=8),
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8,
                  mamba_chunk_size=16),
    "nemotron_h": dict(hybrid_override_pattern="M*", mamba_num_heads=8, mamba_head_dim=16,
                       ssm_state_size=8, n_groups=1, chunk_size=16),
    "falcon_h1": dict(lm_head_multiplier=0.5, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16,
                      mamba_d_state=8, mamba_chunk_size=16),
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "qwen3_next": dict(MOE, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                       layer_types=["linear_attention", "full_attention"],
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16),
}
# what each falls back to in transformers 5.25 on CPU (anything else fails the test, so a
# change in transformers shows here)
# linear layers "all-linear" leaves out: SSM mixers' layers whose weight the model reads
# directly (trainer_lib leaves them out), and the dense MLPs of MoE models whose names peft maps
# onto the fused experts
NOT_ADAPTED = {"mamba": ("out_proj", "dt_proj"), "jamba": ("dt_proj",),
               "nemotron_h": ("out_proj",), "falcon_h1": ("out_proj",),
               "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
               "qwen3_next": ("gate_proj", "up_proj", "down_proj")}
PACKED_ROWS_LEAK = {"gpt_oss", "bloom", "mpt", "opt", "mamba", "jamba", "bamba", "nemotron_h",
                    "falcon_h1", "lfm2", "qwen3_next"}

PAIRS = [
    ("Add 12 and 30.\n", "The sum is 42."),
    ("What year follows 2023?\n", "It is 2024."),
    ("Name a colour.\n", "Blue, like 7 skies."),
    ("Count to 5.\n", "1 2 3 4 5"),
    ("Spell cat.\n", "C A T, 3 letters."),
    ("Say hello.\n", "Hello there, friend 99."),
]


@pytest.fixture(scope="module", autouse=True)
def quick_machine():
    """One thread (these models are tiny: more threads only wait on each other) and no fsync of
    the checkpoints each run writes (what is checked here is the loss, not the disk)."""
    threads, fsync = torch.get_num_threads(), os.fsync
    torch.set_num_threads(1)
    os.fsync = lambda fd: None
    yield
    torch.set_num_threads(threads)
    os.fsync = fsync


@pytest.fixture(scope="module")
def tokenizer():
    texts = [v for row in load_default_samples() for v in row.values()]
    texts += [p + c for p, c in PAIRS] * 3
    return build_tokenizer(texts, vocab_size=320)


def build_folder(model_type: str, tokenizer, folder) -> str:
    """A tiny random model of `model_type` (float32, seed 0) and the tokenizer, saved."""
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                 tie_word_embeddings=False)
    sizes.update(ARCHITECTURES[model_type])
    config = AutoConfig.for_model(model_type, **sizes)
    for name, value in config.to_dict().items():  # dropout off: the first loss is deterministic
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def examples(tok) -> list[tuple[list[int], list[bool]]]:
    """(token ids, which tokens carry loss) per pair, from the folder's own tokenizer: the prompt
    with its special tokens, the completion, EOS (each prompt ends in a newline, a token apart)."""
    out = []
    for prompt, completion in PAIRS:
        p = tok(prompt)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((p + c, [False] * len(p) + [True] * len(c)))
    return out


@torch.no_grad()
def own_completion_logps(model, exs) -> list[float]:
    """Each example alone through the model's own forward: the summed log-probs of its
    loss-carrying tokens."""
    sums = []
    for ids, loss in exs:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        sums.append(float(logps[torch.tensor(loss[1:])].sum()))
    return sums


@torch.no_grad()
def own_aux_loss(model, exs) -> float:
    """coef x the load-balancing loss transformers adds for a padded batch of all examples (0
    for a model without routers)."""
    coef = getattr(model, "router_aux_loss_coef", None)
    if not coef:
        return 0.0
    width = max(len(ids) for ids, _ in exs)
    ids = torch.zeros(len(exs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (x, _) in enumerate(exs):
        ids[r, :len(x)], mask[r, :len(x)] = torch.tensor(x), 1
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    return coef * float(out.aux_loss)


def run(config, samples, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = train(samples=samples, config=config)
    return trainer, capsys.readouterr().out


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_architecture_trains_with_its_own_loss(model_type, tokenizer, tmp_path, capsys):
    folder = build_folder(model_type, tokenizer, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    exs = examples(tok)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    logps = own_completion_logps(model, exs)
    tokens = sum(sum(loss[1:]) for _, loss in exs)
    expected_loss = -sum(logps) / tokens + own_aux_loss(model, exs)
    leaks = model_type in PACKED_ROWS_LEAK

    base = default_config("sft").evolve(
        model=dict(model_path=folder),
        train=dict(seq_length=64, batch_size=len(PAIRS), total_steps=1, progress_bar=False,
                   checkpoint_dir=str(tmp_path / "ckpts"), logging_dir=str(tmp_path / "logs"),
                   eval_interval=1000),
        data=dict(num_proc=1),
        optimizer=dict(kwargs=dict(lr=1e-2)))
    samples = [{"prompt": p, "completion": c} for p, c in PAIRS]

    # SFT, packed (the default), LoRA on every linear layer; saved merged, reloaded
    lora = base.evolve(model=dict(peft_config=dict(target_modules="all-linear", rank=4)))
    trainer, said = run(lora, samples, capsys)
    assert [(list(ex["input_ids"]), [l != -100 for l in ex["labels"]][1:])
            for ex in trainer.train_examples] == [(ids, loss[1:]) for ids, loss in exs]
    first = trainer.log_history[0]
    assert first["loss"] == pytest.approx(expected_loss, rel=RTOL)
    if own_aux_loss(model, exs):
        assert first["aux_loss"] > 0
    assert ("padded, length-grouped batches" in said) == leaks, said
    assert (trainer.loss_path.packing is None) == leaks
    assert not trainer.loss_path.head.own_logits  # the chunked loss reproduces every head here
    policy = trainer.accelerator.unwrap_model(trainer.model)
    linear = {n for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not model.get_output_embeddings()
              and n.rsplit(".", 1)[-1] not in NOT_ADAPTED.get(model_type, ())}
    adapted = {n.rsplit(".base_layer", 1)[0] for n, _ in policy.named_modules()
               if n.endswith(".base_layer")}
    adapted = {n.split("base_model.model.", 1)[1] for n in adapted}
    assert linear and linear <= adapted, linear - adapted  # (peft adapts MoE routers too)
    b = {n: p for n, p in policy.named_parameters() if "lora_B" in n}
    assert b and all(p.abs().sum() > 0 for p in b.values())  # every adapter moved
    trainer.save_pretrained(str(tmp_path / "out"), merge_adapters=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    probe = torch.tensor([exs[0][0]])
    with torch.no_grad():
        trained_logits = policy.eval()(input_ids=probe).logits
        torch.testing.assert_close(reloaded(input_ids=probe).logits, trained_logits,
                                   rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(input_ids=probe).logits, trained_logits, atol=1e-4)

    # SFT, padded (a model that leaks was padded above already)
    if not leaks:
        padded, _ = run(base.evolve(method=dict(packing=False)), samples, capsys)
        assert padded.log_history[0]["loss"] == pytest.approx(expected_loss, rel=RTOL)

    # KTO: its logged log-probs are the model's own completion log-probs
    labels = [i % 2 == 0 for i in range(len(PAIRS))]
    kto = base.evolve(method=dict(name="kto"))
    trainer, _ = run(kto, [dict(s, label=l) for s, l in zip(samples, labels)], capsys)
    first = trainer.log_history[0]
    chosen = [x for x, l in zip(logps, labels) if l]
    rejected = [x for x, l in zip(logps, labels) if not l]
    assert first["logps/chosen"] == pytest.approx(sum(chosen) / len(chosen), rel=RTOL)
    assert first["logps/rejected"] == pytest.approx(sum(rejected) / len(rejected), rel=RTOL)
