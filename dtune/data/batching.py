"""Micro-batches in a seeded, resumable order: padded on the right, or packed without padding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dtune.data.formatting import IGNORE, Example
from dtune.data.preference import PairExample
from dtune.errors import DtuneError


def label_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where a batch's next-token targets are: the flat positions, in [rows x (length - 1)],
    whose label carries loss, and the row of each. Found here, on the host, as a batch is
    collated: the chunked loss and the response-only LM head index with them, where a boolean
    mask on a GPU would stop the host until the GPU says how many there are, every forward."""
    scored = labels[:, 1:] != IGNORE
    flat = scored.reshape(-1).nonzero().squeeze(1)
    return {"label_positions": flat, "label_rows": flat // scored.size(1)}


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            **label_positions(labels)}


def collate_pairs(pairs: list[PairExample], pad_id: int,
                  indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """n preference pairs as one batch of 2n rows, for one forward pass: rows 0..n-1 the chosen
    sequences, rows n..2n-1 the rejected ones in the same pair order, right padded to the
    longest of all 2n (labels IGNORE on prompt and padding). `pair_index` ([n]) holds each
    pair's index in its table (`indices`), which keys the precomputed reference log-probs."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["pair_index"] = torch.tensor(list(indices), dtype=torch.long)
    return batch


def collate_packed(rows: list[list[Example]], pad_id: int,
                   one_row: bool = False) -> dict[str, torch.Tensor]:
    """Rows of several examples laid end to end, with position ids restarting per example.

    The model sees no 2-D attention mask, only `position_ids`, and transformers tells the
    examples apart by where the positions restart: with sdpa and eager it builds a
    block-diagonal causal mask (correct, but a dense mask keeps sdpa off its fastest kernel);
    with flex_attention a block mask from the same boundaries. flash_attention_2 finds the
    boundaries (its varlen path) only within a batch of one row, so with `one_row` the rows
    are laid end to end as one: the padding-free layout. Each example's first label is
    masked: it would otherwise be "predicted" from the previous example's last token. The
    right padding of a short row is its own sequence (positions from 0) with no labels.
    `attention_mask` marks real tokens, for counting only.
    """
    longest = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, start : start + n] = torch.tensor(example.input_ids)
            labels[r, start + 1 : start + n] = torch.tensor(example.labels[1:])
            position_ids[r, start : start + n] = torch.arange(n)
            attention_mask[r, start : start + n] = 1
            start += n
        position_ids[r, start:] = torch.arange(longest - start)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "position_ids": position_ids}
    if one_row:
        batch = {k: v.reshape(1, -1) for k, v in batch.items()}
    return {**batch, **label_positions(batch["labels"])}


def pack_rows(lengths: list[int], rows: int, row_len: int) -> tuple[list[list[int]], int]:
    """First-fit of consecutive examples into `rows` rows of `row_len` tokens.

    Returns (for each row, the positions in `lengths` it holds; how many were taken): takes
    examples in order and stops at the first that fits no row, so the order stays the global
    seeded order and the cursor stays a plain count.
    """
    filled, members, taken = [0] * rows, [[] for _ in range(rows)], 0
    for length in lengths:
        row = next((r for r in range(rows) if filled[r] + length <= row_len), None)
        if row is None:
            break
        filled[row] += length
        members[row].append(taken)
        taken += 1
    return [m for m in members if m], taken


def loss_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss once labels are shifted for next-token prediction."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@dataclass
class BatchStream:
    """Endless micro-batches: epoch by epoch, each epoch a fresh seeded permutation.

    Every rank walks the same global order. A step's window is `accum x world_size`
    consecutive micro-batches, and rank r takes the r-th block of `accum`: no example is seen
    twice or skipped, and 2 ranks x 2 micro-batches see exactly what 1 rank x 4 sees.
    With `pack_len` > 0 a micro-batch is `micro_batch_size` rows of up to `pack_len` tokens,
    filled with the next examples of the same global order (see `pack_rows`).
    The position (epoch, cursor) is all a checkpoint needs to continue with the same batches,
    on any number of ranks. Over a mixture (dtune/data/mixture.py) it also counts the examples
    and tokens each source has given, for every rank's micro-batches (each rank walks them all).
    Over preference pairs (PairExample) a micro-batch is `micro_batch_size` pairs, collated by
    `collate_pairs` with `pair_index` the pairs' positions in `examples`; the order, rank
    blocks and (epoch, cursor) are the same as for examples. Pairs are never packed.
    """

    examples: Sequence[Example]  # a list, or the ExampleTable of dtune/data/prepare.py
    micro_batch_size: int
    seed: int
    pad_id: int
    rank: int = 0
    world_size: int = 1
    pack_len: int = 0  # 0: one example per row, padded; > 0: pack rows of this many tokens
    one_row: bool = False  # packed rows laid end to end as one (flash_attention_2)
    epoch: int = 0
    cursor: int = 0

    def __post_init__(self) -> None:
        self._pairs = len(self.examples) > 0 and isinstance(self.examples[0], PairExample)
        if self._pairs and self.pack_len:
            # Packing would put pairs side by side in a row; the objectives score the chosen
            # and rejected rows of one batch against each other (see collate_pairs).
            raise DtuneError(
                "data.packing=true does not apply to preference pairs (data.format=preference):"
                " a pair's chosen and rejected sequences go into one batch as two padded rows. "
                "Set data.packing=false.")
        lengths = getattr(self.examples, "lengths", None)
        if lengths is not None:
            self._lengths = lengths.tolist()
        else:
            self._lengths = [e.length if self._pairs else len(e.input_ids) for e in self.examples]
        self._order = self._permutation(self.epoch)
        self._source_of = getattr(self.examples, "sources", None)
        self.source_names = list(getattr(self.examples, "names", None) or [])
        self.source_examples = [0] * len(self.source_names)
        self.source_tokens = [0] * len(self.source_names)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    @property
    def batches_per_epoch(self) -> int:
        if not self.pack_len:
            return -(-len(self.examples) // self.micro_batch_size)
        # Packed: count the micro-batches of epoch 0's order (later epochs differ by a few).
        lengths = [self._lengths[i] for i in self._permutation(0)]
        cursor, batches = 0, 0
        while cursor < len(lengths):
            cursor += max(pack_rows(lengths[cursor:cursor + self.micro_batch_size * self.pack_len],
                                    self.micro_batch_size, self.pack_len)[1], 1)
            batches += 1
        return batches

    def _next_rows(self) -> list[list[int]]:
        """The example indices of the next micro-batch, row by row."""
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        if not self.pack_len:
            picked = self._order[self.cursor : self.cursor + self.micro_batch_size]
            self.cursor += len(picked)
            return [[i] for i in picked]
        # Each example holds at least one token, so this many candidates always suffice.
        candidates = self._order[self.cursor : self.cursor + self.micro_batch_size * self.pack_len]
        rows, taken = pack_rows([self._lengths[i] for i in candidates],
                                self.micro_batch_size, self.pack_len)
        if not taken:  # longer than a row (cannot happen after truncation): a row of its own
            rows, taken = [[0]], 1
        self.cursor += taken
        return [[candidates[j] for j in row] for row in rows]

    def next_window(self, accum: int) -> list[dict[str, torch.Tensor]]:
        """This rank's `accum` micro-batches of the next optimizer step."""
        mine = []
        for index in range(accum * self.world_size):
            rows = self._next_rows()
            self._count_sources(rows)
            if index // accum != self.rank:
                continue
            if self.pack_len:
                mine.append(collate_packed([[self.examples[i] for i in row] for row in rows],
                                           self.pad_id, self.one_row))
            elif self._pairs:
                picked = [row[0] for row in rows]
                mine.append(collate_pairs([self.examples[i] for i in picked], self.pad_id,
                                          picked))
            else:
                mine.append(collate([self.examples[row[0]] for row in rows], self.pad_id))
        return mine

    def _count_sources(self, rows: list[list[int]]) -> None:
        if self._source_of is None:
            return
        for row in rows:
            for i in row:
                source = int(self._source_of[i])
                self.source_examples[source] += 1
                self.source_tokens[source] += int(self._lengths[i])

    def source_totals(self) -> dict:
        """Examples and tokens drawn so far from each source (a mixture's only)."""
        if len(self.source_names) < 2:
            return {}
        return {**{f"examples/{n}": c for n, c in zip(self.source_names, self.source_examples)},
                **{f"tokens/{n}": c for n, c in zip(self.source_names, self.source_tokens)}}

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "cursor": self.cursor}
        if len(self.source_names) > 1:
            state.update(source_examples=list(self.source_examples),
                         source_tokens=list(self.source_tokens))
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
        if "source_examples" in state:  # a mixture's counts go on from the checkpoint's
            self.source_examples = list(state["source_examples"])
            self.source_tokens = list(state["source_tokens"])
