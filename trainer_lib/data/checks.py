"""Checks, hold-out and the data report, over a prepared table (the rows of `recipe.py`).

`check_errors` raises the first problem the workers wrote down; the hold-out picks records for
evaluation; `make_report` counts what happened to the samples. All of it runs on whole columns
(numpy and Arrow compute), never on one Python object per sample.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer_lib.data.recipe import FORM, NORMALIZE, READ, TOKENIZE, DataRecipe
from trainer_lib.data.report import DataReport
from trainer_lib.data.sources import MAX_REPORTED_LINES, Source, read_errors_message
from trainer_lib.data.store import column
from trainer_lib.errors import ChatError, DataError, KTODataError


def check_errors(table: pa.Table, recipe: DataRecipe, source: Source) -> None:
    """Raises the first problem: every unreadable line of a file at once; then a sample whose
    form cannot be told, a sample of another form than sample 0, a sample that cannot be
    normalised, one that cannot be tokenised, in that order; within a stage the lowest index."""
    errors = table.column("error")
    failed = np.nonzero(pc.is_valid(errors).to_numpy(zero_copy_only=False))[0]
    stages = column(table, "stage")[failed] if len(failed) else failed
    # "sample 3" alone would send the user to the training data: name the evaluation data
    where = "" if source.what == "samples" else f"{source.what}: "
    read = failed[stages == READ]
    if len(read):
        messages = [errors[int(i)].as_py() for i in read[:MAX_REPORTED_LINES]]
        raise DataError(where + read_errors_message(source.path or source.name, messages,
                                                    len(read)))
    _raise_first(table, failed[stages == FORM], where)
    forms = table.column("form")
    first = forms[0].as_py()
    other = np.nonzero(pc.not_equal(forms, first).to_numpy(zero_copy_only=False))[0]
    if len(other):
        i = int(other[0])
        raise recipe.error(where + recipe.mixed_forms(int(table.column("sample")[i].as_py()),
                                                      forms[i].as_py(), first))
    for stage in (NORMALIZE, TOKENIZE):
        _raise_first(table, failed[stages == stage], where)


def _raise_first(table: pa.Table, rows: np.ndarray, where: str) -> None:
    if len(rows):
        i = int(rows[0])
        error = table.column("error")[i].as_py()
        raise error_class(table.column("error_type")[i].as_py())(where + error)


def error_class(name: str) -> type:
    """The class of the error a sample raised (ChatError and KTODataError are DataErrors)."""
    return {"ChatError": ChatError, "KTODataError": KTODataError}.get(name, DataError)


def kept_rows(table: pa.Table) -> np.ndarray:
    return np.nonzero(column(table, "length") > 0)[0]


def _first_rows(table: pa.Table) -> np.ndarray:
    """True on the first row of every record (a record's rows are consecutive)."""
    record = column(table, "record")
    first = np.ones(len(record), dtype=bool)
    first[1:] = record[1:] != record[:-1]
    return first


def held_out(table: pa.Table, fraction: float, seed: int) -> np.ndarray:
    """Rows of the records held out for evaluation: a seeded random `fraction` of the records."""
    first = _first_rows(table)
    n = int(first.sum())
    if fraction <= 0:
        return np.zeros(len(first), dtype=bool)
    n_eval = max(1, int(round(fraction * n)))
    if n_eval >= n:
        raise DataError(f"train.eval_split={fraction} leaves no training samples out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)  # the records trainer_lib has always held out for a seed
    held = np.zeros(n, dtype=bool)
    held[order[:n_eval]] = True
    return held[np.cumsum(first) - 1]


def make_report(table: pa.Table, rows: np.ndarray) -> DataReport:
    """The data report of the rows selected by the boolean mask `rows` (a split)."""
    first = _first_rows(table) & rows
    report = DataReport()
    report.num_samples = int(first.sum())
    first_mask = pa.array(first)
    for item in pc.value_counts(pc.filter(table.column("kind"), first_mask)).to_pylist():
        report.kinds[item["values"]] = item["counts"]
    for item in pc.value_counts(pc.filter(table.column("note"), first_mask)).to_pylist():
        if item["values"]:
            report.notes[item["values"]] = item["counts"]
    outcomes = pc.filter(table.column("outcome"), first_mask)
    report.truncated = int(pc.sum(pc.equal(outcomes, "truncated")).as_py() or 0)
    report.split = int(pc.sum(pc.equal(outcomes, "split")).as_py() or 0)
    dropped = pc.filter(table.column("dropped"), pa.array(rows))
    for item in pc.value_counts(dropped).to_pylist():
        if item["values"]:
            report.dropped[item["values"]] = item["counts"]
    length = column(table, "length")
    kept = rows & (length > 0)
    report.num_examples = int(kept.sum())
    report.num_tokens = int(length[kept].sum())
    report.num_loss_tokens = int(column(table, "num_loss")[kept].sum())
    return report
