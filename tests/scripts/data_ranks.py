"""What each process of a launched run gets from the data pipeline; run by tests/test_data_cache.py
under `accelerate launch --num_processes 2`.

    python data_ranks.py --model <tiny model folder> --out <folder>

Each process writes out/rank<N>.json: whether it tokenised anything itself, the cache entries it
found, a hash of every packed row of the whole dataset as it sees it, the rows its loader gave it
in one epoch, and the samples its share of a stream held; then the same for a Dataset whose
fingerprint is random in each process; then, for a mixture of two sources, each epoch's rows as
the process drew them and the rows its loader gave it in each epoch.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

NUM_SAMPLES = 40


def samples():
    words = ["alpha", "beta", "gamma", "delta", "word1", "token2"]
    return [{"prompt": f"sample {i:03d}\n", "completion": " ".join(words[: 1 + i % 6])}
            for i in range(NUM_SAMPLES)]


def row_hash(row) -> str:
    return hashlib.sha1(json.dumps([ex["input_ids"] for ex in row]).encode()).hexdigest()[:16]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import datasets

    from trainer_lib import Mixture, default_sft_config
    from trainer_lib.data.streaming import StreamItems
    from trainer_lib.methods.sft.recipe import SFTRecipe
    from trainer_lib.methods.sft.trainer import SFTTrainer

    calls = []
    tokenize = SFTRecipe.tokenize

    def counting(self, records, indices):
        calls.append(len(records))
        return tokenize(self, records, indices)

    SFTRecipe.tokenize = counting
    config = default_sft_config().evolve(
        model=dict(model_path=args.model),
        train=dict(seq_length=64, batch_size=2, total_steps=1, progress_bar=False,
                   checkpoint_dir=os.path.join(args.out, "ckpts"),
                   logging_dir=os.path.join(args.out, "logs")))
    trainer = SFTTrainer(config, samples=samples())
    acc = trainer.accelerator
    tokenised = sum(calls)  # by this process, for the whole dataset
    mine = [row_hash(row) for batch in trainer.train_loader for row in _rows(trainer, batch)]

    stream = datasets.IterableDataset.from_generator(
        lambda: ({"prompt": s["prompt"], "completion": s["completion"]} for s in samples()))
    items = StreamItems(stream, "records", trainer.data_recipe(), packing=False, seed=1,
                        buffer_size=8, rank=acc.process_index, world=acc.num_processes)
    tokenizer = trainer.tokenizer
    streamed = sorted(int(tokenizer.decode(ex["input_ids"]).split("sample ")[1][:3])
                      for ex in items.examples(0))

    cache = Path(os.environ["TRAINER_LIB_DATA_CACHE"])
    entries = sorted(p.name for p in cache.iterdir() if (p / "done.json").exists())

    # a Dataset that datasets cannot hash gets a random fingerprint, different in each process
    unhashable = (x for x in range(1))
    dataset = datasets.Dataset.from_list(samples()[:10]).map(
        lambda r: {"completion": r["completion"] + ("" if unhashable else "!")})
    calls.clear()
    SFTTrainer(config, samples=dataset)
    acc.wait_for_everyone()
    unhashable_tokenised = sum(calls)
    entries_after = sorted(p.name for p in cache.iterdir() if (p / "done.json").exists())

    calls.clear()
    mixture = Mixture({"a": (samples()[:30], 3), "b": (samples()[30:], 1)}, examples_per_epoch=16)
    mixed = SFTTrainer(config.evolve(train=dict(epochs=2, total_steps=100)), samples=mixture)
    starts = mixed.epoch_ranges.starts
    drawn, given = [], []
    for epoch in range(2):
        drawn.append([row_hash(row) for row in mixed.train_items[starts[epoch]:starts[epoch + 1]]])
        mixed.train_loader.set_epoch(epoch)
        given.append([row_hash(row) for batch in mixed.train_loader
                      for row in _rows(mixed, batch)])
    acc.wait_for_everyone()
    mixture_tokenised = sum(calls)
    out = {"rank": acc.process_index, "num_processes": acc.num_processes,
           "tokenised": tokenised, "entries": entries, "unhashable_tokenised": unhashable_tokenised,
           "entries_after": entries_after,
           "entries_mixed": sorted(p.name for p in cache.iterdir() if (p / "done.json").exists()),
           "all_rows": [row_hash(row) for row in trainer.train_items],
           "loader_rows": mine, "streamed": streamed,
           "mixture_tokenised": mixture_tokenised, "mixture_drawn": drawn, "mixture_given": given,
           "mixture_report": mixed.data_report.as_dict()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{acc.process_index}.json").write_text(json.dumps(out))


def _rows(trainer, batch):
    """The packed rows of a collated batch, back as lists of examples (split at position 0)."""
    rows = []
    for ids, positions in zip(batch["input_ids"], batch["position_ids"]):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
        docs = [ids[s:e] for s, e in zip(starts[:-1], starts[1:])]
        rows.append([{"input_ids": d.tolist()} for d in docs
                     if not d.eq(trainer.tokenizer.pad_token_id).all()])  # not the padding run
    return rows


if __name__ == "__main__":
    main()
