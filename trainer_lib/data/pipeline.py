"""One data pipeline for every method: samples -> records -> tokenised examples, on disk.

    open_source (sources.py) -> Dataset.map(tokenize_batch (recipe.py), data.num_proc workers)
        -> prepared table, cached and shared (cache.py) -> checks, hold-out, report (checks.py)
        -> ExampleStore and the views the loaders draw from (store.py)

It all runs before the model loads, so bad input fails in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from trainer_lib.data.cache import (
    PIPELINE_VERSION,
    CacheEntry,
    default_cache_dir,
    digest,
    temporary_root,
    tokenizer_fingerprint,
)
from trainer_lib.data.checks import check_errors, held_out, kept_rows, make_report
from trainer_lib.data.mixture import Mixture, MixtureDraw, source_counts
from trainer_lib.data.recipe import DataRecipe, table_features, tokenize_batch
from trainer_lib.data.report import DataReport
from trainer_lib.data.sources import Source, open_source
from trainer_lib.data.store import Examples, ExampleStore, column
from trainer_lib.errors import ConfigError, DataError
from trainer_lib.runtime.processes import main_first, shared_token, shared_value

SMALL_DATASET = 1000  # samples per worker below which starting a worker costs more than it saves


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
    mixture: Optional[MixtureDraw] = None  # the training samples, when they are a Mixture

    def derived(self, name: str, key_parts: Any, build: Callable[[Path], None],
                verify: Optional[Callable[[Path], Optional[str]]] = None) -> Path:
        """A folder that `build(folder)` fills once per key (on each node's main process first,
        then shared); returns it. A cached folder is checked first (its files' sizes, then
        `verify(folder)`, which says what is wrong or None) and built again if damaged."""
        entry = CacheEntry(self.folder / "derived", name, digest(self.key, key_parts))

        def make():
            if entry.ready():
                problem = entry.damage() or (verify(entry.path) if verify else None)
                if problem is None:
                    return entry.path
                entry.discard(problem)
            with entry.building({"name": name}) as tmp, \
                    _datasets_progress(self.context.show_progress):
                build(tmp)
            return entry.path

        return main_first(self.context.accelerator, make)

    def derived_arrays(self, name: str, key_parts: Any,
                       compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """numpy arrays computed once and memory-mapped by every process."""
        def build(folder: Path) -> None:
            arrays = {n: np.asarray(a) for n, a in compute().items()}
            for array_name, array in arrays.items():
                np.save(folder / f"{array_name}.npy", array)
            (folder / "arrays.json").write_text(json.dumps(
                {n: [a.dtype.str, list(a.shape)] for n, a in arrays.items()}))

        folder = self.derived(name, key_parts, build, _check_arrays)
        return {p.stem: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}

    def release(self) -> None:
        """Once every process holds what it needs: a run with caching off removes its files."""
        self.context.release()


def _check_arrays(folder: Path) -> Optional[str]:
    """What is wrong with the arrays of a derived folder (one that cannot be mapped, or of
    another dtype or shape than was written), or None."""
    try:
        written = json.loads((folder / "arrays.json").read_text())
    except (OSError, ValueError) as e:
        return f"arrays.json cannot be read ({type(e).__name__})"
    for name, (dtype, shape) in written.items():
        try:
            array = np.load(folder / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            return f"{name}.npy cannot be read ({e})"
        if array.dtype.str != dtype or list(array.shape) != shape:
            return (f"{name}.npy holds {array.dtype.str} {list(array.shape)}, not the "
                    f"{dtype} {shape} written")
    return None


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
    mixture = as_mixture(samples, d)
    if mixture is not None:
        return _build_mixture(context, recipe, mixture, eval_samples, config)
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

    eval_table, eval_entry = (_prepared_table(context, recipe, eval_source, evaluation=True)
                              if eval_source is not None else (None, None))
    if sources.train.stream is not None:
        if t.eval_split > 0:
            raise DataError("train.eval_split holds out a fraction of the samples, which a stream "
                            "does not have; pass eval_samples instead, or set train.eval_split=0")
        store = ExampleStore(eval_table, recipe.carried) if eval_table is not None else None
        rows = kept_rows(eval_table) if eval_table is not None else np.zeros(0, np.int64)
        return PreparedData(store, None, Examples(store, rows), DataReport(), None, context,
                            stream=sources.train)

    train_table, entry = _prepared_table(context, recipe, sources.train)
    tables = [train_table] + ([eval_table] if eval_table is not None else [])
    store = ExampleStore(pa.concat_tables(tables) if len(tables) > 1 else train_table,
                         recipe.carried)
    if eval_table is not None:
        in_train = np.ones(train_table.num_rows, dtype=bool)
        eval_rows = kept_rows(eval_table) + train_table.num_rows
    else:
        in_train = ~held_out(train_table, t.eval_split, t.seed)
        eval_rows = np.nonzero(~in_train & (column(train_table, "length") > 0))[0]
    train_rows = np.nonzero(in_train & (column(train_table, "length") > 0))[0]
    report = make_report(train_table, in_train)
    key = digest(entry.key, eval_entry.key if eval_entry else None, t.eval_split, t.seed)
    return PreparedData(store, Examples(store, train_rows), Examples(store, eval_rows), report,
                        entry.path, context, key=key)


def as_mixture(samples: Any, data_config) -> Optional[Mixture]:
    """The Mixture to train on: `samples` itself, or `data.mixture` of the config."""
    if not data_config.mixture:
        return samples if isinstance(samples, Mixture) else None
    if samples is not None:
        raise ConfigError("both samples and data.mixture are given; train on one: pass "
                          "samples=None (or no --data) to use data.mixture, or unset it")
    return Mixture.from_config(data_config.mixture, data_config.mixture_seed,
                               data_config.examples_per_epoch)


def _build_mixture(context: _Context, recipe: DataRecipe, mixture: Mixture, eval_samples: Any,
                   config) -> PreparedData:
    """Every source prepared on its own (one cached table each), held out from as a dataset
    would be, and put in one store; the draws come later, one epoch at a time."""
    t = config.train
    if config.data.streaming:
        raise ConfigError("data.streaming=True with a mixture: a mixture draws its share from "
                          "every whole source, which a stream does not have; set "
                          "data.streaming=False")
    main = context.accelerator is None or context.accelerator.is_main_process
    tables, in_train, eval_tables, keys = [], [], [], []
    for name, (samples, weight) in mixture.sources.items():
        what = f"mixture source '{name}'"
        sources = open_source(samples, what, False, context.hf_cache,
                              dict_eval=eval_samples is None and t.eval_split == 0)
        if sources.note and main:
            print(sources.note, flush=True)
        if sources.train.stream is not None:
            raise DataError(f"{what} is a stream: a mixture draws its share from every whole "
                            "source; pass a datasets.Dataset or a file instead")
        table, entry = _named(what, lambda: _prepared_table(context, recipe, sources.train))
        tables.append(table)
        keys.append([name, weight, entry.key])
        if sources.eval is not None:
            eval_table, eval_entry = _named(what, lambda: _prepared_table(
                context, recipe, sources.eval, evaluation=True))
            eval_tables.append(eval_table)
            keys[-1].append(eval_entry.key)
        held = (_named(what, lambda: held_out(table, t.eval_split, t.seed))
                if eval_samples is None else np.zeros(table.num_rows, dtype=bool))
        in_train.append(~held)
    if eval_samples is not None:
        eval_table, eval_entry = _prepared_table(context, recipe, open_source(
            eval_samples, "eval_samples", False, context.hf_cache, dict_eval=False).train,
            evaluation=True)
        eval_tables.append(eval_table)
        keys.append(["eval_samples", eval_entry.key])

    all_tables = tables + eval_tables
    store = ExampleStore(pa.concat_tables(all_tables) if len(all_tables) > 1 else tables[0],
                         recipe.carried)
    starts = np.cumsum([0] + [tb.num_rows for tb in all_tables])
    pools, eval_rows, reports = [], [], []
    for (name, _), table, train_mask, base in zip(mixture.sources.items(), tables, in_train,
                                                   starts):
        kept = column(table, "length") > 0
        pool = np.nonzero(train_mask & kept)[0] + base
        report = make_report(table, train_mask)
        if not len(pool):
            raise DataError(f"mixture source '{name}' leaves no example to train on: "
                            f"{report.summary()}")
        pools.append(pool)
        eval_rows.append(np.nonzero(~train_mask & kept)[0] + base)
        reports.append(report)
    for table, base in zip(eval_tables, starts[len(tables):]):
        eval_rows.append(kept_rows(table) + base)

    names = list(mixture.sources)
    total = mixture.examples_per_epoch or int(sum(len(p) for p in pools))
    counts = source_counts([w for _, w in mixture.sources.values()], total)
    seed = t.seed if mixture.seed is None else mixture.seed
    report = DataReport.combined(reports)
    report.sources = {n: {"examples": c, "available": len(p)}
                      for n, c, p in zip(names, counts, pools)}
    key = digest("mixture", keys, t.eval_split, t.seed, seed, total)
    draw = MixtureDraw(names, pools, counts, seed)
    return PreparedData(store, Examples(store, np.concatenate(pools)),
                        Examples(store, np.concatenate(eval_rows)), report,
                        context.root / f"mixture-{key}", context, key=key, mixture=draw)


def _named(what: str, prepare: Callable[[], Any]) -> Any:
    """`prepare()`, its data errors saying which source of a mixture they are about."""
    try:
        return prepare()
    except DataError as e:
        if what in str(e):
            raise
        raise type(e)(f"{what}: {e}") from None


def _prepared_table(context: _Context, recipe: DataRecipe, source: Source,
                    evaluation: bool = False) -> tuple[pa.Table, CacheEntry]:
    """The prepared table of one source (`evaluation`: of evaluation samples): from the cache,
    or built (main process first)."""
    # the main process's key: a Dataset that datasets could not hash has a random fingerprint,
    # different in every process, and each would otherwise prepare its own copy
    key = shared_value(context.accelerator, digest(PIPELINE_VERSION, recipe.name,
                                                   recipe.settings(), _tokenizer_key(recipe),
                                                   source.key))
    entry = CacheEntry(context.root, recipe.name, key)
    main_first(context.accelerator, lambda: _build(context, recipe, source, entry, evaluation))
    try:  # checked on the main process already; damaged since then, it is said, not traced
        return _open_table(entry), entry
    except _UNREADABLE as e:
        raise DataError(f"the prepared data cached in {entry.path} cannot be read ({e}); "
                        "remove that folder and run again") from None


_UNREADABLE = (pa.ArrowException, OSError, ValueError, KeyError)


def _open_table(entry: CacheEntry) -> pa.Table:
    """The prepared table of an entry, memory-mapped, with as many rows as were written."""
    meta = entry.meta()
    tables = [pa.ipc.open_stream(pa.memory_map(str(entry.path / name))).read_all()
              for name in meta["files"]]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if table.num_rows != meta["rows"]:
        raise ValueError(f"{table.num_rows} rows; {meta['rows']} were written")
    return table


def _tokenizer_key(recipe: DataRecipe) -> str:
    cached = getattr(recipe, "_tokenizer_key", None)
    if cached is None:
        cached = recipe._tokenizer_key = tokenizer_fingerprint(recipe.tokenizer)
    return cached


def _build(context: _Context, recipe: DataRecipe, source: Source, entry: CacheEntry,
           evaluation: bool = False) -> None:
    if entry.ready():
        problem = entry.damage()
        if problem is None:
            try:
                _open_table(entry)
                return
            except _UNREADABLE as e:
                problem = f"{type(e).__name__}: {e}"
        entry.discard(problem)
    meta = {"source": source.name, "method": recipe.name, "settings": recipe.settings()}
    with entry.building(meta) as folder, _datasets_progress(context.show_progress):
        raw = source.load(folder, context.show_progress)
        if len(raw) == 0:
            if not evaluation:
                raise DataError(recipe.empty_message(source.name))
            name = f"{source.what} ({source.path})" if source.path else source.what
            raise DataError(f"{name} is empty: give at least one evaluation sample, or none")
        num_proc = resolve_num_proc(context.num_proc, len(raw))
        prepared = raw.with_format("arrow").map(
            tokenize_batch, batched=True, batch_size=500, with_indices=True,
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
