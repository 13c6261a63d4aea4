"""`data.streaming=true`: rows read, checked and tokenized as training goes, for data larger than
memory or the disk cache.

Order: rows come from `open_source(..., streaming=True)` (several sources interleaved with
their weights, seeded by train.seed) and are shuffled in blocks of data.shuffle_buffer rows,
each block by its own seeded permutation. A block, not a running shuffle buffer, because a
block can be re-read exactly: `IterableDataset.state_dict()` is exact for a plain stream but
drops the contents of a `shuffle` buffer (datasets 5.2 refills it on resume), so a resumed run
would see other rows. The position (epoch, the stream's state at the block's start, the offset
in the block) is all a checkpoint holds; a resume re-reads one block, never the whole stream.

Batches follow BatchStream's layout rules (dtune/data/batching.py): padded micro-batches of
train.micro_batch_size examples, or packed rows by the same first-fit; every rank reads the
same global order, and rank r takes block r of each window of accum x world micro-batches.
So every rank reads and tokenizes every row (the price of knowing the global order without
a length). When the stream ends it starts over (the next epoch, each block shuffled anew); a
micro-batch may hold the last rows of one pass and the first of the next.

Eval: data.eval_path / eval_split when given (their first N rows), else the first N rows of
the stream are held out and never trained on (N = the larger of eval.max_loss_samples and
eval.exact_match_samples; data.eval_fraction=0 turns it off). A stream has no length, so
train.max_steps is required.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterator, Optional

import datasets
import numpy as np
import torch

from dtune.config import Config
# the module by its path: the package's entry point (dtune/data/__init__.py) imports this one
import dtune.data.builtin as builtin
from dtune.data.batching import collate, collate_packed, collate_pairs, pack_rows
from dtune.data.formatting import IGNORE, Example, tokenize
from dtune.data.preference import PairExample, tokenize_pair
from dtune.data.loading import validate_record
from dtune.data.sources import SourceSpec, open_source, source_specs
from dtune.errors import DtuneError

log = logging.getLogger("dtune")

START = {"epoch": 0, "block": None, "row": 0, "offset": 0}


def builtin_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """The built-in (train, eval) rows: chat conversations, or with data.format=preference
    the built-in pairs."""
    b = cfg.data.builtin
    make = builtin.generate_pairs if cfg.data.format == "preference" else builtin.generate
    return make(list(b.tasks), b.train_size, b.eval_size, b.seed,
                options=builtin.TaskOptions(b.document_lines))


def held_out_count(cfg: Config) -> int:
    return max(cfg.eval.max_loss_samples, cfg.eval.exact_match_samples)


def open_rows(cfg: Config, specs: list[SourceSpec]) -> datasets.IterableDataset:
    """The training rows as one stream, opened afresh (each epoch and each resume opens one)."""
    if cfg.data.path == "builtin" and not cfg.data.sources:
        train, _ = builtin_rows(cfg)
        return datasets.Dataset.from_list(train).to_iterable_dataset()
    streams = [open_source(spec, spec.split, streaming=True) for spec in specs]
    if len(streams) == 1:
        return streams[0]
    weights = [1.0 if s.weight is None else s.weight for s in specs]
    return datasets.interleave_datasets(
        streams, probabilities=[w / sum(weights) for w in weights], seed=cfg.train.seed,
        stopping_strategy="all_exhausted")


def eval_records(cfg: Config) -> list[dict]:
    """The streamed run's eval rows, checked (read before the model loads: a bad row fails
    fast). The stream's settings were checked before launch (dtune/data/settings.py)."""
    specs = stream_specs(cfg)
    n = held_out_count(cfg)
    if not specs:
        records = builtin_rows(cfg)[1][:n]
    elif any(s.eval_path or s.eval_split for s in specs):
        records = []
        for spec in specs:
            if spec.eval_path or spec.eval_split:
                source = SourceSpec(**{**spec.__dict__, "path": spec.eval_path or spec.path,
                                       "key": spec.key.replace(".path", ".eval_path")})
                split = spec.eval_split if spec.eval_split else "train"
                records += list(islice(open_source(source, split, streaming=True), n))
    elif cfg.data.eval_fraction > 0:
        records = list(islice(open_rows(cfg, specs), n))
    else:
        records = []
    fmt = row_format(cfg, specs)
    for index, record in enumerate(records):
        validate_record(record, fmt, f"the streamed eval rows, row {index + 1}")
    return records


