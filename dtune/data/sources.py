"""Where a dataset's rows come from: `data.path` or each of `data.sources`, opened through
`datasets` and renamed to dtune's fields.

A path is, in the order tried: `builtin`; a file; a `save_to_disk` folder; a folder of shards;
a glob of shards (.parquet, .jsonl, .json, .csv, .arrow); a hub dataset id `org/name`. Hub
datasets are read through `datasets.load_dataset`, which offline (HF_DATASETS_OFFLINE=1 or
HF_HUB_OFFLINE=1) serves the copy an earlier online load left in the `datasets` cache
(`$HF_DATASETS_CACHE/org___name/<subset>/<version>/<commit>/`).

Opened rows stay Arrow tables, memory-mapped from the `datasets` cache or the saved folder:
nothing here turns them into Python objects.
"""
from __future__ import annotations

import csv
import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets

from dtune.cache import cache_dir
from dtune.config import DataConfig
from dtune.errors import DtuneError
from dtune.hub import hub_reachable

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
            ".arrow": "arrow"}
# How `datasets` and Arrow word a record nested too deeply to read.
TOO_DEEP = re.compile(r"recursion|depth limit|nesting depth", re.IGNORECASE)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The fields each format reads; `data.columns` may map these (and `task`, the exact-match group).
FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",),
          "text": ("text",), "sharegpt": ("conversations",),
          "preference": ("prompt", "messages", "chosen", "rejected")}
# ShareGPT's `from` values, and the chat role each becomes.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


@dataclass
class SourceSpec:
    """One dataset to read, with every setting resolved (a source's unset fields take data.*)."""

    name: str  # unique label: metrics, summary and cache files
    path: str
    format: str = "alpaca"
    subset: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    columns: dict = field(default_factory=dict)  # dtune field -> dataset column
    weight: Optional[float] = None
    fraction: Optional[float] = None
    eval_path: Optional[str] = None
    eval_split: Optional[str] = None
    key: str = "data.path"  # the setting that named `path`, for messages

    @property
    def row_format(self) -> str:
        """The format of the rows `open_source` returns: ShareGPT comes back as chat."""
        return "chat" if self.format == "sharegpt" else self.format


def source_specs(cfg: DataConfig) -> list[SourceSpec]:
    """The datasets `cfg` names: data.path as one source, or each of data.sources."""
    if not cfg.sources:
        return [_checked(SourceSpec(
            name=default_name(cfg.path), path=cfg.path, format=cfg.format, subset=cfg.subset,
            split=cfg.split, revision=cfg.revision, columns=dict(cfg.columns or {}),
            eval_path=cfg.eval_path, eval_split=cfg.eval_split))]
    if cfg.path not in (None, "builtin"):
        raise DtuneError(
            f"data.path={cfg.path!r} and data.sources are both set; give one: a mixture lists "
            "every dataset in data.sources (set data.path=null, or use data=mixture).")
    specs, taken = [], set()
    for index, source in enumerate(cfg.sources):
        def unset_or(mine, inherited):
            return inherited if mine is None else mine

        name = source.name or default_name(source.path)
        if source.name and source.name in taken:
            raise DtuneError(
                f"data.sources[{index}].name={source.name!r} is used by another source; "
                "each source needs its own name (it labels its metrics).")
        base, n = name, 2
        while name in taken:  # two shards called train.jsonl: train, train-2
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        specs.append(_checked(SourceSpec(
            name=name, path=source.path, format=unset_or(source.format, cfg.format),
            subset=unset_or(source.subset, cfg.subset), split=unset_or(source.split, cfg.split),
            revision=unset_or(source.revision, cfg.revision),
            columns=dict(unset_or(source.columns, cfg.columns) or {}),
            weight=source.weight, fraction=source.fraction,
            # data.eval_path is one file for the whole run, not one per source
            eval_path=source.eval_path, eval_split=unset_or(source.eval_split, cfg.eval_split),
            key=f"data.sources[{index}].path")))
    pairs = [s.name for s in specs if s.format == "preference"]
    if pairs and len(pairs) < len(specs):
        # A batch is either pairs (a preference objective) or examples (SFT), never both.
        raise DtuneError(
            f"data.sources: {', '.join(pairs)} hold preference pairs (format=preference) and "
            f"{', '.join(s.name for s in specs if s.format != 'preference')} do not; a run "
            "trains on one kind. Give every source format=preference, or none.")
    return specs


