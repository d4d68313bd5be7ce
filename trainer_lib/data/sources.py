"""Where samples come from: a list, a file, a `datasets.Dataset`, a hub name or a stream.

Lists and JSON files are stored as each sample's JSON text, so nested fields of any schema stay
exactly as written (Arrow would unify the schemas of different tools); JSON Lines keep their line
numbers so every bad line can be named. The data is read only when the cache has nothing for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa

from trainer_lib.errors import DataError
from trainer_lib.runtime.hub import hub_offline

# the raw table of JSON text: one row per sample, `line` its line number in the file (0: a list)
RAW_SCHEMA = pa.schema([("json", pa.binary()), ("line", pa.int64())])
JSON_SUFFIXES = (".json", ".jsonl")
LOCAL_SUFFIXES = JSON_SUFFIXES + (".parquet",)
MAX_REPORTED_LINES = 20
_BLOCK = 1 << 24  # bytes read at a time from a JSON Lines file
UTF8_BOM = b"\xef\xbb\xbf"
_FIX_LINE = "; fix the line or remove it"


@dataclass
class Source:
    """Samples ready to be prepared. `rows` says how the pipeline reads a row: "json" (the JSON
    text of a sample in column `json`, with its `line`) or "records" (dataset rows as they are)."""

    name: str  # "samples", "eval_samples" or a path: how messages name the data
    key: str  # names the data for the cache
    rows: str
    # (folder for temporary files, show a progress bar) -> datasets.Dataset; called on a miss
    load: Callable[[Path, bool], Any]
    path: Optional[str] = None  # the file, for messages naming its lines
    stream: Any = None  # a datasets.IterableDataset when streaming
    # what the data is to the user, for messages: "samples", "eval_samples", "samples['test']"
    what: str = "samples"


@dataclass
class Sources:
    train: Source
    eval: Optional[Source] = None  # from a DatasetDict's validation/test split
    note: str = ""  # said once, e.g. which splits of a DatasetDict are used


def open_source(samples: Any, what: str, streaming: bool = False, hf_cache: Optional[str] = None,
                dict_eval: bool = True) -> Sources:
    """What the user passed as `samples` (or `eval_samples`: `what`) -> Sources. `dict_eval`: a
    DatasetDict's validation (else test) split becomes the evaluation samples."""
    if samples is None:
        raise DataError(f"no {what} given: pass a list, a datasets.Dataset, a DatasetDict, a "
                        ".json/.jsonl/.parquet path or a hub name")
    if isinstance(samples, (str, os.PathLike)):
        return _from_path(os.fspath(samples), what, streaming, hf_cache, dict_eval)
    if _is_datasets(samples, "IterableDatasetDict") or _is_datasets(samples, "DatasetDict"):
        return _from_dict(samples, what, streaming, hf_cache, dict_eval)
    if _is_datasets(samples, "IterableDataset"):
        return Sources(_stream_source(samples, what, "records", what=what))
    if _is_datasets(samples, "Dataset"):
        if streaming:
            return Sources(_stream_source(samples.to_iterable_dataset(), what, "records",
                                          what=what))
        return Sources(_dataset_source(samples, what))
    if isinstance(samples, dict):
        raise DataError(f"{what} must be a list of samples, got a single dict; wrap it in a list")
    if isinstance(samples, Iterable):
        return Sources(_list_source(samples, what, streaming))
    raise DataError(f"{what} must be a list, a datasets.Dataset or a path, got "
                    f"{type(samples).__name__}")


def _is_datasets(obj: Any, name: str) -> bool:
    return type(obj).__module__.startswith("datasets") and any(
        c.__name__ == name for c in type(obj).__mro__)


# ---------------------------------------------------------------------- in-memory lists


def _list_source(samples: Iterable, what: str, streaming: bool = False) -> Source:
    samples = samples if isinstance(samples, (list, tuple)) else list(samples)
    if streaming:
        return _stream_source(_raw_stream(lambda: ((t, 0) for t in _json_texts(samples, what))),
                              what, "json", what=what)
    digest = hashlib.blake2b(digest_size=16)
    for text in _json_texts(samples, what):
        digest.update(text)
        digest.update(b"\n")

    def load(folder: Path, show: bool):
        return _write_raw(folder / "raw.arrow", ((t, 0) for t in _json_texts(samples, what)),
                          _bar(show, len(samples), f"reading {what}", "samples"))

    return Source(what, f"list-{digest.hexdigest()}", "json", load, what=what)


def _json_texts(samples: Iterable, what: str) -> Iterator[bytes]:
    for i, sample in enumerate(samples):
        try:
            yield json.dumps(sample, ensure_ascii=False, default=_plain).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise DataError(f"sample {i}: cannot be read as data ({e}); {what} must hold strings, "
                            "numbers, booleans, lists and dicts") from None


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as the Python values they hold (e.g. a label that is np.bool_)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} is not JSON data")


