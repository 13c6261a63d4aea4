"""Records to training examples: each source tokenized through `datasets.map` (with
data.num_proc processes) into Arrow files in dtune's cache, once per machine.

Local rank 0 of each node tokenizes and writes the cache while the other ranks poll for it
(see `build_once`: no collective is waited in, so a long tokenization is not a timeout), then
every rank memory-maps the files. A later run with the same rows, tokenizer, chat template and
settings maps the files and tokenizes nothing. A mixture tokenizes each source on its own and
combines them afterwards (dtune/data/mixture.py), so changing one source's weight
re-tokenizes nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np

from dtune.cache import atomic_dir, build_once, cache_dir
from dtune.config import Config
from dtune.data.formatting import IGNORE, Example, tokenize
from dtune.data.loading import SourceRows, train_row_location
from dtune.data.mixture import MixedExamples, mix
from dtune.data.preference import PairExample, tokenize_pair
from dtune.distributed import Ranks, barrier
from dtune.errors import DtuneError

log = logging.getLogger("dtune")
# Tokenizing this many rows takes long enough (seconds to minutes) to be announced and timed.
ANNOUNCE_ROWS = 5_000
CACHE_VERSION = 4  # 4: pair tables carry identical_row
FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                              "labels": datasets.Sequence(datasets.Value("int32")),
                              "length": datasets.Value("int32")})
# data.format=preference: both sequences of a pair, the longer one's length for batching, and
# identical_row: the pair's row in its split when truncation to data.max_seq_len left chosen
# and rejected the same tokens (a pair that trains nothing), else -1. A column rather than a
# count, so that it survives data.num_proc workers and the cache, and names the first row.
PAIR_FEATURES = datasets.Features({
    **{f"{side}_{column}": datasets.Sequence(datasets.Value("int32"))
       for side in ("chosen", "rejected") for column in ("input_ids", "labels")},
    "length": datasets.Value("int32"), "identical_row": datasets.Value("int64")})


class ExampleTable:
    """Tokenized examples backed by an Arrow table: rows are read when a batch needs them,
    so a large dataset is not held as Python objects."""

    def __init__(self, table: datasets.Dataset):
        self.table = table
        # Straight from the Arrow column: `table["length"]` decodes row by row (9 s a million).
        self.lengths = table.select_columns(["length"]).with_format("arrow")[:]["length"] \
            .to_numpy().astype(np.int64) if len(table) else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Example:
        row = self.table[int(index)]
        return Example(row["input_ids"], row["labels"])


class PairTable(ExampleTable):
    """Tokenized preference pairs (PAIR_FEATURES), Arrow-backed like ExampleTable; `lengths`
    holds each pair's longer sequence."""

    def __getitem__(self, index: int) -> PairExample:
        row = self.table[int(index)]
        return PairExample(Example(row["chosen_input_ids"], row["chosen_labels"]),
                           Example(row["rejected_input_ids"], row["rejected_labels"]))


def empty_table(pairs: bool) -> ExampleTable:
    features = PAIR_FEATURES if pairs else FEATURES
    table = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return PairTable(table) if pairs else ExampleTable(table)


@dataclass
class PreparedData:
    train: MixedExamples  # over PairTables with data.format=preference
    evals: dict  # source name -> its eval ExampleTable or PairTable (possibly empty)
    eval_records: list  # the first eval rows as dicts, for exact match
    eval_format: str  # their format
    # the training rows and their tokenizer: a resume compares it with its checkpoint's
    fingerprint: str | None = None
    # training pairs whose chosen and rejected truncation made the same (None: not pairs)
    identical_pairs: int | None = None


def prepare_data(cfg: Config, tokenizer, ranks: Ranks,
                 sources: list[SourceRows]) -> PreparedData:
    """Tokenized train (the mixture) and eval examples of the sources `load_splits` read."""
    tables, evals = [], {}
    for source in sources:
        key = fingerprint(cfg, tokenizer, source)
        folders = {name: cache_dir() / "tokenized" / f"{key}-{name}" for name in ("train", "eval")}
        splits = {"train": (source.train, "training"),
                  "eval": (source.eval.select(range(min(len(source.eval),
                                                        cfg.eval.max_loss_samples))), "eval")}

        def build(source=source, folders=folders, splits=splits) -> None:
            for name, (rows, split) in splits.items():
                if not folders[name].is_dir():  # renamed into place once complete
                    tokenize_records(rows, cfg, tokenizer, split, folders[name], source.format)

        build_once(list(folders.values()), build, ranks.local_rank,
                   f"tokenizing {source.spec.name} ({len(source.train):,} rows)")
        tables.append(load_tokenized(folders["train"]))
        evals[source.spec.name] = load_tokenized(folders["eval"])
    barrier()  # every rank has its tables: the waiting is over, this one is quick
    identical = [identical_pairs(cfg, source, table, ranks.is_main)
                 for source, table in zip(sources, tables)]
    specs = [s.spec for s in sources]
    train = mix(tables, [s.name for s in specs], [s.weight for s in specs],
                [s.fraction for s in specs], cfg.train.seed)
    fmt = sources[0].format
    records = []
    for source in sources:  # exact match reads one format: the first source's
        if source.format == fmt and len(records) < cfg.eval.exact_match_samples:
            wanted = min(len(source.eval), cfg.eval.exact_match_samples - len(records))
            records += [row if len(sources) == 1 else {"task": source.spec.name, **row}
                        for row in source.eval.select(range(wanted))]
    return PreparedData(train, evals, records, fmt, rows_fingerprint(sources, tokenizer),
                        sum(identical) if fmt == "preference" else None)


