"""One data pipeline for every method: samples -> records -> tokenised examples, on disk.

    open_source -> datasets.Dataset -> Dataset.map(prepare_batch, batched, num_proc)
        -> prepared table (cached, shared by processes) -> checks -> hold-out -> data report
        -> ExampleStore and views the loaders draw from

A method supplies a `DataRecipe`: how to tell a sample's form, normalise it into records and
tokenise records (reusing the per-sample functions of `tokenize.py` and `chat.py`, so the result
is token for token theirs). Everything else is shared: reading, the over-long policy, the
accounting of truncations and drops, errors that name the sample, caching and sharing.

Errors never cross the worker processes as exceptions: `prepare_batch` writes each problem into
the `error` column of the sample's row, and `check_errors` raises the first one (every unreadable
line of a file at once) once the map is done, before anything is trained or loaded.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer_lib.data.cache import (
    PIPELINE_VERSION,
    CacheEntry,
    default_cache_dir,
    digest,
    main_first,
    shared_token,
    temporary_root,
)
from trainer_lib.data.samples import DataError
from trainer_lib.data.sources import Source, decode_json_row, open_source, read_errors_message
from trainer_lib.data.store import Examples, ExampleStore
from trainer_lib.data.constants import IGNORE_INDEX
from trainer_lib.data.tokenize import DataReport, fit_to_length

# the stage at which a sample failed: errors of an earlier stage are reported first
READ, FORM, NORMALIZE, TOKENIZE = 0, 1, 2, 3
SMALL_DATASET = 1000  # samples per worker below which starting a worker costs more than it saves


class DataRecipe:
    """What a method supplies to the pipeline. Subclasses must be picklable (they travel to the
    tokenising workers): keep the tokenizer and plain settings on them, not a trainer."""

    name = "data"
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

    def empty_message(self, what: str) -> str:
        return f"{what} is empty: give at least one training sample"


# ---------------------------------------------------------------------- one batch of samples


def prepare_batch(batch: pa.Table, indices: list[int], recipe: DataRecipe, rows: str) -> pa.Table:
    """Raw samples -> rows of tokenised examples (one row per example, plus one row per sample
    that failed or was dropped entirely, so that every sample is accounted for)."""
    return prepare_samples(decode_rows(batch, rows), indices, recipe)


def decode_rows(batch: pa.Table, rows: str) -> list[tuple[Any, Optional[str]]]:
    """(sample, None) per row, or (None, what is wrong with it)."""
    if rows == "json":
        texts, lines = batch.column("json").to_pylist(), batch.column("line").to_pylist()
        return [decode_json_row(t, n) for t, n in zip(texts, lines)]
    from trainer_lib.data.conversations import clean_dataset_row

    return [(clean_dataset_row(row), None) for row in batch.to_pylist()]


def prepare_samples(samples: list[tuple[Any, Optional[str]]], indices: list[int],
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
        "error": v("string"), "error_type": v("string"), "stage": v("int8"),
        **recipe.scalar_features,
    })


class _Rows:
    """Column builders for `prepare_batch`."""

    def __init__(self, recipe: DataRecipe):
        self.recipe = recipe
        self.ids, self.mask, self.offsets = [], [], [0]
        self.cols = {k: [] for k in ("length", "num_loss", "sample", "record", "form", "kind",
                                     "outcome", "dropped", "error", "error_type", "stage",
                                     *recipe.scalar_features)}

    def _row(self, ids, mask, **values) -> None:
        self.ids.extend(ids)
        self.mask.extend(mask)
        self.offsets.append(len(self.ids))
        for name, column in self.cols.items():
            column.append(values.get(name))

    def error(self, index: int, stage: int, error: Any, form: str = "") -> None:
        self._row((), (), length=0, num_loss=0, sample=index, record=index * 4, form=form,
                  kind="", outcome="", dropped="", error=str(error), stage=stage,
                  error_type=type(error).__name__ if isinstance(error, Exception) else None)

    def add(self, index: int, sub: int, form: str, record: dict, example: dict) -> None:
        recipe = self.recipe
        kind, policy = recipe.fit_kind(record), recipe.overlong
        n = len(example["input_ids"])
        common = dict(sample=index, record=index * 4 + sub, form=form,
                      kind=recipe.report_kind(record), **recipe.scalars(record))
        if policy == "split" and kind != "text" and n > recipe.seq_length:
            self._row((), (), length=0, num_loss=0, outcome="", dropped="", stage=TOKENIZE,
                      error=f"sample {index}: {n} tokens, more than train.seq_length="
                            f"{recipe.seq_length}, and method.overlong=\"split\" cuts only text "
                            "samples; set method.overlong to \"truncate\" or \"drop\" for "
                            "prompt/completion pairs and conversations", **common)
            return
        pieces, what = fit_to_length(example, recipe.seq_length, kind, policy)
        if not pieces:
            self._row((), (), length=0, num_loss=0, outcome=what, dropped=what.split(":", 1)[1],
                      **common)
        for piece in pieces:
            labels = piece["labels"]
            mask = [0 if label == IGNORE_INDEX else 1 for label in labels]
            num_loss = sum(mask) - (mask[0] if mask else 0)  # the first token is never a target
            if num_loss == 0 and recipe.drop_without_loss:
                self._row((), (), length=0, num_loss=0, outcome=what, dropped="no_loss_tokens",
                          **common)
                continue
            self._row(piece["input_ids"], mask, length=len(labels), num_loss=num_loss,
                      outcome=what, dropped="", **common)

    def table(self) -> pa.Table:
        offsets = pa.array(self.offsets, pa.int32())
        columns = {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(self.ids, pa.int32())),
            "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(self.mask, pa.uint8())),
        }
        features = table_features(self.recipe)
        for name, values in self.cols.items():
            columns[name] = pa.array(values, features[name].pa_type)
        return pa.table(columns)


# ---------------------------------------------------------------------- the whole dataset


@dataclass
class PreparedData:
    """The run's examples: train and eval views of one store, the report, and where derived
    results (packed rows, micro-batches) are kept beside the prepared table."""

    store: Optional[ExampleStore]
    train: Optional[Examples]
    eval: Examples
    report: DataReport
    folder: Optional[Path]  # the train entry: derived results are cached inside it
    context: "_Context"
    stream: Optional[Source] = None  # the training samples, when they are a stream
    key: str = ""

    def derived(self, name: str, key_parts: Any, build: Callable[[Path], None]) -> Path:
        """A folder that `build(folder)` fills once per key (on each node's main process first,
        then shared); returns it."""
        entry = CacheEntry(self.folder / "derived", name, digest(self.key, key_parts))

        def make():
            if not entry.ready():
                with entry.building({"name": name}) as tmp, \
                        _datasets_progress(self.context.show_progress):
                    build(tmp)
            return entry.path

        return main_first(self.context.accelerator, make)

    def derived_arrays(self, name: str, key_parts: Any,
                       compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """numpy arrays computed once and memory-mapped by every process."""
        def build(folder: Path) -> None:
            for array_name, array in compute().items():
                np.save(folder / f"{array_name}.npy", np.asarray(array))

        folder = self.derived(name, key_parts, build)
        return {p.stem: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}

    def release(self) -> None:
        """Once every process holds what it needs: a run with caching off removes its files."""
        self.context.release()


@dataclass
class _Context:
    accelerator: Any
    root: Path
    num_proc: Optional[int]
    show_progress: bool
    temporary: Optional[Path] = None
    hf_cache: Optional[str] = None

    def release(self) -> None:
        if self.temporary is None:
            return
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            acc.wait_for_everyone()
        if acc is None or acc.is_local_main_process:
            import shutil

            shutil.rmtree(self.temporary, ignore_errors=True)
        self.temporary = None


def build_data(accelerator, config, recipe: DataRecipe, samples: Any,
               eval_samples: Any = None) -> PreparedData:
    """Samples and evaluation samples -> PreparedData, before any model is loaded."""
    d, t = config.data, config.train
    main = accelerator is None or accelerator.is_main_process
    root = Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir()
    context = _Context(accelerator, root, d.num_proc, main and t.progress_bar,
                       hf_cache=str(root / "hf"))
    if not d.cache:
        context.root = context.temporary = temporary_root(root, shared_token(accelerator))
        context.hf_cache = str(context.temporary / "hf")
    sources = open_source(samples, "samples", d.streaming, context.hf_cache,
                          dict_eval=eval_samples is None and t.eval_split == 0)
    if sources.note and main:
        print(sources.note, flush=True)
    eval_source = sources.eval
    if eval_samples is not None:
        eval_source = open_source(eval_samples, "eval_samples", False, context.hf_cache,
                                  dict_eval=False).train
        if eval_source.stream is not None:
            raise DataError("eval_samples is a stream; evaluation samples are prepared whole: "
                            "pass a list, a datasets.Dataset or a file")

    eval_table, eval_entry = (_prepare(context, recipe, eval_source) if eval_source is not None
                              else (None, None))
    if sources.train.stream is not None:
        if t.eval_split > 0:
            raise DataError("train.eval_split holds out a fraction of the samples, which a stream "
                            "does not have; pass eval_samples instead, or set train.eval_split=0")
        store = ExampleStore(eval_table, recipe.carried) if eval_table is not None else None
        rows = _kept(eval_table) if eval_table is not None else np.zeros(0, np.int64)
        return PreparedData(store, None, Examples(store, rows), DataReport(), None, context,
                            stream=sources.train)

    train_table, entry = _prepare(context, recipe, sources.train)
    tables = [train_table] + ([eval_table] if eval_table is not None else [])
    store = ExampleStore(pa.concat_tables(tables) if len(tables) > 1 else train_table,
                         recipe.carried)
    if eval_table is not None:
        in_train = np.ones(train_table.num_rows, dtype=bool)
        eval_rows = _kept(eval_table) + train_table.num_rows
    else:
        in_train = ~_held_out(train_table, t.eval_split, t.seed)
        eval_rows = np.nonzero(~in_train & (_column(train_table, "length") > 0))[0]
    train_rows = np.nonzero(in_train & (_column(train_table, "length") > 0))[0]
    report = make_report(train_table, in_train)
    key = digest(entry.key, eval_entry.key if eval_entry else None, t.eval_split, t.seed)
    return PreparedData(store, Examples(store, train_rows), Examples(store, eval_rows), report,
                        entry.path, context, key=key)


def _prepare(context: _Context, recipe: DataRecipe, source: Source) -> tuple[pa.Table, CacheEntry]:
    """The prepared table of one source: from the cache, or built (main process first)."""
    key = digest(PIPELINE_VERSION, recipe.name, recipe.settings(), _tokenizer_key(recipe),
                 source.key)
    entry = CacheEntry(context.root, recipe.name, key)
    main_first(context.accelerator, lambda: _build(context, recipe, source, entry))
    files = [entry.path / name for name in entry.meta()["files"]]
    tables = [pa.ipc.open_stream(pa.memory_map(str(p))).read_all() for p in files]
    return (pa.concat_tables(tables) if len(tables) > 1 else tables[0]), entry


def _tokenizer_key(recipe: DataRecipe) -> str:
    from trainer_lib.data.cache import tokenizer_fingerprint

    cached = getattr(recipe, "_tokenizer_key", None)
    if cached is None:
        cached = recipe._tokenizer_key = tokenizer_fingerprint(recipe.tokenizer)
    return cached


def _build(context: _Context, recipe: DataRecipe, source: Source, entry: CacheEntry) -> None:
    if entry.ready():
        return
    meta = {"source": source.name, "method": recipe.name, "settings": recipe.settings()}
    with entry.building(meta) as folder, _datasets_progress(context.show_progress):
        raw = source.load(folder, context.show_progress)
        if len(raw) == 0:
            raise DataError(recipe.empty_message(source.name))
        num_proc = resolve_num_proc(context.num_proc, len(raw))
        prepared = raw.with_format("arrow").map(
            prepare_batch, batched=True, batch_size=500, with_indices=True,
            fn_kwargs=dict(recipe=recipe, rows=source.rows), remove_columns=raw.column_names,
            features=table_features(recipe), num_proc=num_proc if num_proc > 1 else None,
            cache_file_name=str(folder / "prepared.arrow"), new_fingerprint=entry.key,
            load_from_cache_file=False,
            desc=f"tokenising {source.name}")
        check_errors(prepared.data.table, recipe, source)
        meta["files"] = [Path(f["filename"]).name for f in prepared.cache_files]
        meta["rows"] = len(prepared)
        del prepared, raw
        (folder / "raw.arrow").unlink(missing_ok=True)


def resolve_num_proc(setting: Optional[int], n_samples: int) -> int:
    """`data.num_proc`, or the CPU cores available to this process; a small dataset is prepared
    in the process itself, since starting workers would cost more than they save."""
    if setting is not None:
        return max(1, min(setting, n_samples))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, n_samples // SMALL_DATASET))


@contextlib.contextmanager
def _datasets_progress(show: bool):
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


# ---------------------------------------------------------------------- checks


def check_errors(table: pa.Table, recipe: DataRecipe, source: Source) -> None:
    """Raises the first problem: every unreadable line of a file at once; then a sample whose
    form cannot be told, a sample of another form than sample 0, a sample that cannot be
    normalised, one that cannot be tokenised, in that order; within a stage the lowest index."""
    errors = table.column("error")
    failed = np.nonzero(pc.is_valid(errors).to_numpy(zero_copy_only=False))[0]
    stages = _column(table, "stage")[failed] if len(failed) else failed
    read = failed[stages == READ]
    if len(read):
        messages = [errors[int(i)].as_py() for i in read[:20]]
        raise DataError(read_errors_message(source.path or source.name, messages, len(read)))
    for stage in (FORM,):
        at = failed[stages == stage]
        if len(at):
            raise DataError(errors[int(at[0])].as_py())
    forms = table.column("form")
    first = forms[0].as_py()
    other = np.nonzero(pc.not_equal(forms, first).to_numpy(zero_copy_only=False))[0]
    if len(other):
        i = int(other[0])
        raise DataError(recipe.mixed_forms(int(table.column("sample")[i].as_py()),
                                           forms[i].as_py(), first))
    for stage in (NORMALIZE, TOKENIZE):
        at = failed[stages == stage]
        if len(at):
            i = int(at[0])
            raise _error_class(table.column("error_type")[i].as_py())(errors[i].as_py())


def _error_class(name: str) -> type:
    """The class of the error a sample raised (ChatError and KTODataError are DataErrors)."""
    from trainer_lib.data.conversations import ChatError
    from trainer_lib.data.kto_data import KTODataError

    return {"ChatError": ChatError, "KTODataError": KTODataError}.get(name, DataError)


def _column(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    return column.to_numpy() if column.num_chunks != 1 else column.chunk(0).to_numpy(
        zero_copy_only=False)


def _kept(table: pa.Table) -> np.ndarray:
    return np.nonzero(_column(table, "length") > 0)[0]


def _first_rows(table: pa.Table) -> np.ndarray:
    """True on the first row of every record (a record's rows are consecutive)."""
    record = _column(table, "record")
    first = np.ones(len(record), dtype=bool)
    first[1:] = record[1:] != record[:-1]
    return first


def _held_out(table: pa.Table, fraction: float, seed: int) -> np.ndarray:
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
    outcomes = pc.filter(table.column("outcome"), first_mask)
    report.truncated = int(pc.sum(pc.equal(outcomes, "truncated")).as_py() or 0)
    report.split = int(pc.sum(pc.equal(outcomes, "split")).as_py() or 0)
    dropped = pc.filter(table.column("dropped"), pa.array(rows))
    for item in pc.value_counts(dropped).to_pylist():
        if item["values"]:
            report.dropped[item["values"]] = item["counts"]
    length = _column(table, "length")
    kept = rows & (length > 0)
    report.num_examples = int(kept.sum())
    report.num_tokens = int(length[kept].sum())
    report.num_loss_tokens = int(_column(table, "num_loss")[kept].sum())
    return report
