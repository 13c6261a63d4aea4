"""Read every source of the run through `datasets` and check every row before training starts.

Rows stay Arrow tables (memory-mapped, never a list of dicts) and are checked batch by batch.
Errors name the file and the line (JSONL, CSV) or record (JSON, Parquet, hub, saved) of the
bad row. A source checked once is not checked again while its files are unchanged.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq

from dtune.cache import build_once, cache_dir
from dtune.config import DataConfig
# the module by its path: the package's entry point (dtune/data/__init__.py) imports this one
import dtune.data.builtin as builtin
from dtune.data.sources import (SourceSpec, load_arguments, open_source, saved_to_disk,
                                source_specs)
from dtune.errors import DtuneError, excerpt
from dtune.files import write_atomically

TEXT_SUFFIXES = (".jsonl", ".json", ".csv")  # read as UTF-8 text; parquet is binary
ROLES = ("system", "user", "assistant")
CHECK_VERSION = 1
BATCH = 1000  # rows turned into Python objects at a time while checking
HERE = "\x00where\x00"  # stands for a row's location in messages until an error needs it


@dataclass
class SourceRows:
    """One source's checked rows: train and eval, Arrow-backed, in dtune's fields."""

    spec: SourceSpec
    train: datasets.Dataset
    eval: datasets.Dataset  # may hold no rows
    # where each train row sits in the split as read, when eval rows were held out of it
    # (None: the train rows are the split's, in order); for messages that name a row
    train_rows: np.ndarray | None = None

    @property
    def format(self) -> str:
        return self.spec.row_format


def load_splits(cfg: DataConfig, local_rank: int = 0) -> list[SourceRows]:
    """Every source `cfg` names, with its train and eval rows checked for its format.

    On a machine with several ranks, local rank 0 checks each source and the others wait
    for it and then open the same (now cached) rows. The settings themselves were checked
    before launch (dtune/data/settings.py)."""
    return [load_source(spec, cfg, local_rank) for spec in source_specs(cfg)]


def load_source(spec: SourceSpec, cfg: DataConfig, local_rank: int = 0) -> SourceRows:
    if spec.path == "builtin":
        b = cfg.builtin
        make = builtin.generate_pairs if spec.format == "preference" else builtin.generate
        train, held = make(list(b.tasks), b.train_size, b.eval_size, b.seed,
                           options=builtin.TaskOptions(b.document_lines))
        return SourceRows(spec, datasets.Dataset.from_list(train),
                          datasets.Dataset.from_list(held))
    train = read_rows(spec, spec.split, local_rank)
    eval_key = spec.key.replace(".path", ".eval_path")
    if spec.eval_path:
        eval_spec = replace(spec, path=spec.eval_path, key=eval_key)
        return SourceRows(spec, train, read_rows(eval_spec, spec.eval_split or "train",
                                                 local_rank))
    if spec.eval_split:
        return SourceRows(spec, train, read_rows(spec, spec.eval_split, local_rank))
    if cfg.eval_fraction == 0:
        return SourceRows(spec, train, train.select([]))
    return SourceRows(spec, *hold_out(train, cfg.eval_fraction, spec))


def hold_out(rows: datasets.Dataset, fraction: float, spec: SourceSpec):
    """(train, eval, the train rows' indices in `rows`): a fixed-seed `fraction` of the rows
    held out, as Arrow selections."""
    n_eval = max(1, int(len(rows) * fraction))
    if n_eval >= len(rows):
        raise DtuneError(
            f"data.eval_fraction={fraction} leaves no training rows from the "
            f"{len(rows)} in {spec.path}; lower it or give data.eval_path.")
    # A fixed shuffle, independent of train.seed, so every run of a sweep holds out the same
    # rows; each part keeps the file's order.
    held = np.zeros(len(rows), dtype=bool)
    held[np.random.default_rng(0).permutation(len(rows))[:n_eval]] = True
    base, kept = rows._fingerprint, np.flatnonzero(~held)
    return (rows.select(kept, new_fingerprint=_digest(base, fraction, "train")),
            rows.select(np.flatnonzero(held), new_fingerprint=_digest(base, fraction, "eval")),
            kept)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def read_records(path_str: str, fmt: str, key: str) -> datasets.Dataset:
    """The checked rows of one file, folder or hub dataset (its train split)."""
    spec = SourceSpec(name="data", path=path_str, format=fmt, key=key)
    return read_rows(spec, "train")


def read_rows(spec: SourceSpec, split: str, local_rank: int = 0) -> datasets.Dataset:
    """`split` of `spec`, every row checked for `spec.format` (once per unchanged source)."""
    files = _split_files(spec, split)
    checked = cache_dir() / "checked" / f"{_check_key(spec, split, files)}.ok"

    def check() -> None:
        for path in files:
            _check_text_file(path, spec)
        rows = _opened(spec, split)
        validate_rows(rows, spec, split, files)
        write_atomically(checked, "ok\n")  # not through a link planted in the cache

    if not checked.is_file():
        build_once([checked], check, local_rank, f"checking {spec.path}")
    return _opened(spec, split)


def train_row_location(source: SourceRows, index: int) -> str:
    """Where train row `index` of `source` came from: file and line, or record (the row
    number of built-in and hub data)."""
    if source.train_rows is not None:
        index = int(source.train_rows[index])
    spec = source.spec
    files = [] if spec.path == "builtin" else _split_files(spec, spec.split)
    return _where(spec, spec.split, files, index)


def _split_files(spec: SourceSpec, split: str) -> list[Path]:
    """The local files `split` of `spec` is read from (none for a hub dataset)."""
    return _local_files(None if _is_saved(spec) else load_arguments(spec, split))


def _is_saved(spec: SourceSpec) -> bool:
    path = Path(spec.path).expanduser()
    return path.is_dir() and saved_to_disk(path)


def _local_files(arguments: dict | None) -> list[Path]:
    if not arguments or "data_files" not in arguments:
        return []
    return [Path(f) for files in arguments["data_files"].values() for f in files]


def _check_key(spec: SourceSpec, split: str, files: list[Path]) -> str:
    """Changes whenever the rows could: the source's settings, and each local file's size and
    modification time (a save_to_disk folder: its state; a hub dataset: its id and revision)."""
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    path = Path(spec.path).expanduser()
    for name in ("state.json", "dataset_dict.json", "dataset_info.json"):
        if path.is_dir() and (path / name).is_file():
            stats.append([name, (path / name).read_text()])
    fields = {k: v for k, v in asdict(spec).items() if k not in ("name", "weight", "fraction")}
    return _digest(CHECK_VERSION, fields, split, stats)


def _opened(spec: SourceSpec, split: str) -> datasets.Dataset:
    rows = open_source(spec, split)
    if not len(rows):
        raise DtuneError(f"{spec.key}={spec.path!r} holds no records"
                         f"{'' if split == 'train' else f' in its {split!r} split'}.")
    return rows


def _check_text_file(path: Path, spec: SourceSpec) -> None:
    if path.stat().st_size == 0:
        raise DtuneError(f"{spec.key}={spec.path!r}: {path} is empty; it must hold at least "
                         "one record.")
    if path.suffix.lower() in TEXT_SUFFIXES:
        _check_utf8(path)
    if path.suffix.lower() == ".jsonl":
        _check_jsonl_lines(path)


def validate_rows(rows: datasets.Dataset, spec: SourceSpec, split: str,
                  files: list[Path]) -> None:
    """Check every row for `spec.format`, `BATCH` rows at a time; an error names the row's
    file and line (or record)."""
    fmt = "sharegpt" if spec.format == "sharegpt" else spec.row_format
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        columns = list(batch)
        for offset in range(len(batch[columns[0]]) if columns else 0):
            row = {c: batch[c][offset] for c in columns}
            try:
                validate_record(row, fmt, HERE)
            except DtuneError as exc:
                where = _where(spec, split, files, start + offset)
                raise DtuneError(str(exc).replace(HERE, where)) from None


def _check_utf8(path: Path) -> None:
    # Line by line in bytes: a newline byte never occurs inside a UTF-8 character, so the line
    # and byte offset of the first bad byte come out exact, in bounded memory per line.
    offset = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DtuneError(
                    f"{path}, line {number}: the byte 0x{line[exc.start]:02x} at byte offset "
                    f"{offset + exc.start} of the file is not UTF-8 ({exc.reason}); dtune "
                    f"reads {path.suffix} files as UTF-8. "
                    f"Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > "
                    f"{path.with_name(path.stem + '.utf8' + path.suffix)}` if it is Latin-1."
                ) from None
            offset += len(line)


def _check_jsonl_lines(path: Path) -> None:
    # `datasets` reports a bad line as an Arrow error without its number; find it first.
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DtuneError(
                    f"{path}, line {number}: malformed JSON ({exc.msg} at column {exc.colno}). "
                    "Each line of a .jsonl file must be one JSON object."
                ) from None
            except RecursionError:
                raise too_deep(path, number) from None
            if not isinstance(value, dict):
                raise DtuneError(
                    f"{path}, line {number}: expected a JSON object, found "
                    f"{type(value).__name__}. Each line of a .jsonl file must be one object."
                )


def too_deep(path: Path, number: int | None = None) -> DtuneError:
    where = f"{path}, line {number}" if number else str(path)
    return DtuneError(
        f"{where}: a record nests lists or objects inside each other deeper than can be read "
        "(hundreds of levels), and dtune's formats need a few (a list of messages, each an "
        "object with strings). Flatten that record or drop it.")


def _where(spec: SourceSpec, split: str, files: list[Path], index: int) -> str:
    """Where row `index` of the split came from: file and line, or record. Counted only when a
    row is bad, so a good dataset costs no second read."""
    if not files or "[" in split:
        return f"{spec.path} (split {split}), record {index + 1}"
    for path in files:
        count = _row_count(path)
        if index < count:
            break
        index -= count
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return f"{path}, line {_jsonl_line_number(path, index)}"
    if suffix == ".csv":
        return f"{path}, line {index + 2}"  # line 1 is the header
    return f"{path}, record {index + 1}"


def _row_count(path: Path) -> int:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            return max(sum(1 for _ in csv.reader(handle)) - 1, 0)
    if suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if suffix == ".arrow":
        return len(datasets.Dataset.from_file(str(path)))
    value = json.loads(path.read_text(encoding="utf-8"))
    return len(value) if isinstance(value, list) else 1


def _jsonl_line_number(path: Path, index: int) -> int:
    seen = -1
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return number
    return index + 1


def _require_string(row: dict, column: str, where: str, fmt: str, allow_empty=False) -> str:
    if column not in row or row[column] is None:
        present = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
        raise DtuneError(
            f"{where}: the column {column!r} is missing (data.format={fmt} needs it; "
            f"columns present: {present})."
        )
    value = row[column]
    if not isinstance(value, str):
        raise DtuneError(
            f"{where}: the column {column!r} must be a string, found "
            f"{type(value).__name__} {excerpt(value)}."
        )
    if not allow_empty and not value.strip():
        raise DtuneError(f"{where}: the column {column!r} is empty; give it text or drop the row.")
    return value


def validate_record(row: dict, fmt: str, where: str) -> None:
    """Raise a DtuneError naming `where` if `row` cannot be trained on under `fmt`."""
    if fmt == "text":
        _require_string(row, "text", where, fmt)
    elif fmt == "alpaca":
        _require_string(row, "instruction", where, fmt)
        _require_string(row, "output", where, fmt)
        if row.get("input") is not None:
            _require_string(row, "input", where, fmt, allow_empty=True)
    elif fmt in ("chat", "sharegpt"):  # sharegpt rows arrive converted to chat
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DtuneError(
                f"{where}: data.format={fmt} needs a non-empty "
                f"{'conversations' if fmt == 'sharegpt' else 'messages'!r} list of "
                f"{'{from, value}' if fmt == 'sharegpt' else '{role, content}'} objects."
            )
        for turn, message in enumerate(messages, start=1):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ROLES:
                accepted = "human, gpt, system (or user, assistant)" if fmt == "sharegpt" \
                    else ", ".join(ROLES)
                raise DtuneError(
                    f"{where}: message {turn} has the role {excerpt(role, 80)}; roles must be "
                    f"one of {accepted}."
                )
            _require_string(message, "content", f"{where}, message {turn}", fmt,
                            allow_empty=role != "assistant")
        if not any(m["role"] == "assistant" for m in messages):
            raise DtuneError(
                f"{where}: the conversation has no assistant message, so nothing would be "
                "trained; add one or drop the row."
            )
    elif fmt == "preference":
        validate_pair(row, where)


def validate_pair(row: dict, where: str) -> None:
    """A preference row: `prompt` or `messages` ending in a user turn, and two different,
    non-empty string responses."""
    has_prompt, has_messages = row.get("prompt") is not None, row.get("messages") is not None
    if has_prompt == has_messages:
        raise DtuneError(
            f"{where}: data.format=preference needs the prompt as either a 'prompt' string or "
            f"chat 'messages' ending in a user turn, and this row has "
            f"{'both' if has_prompt else 'neither'}; keep one (data.columns maps yours, e.g. "
            "data.columns={prompt: question}).")
    if has_prompt:
        _require_string(row, "prompt", where, "preference")
    else:
        _check_prompt_messages(row["messages"], where)
    for side in ("chosen", "rejected"):
        _require_string(row, side, where, "preference")
    if row["chosen"].strip() == row["rejected"].strip():
        raise DtuneError(
            f"{where}: 'chosen' and 'rejected' are the same response "
            f"({excerpt(row['chosen'], 80)}), so the pair prefers nothing; give a different "
            "rejected response or drop the row.")


def _check_prompt_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DtuneError(
            f"{where}: data.format=preference needs 'messages' to be a non-empty list of "
            "{role, content} objects (the prompt), found "
            f"{type(messages).__name__} {excerpt(messages, 80)}.")
    for turn, message in enumerate(messages, start=1):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise DtuneError(f"{where}: message {turn} has the role {excerpt(role, 80)}; roles "
                             f"must be one of {', '.join(ROLES)}.")
        _require_string(message, "content", f"{where}, message {turn}", "preference",
                        allow_empty=role != "user")
    if messages[-1]["role"] != "user":
        raise DtuneError(
            f"{where}: the prompt 'messages' end with a turn of the role "
            f"{messages[-1]['role']!r}; for data.format=preference they must end with the "
            "user turn the responses answer "
            "(the responses go in 'chosen' and 'rejected', not in 'messages').")
