"""Tokenised examples in a memory-mapped Arrow table, and the views the loaders draw from.

Nothing per example lives in Python objects: a view is an array of row numbers (and offsets, for
items of several examples), and a batch's rows are read straight from the mapped file when the
DataLoader asks for them.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa

from trainer_lib.ops.cross_entropy import IGNORE_INDEX


class TokenColumns:
    """Builds the token columns of the store's format from examples, one at a time."""

    def __init__(self):
        self.ids, self.mask, self.offsets = [], [], [0]

    def add(self, input_ids, labels) -> list[int]:
        """Appends one example (empty for a row without one); returns its loss mask."""
        mask = [0 if label == IGNORE_INDEX else 1 for label in labels]
        self.ids.extend(input_ids)
        self.mask.extend(mask)
        self.offsets.append(len(self.ids))
        return mask

    def arrays(self) -> dict[str, pa.Array]:
        offsets = pa.array(self.offsets, pa.int32())
        return {"input_ids": pa.ListArray.from_arrays(offsets, pa.array(self.ids, pa.int32())),
                "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(self.mask, pa.uint8()))}


class ExampleStore:
    """Rows of a table with `input_ids` and `loss_mask`; `carried` names scalar columns (e.g.
    `label`, `sample`) that every fetched example carries."""

    def __init__(self, table: pa.Table, carried: tuple[str, ...] = ()):
        self.table, self.carried = table, tuple(carried)
        names = ("input_ids", "loss_mask") + self.carried
        columns = [table.column(name) for name in names]
        if len({tuple(len(c) for c in column.chunks) for column in columns}) > 1:
            table = table.select(list(names)).combine_chunks()  # one chunk layout for all
            columns = [table.column(name) for name in names]
        self._columns = columns
        self._starts = np.cumsum([0] + [len(c) for c in columns[0].chunks])
        self._views: dict[int, list] = {}

    def __len__(self) -> int:
        return self.table.num_rows

    def lengths(self) -> np.ndarray:
        return self.column("length").astype(np.int64)

    def column(self, name: str) -> np.ndarray:
        return column(self.table, name)

    def _chunk(self, c: int) -> list:
        """numpy views (no copy, but for booleans) of one chunk's offsets and values."""
        if c not in self._views:
            ids, mask, *scalars = (column.chunk(c) for column in self._columns)
            self._views[c] = [ids.offsets.to_numpy(), ids.values.to_numpy(),
                              mask.offsets.to_numpy(), mask.values.to_numpy(),
                              [s.to_numpy(zero_copy_only=False) for s in scalars]]
        return self._views[c]

    def fetch(self, rows) -> list[dict]:
        """The examples at `rows`: input_ids and labels as lists, plus the carried columns."""
        rows = np.asarray(rows, dtype=np.int64)
        chunks = np.searchsorted(self._starts, rows, side="right") - 1
        out = []
        for row, c in zip(rows.tolist(), chunks.tolist()):
            i = row - int(self._starts[c])
            offsets, values, mask_offsets, mask_values, scalars = self._chunk(c)
            ids = values[offsets[i]:offsets[i + 1]]
            mask = mask_values[mask_offsets[i]:mask_offsets[i + 1]]
            example = {"input_ids": ids.tolist(),
                       "labels": np.where(mask != 0, ids, IGNORE_INDEX).tolist()}
            for name, column in zip(self.carried, scalars):
                example[name] = column[i].item()
            out.append(example)
        return out


def column(table: pa.Table, name: str) -> np.ndarray:
    """A column of `table` as a numpy array (without a copy where Arrow allows)."""
    values = table.column(name)
    if values.num_chunks == 0:
        return np.zeros(0, dtype=values.type.to_pandas_dtype())
    if values.num_chunks == 1:
        return values.chunk(0).to_numpy(zero_copy_only=False)
    return values.to_numpy()


class _View:
    """A read-only list over `ids` (int64 numbers of whatever the subclass fetches)."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __bool__(self) -> bool:
        return len(self.ids) > 0

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._with(self.ids[key])
        if isinstance(key, (list, np.ndarray)):
            return self._with(self.ids[np.asarray(key, dtype=np.int64)])
        return self._fetch([self.ids[key]])[0]

    def __getitems__(self, keys) -> list:
        return self._fetch(self.ids[np.asarray(keys, dtype=np.int64)])

    def __iter__(self):
        step = 256
        for start in range(0, len(self.ids), step):
            yield from self._fetch(self.ids[start:start + step])

    def __add__(self, other):
        if isinstance(other, (list, tuple)) and not other:
            return self
        if type(other) is not type(self) or not self._same_source(other):
            return NotImplemented
        return self._with(np.concatenate([self.ids, other.ids]))

    def __radd__(self, other):
        if isinstance(other, (list, tuple)) and not other:
            return self
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} items)"


class Examples(_View):
    """Single examples: the rows `ids` of `store`."""

    def __init__(self, store: ExampleStore, rows: np.ndarray):
        super().__init__(rows)
        self.store = store

    @property
    def rows(self) -> np.ndarray:
        return self.ids

    def _with(self, ids):
        return Examples(self.store, ids)

    def _same_source(self, other) -> bool:
        return other.store is self.store

    def _fetch(self, rows) -> list[dict]:
        return self.store.fetch(rows)

    def lengths(self) -> np.ndarray:
        return self.store.lengths()[self.ids] if len(self.ids) else np.zeros(0, np.int64)


class GroupLayout:
    """Groups of store rows: group g holds rows `flat[offsets[g]:offsets[g + 1]]`. Optionally each
    position has a partner example in `partners` (a store aligned with `flat`, e.g. KTO's
    mismatched pairs) and values set later (`set_values`, e.g. reference log-probs)."""

    def __init__(self, store: ExampleStore, flat: np.ndarray, offsets: np.ndarray,
                 partners: Optional[ExampleStore] = None):
        self.store, self.flat, self.offsets = store, np.asarray(flat), np.asarray(offsets)
        self.partners = partners
        self.values: dict[str, np.ndarray] = {}
        self.valued: Optional[np.ndarray] = None  # positions whose values are set

    def positions(self, group: int) -> range:
        return range(int(self.offsets[group]), int(self.offsets[group + 1]))

    def fetch(self, groups) -> list[list[dict]]:
        spans = [self.positions(g) for g in np.asarray(groups).tolist()]
        positions = [p for span in spans for p in span]
        examples = self.store.fetch(self.flat[positions]) if positions else []
        partners = self.partners.fetch(positions) if self.partners is not None else None
        for k, (example, p) in enumerate(zip(examples, positions)):
            if partners is not None:
                example["kl"] = partners[k]  # this position's mismatched pair, as tokenised
            if self.valued is not None and self.valued[p]:
                for name, values in self.values.items():
                    example[name] = None if np.isnan(values[p]) else float(values[p])
        out, k = [], 0
        for span in spans:
            out.append(examples[k:k + len(span)])
            k += len(span)
        return out

    def set_values(self, group: int, **columns) -> None:
        span = self.positions(group)
        if self.valued is None:
            self.valued = np.zeros(len(self.flat), dtype=bool)
        self.valued[span.start:span.stop] = True
        for name, values in columns.items():
            if name not in self.values:
                self.values[name] = np.full(len(self.flat), np.nan)
            array = self.values[name]
            array[span.start:span.stop] = [np.nan if v is None else v for v in values]


class Groups(_View):
    """Items that are lists of examples: the groups `ids` of a `GroupLayout`."""

    def __init__(self, layout: GroupLayout, ids: Optional[np.ndarray] = None):
        super().__init__(np.arange(len(layout.offsets) - 1) if ids is None else ids)
        self.layout = layout

    def _with(self, ids):
        return Groups(self.layout, ids)

    def _same_source(self, other) -> bool:
        return other.layout is self.layout

    def _fetch(self, ids) -> list[list[dict]]:
        return self.layout.fetch(ids)

    def sizes(self) -> np.ndarray:
        return np.diff(self.layout.offsets)[self.ids]

    def set_reference(self, item: int, ref_logps: list, kl_ref_logps: list) -> None:
        """Stores reference log-probs for the examples of item `item` (KTO's precompute), which
        every later fetch of them carries as `ref_logp` and `kl_ref_logp`."""
        self.layout.set_values(int(self.ids[item]), ref_logp=ref_logps, kl_ref_logp=kl_ref_logps)


def materialize(items: Any) -> list:
    """A view's items as a list (fetched at once); a list as it is."""
    if isinstance(items, _View):
        return items._fetch(items.ids)
    return items if isinstance(items, list) else list(items)