def identical_pairs(cfg: Config, source: SourceRows, table: ExampleTable, warn: bool) -> int:
    """How many of a source's training pairs truncation left with the same chosen and rejected
    tokens (read from the table, so a warm cache knows too). Such a pair is scored ln 2 and
    pulls towards neither response: a majority is refused, a minority warned about."""
    if not isinstance(table, PairTable) or not len(table):
        return 0
    rows = table.table.select_columns(["identical_row"]).with_format("arrow")[:] \
        ["identical_row"].to_numpy()
    rows = rows[rows >= 0]
    if not len(rows):
        return 0
    count, total, limit = len(rows), len(table), cfg.data.max_seq_len
    where = train_row_location(source, int(rows.min()))
    if 2 * count > total:
        raise DtuneError(
            f"{count} of the {total} training pairs of {source.spec.name} become identical "
            f"when cut to data.max_seq_len={limit} tokens: their chosen and rejected responses "
            f"differ only past the cut (the first: {where}), so they would train nothing (a "
            f"loss of ln 2 that prefers neither). Raise data.max_seq_len, or shorten the "
            "prompts so that the responses' differences fit.")
    if warn:
        log.warning("%d of the %d training pairs of %s become identical when cut to "
                    "data.max_seq_len=%d tokens (the first: %s) and train nothing; raise "
                    "data.max_seq_len to keep their differences.", count, total,
                    source.spec.name, limit, where)
    return count


def load_tokenized(folder: Path) -> ExampleTable:
    """The examples a finished `tokenize_records` left in `folder` (one file per process)."""
    done = json.loads((folder / "done.json").read_text())
    files, pairs = done["files"], done.get("pairs", False)
    if not files:
        return empty_table(pairs)
    parts = [datasets.Dataset.from_file(str(folder / name)) for name in files]
    table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return PairTable(table) if pairs else ExampleTable(table)


def tokenize_records(records, cfg: Config, tokenizer, split: str, folder: Path | None = None,
                     fmt: str | None = None) -> ExampleTable:
    """Tokenize `records` (a `datasets.Dataset` or a list of dicts) in `fmt` (default:
    data.format) with data.num_proc processes; with `folder`, write the Arrow files there,
    completed by `done.json`. Preference rows become a PairTable, any other an ExampleTable."""
    datasets.disable_progress_bars()
    d = cfg.data
    fmt = fmt or ("chat" if d.format == "sharegpt" else d.format)
    pairs = fmt == "preference"
    if not isinstance(records, datasets.Dataset):
        records = datasets.Dataset.from_list(list(records))
    if not len(records):  # an empty eval split
        if folder is not None:
            with atomic_dir(folder) as tmp:
                (tmp / "done.json").write_text(json.dumps({"files": [], "rows": 0,
                                                           "pairs": pairs}))
            return load_tokenized(folder)
        return empty_table(pairs)
    batch_tokenizer = _pair_batches if pairs else _example_batches
    announce = len(records) >= ANNOUNCE_ROWS
    if announce:
        log.info("Tokenizing %s %s rows (data.num_proc=%d)%s", f"{len(records):,}", split,
                 d.num_proc, "; cached: later runs with the same rows and tokenizer skip this"
                 if folder is not None else "")
    started = time.perf_counter()
    table = _map(records, batch_tokenizer(cfg, tokenizer, fmt), cfg, folder, pairs)
    if announce:
        log.info("Tokenized %s %s rows in %.0f s", f"{len(records):,}", split,
                 time.perf_counter() - started)
    emptied = len(records) - len(table)
    if emptied:
        log.warning("%d of %d %s examples lost their whole response to data.max_seq_len=%d "
                    "and were dropped.", emptied, len(records), split, d.max_seq_len)
    if not len(table) and split != "eval":
        raise DtuneError(
            f"every {split} example is longer than data.max_seq_len={d.max_seq_len} "
            "before its response starts, so nothing would be trained; raise data.max_seq_len."
        )
    return table


