"""Datasets: the built-in task set, file loading, formatting into tokens, and batching.

The recipe reads data through two calls here, and never asks how the rows arrive:

    records = data.read(cfg, ranks)                       # checked, before the model loads
    prepared = data.build(cfg, tokenizer, ranks, records, pairs)  # batches, held-out sets

Rows come either all at once (loaded, checked and tokenized into the Arrow cache up front:
`loading`, `prepare`, `batching.BatchStream`) or, with data.streaming, as training goes
(`streaming.StreamingBatches`); both give batches through one interface (`Batches`).

The submodules are imported inside the functions: configuration checks import a few of them
(formats, sources) before torch, datasets or any tokenizer should load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol


class Batches(Protocol):
    """What training reads of its batches, in memory (BatchStream) or streamed
    (StreamingBatches): a window of micro-batches per step, a position a checkpoint holds,
    and examples and tokens per source of a mixture ({} for one source)."""
    world_size: int

    def next_window(self, accum: int) -> list[dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def source_totals(self) -> dict: ...


@dataclass
class Records:
    """The rows `read` checked: every source's (in memory), or a stream's held-out rows."""
    sources: Optional[list] = None  # loading.SourceRows
    eval_records: Optional[list] = None  # data.streaming: the held-out rows


@dataclass
class HeldOut:
    """What a model is evaluated on: the tokenized examples of each eval set (a mixture:
    each source's), the eval records exact match answers (in format `fmt`), and for a
    preference objective a batch stream over each set's pairs (then neither of the others)."""
    examples: dict  # eval set name -> ExampleTable
    records: list
    fmt: str
    pairs: Optional[list] = None


@dataclass
class TrainingData:
    batches: Batches
    held_out: HeldOut
    described: str  # the training examples' count for the log, or "streamed"
    epoch_batches: Optional[int] = None  # micro-batches in one pass (None: a stream)
    # the training rows and their tokenizer: a resume compares it with its checkpoint's
    fingerprint: Optional[str] = None
    # training pairs whose chosen and rejected truncation made the same (None: not pairs)
    identical_pairs: Optional[int] = None


def read(cfg, ranks) -> Records:
    """The rows, checked before minutes go into loading the model: a bad row fails fast.
    In memory, local rank 0 checks every source and the other ranks wait for it; a stream
    reads only its held-out rows now, and the rest as training goes."""
    if cfg.data.streaming:
        from dtune.data import streaming

        return Records(eval_records=streaming.eval_records(cfg))
    from dtune.data.loading import load_splits

    return Records(sources=load_splits(cfg.data, ranks.local_rank))


def build(cfg, tokenizer, ranks, records: Records, pairs: bool) -> TrainingData:
    """This rank's training batches and the held-out sets, tokenized. `pairs`: the objective
    trains on preference pairs, so evaluation scores each eval set's pairs."""
    from dtune.data.batching import BatchStream

    data = streamed(cfg, tokenizer, ranks, records) if cfg.data.streaming else \
        in_memory(cfg, tokenizer, ranks, records)
    if pairs:
        data.held_out.pairs = [BatchStream(examples, cfg.eval.batch_size, cfg.train.seed,
                                           tokenizer.pad_token_id, ranks.rank, ranks.world_size)
                               for examples in data.held_out.examples.values() if len(examples)]
    return data


def in_memory(cfg, tokenizer, ranks, records: Records) -> TrainingData:
    from dtune.data.batching import BatchStream
    from dtune.data.prepare import prepare_data

    data = prepare_data(cfg, tokenizer, ranks, records.sources)
    batches = BatchStream(data.train, cfg.train.micro_batch_size, cfg.train.seed,
                          tokenizer.pad_token_id, ranks.rank, ranks.world_size,
                          pack_len=cfg.data.max_seq_len if cfg.data.packing else 0,
                          one_row=cfg.model.attn_implementation == "flash_attention_2")
    return TrainingData(batches, HeldOut(data.evals, data.eval_records, data.eval_format),
                        f"{len(data.train)}", batches.batches_per_epoch, data.fingerprint,
                        data.identical_pairs)


def streamed(cfg, tokenizer, ranks, records: Records) -> TrainingData:
    from dtune.data import streaming
    from dtune.data.prepare import tokenize_records

    fmt = streaming.row_format(cfg, streaming.stream_specs(cfg))
    examples = tokenize_records(records.eval_records[: cfg.eval.max_loss_samples], cfg,
                                tokenizer, "eval", fmt=fmt)
    return TrainingData(streaming.open_stream(cfg, tokenizer, ranks.rank, ranks.world_size),
                        HeldOut({"eval": examples}, records.eval_records, fmt), "streamed")