def positioned_rows(open_stream: Callable[[], datasets.IterableDataset], seed: int,
                    block_size: int, held_out: int, start: dict) -> Iterator[tuple[dict, dict, int]]:
    """(position, row, its index in this pass) from `start` on, forever: each pass skips the
    first `held_out` rows, then yields blocks of `block_size` rows in a seeded order."""
    epoch, block_state, row, offset = (start[k] for k in ("epoch", "block", "row", "offset"))
    while True:
        rows = open_stream()
        if block_state is not None:
            rows.load_state_dict(block_state)
        source = iter(rows)
        if block_state is None:
            row = sum(1 for _ in islice(source, held_out))
        while True:
            block_state = rows.state_dict()  # a snapshot: where this block starts
            block = list(islice(source, block_size))
            if not block:
                break
            order = np.random.default_rng([seed, epoch, row]).permutation(len(block))
            for k in range(offset, len(block)):
                position = {"epoch": epoch, "block": block_state, "row": row, "offset": k}
                yield position, block[order[k]], row + int(order[k])
            row, offset = row + len(block), 0
        if row <= held_out:
            raise DtuneError(
                f"the data stream holds {row} row(s), and the first {held_out} are held out for "
                "eval (the larger of eval.max_loss_samples and eval.exact_match_samples), so "
                "none is left to train on; lower those, set data.eval_fraction=0, or give "
                "data.eval_path.")
        epoch, block_state, row, offset = epoch + 1, None, 0, 0


@dataclass
class StreamingBatches:
    """dtune.data.Batches, as BatchStream gives it (next_window, state_dict, load_state_dict,
    source_totals), over a stream: see the module's docstring for the order and the
    position."""

    open_stream: Callable[[], datasets.IterableDataset]
    # an Example, a PairExample (data.format=preference), or None: the row is dropped
    to_example: Callable[[dict, int], Optional[Example | PairExample]]
    micro_batch_size: int
    seed: int
    pad_id: int
    rank: int = 0
    world_size: int = 1
    pack_len: int = 0
    one_row: bool = False
    block_size: int = 10000
    held_out: int = 0
    position: dict = field(default_factory=lambda: dict(START))

    def __post_init__(self) -> None:
        self._restart(self.position)

    def _restart(self, position: dict) -> None:
        self._rows = positioned_rows(self.open_stream, self.seed, self.block_size,
                                     self.held_out, position)
        self._pending: deque[tuple[dict, Example]] = deque()
        self._next = position  # where the row after the last one read sits

    @property
    def epoch(self) -> int:
        return self.state_dict()["epoch"]

    def _fill(self, count: int) -> None:
        while len(self._pending) < count:
            position, record, index = next(self._rows)
            self._next = {**position, "offset": position["offset"] + 1}
            example = self.to_example(record, index)
            if example is not None:
                self._pending.append((position, example, index))

    def _take(self, count: int) -> list[tuple[Example | PairExample, int]]:
        """The next `count` examples, each with its row's index in the pass."""
        return [self._pending.popleft()[1:] for _ in range(count)]

    def _next_rows(self) -> list[list[tuple[Example | PairExample, int]]]:
        if not self.pack_len:
            self._fill(self.micro_batch_size)
            return [[taken] for taken in self._take(self.micro_batch_size)]
        # pack_rows decides each example from the ones before it alone, so a prefix that
        # stops before its end gives what the whole candidate list would (BatchStream's).
        limit, count = self.micro_batch_size * self.pack_len, self.micro_batch_size
        while True:
            self._fill(count)
            lengths = [len(e.input_ids) for _, e, _ in islice(self._pending, count)]
            rows, taken = pack_rows(lengths, self.micro_batch_size, self.pack_len)
            if taken < count or count >= limit:
                break
            count = min(2 * count, limit)
        if not taken:  # longer than a row (cannot happen after truncation): a row of its own
            rows, taken = [[0]], 1
        examples = self._take(taken)
        return [[examples[j] for j in row] for row in rows]

    def next_window(self, accum: int) -> list[dict[str, torch.Tensor]]:
        """This rank's `accum` micro-batches of the next optimizer step."""
        mine = []
        for index in range(accum * self.world_size):
            rows = self._next_rows()
            if index // accum != self.rank:
                continue
            if self.pack_len:
                mine.append(collate_packed([[e for e, _ in row] for row in rows], self.pad_id,
                                           self.one_row))
            elif isinstance(rows[0][0][0], PairExample):  # a pair's index: its row in the pass
                mine.append(collate_pairs([row[0][0] for row in rows], self.pad_id,
                                          [row[0][1] for row in rows]))
            else:
                mine.append(collate([row[0][0] for row in rows], self.pad_id))
        return mine

    def source_totals(self) -> dict:  # a stream's sources are not counted apart
        return {}

    def state_dict(self) -> dict:
        """The position of the first row not yet in a batch (JSON: it goes in a checkpoint)."""
        return {"streaming": True, **(self._pending[0][0] if self._pending else self._next)}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("streaming"):
            raise DtuneError(
                "the checkpoint holds the position of a run without data.streaming, and this "
                "run streams; resume with the setting that wrote it (data.streaming=false), or "
                "start a new run dir.")
        self._restart({k: state[k] for k in START})


