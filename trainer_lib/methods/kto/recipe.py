"""KTO's part of the data pipeline: its recipe, its fixed micro-batches and their KL pairs.

Micro-batches are drawn once, so each example's mismatched partner (prompt i with the completion
of example i + 1 of its micro-batch) is the same in every epoch and on every process: that is
what lets reference log-probs be precomputed. The pairs are tokenised once, in the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from trainer_lib.data.cache import digest
from trainer_lib.data.chat_template import (
    RunTemplate,
    as_messages,
    tokenize_prompt_completion_messages,
)
from trainer_lib.data.pipeline import PreparedData, resolve_num_proc
from trainer_lib.data.recipe import DataRecipe
from trainer_lib.data.store import ExampleStore, GroupLayout, Groups, TokenColumns
from trainer_lib.data.tokenize import fit_to_length, tokenize_pair, tokenize_pairs
from trainer_lib.data.tokens import vocabulary_size
from trainer_lib.errors import DataError, KTODataError
from trainer_lib.methods.kto.loss import mismatched_pairing
from trainer_lib.methods.kto.samples import KIND_NAMES, kto_sample_form, normalize_kto_sample
from trainer_lib.ops.cross_entropy import IGNORE_INDEX


class KTORecipe(DataRecipe):
    name = "kto"
    error = KTODataError
    drop_without_loss = False  # as KTO always did: an example is kept whatever its loss tokens
    carried = ("sample", "label")

    def __init__(self, tokenizer, template: RunTemplate, method, seq_length: int):
        import datasets

        super().__init__(tokenizer, seq_length, method.overlong)
        self.keys = (method.input_key, method.output_key, method.label_key)
        self.template = template
        self.vocab_size = vocabulary_size(tokenizer)
        # the record travels as JSON for the KL pairs, which join records of two examples
        self.scalar_features = {"label": datasets.Value("bool"),
                                "record_json": datasets.Value("string")}

    def settings(self) -> dict:
        return {**super().settings(), "keys": self.keys,
                "chat_template": [self.template.spec, self.template.template]}

    def form(self, sample, index: int) -> str:
        return kto_sample_form(sample, index, *self.keys)

    def mixed_forms(self, index: int, form: str, first: str) -> str:
        return (f"sample {index} is {KIND_NAMES[form]} but sample 0 is {KIND_NAMES[first]}; "
                "all samples must have the same format")

    def normalize(self, sample, index: int, form: str) -> list[dict]:
        return normalize_kto_sample(sample, form, index, *self.keys, vocab_size=self.vocab_size)

    def tokenize(self, records: list[dict], indices: list[int]) -> list:
        out: list = [None] * len(records)
        for k, record in enumerate(records):
            if record.get("tokens"):  # used as given: loss on the completion's ids
                prompt, completion = record["prompt"], record["completion"]
                out[k] = {"input_ids": prompt + completion,
                          "labels": [IGNORE_INDEX] * len(prompt) + completion}
        texts = [k for k, r in enumerate(records) if out[k] is None
                 and isinstance(r["prompt"], str) and isinstance(r["completion"], str)]
        if texts:
            done = tokenize_pairs(self.tokenizer, [records[k]["prompt"] for k in texts],
                                  [records[k]["completion"] for k in texts], add_eos=True)
            for k, example in zip(texts, done):
                out[k] = example
        for k, (record, index) in enumerate(zip(records, indices)):
            if out[k] is None:
                try:
                    out[k] = tokenize_kto_pair(self.tokenizer, self.template, record["prompt"],
                                               record["completion"], record.get("tools"), index)
                except DataError as e:
                    out[k] = e
        return out

    def report_kind(self, record: dict) -> str:
        return "desirable" if record["label"] else "undesirable"

    def scalars(self, record: dict) -> dict:
        return {"label": record["label"], "record_json": json.dumps(
            {"prompt": record["prompt"], "completion": record["completion"],
             "tools": record.get("tools"), "tokens": record.get("tokens", False)},
            ensure_ascii=False)}

    def kl_records(self, prompts: list[dict], completions: list[dict]) -> list[dict]:
        """The records of KL pairs: prompt i with completion i. Both sides of one form pair as
        records of that form (text pairs are tokenised as one text, like the examples); a pair
        of two forms (sources of a mixture) joins the prompt's tokens to the completion's."""
        out, mixed = [], []
        for k, (p, c) in enumerate(zip(prompts, completions)):
            out.append({"prompt": p["prompt"], "completion": c["completion"],
                        "tools": p.get("tools"), "tokens": bool(p.get("tokens"))})
            if bool(p.get("tokens")) != bool(c.get("tokens")):
                mixed.append(k)
        if mixed:
            sides = self.tokenize([prompts[k] for k in mixed] + [completions[k] for k in mixed],
                                  list(range(2 * len(mixed))))
            for j, k in enumerate(mixed):
                prompt, completion = sides[j], sides[len(mixed) + j]
                for side in (prompt, completion):
                    if isinstance(side, DataError):
                        raise side
                out[k] = {"prompt": _prompt_part(prompt)[0],
                          "completion": _prompt_part(completion)[1], "tokens": True}
        return out

    def empty_message(self, what: str) -> str:
        return f"no KTO samples were given ({what} is empty)"


def tokenize_kto_pair(tokenizer, template: RunTemplate, prompt, completion, tools,
                      index: Optional[int] = None) -> dict:
    """One (prompt, completion): input_ids and labels, loss on the completion."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return tokenize_pair(tokenizer, prompt, completion, add_eos=True)
    return tokenize_prompt_completion_messages(
        tokenizer, as_messages(prompt, "user"), as_messages(completion, "assistant"), tools,
        template.for_messages(), index=index)


