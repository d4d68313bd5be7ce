"""What a method supplies to the data pipeline (`DataRecipe`), and how a batch of samples becomes
rows: one row per example, plus one per sample that failed or was dropped, so every sample is
accounted for. Errors never cross the worker processes as exceptions: each is written into the
row's `error` column (checks.py raises the first).
"""

from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa

from trainer_lib.data.conversations import clean_dataset_row
from trainer_lib.data.sources import decode_json_row
from trainer_lib.data.store import TokenColumns
from trainer_lib.data.tokenize import fit_to_length
from trainer_lib.errors import DataError
from trainer_lib.ops.cross_entropy import IGNORE_INDEX

# the stage at which a sample failed: errors of an earlier stage are reported first
READ, FORM, NORMALIZE, TOKENIZE = 0, 1, 2, 3


class DataRecipe:
    """What a method supplies to the pipeline. Subclasses must be picklable (they travel to the
    tokenising workers): keep the tokenizer and plain settings on them, not a trainer."""

    name = "data"
    error = DataError  # what a sample of another form than sample 0 raises
    # examples whose labels carry no loss are left out (and counted as dropped)
    drop_without_loss = True
    # per-example columns stored beside the tokens: name -> datasets feature
    scalar_features: dict = {}
    # columns that every fetched example carries (scalars: `sample` is the user's index)
    carried: tuple = ("sample",)

    def __init__(self, tokenizer, seq_length: int, overlong: str):
        self.tokenizer, self.seq_length, self.overlong = tokenizer, seq_length, overlong

    def settings(self) -> dict:
        """Everything besides the data and the tokenizer that changes the prepared examples."""
        return {"seq_length": self.seq_length, "overlong": self.overlong}

    def form(self, sample: Any, index: int) -> str:
        """The sample's format; raises DataError when it has none."""
        raise NotImplementedError

    def mixed_forms(self, index: int, form: str, first: str) -> str:
        return (f"sample {index} is a {form} sample but sample 0 is a {first} sample; one dataset "
                "must hold one kind of sample")

    def normalize(self, sample: Any, index: int, form: str) -> list[dict]:
        """The records of one sample; raises DataError naming the sample and the field."""
        raise NotImplementedError

    def tokenize(self, records: list[dict], indices: list[int]) -> list:
        """`{"input_ids", "labels"}` per record (or the DataError it raised), in order."""
        raise NotImplementedError

    def fit_kind(self, record: dict) -> str:
        """How the over-long policy treats the record: "text", "pair" or "chat"."""
        return "pair"

    def report_kind(self, record: dict) -> str:
        return record.get("kind", "sample")

    def scalars(self, record: dict) -> dict:
        """Values of `scalar_features` for the record's examples."""
        return {}

    def note(self, record: dict) -> str:
        """A remark on the record that the data report counts (a name, e.g. a conversation whose
        last turn trains nothing: see `DataReport.NOTES`), or ""."""
        return ""

    def empty_message(self, what: str) -> str:
        return f"{what} is empty: give at least one training sample"


def tokenize_batch(batch: pa.Table, indices: list[int], recipe: DataRecipe, rows: str) -> pa.Table:
    """Raw samples -> rows of tokenised examples (one row per example, plus one row per sample
    that failed or was dropped entirely, so that every sample is accounted for)."""
    return tokenize_samples([decode_row(row, rows) for row in batch.to_pylist()], indices, recipe)


def decode_row(row: dict, rows: str) -> tuple[Any, Optional[str]]:
    """A raw row -> (sample, None), or (None, what is wrong with it). `rows`: "json" (the JSON
    text of a sample and its line number) or "records" (a dataset's row as it is)."""
    if rows == "json":
        return decode_json_row(row["json"], row["line"])
    return clean_dataset_row(row), None