def example_maker(cfg: Config, tokenizer, fmt: str
                  ) -> Callable[[dict, int], Optional[Example | PairExample]]:
    """Check and tokenize one streamed row (a pair with data.format=preference); None when
    truncation left it (or either of a pair's responses) no response."""
    d, dropped = cfg.data, {"n": 0}

    def to_example(record: dict, index: int) -> Optional[Example | PairExample]:
        validate_record(record, fmt, f"the data stream ({d.path or 'data.sources'}), row "
                                     f"{index + 1} of its pass")
        if fmt == "preference":
            example = tokenize_pair(record, tokenizer, d.max_seq_len, d.system_prompt)
        else:
            example = tokenize(record, fmt, tokenizer, d.max_seq_len, d.train_on_inputs,
                               d.system_prompt)
        if example is None or (not isinstance(example, PairExample)
                                and all(label == IGNORE for label in example.labels[1:])):
            dropped["n"] += 1
            if dropped["n"] == 1:
                log.warning("Streamed row %d lost its whole response to data.max_seq_len=%d "
                            "and was dropped (later ones are dropped silently).", index + 1,
                            d.max_seq_len)
            return None
        return example

    return to_example


def stream_specs(cfg: Config) -> list[SourceSpec]:
    """The sources a stream reads; none for data.path=builtin (generated, not read)."""
    return [] if cfg.data.path == "builtin" and not cfg.data.sources else source_specs(cfg.data)


def row_format(cfg: Config, specs: list[SourceSpec]) -> str:
    """The format of the streamed rows (one for all sources: data/settings.py)."""
    if not specs:  # the built-in rows
        return "preference" if cfg.data.format == "preference" else "chat"
    return specs[0].row_format


def open_stream(cfg: Config, tokenizer, rank: int, world_size: int) -> StreamingBatches:
    """The streamed batches of this rank, from the start of the stream."""
    specs = stream_specs(cfg)
    fmt = row_format(cfg, specs)
    held_out = 0
    if specs and cfg.data.eval_fraction > 0 and not any(s.eval_path or s.eval_split
                                                        for s in specs):
        held_out = held_out_count(cfg)
    return StreamingBatches(
        open_stream=lambda: open_rows(cfg, specs), to_example=example_maker(cfg, tokenizer, fmt),
        micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
        pad_id=tokenizer.pad_token_id, rank=rank, world_size=world_size,
        pack_len=cfg.data.max_seq_len if cfg.data.packing else 0,
        one_row=cfg.model.attn_implementation == "flash_attention_2",
        block_size=cfg.data.shuffle_buffer, held_out=held_out)
