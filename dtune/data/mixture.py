"""Several tokenized sources as one sequence of examples, fixed by the seed.

Each source keeps its own Arrow table; the mixture is two integer arrays (which source, which
row), so combining costs no copy. `weight` and `fraction` set how many of a source's rows an
epoch holds:

- `fraction` f: f of the source's own rows;
- `weight` w: the weighted sources share their combined row count in proportion to their
  weights (a source may be repeated, or cut, to its share);
- neither: every row once.

The rows a source contributes are drawn by `seed`, so the same seed gives the same mixture;
`BatchStream` then shuffles the whole of it each epoch, and its (epoch, cursor) position is
all a resume needs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dtune.data.formatting import Example


class MixedExamples:
    """Entry i is row `rows[i]` of table `sources[i]`; `names[s]` labels source s."""

    def __init__(self, tables: Sequence, names: list[str], sources: np.ndarray,
                 rows: np.ndarray):
        self.tables, self.names = list(tables), list(names)
        self.sources = np.asarray(sources, dtype=np.int64)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.lengths = np.zeros(len(self.rows), dtype=np.int64)
        for s, table in enumerate(self.tables):
            mine = self.sources == s
            self.lengths[mine] = np.asarray(table.lengths)[self.rows[mine]]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        return self.tables[self.sources[index]][int(self.rows[index])]


def mixture_counts(sizes: list[int], weights: list[float | None],
                   fractions: list[float | None]) -> list[int]:
    """How many entries each source gets per epoch (see the module's docstring)."""
    weighted = [i for i, w in enumerate(weights) if w is not None]
    pool, total_weight = sum(sizes[i] for i in weighted), sum(weights[i] for i in weighted)
    counts = []
    for size, weight, fraction in zip(sizes, weights, fractions):
        if weight is not None:
            counts.append(max(1, round(pool * weight / total_weight)))
        elif fraction is not None:
            counts.append(max(1, round(size * fraction)))
        else:
            counts.append(size)
    return counts


def mix(tables: Sequence, names: list[str], weights: list[float | None],
        fractions: list[float | None], seed: int) -> MixedExamples:
    """The mixture of `tables` for `seed`."""
    counts = mixture_counts([len(t) for t in tables], weights, fractions)
    sources, rows = [], []
    for s, (table, count) in enumerate(zip(tables, counts)):
        size = len(table)
        if count == size:
            picked = np.arange(size)  # every row once: nothing to draw
        else:
            # Fresh permutations laid end to end: a source repeated to its share sees every
            # row once before any row twice.
            rng = np.random.default_rng([seed, s])
            picked = np.concatenate([rng.permutation(size) for _ in range(-(-count // size))])
            picked = picked[:count]
        sources.append(np.full(count, s))
        rows.append(picked)
    return MixedExamples(tables, names, np.concatenate(sources), np.concatenate(rows))
