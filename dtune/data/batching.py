"""Micro-batches in a seeded, resumable order, padded on the right."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dtune.data.formatting import IGNORE, Example


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
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def loss_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss once labels are shifted for next-token prediction."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@dataclass
class BatchStream:
    """Endless micro-batches: epoch by epoch, each epoch a fresh seeded permutation.

    Every rank walks the same global order. A step's window is `accum x world_size`
    consecutive micro-batches, and rank r takes the r-th block of `accum`: no example is seen
    twice or skipped, and 2 ranks x 2 micro-batches see exactly what 1 rank x 4 sees.
    The position (epoch, cursor) is all a checkpoint needs to continue with the same batches,
    on any number of ranks.
    """

    examples: list[Example]
    micro_batch_size: int
    seed: int
    pad_id: int
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    cursor: int = 0

    def __post_init__(self) -> None:
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.examples) // self.micro_batch_size)

    def _next_indices(self) -> list[int]:
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        picked = self._order[self.cursor : self.cursor + self.micro_batch_size]
        self.cursor += len(picked)
        return picked

    def next_window(self, accum: int) -> list[dict[str, torch.Tensor]]:
        """This rank's `accum` micro-batches of the next optimizer step."""
        mine = []
        for index in range(accum * self.world_size):
            picked = self._next_indices()
            if index // accum == self.rank:
                mine.append(collate([self.examples[i] for i in picked], self.pad_id))
        return mine

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