def tokenize_samples(samples: list[tuple[Any, Optional[str]]], indices: list[int],
                    recipe: DataRecipe) -> pa.Table:
    out = _Rows(recipe)
    pending = []
    for index, (sample, problem) in zip(indices, samples):
        if problem is not None:
            out.error(index, READ, problem)
            continue
        try:
            form = recipe.form(sample, index)
        except DataError as e:
            out.error(index, FORM, e)
            continue
        try:
            records = recipe.normalize(sample, index, form)
        except DataError as e:
            out.error(index, NORMALIZE, e, form)
            continue
        pending.extend((index, sub, record, form) for sub, record in enumerate(records))
    examples = recipe.tokenize([p[2] for p in pending], [p[0] for p in pending]) if pending else []
    for (index, sub, record, form), example in zip(pending, examples):
        if isinstance(example, DataError):
            out.error(index, TOKENIZE, example, form)
        else:
            out.add(index, sub, form, record, example)
    return out.table()


def table_features(recipe: DataRecipe):
    import datasets

    v = datasets.Value
    return datasets.Features({
        "input_ids": datasets.List(v("int32")), "loss_mask": datasets.List(v("uint8")),
        "length": v("int32"), "num_loss": v("int32"),
        "sample": v("int64"), "record": v("int64"),  # the user's index; sample * 4 + record
        "form": v("string"), "kind": v("string"),
        "outcome": v("string"),  # what the over-long policy did to the record
        "dropped": v("string"),  # why this row holds no example ("" when it holds one)
        "note": v("string"),  # a remark the data report counts (DataRecipe.note)
        "error": v("string"), "error_type": v("string"), "stage": v("int8"),
        **recipe.scalar_features,
    })


class _Rows:
    """Column builders for `tokenize_batch`."""

    def __init__(self, recipe: DataRecipe):
        self.recipe = recipe
        self.tokens = TokenColumns()
        self.cols = {k: [] for k in ("length", "num_loss", "sample", "record", "form", "kind",
                                     "outcome", "dropped", "note", "error", "error_type",
                                     "stage", *recipe.scalar_features)}

    def _row(self, input_ids=(), labels=(), **values) -> None:
        """One row: an example's tokens, or none (a sample that failed or was dropped)."""
        self.tokens.add(input_ids, labels)
        for name, column in self.cols.items():
            column.append(values.get(name))

    def error(self, index: int, stage: int, error: Any, form: str = "") -> None:
        self._row(length=0, num_loss=0, sample=index, record=index * 4, form=form,
                  kind="", outcome="", dropped="", error=str(error), stage=stage,
                  error_type=type(error).__name__ if isinstance(error, Exception) else None)

    def add(self, index: int, sub: int, form: str, record: dict, example: dict) -> None:
        recipe = self.recipe
        kind, policy = recipe.fit_kind(record), recipe.overlong
        n = len(example["input_ids"])
        common = dict(sample=index, record=index * 4 + sub, form=form,
                      kind=recipe.report_kind(record), note=recipe.note(record),
                      **recipe.scalars(record))
        if policy == "split" and kind != "text" and n > recipe.seq_length:
            self._row(length=0, num_loss=0, outcome="", dropped="", stage=TOKENIZE,
                      error=f"sample {index}: {n} tokens, more than train.seq_length="
                            f"{recipe.seq_length}, and method.overlong=\"split\" cuts only text "
                            "samples; set method.overlong to \"truncate\" or \"drop\" for "
                            "prompt/completion pairs and conversations", **common)
            return
        pieces, what = fit_to_length(example, recipe.seq_length, kind, policy)
        if not pieces:
            self._row(length=0, num_loss=0, outcome=what, dropped=what.split(":", 1)[1],
                      **common)
        for piece in pieces:
            labels = piece["labels"]
            # the first token is never a target
            num_loss = sum(label != IGNORE_INDEX for label in labels[1:])
            if num_loss == 0 and recipe.drop_without_loss:
                self._row(length=0, num_loss=0, outcome=what, dropped="no_loss_tokens",
                          **common)
                continue
            self._row(piece["input_ids"], labels, length=len(labels), num_loss=num_loss,
                      outcome=what, dropped="", **common)

    def table(self) -> pa.Table:
        columns = self.tokens.arrays()
        features = table_features(self.recipe)
        for name, values in self.cols.items():
            columns[name] = pa.array(values, features[name].pa_type)
        return pa.table(columns)