def _bar(show: bool, total: int, desc: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=not show,
                dynamic_ncols=True)


def _write_raw(path: Path, rows: Iterable[tuple[bytes, int]], bar, by_bytes: bool = False,
               batch: int = 20_000):
    """Writes (JSON text, line number) rows as an Arrow file and opens it memory-mapped."""
    import datasets

    texts, lines = [], []
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, RAW_SCHEMA) as writer:
        def flush():
            writer.write_batch(pa.record_batch([pa.array(texts, pa.binary()),
                                                pa.array(lines, pa.int64())], schema=RAW_SCHEMA))
            texts.clear()
            lines.clear()

        with bar:
            for text, line in rows:
                texts.append(text)
                lines.append(line)
                if len(texts) >= batch:
                    bar.update(sum(len(t) + 1 for t in texts) if by_bytes else len(texts))
                    flush()
            if texts:
                bar.update(sum(len(t) + 1 for t in texts) if by_bytes else len(texts))
                flush()
    return datasets.Dataset.from_file(str(path))


# ---------------------------------------------------------------------- files


def _from_path(source: str, what: str, streaming: bool, hf_cache: Optional[str],
               dict_eval: bool) -> Sources:
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and suffix in JSON_SUFFIXES:
        if streaming:
            return Sources(_stream_source(_raw_stream(lambda: _json_file_rows(path)), str(path),
                                          "json", path=str(path), what=what))
        return Sources(_json_file_source(path, what))
    check_exists(source, what)
    loaded = load_dataset_named(source, what, cache_dir=hf_cache, streaming=streaming)
    return open_source(loaded, what, streaming, hf_cache, dict_eval)



def check_exists(source: str, what: str) -> None:
    """A path that is plainly meant as a local file (by its suffix or start) must exist: it is
    never looked up on the hub."""
    if not Path(source).expanduser().exists() and (
            Path(source).suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~"))):
        raise DataError(f"{what} file {source} does not exist (relative paths start from "
                        f"{os.getcwd()}); check the path, or give a datasets hub name")


def load_dataset_named(source: str, what: str, split: Optional[str] = None,
                       cache_dir: Optional[str] = None, streaming: bool = False):
    """`datasets.load_dataset` of a .parquet file, a folder or a hub name; a failure (offline, a
    wrong name or split) is a DataError saying which and why."""
    import datasets

    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".parquet":
        _check_parquet(path, what)
    try:
        if path.is_file() and path.suffix.lower() == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split=split,
                                         cache_dir=cache_dir, streaming=streaming)
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir,
                                     streaming=streaming)
    except Exception as e:  # noqa: BLE001 - offline, a wrong name: say which and why
        hint = ("; offline, so only local files and cached datasets can be used"
                if hub_offline(datasets=True) else "")
        which = f"the dataset '{source}'" + (f" (split '{split}')" if split else "")
        raise DataError(f"{what}: could not load {which} with datasets.load_dataset: "
                        f"{type(e).__name__}: {e}{hint}. For a local file, give an existing "
                        ".json, .jsonl or .parquet path") from None


def _check_parquet(path: Path, what: str) -> None:
    """A Parquet file's footer, read before datasets reads the file: an empty or damaged file is
    named as such (datasets says only that generating the dataset failed)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(str(path)).num_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{what} file {path} cannot be read as Parquet ({e}); write it again, "
                        "or give a .json/.jsonl file") from None
    if rows == 0:
        raise DataError(f"{what} file {path}: the file has no rows; give a file with at least "
                        "one sample")


def _json_file_source(path: Path, what: str) -> Source:
    stat = path.stat()
    # as datasets does for local files: the file is named by its path, size and modification time
    key = f"file-{path.resolve()}-{stat.st_size}-{stat.st_mtime_ns}"

    def load(folder: Path, show: bool):
        bar = _bar(show, stat.st_size, f"reading {path.name}", "B")
        return _write_raw(folder / "raw.arrow", _json_file_rows(path), bar, by_bytes=True)

    return Source(str(path), key, "json", load, path=str(path), what=what)


def _json_file_rows(path: Path) -> Iterator[tuple[bytes, int]]:
    if path.suffix.lower() == ".jsonl" or _holds_json_lines(path):
        return _json_lines(path)
    return ((t, 0) for t in _json_texts(_read_json_document(path), str(path)))


def _holds_json_lines(path: Path) -> bool:
    """A .json file whose first non-blank line is a whole JSON object or array, with more lines
    after it: JSON Lines under a .json name (what Dataset.to_json() writes)."""
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"").removeprefix(UTF8_BOM)
        if not any(line.strip() for line in f):
            return False  # one line: a JSON document (parsed once, by the caller)
    try:
        value = json.loads(first)
    except ValueError:
        return False
    return isinstance(value, (dict, list))


def _read_json_document(path: Path) -> list:
    raw = path.read_bytes().removeprefix(UTF8_BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        problem = _utf8_problem(raw[e.start], e.start - line_start)
        raise DataError(f"{path}:{line}: {problem}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ("; it looks like JSON Lines (one sample per line): rename it to .jsonl"
                if e.msg == "Extra data" else "")
        raise DataError(f"{path}: not valid JSON ({e.msg}: line {e.lineno}, column {e.colno})"
                        + (hint or "; fix the file, or save it again from the tool that wrote "
                           "it")) from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]} style files
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        raise DataError(f"{path}: expected a JSON list of samples, got an object")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples, got a {type(data).__name__}")
    return data


def _json_lines(path: Path) -> Iterator[tuple[bytes, int]]:
    """(line, line number) for every non-blank line, read in blocks of bytes (not decoded here:
    the workers decode and report every bad line with its number)."""
    number, tail = 0, b""
    with open(path, "rb") as f:
        # the byte-order mark that spreadsheets and Windows tools write first is not data
        if f.read(len(UTF8_BOM)) != UTF8_BOM:
            f.seek(0)
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            lines = (tail + block).split(b"\n")
            tail = lines.pop()
            for line in lines:
                number += 1
                if line.strip():
                    yield line, number
    if tail.strip():
        yield tail, number + 1


def _utf8_problem(byte: int, column: int) -> str:
    return f"not UTF-8 (byte 0x{byte:02x} at column {column + 1}); save the file as UTF-8"


def decode_json_row(text: bytes, line: int) -> tuple[Any, Optional[str]]:
    """(sample, None) or (None, what is wrong with the line)."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"line {line}: " + _utf8_problem(text[e.start], e.start)
    try:
        return json.loads(decoded), None
    except json.JSONDecodeError as e:
        where = f"line {line}" if line else "sample"
        return None, f"{where}: not valid JSON ({e.msg}: column {e.colno}){_FIX_LINE}"