def _prompt_part(example: dict) -> tuple[list, list]:
    """(prompt ids, completion ids) of a tokenised example: its ids before the first one that
    carries loss, and the rest."""
    labels = example["labels"]
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return example["input_ids"][:start], example["input_ids"][start:]


# ---------------------------------------------------------------------- micro-batches


def micro_batch_offsets(n: int, size: int) -> np.ndarray:
    """Group boundaries of `fixed_micro_batches(n, size, seed)`: consecutive runs of `size` in
    the seeded order, a lone last example joining the run before it."""
    offsets = list(range(0, n, size)) + [n]
    if size > 1 and len(offsets) > 2 and offsets[-1] - offsets[-2] == 1:
        offsets.pop(-2)
    return np.asarray(offsets, dtype=np.int64)


def micro_batches(data: PreparedData, recipe: KTORecipe, train_size: int, eval_size: int,
                  seed: int, with_kl: bool, num_proc: Optional[int]) -> tuple[Groups, Groups]:
    """Fixed micro-batches of the train and eval examples (train groups first in one layout) and,
    `with_kl`, every example's mismatched partner tokenised."""
    return epoch_micro_batches(data, recipe, train_size, eval_size, seed, with_kl, num_proc)[:2]


def epoch_micro_batches(data: PreparedData, recipe: KTORecipe, train_size: int, eval_size: int,
                        seed: int, with_kl: bool, num_proc: Optional[int],
                        epochs: Optional[Callable[[], list[np.ndarray]]] = None,
                        epochs_key: Any = None) -> tuple[Groups, Groups, np.ndarray]:
    """`micro_batches`, where `epochs()` (for a mixture) gives the train rows of each epoch, each
    drawn into micro-batches of its own (`epochs_key` names them). Returns (train groups, eval
    groups, the bounds of each epoch's groups among the train groups)."""
    def compute() -> dict:
        if epochs is None:
            parts = [(data.train.rows, train_size, seed)]
        else:
            parts = [(rows, train_size, [seed, e]) for e, rows in enumerate(epochs())]
        parts.append((data.eval.rows, eval_size, seed))
        pieces, offsets, partner, n_groups = [], [np.zeros(1, np.int64)], [], []
        base = 0
        for rows, size, part_seed in parts:
            if not len(rows):
                n_groups.append(0)
                continue
            order = np.random.default_rng(part_seed).permutation(len(rows))
            bounds = micro_batch_offsets(len(rows), size)
            pieces.append(rows[order])
            offsets.append(bounds[1:] + base)
            for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                if with_kl:
                    partner.extend(base + start + j for j in mismatched_pairing(stop - start))
            base += len(rows)
            n_groups.append(len(bounds) - 1)
        return {"flat": np.concatenate(pieces), "offsets": np.concatenate(offsets),
                "partner": np.asarray(partner, dtype=np.int64),
                "n_groups": np.asarray(n_groups, dtype=np.int64)}

    key = ["fixed_micro_batches", train_size, eval_size, seed, with_kl]
    if epochs is not None:
        key.append(epochs_key)
    arrays = data.derived_arrays("micro_batches", key, compute)
    partners = None
    if with_kl:
        folder = data.derived("kl_pairs", key, lambda f: _tokenize_kl_pairs(
            f, data, recipe, arrays["flat"], arrays["partner"], num_proc),
            verify=lambda f: _check_pairs(f, len(arrays["flat"])))
        partners = ExampleStore(_open(folder))
    layout = GroupLayout(data.store, arrays["flat"], arrays["offsets"], partners)
    starts = np.cumsum(np.concatenate([[0], arrays["n_groups"][:-1]]))
    n_train = int(starts[-1])
    total = len(arrays["offsets"]) - 1
    return (Groups(layout, np.arange(n_train)), Groups(layout, np.arange(n_train, total)),
            starts)


