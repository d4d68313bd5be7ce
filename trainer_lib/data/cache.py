"""Prepared data on disk, named by everything that changes it and written once.

An entry is built under a temporary name and renamed once complete, so an interrupted run never
leaves half an entry and two runs racing for one key both end with a whole one. The other
processes of a node open the entry its main process built, memory-mapped: one copy per node.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

# bump when the prepared tables change for the same inputs, so old entries are not reused
PIPELINE_VERSION = 2


def default_cache_dir() -> Path:
    if os.environ.get("TRAINER_LIB_DATA_CACHE"):
        return Path(os.environ["TRAINER_LIB_DATA_CACHE"])
    root = os.environ.get("TRAINER_LIB_CACHE", Path.home() / ".cache" / "trainer_lib")
    return Path(root) / "data"


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides how the tokenizer splits text: for a fast tokenizer its whole definition
    (vocabulary, merges, added tokens, normaliser, pre-tokeniser, post-processor), plus the special
    tokens and the settings it was loaded with; for a slow one its vocabulary and files."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
        for name in getattr(tokenizer, "vocab_files_names", {}):
            path = getattr(tokenizer, name, None)
            if isinstance(path, str) and os.path.isfile(path):
                h.update(Path(path).read_bytes())
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
                if isinstance(v, (str, int, float, bool, type(None)))
                and "file" not in k and "path" not in k}
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
           tokenizer.unk_token_id]
    added = sorted((int(i), str(t)) for i, t in getattr(tokenizer, "added_tokens_decoder",
                                                        {}).items())
    h.update(json.dumps([settings, ids, added, str(tokenizer.special_tokens_map)], sort_keys=True,
                        default=str).encode("utf-8"))
    return h.hexdigest()


# ---------------------------------------------------------------------- entries


class CacheEntry:
    """One prepared result: a folder named by its key."""

    def __init__(self, root: Path, name: str, key: str):
        self.root, self.name, self.key = Path(root), name, key
        self.path = self.root / f"{name}-{key}"

    def ready(self) -> bool:
        return (self.path / "done.json").is_file()

    @contextlib.contextmanager
    def building(self, meta: dict) -> Iterator[Path]:
        """A temporary folder to write into; renamed to the entry once the block succeeds. The
        size of every file written is recorded, so that a damaged entry is found when opened."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            meta = {**meta, "sizes": {str(f.relative_to(tmp)): f.stat().st_size
                                      for f in sorted(tmp.rglob("*")) if f.is_file()}}
            (tmp / "done.json").write_text(json.dumps(meta, indent=1, default=str))
            try:
                os.rename(tmp, self.path)
            except OSError:  # another run finished the same entry first: theirs is as good
                if not self.ready():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def meta(self) -> dict:
        return json.loads((self.path / "done.json").read_text())

    def damage(self) -> Optional[str]:
        """What is wrong with a ready entry's files (missing, or not the size written), or None.
        Cheap: sizes only; what sizes cannot show, opening the files does."""
        try:
            sizes = self.meta().get("sizes", {})
        except (OSError, ValueError) as e:
            return f"done.json cannot be read ({type(e).__name__})"
        for name, size in sizes.items():
            path = self.path / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} is {path.stat().st_size:,} bytes; {size:,} were written"
        return None

    def discard(self, problem: str) -> None:
        """Removes a damaged entry, saying why, so that it is prepared again (renamed first:
        no process ever sees half of it)."""
        warnings.warn(f"the prepared data cached in {self.path} is damaged ({problem}): "
                      "preparing it again", stacklevel=3)
        gone = self.root / f".{self.path.name}.damaged-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)


def temporary_root(root: Path, token: str) -> Path:
    """The folder of a run with caching off: removed when the run has opened its data, and at exit
    at the latest."""
    path = Path(root) / f"tmp-{token}"
    atexit.register(shutil.rmtree, path, True)
    return path
