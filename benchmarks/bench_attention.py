"""Attention over packed rows: transformers' SDPA with its block-diagonal mask against
trainer_lib's per-document attention (trainer_lib/attention.py), side by side.

    python benchmarks/bench_attention.py                # 8 rows of 512 tokens, 5 rounds

Rows are packed by best fit decreasing from the lengths of real instruction data (GSM8K and
Alpaca in the Alpaca prompt format, as bench_sft.py), so they hold the usual 2-4 documents. The
model is the SFT benchmark's Llama shape (hidden 256, 4 layers, 4 heads, 32k vocabulary), the
loss a plain sum of the last hidden state (the head is the same for both and left out). Each
figure is the median over rounds of forward + backward, and of a forward without gradients, in
wall seconds and in the process's CPU seconds (with one thread the steadier figure on a machine
busy with other work), with the threads asked for.
The logits and the gradients of both are compared too.
"""

from __future__ import annotations

import argparse
import statistics
import time

from workload import instructions


def lengths(n: int) -> list[int]:
    """Token counts of n instruction examples (about 4 characters a token)."""
    gsm, alpaca = instructions()
    rows = gsm[: n - n // 4] + alpaca[: n // 4]
    return [min(512, 20 + len(" ".join(r.values())) // 4) for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq_length", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer_lib.data.packing import pack_documents
    from trainer_lib.ops.attention import register

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    docs = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths(4 * args.rows)]
    batch = pack_documents(docs, args.seq_length, 0)
    batch = {k: v[: args.rows] for k, v in batch.items() if torch.is_tensor(v)}
    batch["input_ids"] = torch.randint(3, 32000, batch["input_ids"].shape)
    per_row = [len(set(r.tolist()) - {-1}) for r in batch["document_index"]]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, intermediate_size=704)).model
    name = register()

    def run(attention, grad):
        model.set_attn_implementation(attention)
        model.zero_grad()
        start, cpu = time.perf_counter(), time.process_time()
        with torch.set_grad_enabled(grad):
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        use_cache=False).last_hidden_state
            if grad:
                out[batch["document_index"] >= 0].sum().backward()
        return ((time.perf_counter() - start, time.process_time() - cpu), out.detach(),
                [p.grad for p in model.parameters()])

    times = {(a, g): [] for a in ("sdpa", name) for g in (True, False)}
    for _ in range(args.rounds):
        for key in times:
            times[key].append(run(*key)[0])
    _, out_a, grads_a = run("sdpa", True)
    _, out_b, grads_b = run(name, True)
    real = batch["document_index"] >= 0
    print(f"{len(batch['input_ids'])} rows of {args.seq_length} tokens, documents per row "
          f"{per_row}, {args.threads} threads, median of {args.rounds} rounds, seconds (CPU "
          "seconds)")

    def median(a, g, i):
        return statistics.median(t[i] for t in times[(a, g)])

    print(f"{'attention':18s} {'fwd+bwd':>16s} {'fwd only':>16s}")
    for a in ("sdpa", name):
        print(f"{a:18s} {median(a, True, 0):7.3f} ({median(a, True, 1):6.3f}) "
              f"{median(a, False, 0):7.3f} ({median(a, False, 1):6.3f})")
    for g, label in ((True, "fwd+bwd"), (False, "fwd only")):
        print(f"per-document vs sdpa, {label}: {median('sdpa', g, 0) / median(name, g, 0):.2f}x "
              f"wall, {median('sdpa', g, 1) / median(name, g, 1):.2f}x CPU")
    grad_diff = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(grads_a, grads_b))
    print(f"largest difference: hidden states {(out_a[real] - out_b[real]).abs().max().item():.2e}, "
          f"gradients {grad_diff:.2e} of each one's largest value")


if __name__ == "__main__":
    main()