def _open(folder: Path) -> pa.Table:
    tables = [pa.ipc.open_stream(pa.memory_map(str(folder / name))).read_all()
              for name in (folder / "files.txt").read_text().split()]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _check_pairs(folder: Path, rows: int) -> Optional[str]:
    """What is wrong with cached KL pairs (files that cannot be read, or too few rows), or None."""
    try:
        found = _open(folder).num_rows
    except (pa.ArrowException, OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None if found == rows else f"{found} KL pairs; {rows} were written"


def _take(column: pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """column[rows] chunk by chunk (a take over the whole chunked column could copy it all)."""
    starts = np.cumsum([0] + [len(c) for c in column.chunks])
    chunk_of = np.searchsorted(starts, rows, side="right") - 1
    pieces, where = [], []
    for c in np.unique(chunk_of).tolist():
        at = np.nonzero(chunk_of == c)[0]
        pieces.append(column.chunk(c).take(pa.array(rows[at] - starts[c])))
        where.append(at)
    taken = pa.concat_arrays(pieces)
    return taken.take(pa.array(np.argsort(np.concatenate(where), kind="stable")))


def _tokenize_kl_pairs(folder: Path, data: PreparedData, recipe: KTORecipe, flat: np.ndarray,
                       partner: np.ndarray, num_proc: Optional[int]) -> None:
    """At position p, the prompt of example flat[p] with the completion of example
    flat[partner[p]], tokenised and truncated to seq_length; `files.txt` lists the files."""
    import datasets

    records = data.store.table.column("record_json")
    source = folder / "pairs.arrow"
    schema = pa.schema([("prompt", pa.string()), ("completion", pa.string())])
    block = 10_000  # a block at a time: never every text at once
    with pa.OSFile(str(source), "wb") as f, pa.ipc.new_stream(f, schema) as writer:
        for start in range(0, len(flat), block):
            rows = np.asarray(flat[start:start + block])
            partners = np.asarray(flat)[np.asarray(partner[start:start + block])]
            writer.write_batch(pa.record_batch([_take(records, rows), _take(records, partners)],
                                               schema=schema))
    pairs = datasets.Dataset.from_file(str(source))
    n = resolve_num_proc(num_proc, len(pairs))
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                  "loss_mask": datasets.List(datasets.Value("uint8")),
                                  "length": datasets.Value("int32")})
    done = pairs.with_format("arrow").map(
        _kl_batch, batched=True, batch_size=500, fn_kwargs=dict(recipe=recipe),
        remove_columns=pairs.column_names, features=features, num_proc=n if n > 1 else None,
        cache_file_name=str(folder / "kl.arrow"), load_from_cache_file=False,
        new_fingerprint=digest(folder.name), desc="tokenising KL pairs")
    (folder / "files.txt").write_text("\n".join(Path(f["filename"]).name
                                                for f in done.cache_files))
    del pairs, done
    source.unlink()


def _kl_batch(batch: pa.Table, recipe: KTORecipe) -> pa.Table:
    prompts = [json.loads(t) for t in batch.column("prompt").to_pylist()]
    completions = [json.loads(t) for t in batch.column("completion").to_pylist()]
    records = recipe.kl_records(prompts, completions)
    # as the examples themselves are tokenised (text pairs in one batch), then truncated
    examples = recipe.tokenize(records, list(range(len(records))))
    tokens, lengths = TokenColumns(), []
    for example in examples:
        if isinstance(example, DataError):
            raise example
        example = fit_to_length(example, recipe.seq_length, "pair", "truncate")[0][0]
        tokens.add(example["input_ids"], example["labels"])
        lengths.append(len(example["input_ids"]))
    return pa.table({**tokens.arrays(), "length": pa.array(lengths, pa.int32())})
