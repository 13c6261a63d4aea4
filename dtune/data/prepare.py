"""Records to training examples: tokenized through `datasets.map` into an Arrow file in
dtune's cache, once per machine.

With several processes, local rank 0 of each node tokenizes and writes the cache while the
others wait at a barrier, then memory-map it: the work is not repeated per rank, and no rank
races another to write the same file. A later run with the same data, tokenizer and settings
maps the file and tokenizes nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np

from dtune.cache import build_lock, cache_dir
from dtune.config import Config
from dtune.data.formatting import IGNORE, Example, tokenize
from dtune.distributed import Ranks, barrier
from dtune.errors import DtuneError

log = logging.getLogger("dtune")
CACHE_VERSION = 2


class ExampleTable:
    """Tokenized examples backed by an Arrow table: rows are read when a batch needs them,
    so a large dataset is not held as Python objects."""

    def __init__(self, table: datasets.Dataset):
        self.table = table
        self.lengths = np.asarray(table["length"], dtype=np.int64) if len(table) else \
            np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Example:
        row = self.table[int(index)]
        return Example(row["input_ids"], row["labels"])


def prepare_data(cfg: Config, tokenizer, ranks: Ranks, train_records: list[dict],
                 eval_records: list[dict]) -> tuple[ExampleTable, ExampleTable]:
    """Tokenized (train examples, eval examples) of the records `load_splits` returned."""
    key = fingerprint(cfg, tokenizer)
    splits = {"train": (train_records, "training"),
              "eval": (eval_records[: cfg.eval.max_loss_samples], "eval")}
    paths = {name: cache_dir() / "tokenized" / f"{key}-{name}.arrow" for name in splits}
    if ranks.local_rank == 0:
        with build_lock(paths["train"]):
            for name, (records, split) in splits.items():
                if not paths[name].is_file():
                    tokenize_records(records, cfg, tokenizer, split, paths[name])
    barrier()
    return tuple(ExampleTable(datasets.Dataset.from_file(str(paths[name]))) for name in splits)


def tokenize_records(records: list[dict], cfg: Config, tokenizer, split: str,
                     cache_file: Path | None = None) -> ExampleTable:
    """Tokenize `records`; with `cache_file`, write the Arrow table there."""
    datasets.disable_progress_bars()
    d = cfg.data

    def tokenize_batch(batch: dict) -> dict:
        out = {"input_ids": [], "labels": [], "length": []}
        for index in range(len(next(iter(batch.values())))):
            record = {column: values[index] for column, values in batch.items()}
            example = tokenize(record, d.format, tokenizer, d.max_seq_len, d.train_on_inputs,
                               d.system_prompt)
            if all(label == IGNORE for label in example.labels[1:]):
                continue  # truncation cut off the whole response
            out["input_ids"].append(example.input_ids)
            out["labels"].append(example.labels)
            out["length"].append(len(example.input_ids))
        return out

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "length": datasets.Value("int32")})
    if not records:
        return ExampleTable(datasets.Dataset.from_dict(
            {"input_ids": [], "labels": [], "length": []}, features=features))
    source = datasets.Dataset.from_list(records)
    table = source.map(tokenize_batch, batched=True, remove_columns=source.column_names,
                       features=features, new_fingerprint=fingerprint(cfg, tokenizer) + split,
                       cache_file_name=str(cache_file) if cache_file else None,
                       keep_in_memory=cache_file is None)
    emptied = len(records) - len(table)
    if emptied:
        log.warning("%d of %d %s examples lost their whole response to data.max_seq_len=%d "
                    "and were dropped.", emptied, len(records), split, d.max_seq_len)
    if not len(table):
        raise DtuneError(
            f"every {split} example is longer than data.max_seq_len={d.max_seq_len} "
            "before its response starts, so nothing would be trained; raise data.max_seq_len."
        )
    return ExampleTable(table)


def fingerprint(cfg: Config, tokenizer) -> str:
    """Changes whenever the data, its files, the tokenizer or the formatting would."""
    files = {}
    for key in ("path", "eval_path"):
        value = getattr(cfg.data, key)
        if value and value != "builtin" and Path(value).is_file():
            stat = Path(value).stat()
            files[key] = [str(Path(value).resolve()), stat.st_size, stat.st_mtime_ns]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(),
                                                                     sort_keys=True)
    payload = json.dumps({
        "version": CACHE_VERSION,
        "data": asdict(cfg.data),
        "max_loss_samples": cfg.eval.max_loss_samples,
        "files": files,
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token,
    }, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]
