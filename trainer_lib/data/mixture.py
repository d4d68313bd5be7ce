"""Weighted mixtures of datasets, drawn afresh every epoch.

Every source goes through the shared pipeline on its own (its own prepared table, cached and
shared like any other), and every epoch draws each source's share of `examples_per_epoch` by
weight, exactly: a small source is repeated (whole copies, then a random part), a large one
subsampled. A draw is a function of (seed, epoch, source) alone, so every process draws the same
examples and a resumed run sees the epoch it left. A method arranges each epoch's examples into
loader items (packed rows, micro-batches) one epoch after the other; `EpochRanges` tells the
loader where each epoch's items are.
"""

from __future__ import annotations

import math
import numbers
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from trainer_lib.data.padding import length_grouped_order
from trainer_lib.data.store import Examples
from trainer_lib.errors import DataError


class Mixture:
    """`Mixture({"name": (source, weight), ...}, seed=None, examples_per_epoch=None)`, accepted
    wherever `samples` is. A source is anything `samples` accepts (a list, a .json/.jsonl/
    .parquet path, a `datasets.Dataset`, a hub name); sources may hold different sample forms.

    Each epoch holds `examples_per_epoch` examples (default: as many as all the sources hold
    together), `weight / sum of weights` of them from each source. `seed` (default:
    `train.seed`) fixes the draws; every epoch draws anew.
    """

    def __init__(self, sources: dict, seed: Optional[int] = None,
                 examples_per_epoch: Optional[int] = None):
        if isinstance(sources, Mixture) or not isinstance(sources, dict) or not sources:
            raise DataError("Mixture takes a dict {name: (source, weight), ...} with at least one "
                            f"source, got {_preview(sources)}")
        self.sources: dict[str, tuple[Any, float]] = {}
        for name, entry in sources.items():
            if not isinstance(name, str) or not name.strip():
                raise DataError(f"Mixture: a source name must be a non-empty string, got {name!r}")
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise DataError(f"Mixture: source '{name}' must be a (source, weight) pair, e.g. "
                                f"{{'{name}': ('data.jsonl', 1.0)}}; got {_preview(entry)}")
            source, weight = entry
            if isinstance(source, Mixture):
                raise DataError(f"Mixture: source '{name}' is itself a Mixture; list its sources "
                                "in one Mixture, with the weights multiplied out")
            self.sources[name] = (source, _weight(weight, f"Mixture: source '{name}'"))
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise DataError(f"Mixture: seed must be an integer or None, got {seed!r}")
        if examples_per_epoch is not None and (isinstance(examples_per_epoch, bool) or not
                                               isinstance(examples_per_epoch, numbers.Integral)
                                               or examples_per_epoch < 1):
            raise DataError("Mixture: examples_per_epoch must be a whole number >= 1, or None for "
                            f"as many as the sources hold together; got {examples_per_epoch!r}")
        self.seed = None if seed is None else int(seed)
        self.examples_per_epoch = None if examples_per_epoch is None else int(examples_per_epoch)

    @classmethod
    def from_config(cls, entries: list, seed: Optional[int] = None,
                    examples_per_epoch: Optional[int] = None) -> "Mixture":
        """`data.mixture: [{name, path, weight}, ...]`, as the config checked it."""
        return cls({e["name"]: (e["path"], e.get("weight", 1.0)) for e in entries}, seed=seed,
                   examples_per_epoch=examples_per_epoch)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n!r}: weight {w:g}" for n, (_, w) in self.sources.items())
        return (f"Mixture({{{parts}}}, seed={self.seed}, "
                f"examples_per_epoch={self.examples_per_epoch})")


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _weight(value: Any, where: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise DataError(f"{where}: the weight must be a number > 0, got {value!r} (leave a "
                        "source out to not use it)")
    return float(value)


# ---------------------------------------------------------------------- drawing


def source_counts(weights: list[float], total: int) -> list[int]:
    """Examples per source: `total` split by weight, the remainders rounded so that the counts
    add up to `total` (largest remainder first; ties to the earlier source)."""
    shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * total
    counts = np.floor(shares).astype(np.int64)
    left = total - int(counts.sum())
    order = np.lexsort((np.arange(len(shares)), -(shares - counts)))
    counts[order[:left]] += 1
    return counts.tolist()


def draw_rows(pool: np.ndarray, count: int, seed: int, epoch: int, name: str) -> np.ndarray:
    """`count` of the rows `pool`: every row `count // len(pool)` times, then a random
    `count % len(pool)` of them, different for every (seed, epoch, name)."""
    whole, part = divmod(count, len(pool))
    rng = np.random.default_rng([seed, epoch, zlib.crc32(name.encode("utf-8"))])
    picked = pool[np.sort(rng.permutation(len(pool))[:part])]
    return np.concatenate([np.tile(pool, whole), picked]).astype(np.int64)


@dataclass
class MixtureDraw:
    """The examples of a prepared mixture: `pools[s]`, the store rows of source s that can be
    trained on, and `counts[s]` of them drawn every epoch."""

    names: list[str]
    pools: list[np.ndarray]
    counts: list[int]
    seed: int

    @property
    def examples_per_epoch(self) -> int:
        return int(sum(self.counts))

    def rows(self, epoch: int) -> np.ndarray:
        """The store rows of one epoch (each source's draw, one after the other)."""
        return np.concatenate([draw_rows(pool, count, self.seed, epoch, name)
                               for name, pool, count in zip(self.names, self.pools, self.counts)])


# ---------------------------------------------------------------------- epochs of items


def plan_epochs(train, make_epoch: Callable[[int], Any], steps: Callable[[Any], int]) -> list:
    """Each epoch's items, `make_epoch(e)`, for the epochs a run reaches: up to `train.epochs`,
    or fewer where `train.total_steps` is reached first (`steps(items)`: an epoch's steps)."""
    out, total = [], 0
    for epoch in range(train.epochs):
        out.append(make_epoch(epoch))
        total += steps(out[-1])
        if total >= train.total_steps:
            break
    return out


def epoch_steps(accelerator, num_items: int, items_per_batch: int, accumulation: int) -> int:
    """Optimiser steps of an epoch of `num_items` loader items, as the training loop takes them:
    whole batches dealt out to the processes in turn, `accumulation` of them a step, a last
    short step at the end of the epoch."""
    batches = -(-num_items // items_per_batch)
    processes = accelerator.num_processes if accelerator is not None else 1
    return -(-(-(-batches // processes)) // accumulation)


def mixture_examples(data, train, accelerator) -> tuple[Examples, "EpochRanges"]:
    """A mixture's epochs as single examples (batches of `train.batch_size` of them), the planned
    epochs one after the other; computed once, memory-mapped by every process."""
    mixture = data.mixture

    def plan() -> dict:
        epochs = plan_epochs(train, mixture.rows, lambda rows: epoch_steps(
            accelerator, len(rows), train.batch_size, train.gradient_accumulation_steps))
        return {"rows": np.concatenate(epochs),
                "starts": np.cumsum([0] + [len(rows) for rows in epochs])}

    processes = accelerator.num_processes if accelerator is not None else 1
    key = ["examples", train.epochs, train.total_steps, train.batch_size,
           train.gradient_accumulation_steps, processes]
    arrays = data.derived_arrays("mixture_epochs", key, plan)
    return Examples(data.store, arrays["rows"]), EpochRanges(arrays["starts"], train.seed)


class EpochRanges:
    """Where each epoch's items are in the loader's items: epoch e is items
    `starts[e]:starts[e + 1]`, in an order drawn from (seed, e)."""

    def __init__(self, starts, seed: int):
        self.starts, self.seed = [int(s) for s in starts], seed

    @property
    def epochs(self) -> int:
        return len(self.starts) - 1

    def sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.starts[:-1], self.starts[1:])]

    def first(self, items):
        """The items of the first epoch (what identifies the run's data)."""
        return items[self.starts[0]:self.starts[1]]

    def sampler(self, lengths=None, batch_size: int = 1) -> "EpochSampler":
        return EpochSampler(self, lengths, batch_size)


class EpochSampler(torch.utils.data.Sampler):
    """The indices of one epoch's items, shuffled by (seed, epoch), or grouped by length (as
    `LengthGroupedSampler`) when `lengths` are given. Its length is the current epoch's."""

    def __init__(self, ranges: EpochRanges, lengths=None, batch_size: int = 1):
        self.ranges, self.lengths, self.batch_size = ranges, lengths, batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _bounds(self) -> tuple[int, int]:
        if self.epoch >= self.ranges.epochs:
            raise IndexError(f"epoch {self.epoch} was not planned ({self.ranges.epochs} were)")
        return self.ranges.starts[self.epoch], self.ranges.starts[self.epoch + 1]

    def __iter__(self):
        start, stop = self._bounds()
        seed = self.ranges.seed + self.epoch
        if self.lengths is not None:
            order = np.asarray(length_grouped_order(self.lengths[start:stop], self.batch_size,
                                                    seed), dtype=np.int64)
        else:
            order = np.random.default_rng([self.ranges.seed, self.epoch]).permutation(stop - start)
        return iter((order + start).tolist())

    def __len__(self) -> int:
        start, stop = self._bounds()
        return stop - start


def loader_epochs(loader, epochs: int) -> list[int]:
    """Batches of the loader in each epoch of the run: `len(loader)` every epoch, or, for the
    epochs of a mixture, each planned epoch's own."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, EpochSampler):
        return [-(-n // loader.batch_size) for n in sampler.ranges.sizes()]
    return [len(loader)] * epochs