def read_errors_message(name: str, problems: list[str], total: int) -> str:
    """One error for the unreadable lines of a file, the first MAX_REPORTED_LINES of them."""
    if total == 1:
        return f"{name}:{problems[0][len('line '):]}" if problems[0].startswith("line ") \
            else f"{name}: {problems[0]}"
    shown = "\n".join(f"  {p.removesuffix(_FIX_LINE)}" for p in problems[:MAX_REPORTED_LINES])
    more = f"\n  ... and {total - MAX_REPORTED_LINES} more" if total > MAX_REPORTED_LINES else ""
    return f"{name}: {total} lines cannot be read; fix or remove them:\n{shown}{more}"


# ---------------------------------------------------------------------- datasets


def _dataset_source(dataset, what: str) -> Source:
    dataset = dataset.with_format(None)
    return Source(what, f"dataset-{dataset._fingerprint}", "records", lambda folder, show: dataset,
                  what=what)


def _from_dict(dataset_dict, what: str, streaming: bool, hf_cache: Optional[str],
               dict_eval: bool) -> Sources:
    splits = list(dataset_dict.keys())
    if "train" not in splits:
        raise DataError(f"{what} is a DatasetDict with the splits {splits} but no 'train' split; "
                        f"pass one split, e.g. {what}=dataset[{splits[0]!r}]" if splits else
                        f"{what} is an empty DatasetDict")
    held = next((s for s in ("validation", "test") if s in splits), None) if dict_eval else None
    train = open_source(dataset_dict["train"], what, streaming, hf_cache).train
    note = f"{what}: a DatasetDict with the splits {', '.join(splits)}: training on 'train'"
    if held is None:
        unused = " (the other splits are not used)" if len(splits) > 1 else ""
        return Sources(train, note=note + unused)
    held_out = dataset_dict[held]
    if _is_datasets(held_out, "IterableDataset"):  # evaluation data is prepared whole
        import datasets

        held_out = datasets.Dataset.from_generator(lambda: (yield from held_out),
                                                   cache_dir=hf_cache)
    ev = _dataset_source(held_out, f"{what}[{held!r}]")
    return Sources(train, ev, note + f", evaluating eval/loss on '{held}'")


# ---------------------------------------------------------------------- streams


def _stream_source(stream, name: str, rows: str, path: Optional[str] = None,
                   what: str = "samples") -> Source:
    def refuse(folder, show):  # a stream is read by streaming.py, never loaded whole
        raise AssertionError("a stream is not loaded whole")

    return Source(name, f"stream-{name}", rows, refuse, path=path, stream=stream, what=what)


def _raw_stream(make_rows: Callable[[], Iterator[tuple[bytes, int]]]):
    """Raw JSON rows (text, line) as a datasets.IterableDataset, read afresh on every pass."""
    import datasets

    def generate(shards):
        for _ in shards:
            for text, line in make_rows():
                yield {"json": text, "line": line}

    features = datasets.Features({"json": datasets.Value("binary"), "line": datasets.Value("int64")})
    return datasets.IterableDataset.from_generator(generate, features=features,
                                                   gen_kwargs={"shards": [0]})