def _checked(spec: SourceSpec) -> SourceSpec:
    known = (*FIELDS[spec.format], "task")
    columns_key = spec.key.replace(".path", ".columns")
    for dtune_field, column in spec.columns.items():
        if dtune_field not in known:
            raise DtuneError(
                f"{columns_key} maps {dtune_field!r}, which format={spec.format} does not read; "
                f"the keys are dtune's fields ({', '.join(known)}) and the values your "
                f"dataset's columns, e.g. {columns_key}={{{known[0]}: your_column}}.")
        if not isinstance(column, str) or not column:
            raise DtuneError(
                f"{columns_key}.{dtune_field}={column!r} must be the name of a column of the "
                "dataset.")
    return spec


def default_name(path: Optional[str]) -> str:
    """A label from a path: the hub name, the file's stem, the folder, or a glob's folder."""
    if not path:
        return "data"
    if glob.has_magic(path):
        fixed = re.split(r"[*?\[]", path, maxsplit=1)[0]  # "data/shards/" or "data/shard-"
        name = (Path(fixed) if fixed.endswith("/") else Path(fixed).parent).name
    else:
        candidate = Path(path.rstrip("/"))
        name = candidate.stem if candidate.suffix.lower() in BUILDERS else candidate.name
    return re.sub(r"[^\w.-]", "_", name) or "data"


