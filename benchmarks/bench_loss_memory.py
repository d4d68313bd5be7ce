"""Peak memory of the loss over the vocabulary: plain cross-entropy against trainer_lib's chunked
one, for growing vocabularies (forward and backward, fp32, one child process per measurement).

    python benchmarks/bench_loss_memory.py [--tokens 4096] [--hidden 256]

The plain loss materialises [tokens, vocabulary] logits (and their gradient) in float32, so its
memory grows with tokens x vocabulary; the chunked loss holds a few chunks of logits at a time,
each about 2**25 float32 elements (the chunk has fewer tokens as the vocabulary grows). Both also
hold the head's weight gradient, [vocabulary, hidden] in float32, which any loss needs.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

from workload import report, result_of

VOCABS = [8_192, 32_064, 128_256, 262_144]


def worker(kind: str, tokens: int, hidden: int, vocab: int) -> None:
    import torch
    import torch.nn.functional as F

    from trainer_lib.ops.cross_entropy import chunked_token_nll

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(tokens, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if kind == "plain":
        loss = F.cross_entropy(head(h).float(), targets, reduction="sum")
    else:
        loss = chunked_token_nll(h, head, targets).sum()  # the default, automatic chunk size
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report(dict(kind=kind, vocab=vocab, loss=loss.item(), seconds=seconds,
                extra_mb=(peak - base) / 1024))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], args.tokens, args.hidden, int(args.worker[1]))
        return
    print(f"loss over {args.tokens} tokens, hidden {args.hidden}, fp32, forward + backward")
    print(f"{'vocabulary':>10s} {'weight grad MB':>15s} {'plain MB':>9s} {'chunked MB':>11s} "
          f"{'plain s':>8s} {'chunked s':>10s}")
    for vocab in VOCABS:
        row = {}
        for kind in ("plain", "chunked"):
            cmd = [sys.executable, __file__, "--tokens", str(args.tokens),
                   "--hidden", str(args.hidden), "--worker", kind, str(vocab)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            row[kind] = result_of(cmd, proc.returncode, proc.stdout, proc.stderr)
        assert abs(row["plain"]["loss"] - row["chunked"]["loss"]) <= 1e-3 * abs(row["plain"]["loss"])
        print(f"{vocab:>10,d} {vocab * args.hidden * 4 / 2**20:15,.0f} {row['plain']['extra_mb']:9,.0f} {row['chunked']['extra_mb']:11,.0f} "
              f"{row['plain']['seconds']:8.2f} {row['chunked']['seconds']:10.2f}")


if __name__ == "__main__":
    main()