def _example_batches(cfg: Config, tokenizer, fmt: str):
    d = cfg.data

    def tokenize_batch(batch: dict) -> dict:
        out = {"input_ids": [], "labels": [], "length": []}
        for index in range(len(next(iter(batch.values())))):
            record = {column: values[index] for column, values in batch.items()}
            example = tokenize(record, fmt, tokenizer, d.max_seq_len, d.train_on_inputs,
                               d.system_prompt)
            if all(label == IGNORE for label in example.labels[1:]):
                continue  # truncation cut off the whole response
            out["input_ids"].append(example.input_ids)
            out["labels"].append(example.labels)
            out["length"].append(len(example.input_ids))
        return out

    return tokenize_batch


def _pair_batches(cfg: Config, tokenizer, fmt: str):
    d = cfg.data

    def tokenize_batch(batch: dict, rows: list[int]) -> dict:
        out = {name: [] for name in PAIR_FEATURES}
        for index, row in enumerate(rows):
            record = {column: values[index] for column, values in batch.items()}
            pair = tokenize_pair(record, tokenizer, d.max_seq_len, d.system_prompt)
            if pair is None:
                continue  # a response kept no loss-carrying token
            for side, example in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                out[f"{side}_input_ids"].append(example.input_ids)
                out[f"{side}_labels"].append(example.labels)
            out["length"].append(pair.length)
            same = pair.chosen.input_ids == pair.rejected.input_ids
            out["identical_row"].append(row if same else -1)
        return out

    return tokenize_batch


def _map(records: datasets.Dataset, tokenize_batch, cfg: Config, folder: Path | None,
         pairs: bool = False):
    # Fewer rows than processes would leave processes with nothing to do (datasets refuses).
    num_proc = max(1, min(cfg.data.num_proc, len(records)))
    # pairs get each row's index in `records` (with num_proc, datasets offsets each worker's)
    common = dict(batched=True, remove_columns=records.column_names, with_indices=pairs,
                  features=PAIR_FEATURES if pairs else FEATURES,
                  num_proc=num_proc if num_proc > 1 else None)
    if folder is None:
        table = records.map(tokenize_batch, keep_in_memory=True, **common)
        return PairTable(table) if pairs else ExampleTable(table)
    with atomic_dir(folder) as tmp:
        # datasets names each process's file part_0000N_of_0000M.arrow
        _write(records.map(tokenize_batch, cache_file_name=str(tmp / "part.arrow"),
                           load_from_cache_file=False, **common), tmp, pairs)
    return load_tokenized(folder)


def _write(table: datasets.Dataset, folder: Path, pairs: bool = False) -> datasets.Dataset:
    files = sorted(Path(f["filename"]).name for f in table.cache_files)
    (folder / "done.json").write_text(json.dumps({"files": files, "rows": len(table),
                                                  "pairs": pairs}))
    return table


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(),
                                                                     sort_keys=True)
    return hashlib.sha256(vocab.encode()).hexdigest()


def rows_fingerprint(sources: list[SourceRows], tokenizer) -> str:
    """The training rows of every source (datasets' fingerprints, which follow the files'
    contents and the hub revision) and the tokenizer with its chat template: what a resumed
    run must train on to continue the same training."""
    payload = json.dumps({"rows": [s.train._fingerprint for s in sources],
                          "tokenizer": tokenizer_fingerprint(tokenizer),
                          "chat_template": getattr(tokenizer, "chat_template", None)},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def fingerprint(cfg: Config, tokenizer, source: SourceRows) -> str:
    """Changes whenever a source's tokenized examples could: its rows (datasets' own
    fingerprint of them, which follows the files, the hub revision and every selection), how
    they are read (format, columns, split), the tokenizer and its chat template, and the
    formatting settings."""
    d = cfg.data
    spec = {k: v for k, v in asdict(source.spec).items() if k not in ("weight", "fraction")}
    payload = json.dumps({
        "version": CACHE_VERSION,
        "source": spec,
        "rows": [source.train._fingerprint, source.eval._fingerprint],
        "builtin": asdict(d.builtin) if source.spec.path == "builtin" else None,
        "settings": {"max_seq_len": d.max_seq_len, "train_on_inputs": d.train_on_inputs,
                     "system_prompt": d.system_prompt, "chat_template": d.chat_template},
        "max_loss_samples": cfg.eval.max_loss_samples,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizer_class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
    }, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]