def saved_to_disk(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def load_arguments(spec: SourceSpec, split: str) -> dict:
    """Keyword arguments for `datasets.load_dataset` that read `split` of `spec.path`."""
    path = Path(spec.path).expanduser()
    if spec.path == "builtin":
        raise DtuneError(f"{spec.key}=builtin is generated by dtune, not read by datasets.")
    if path.is_file():
        files, split_name = [path], _single_split(spec, split, "a file")
    elif path.is_dir() and saved_to_disk(path):
        files, split_name = _saved_arrow_files(path, spec, split), "train"
        split = split.replace(_base_split(split), "train", 1)
    elif path.is_dir():
        files, split_name = _folder_files(path, spec, split), _base_split(split)
    elif glob.has_magic(spec.path):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DtuneError(f"{spec.key}={spec.path!r}: the glob matches no file. Check the "
                             "pattern (relative paths are taken from the directory you ran "
                             "dtune in).")
        split_name = _single_split(spec, split, "a glob")
    elif HUB_ID.match(spec.path):
        hub_reachable()  # offline: the datasets cache at once, not half a minute of retries
        return {"path": spec.path, "name": spec.subset, "revision": spec.revision,
                "split": split}
    else:
        raise DtuneError(
            f"{spec.key}={spec.path!r}: no such file, folder or glob match, and not a hub "
            "dataset id (org/name). dtune looked for a local file or folder of that name "
            "(relative paths are taken from the directory you ran dtune in); give a "
            ".jsonl/.json/.csv/.parquet file, a folder or glob of them, a save_to_disk folder, "
            "or a hub id such as tatsu-lab/alpaca.")
    builder = _one_builder(files, spec)
    arguments = {"path": builder, "data_files": {split_name: [str(f) for f in files]},
                 "split": split}
    if builder == "csv":
        # CSV has no types: every cell is text, so "42" stays "42" and "" stays "".
        arguments.update(features=_csv_features(files[0]), keep_default_na=False)
    return arguments


def _base_split(split: str) -> str:
    return re.split(r"[\[+]", split, maxsplit=1)[0].strip()


def _single_split(spec: SourceSpec, split: str, what: str) -> str:
    if _base_split(split) != "train":
        key = spec.key.replace(".path", ".split")
        raise DtuneError(
            f"{key}={split!r}: {spec.key}={spec.path!r} is {what}, and its rows form one split, "
            "train (slices such as train[:90%] work). For separate evaluation rows give "
            f"{spec.key.replace('.path', '.eval_path')}, or a folder with train/test files.")
    return "train"


def _folder_files(folder: Path, spec: SourceSpec, split: str) -> list[Path]:
    """The data files of `split` in a folder, as `datasets` assigns files to splits (train-*,
    test-*, train/ and test/ sub-folders; every file is train if none is named)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except Exception:  # EmptyDatasetError and the like: no data file at all
        found = {}
    by_split = {name: sorted(Path(f) for f in files if Path(f).suffix.lower() in BUILDERS)
                for name, files in found.items()}
    by_split = {name: files for name, files in by_split.items() if files}
    if not by_split:
        raise DtuneError(f"{spec.key}={spec.path!r} is a folder without a data file; dtune "
                         f"looked for {', '.join(BUILDERS)} files in it and its sub-folders.")
    base = _base_split(split)
    if base not in by_split:
        raise DtuneError(
            f"{spec.key.replace('.path', '.split')}={split!r}: the folder {spec.path!r} has no "
            f"files of that split; its splits are {', '.join(sorted(by_split))} (from the file "
            "names: train-*, test-*, or train/ and test/ sub-folders).")
    return by_split[base]


def _saved_arrow_files(folder: Path, spec: SourceSpec, split: str) -> list[Path]:
    base = _base_split(split)
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if base not in splits:
            raise DtuneError(
                f"{spec.key.replace('.path', '.split')}={split!r}: the saved dataset "
                f"{spec.path!r} has the splits {', '.join(splits)}; choose one of them.")
        folder = folder / base
    elif base != "train":
        _single_split(spec, split, "a saved Dataset (one split)")
    state = json.loads((folder / "state.json").read_text())
    return [folder / f["filename"] for f in state["_data_files"]]


def _one_builder(files: list[Path], spec: SourceSpec) -> str:
    suffixes = sorted({f.suffix.lower() for f in files})
    unknown = [s for s in suffixes if s not in BUILDERS]
    if unknown:
        raise DtuneError(
            f"{spec.key}={spec.path!r} holds {', '.join(repr(s) for s in unknown)} files, which "
            f"dtune cannot read; use {', '.join(BUILDERS)}.")
    builders = sorted({BUILDERS[s] for s in suffixes})
    if len(builders) > 1:
        raise DtuneError(
            f"{spec.key}={spec.path!r} mixes file types ({', '.join(suffixes)}); one source "
            "reads one type. Put each type in its own folder and list both in data.sources.")
    return builders[0]


def _csv_features(path: Path) -> datasets.Features:
    # errors="replace": a bad byte is reported with its line when the rows are checked
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        header = next(csv.reader(handle), [])
    return datasets.Features({column: datasets.Value("string") for column in header})


def open_source(spec: SourceSpec, split: str, streaming: bool = False):
    """The rows of `split` of `spec` in dtune's fields: a memory-mapped `datasets.Dataset`, or
    an `IterableDataset` with `streaming`. Columns are renamed as `spec.columns` says and
    ShareGPT conversations become chat `messages`."""
    datasets.disable_progress_bars()
    path = Path(spec.path).expanduser()
    if not streaming and path.is_dir() and saved_to_disk(path):
        # load_from_disk maps the saved Arrow files themselves: no copy into the cache
        _saved_arrow_files(path, spec, split)  # names a missing split in words
        saved = datasets.load_from_disk(str(path))
        rows = saved[_base_split(split)] if isinstance(saved, datasets.DatasetDict) else saved
        if "[" in split:
            rows = rows.select(_slice(split, len(rows)))
    else:
        arguments = load_arguments(spec, split)
        try:
            rows = datasets.load_dataset(**arguments, streaming=streaming)
        except DtuneError:
            raise
        except Exception as exc:  # datasets/Arrow/hub raise many types; name what was asked
            raise DtuneError(_load_failure(spec, split, arguments, exc)) from None
    return to_dtune_columns(rows, spec)


def _slice(split: str, count: int) -> range:
    """Rows of a split slice such as train[:90%] or train[100:200], as datasets reads them."""
    instruction = datasets.ReadInstruction.from_spec(split)
    absolute = instruction.to_absolute({_base_split(split): count})[0]
    return range(absolute.from_ or 0, count if absolute.to is None else absolute.to)


def _load_failure(spec: SourceSpec, split: str, arguments: dict, exc: Exception) -> str:
    cause = " ".join(str(exc).split())[:300]
    if "data_files" in arguments:
        files = [f for fs in arguments["data_files"].values() for f in fs]
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        innermost = _innermost(exc)
        if isinstance(innermost, RecursionError) or TOO_DEEP.search(str(innermost)):
            return (f"{spec.key}={spec.path!r}: {_deepest_record(files) or shown} nests lists "
                    "or objects inside each other deeper than can be read "
                    f"({' '.join(str(innermost).split())[:200]}), and dtune's formats need a few "
                    "levels (a list of messages, each an object with strings). Flatten such "
                    "records or drop them.")
        return (f"{spec.key}={spec.path!r}: {shown} could not be read as {arguments['path']}: "
                f"{cause}. Check that every record has the same fields with the same types.")
    return (
        f"{spec.key}={spec.path!r} (subset {spec.subset!r}, split {split!r}, revision "
        f"{spec.revision!r}) could not be loaded from the hub or, offline, from the datasets "
        f"cache: {cause}. Check the id, data.subset and data.split; offline, load it once "
        "online first so that the datasets cache holds it, or save it with save_to_disk and "
        "give that folder.")


def _innermost(exc: BaseException) -> BaseException:
    """The first cause of an error that `datasets` wrapped (often twice)."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def _deepest_record(files: list[str]) -> str | None:
    """`FILE, line N` of the most deeply nested record of the .jsonl files (read only once
    loading has failed for nesting, to name the row)."""
    deepest, where = 0, None
    for name in files:
        if not name.endswith(".jsonl"):
            continue
        with open(name, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                depth = _nesting(line)
                if depth > deepest:
                    deepest, where = depth, f"{name}, line {number}"
    return where


def _nesting(text: str) -> int:
    """How deeply JSON brackets nest in `text`, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def to_dtune_columns(rows, spec: SourceSpec):
    """`rows` with `spec.columns` renamed to dtune's fields, ShareGPT turned into chat."""
    if rows.column_names is None:  # a stream whose columns are unknown until it is read
        if spec.columns:
            rows = rows.rename_columns({c: f for f, c in spec.columns.items() if c != f})
        return rows.map(sharegpt_to_chat, batched=True) if spec.format == "sharegpt" else rows
    present = list(rows.column_names)
    if spec.columns:
        missing = [c for c in spec.columns.values() if c not in present]
        if missing:
            columns_key = spec.key.replace(".path", ".columns")
            mapping = ", ".join(f"{k}: {v}" for k, v in spec.columns.items())
            raise DtuneError(
                f"{columns_key}={{{mapping}}} names the column {missing[0]!r}, which "
                f"{spec.path!r} does not have; its columns are {', '.join(present) or 'none'}. "
                f"Map each of dtune's fields to one of those columns, e.g. "
                f"{columns_key}={{{FIELDS[spec.format][0]}: {present[0] if present else 'x'}}}.")
        # A mapped field wins over a column that already has the field's name.
        clashing = [f for f, c in spec.columns.items() if f in present and f != c]
        if clashing:
            rows = rows.remove_columns(clashing)
        renames = {c: f for f, c in spec.columns.items() if c != f}
        if renames:
            rows = rows.rename_columns(renames)
    if spec.format == "sharegpt":
        names = list(rows.column_names or [])
        if "conversations" not in names:
            raise DtuneError(
                f"{spec.key}={spec.path!r}: format=sharegpt reads the column 'conversations', "
                f"which is missing; the columns are {', '.join(names) or 'none'}. Map yours "
                f"with {spec.key.replace('.path', '.columns')}={{conversations: your_column}}.")
        written = {}
        if isinstance(rows, datasets.Dataset):
            # datasets would write the converted rows beside the source's own Arrow files: for
            # a save_to_disk folder that is the user's folder, which dtune must not write into.
            folder = cache_dir() / "sharegpt"
            folder.mkdir(parents=True, exist_ok=True)
            written = {"cache_file_name": str(folder / f"{rows._fingerprint}.arrow")}
        rows = rows.map(sharegpt_to_chat, batched=True, remove_columns=["conversations"],
                        **written)
    return rows


def sharegpt_to_chat(batch: dict) -> dict:
    """A batch of ShareGPT rows ({from, value} turns) as chat rows ({role, content})."""
    messages = []
    for conversation in batch["conversations"]:
        turns = []
        for turn in conversation or []:
            if not isinstance(turn, dict):
                turns.append({"role": None, "content": None})
                continue
            speaker = turn.get("from", turn.get("role"))
            role = SHAREGPT_ROLES.get(str(speaker).lower(), speaker)
            turns.append({"role": None if role is None else str(role),
                          "content": turn.get("value", turn.get("content"))})
        messages.append(turns)
    return {"messages": messages}
