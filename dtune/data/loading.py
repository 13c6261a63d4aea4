"""Read dataset files through `datasets` and check every row before any training starts.

Errors name the file and the line (JSONL, CSV) or row (JSON, Parquet) of the bad record.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import datasets

from dtune.config import DataConfig
from dtune.data import builtin
from dtune.errors import DtuneError

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")  # read as UTF-8 text; parquet is binary
ROLES = ("system", "user", "assistant")


def load_splits(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """Return (train records, eval records), each validated for `cfg.format`."""
    if cfg.path == "builtin":
        if cfg.format != "chat":
            raise DtuneError(
                f"data.format={cfg.format!r} does not fit data.path=builtin, whose records are "
                "chat conversations; use data.format=chat."
            )
        b = cfg.builtin
        return builtin.generate(list(b.tasks), b.train_size, b.eval_size, b.seed)
    train = read_records(cfg.path, cfg.format, "data.path")
    if cfg.eval_path:
        return train, read_records(cfg.eval_path, cfg.format, "data.eval_path")
    if cfg.eval_fraction == 0:
        return train, []
    # A fixed shuffle, independent of train.seed, so every run of a sweep holds out the same rows.
    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    n_eval = max(1, int(len(train) * cfg.eval_fraction))
    if n_eval >= len(train):
        raise DtuneError(
            f"data.eval_fraction={cfg.eval_fraction} leaves no training rows from the "
            f"{len(train)} in {cfg.path}; lower it or give data.eval_path."
        )
    eval_ids = set(order[:n_eval])
    return (
        [r for i, r in enumerate(train) if i not in eval_ids],
        [r for i, r in enumerate(train) if i in eval_ids],
    )


def read_records(path_str: str, fmt: str, key: str) -> list[dict]:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise DtuneError(f"{key}={path_str!r}: no such file. Check the path (relative paths are "
                         f"taken from the directory you ran dtune in).")
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DtuneError(
            f"{key}={path_str!r} has the extension {path.suffix!r}, which dtune cannot read; "
            f"use one of {', '.join(LOADERS)}."
        )
    if path.stat().st_size == 0:
        raise DtuneError(f"{key}={path_str!r} is empty; it must hold at least one record.")
    if path.suffix.lower() in TEXT_SUFFIXES:
        _check_utf8(path)
    if path.suffix.lower() == ".jsonl":
        _check_jsonl_lines(path)
    rows = _load_with_datasets(path, loader)
    if not rows:
        raise DtuneError(f"{key}={path_str!r} holds no records.")
    for index, row in enumerate(rows):
        validate_record(row, fmt, _where(path, index))
    return rows


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
            if not isinstance(value, dict):
                raise DtuneError(
                    f"{path}, line {number}: expected a JSON object, found "
                    f"{type(value).__name__}. Each line of a .jsonl file must be one object."
                )


def _load_with_datasets(path: Path, loader: str) -> list[dict]:
    datasets.disable_progress_bars()
    # CSV has no types: read every cell as text, so "42" stays the answer "42" and "" stays "".
    extra = {}
    if loader == "csv":
        with path.open(encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle), [])
        extra = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                 "keep_default_na": False}
    try:
        table = datasets.load_dataset(loader, data_files=str(path), split="train", **extra)
    except Exception as exc:  # datasets/Arrow raise many types; the user needs the file name
        cause = " ".join(str(exc).split())[:300]
        raise DtuneError(
            f"{path} could not be read as {loader}: {cause}. Check that every record has the "
            "same fields with the same types."
        ) from None
    return table.to_list()


def _where(path: Path, index: int) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return f"{path}, line {_jsonl_line_number(path, index)}"
    if suffix == ".csv":
        return f"{path}, line {index + 2}"  # line 1 is the header
    return f"{path}, record {index + 1}"


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
            f"{type(value).__name__} {value!r}."
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
    elif fmt == "chat":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DtuneError(
                f"{where}: data.format=chat needs a non-empty 'messages' list of "
                "{role, content} objects."
            )
        for turn, message in enumerate(messages, start=1):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ROLES:
                raise DtuneError(
                    f"{where}: message {turn} has the role {role!r}; roles must be one of "
                    f"{', '.join(ROLES)}."
                )
            _require_string(message, "content", f"{where}, message {turn}", fmt,
                            allow_empty=role != "assistant")
        if not any(m["role"] == "assistant" for m in messages):
            raise DtuneError(
                f"{where}: the conversation has no assistant message, so nothing would be "
                "trained; add one or drop the row."
            )
