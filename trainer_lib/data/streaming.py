"""Training from a stream (`datasets.IterableDataset`), never materialised.

Each process reads its share, tokenises it with the method's recipe in small batches (the same
code as a whole dataset) and packs a bounded buffer at a time. A stream has no length:
`train.total_steps` bounds the run. Resuming reads the stream again from the start of the
checkpointed epoch, which is exact for a stream that gives the same samples in the same order.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Callable, Iterator, Optional

import numpy as np

from trainer_lib.data.checks import error_class, kept_rows, make_report
from trainer_lib.data.packing import pack_lengths
from trainer_lib.data.recipe import READ, DataRecipe, decode_row, tokenize_samples
from trainer_lib.data.sources import read_errors_message
from trainer_lib.data.store import ExampleStore
from trainer_lib.errors import DataError

CHECKED = 256  # samples of a stream checked before the model loads
_READ = 64  # samples prepared at a time


class StreamItems:
    """The training items of a stream: `epoch(e)` yields packed rows (lists of examples) or
    single examples. Indexing gives the first examples of the stream (checked up front), which
    is what a padding batch or the default evaluation prompts need."""

    def __init__(self, stream, rows: str, recipe: DataRecipe, *, packing: bool, seed: int,
                 buffer_size: int, rank: int = 0, world: int = 1, name: str = "samples"):
        from datasets.distributed import split_dataset_by_node

        self.recipe, self.rows, self.packing, self.name = recipe, rows, packing, name
        self.seed, self.buffer_size, self.rank, self.world = seed, buffer_size, rank, world
        self.whole = stream
        self.stream = split_dataset_by_node(stream, rank, world) if world > 1 else stream
        # whole shards per process: sample numbers within the share, not in the whole stream
        self.by_shards = world > 1 and stream.n_shards % world == 0
        checked, table = self._check()
        self.first = checked
        self.report = make_report(table, np.ones(table.num_rows, dtype=bool))
        self.report.stream_checked = table.column("sample").to_numpy().max() + 1

    def _check(self) -> tuple[list, Any]:
        """The first CHECKED samples of the whole stream, prepared: errors raised, examples kept."""
        head = list(itertools.islice(iter(self.whole), CHECKED))
        if not head:
            raise DataError("samples: the stream yields no samples")
        table = tokenize_samples([decode_row(r, self.rows) for r in head], list(range(len(head))),
                                self.recipe)
        _raise_first_error(table, self.name)
        examples = ExampleStore(table, self.recipe.carried)
        kept = kept_rows(table)
        if not len(kept):
            raise DataError(f"samples: none of the first {len(head)} samples of the stream "
                            "leaves an example to train on (all dropped)")
        return examples.fetch(kept[:8]), table

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self._as_item(ex) for ex in self.first[key]]
        return self._as_item(self.first[key])

    def _as_item(self, example: dict):
        return [example] if self.packing else example

    def examples(self, epoch: int) -> Iterator[dict]:
        """This process's examples of one epoch, in stream order."""
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)
        rows = iter(self.stream)
        for start in itertools.count(0, _READ):
            batch = list(itertools.islice(rows, _READ))
            if not batch:
                return
            local = range(start, start + len(batch))
            indices = [i if self.by_shards else i * self.world + self.rank for i in local]
            table = tokenize_samples([decode_row(r, self.rows) for r in batch], indices, self.recipe)
            _raise_first_error(table, self.name, self.rank if self.by_shards else None,
                               process=self.rank)
            kept = kept_rows(table)
            yield from ExampleStore(table, self.recipe.carried).fetch(kept)

    def epoch(self, epoch: int, seq_length: int) -> Iterator[Any]:
        """Items of one epoch: each buffer of examples packed (or not) and shuffled."""
        examples = self.examples(epoch)
        for number in itertools.count():
            buffer = list(itertools.islice(examples, self.buffer_size))
            if not buffer:
                return
            items: list = buffer
            if self.packing:
                flat, offsets = pack_lengths([len(ex["input_ids"]) for ex in buffer], seq_length)
                items = [[buffer[i] for i in flat[offsets[b]:offsets[b + 1]]]
                         for b in range(len(offsets) - 1)]
            order = np.random.default_rng([self.seed, epoch, number]).permutation(len(items))
            for i in order.tolist():
                yield items[i]


def _raise_first_error(table, name: str, rank: Optional[int] = None,
                       process: Optional[int] = None) -> None:
    """Raises the table's first sample error. `rank`: the process whose shards number the samples
    (said in the message); `process`: the one process that met it (the error's `process`), for a
    sample read while training, which the other processes never see."""
    errors = table.column("error")
    for i, message in enumerate(errors.to_pylist()):
        if message is None:
            continue
        if table.column("stage")[i].as_py() == READ:  # a line of a file: name the file
            message = read_errors_message(name, [message], 1)
        if rank is not None:
            message += f" (numbered within the shards of the stream read by process {rank})"
        error = error_class(table.column("error_type")[i].as_py())(message)
        error.process = process
        raise error


class StreamLoader:
    """Batches of a stream, collated; what `make_loader` returns for a stream. Not a torch
    DataLoader, so that accelerate does not shard it again (each process already reads its
    share)."""

    def __init__(self, items: StreamItems, batch_size: int, seq_length: int,
                 collate: Callable[[list], dict]):
        self.items, self.batch_size, self.seq_length = items, batch_size, seq_length
        self.collate, self.epoch = collate, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        items = self.items.epoch(self.epoch, self.seq_length)
        while True:
            batch = list(itertools.islice(items, self.batch_size))
            if not batch:
                return
            yield self.collate(batch)

    def __len__(self) -> int:
        # unknown: the training loop's total_steps = min(train.total_steps, epochs x len) is then
        # train.total_steps, which bounds the run
        return sys.maxsize
