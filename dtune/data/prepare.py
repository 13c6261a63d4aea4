"""Records to training examples, tokenized once per machine and cached.

With several processes, local rank 0 of each node tokenizes and writes the cache while the
others wait at a barrier, then read it: the work is not repeated per rank, and no rank
races another to write the same file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from dtune.config import Config
from dtune.data.formatting import IGNORE, Example, tokenize
from dtune.distributed import Ranks, barrier
from dtune.errors import DtuneError

log = logging.getLogger("dtune")
CACHE_VERSION = 1


def prepare_data(cfg: Config, tokenizer, ranks: Ranks, train_records: list[dict],
                 eval_records: list[dict]) -> tuple[list[Example], list[Example]]:
    """Tokenized (train examples, eval examples) of the records `load_splits` returned."""
    from dtune.models import cache_dir

    path = cache_dir() / "tokenized" / f"{_fingerprint(cfg, tokenizer)}.pt"
    if ranks.local_rank == 0 and not path.is_file():
        cached = {
            "train": _to_lists(tokenize_records(train_records, cfg, tokenizer, "training")),
            "eval": _to_lists(tokenize_records(eval_records[: cfg.eval.max_loss_samples], cfg,
                                               tokenizer, "eval")),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        torch.save(cached, tmp)
        os.replace(tmp, path)
    barrier()
    cached = torch.load(path, weights_only=True)
    return ([Example(ids, labels) for ids, labels in cached["train"]],
            [Example(ids, labels) for ids, labels in cached["eval"]])


def tokenize_records(records: list[dict], cfg: Config, tokenizer, split: str) -> list[Example]:
    examples, emptied = [], 0
    for record in records:
        example = tokenize(record, cfg.data.format, tokenizer, cfg.data.max_seq_len,
                           cfg.data.train_on_inputs, cfg.data.system_prompt)
        if all(label == IGNORE for label in example.labels[1:]):
            emptied += 1  # truncation cut off the whole response
            continue
        examples.append(example)
    if emptied:
        log.warning("%d of %d %s examples lost their whole response to data.max_seq_len=%d "
                    "and were dropped.", emptied, len(records), split, cfg.data.max_seq_len)
    if records and not examples:
        raise DtuneError(
            f"every {split} example is longer than data.max_seq_len={cfg.data.max_seq_len} "
            "before its response starts, so nothing would be trained; raise data.max_seq_len."
        )
    return examples


def _to_lists(examples: list[Example]) -> list:
    return [[e.input_ids, e.labels] for e in examples]


def _fingerprint(cfg: Config, tokenizer) -> str:
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
