"""Sequence parallelism (DeepSpeed Ulysses): each sequence spread over a group of N ranks.

`parallelism.sequence_parallel=N` puts ranks [0..N-1], [N..2N-1], ... in groups. The ranks of
a group draw the same micro-batches (the batch stream counts groups, not ranks: `data_ranks`)
and each keeps one contiguous Nth of every row (`shard_batch`, on the host, before anything is
counted): its tokens, their positions, and the labels they predict. Every layer but attention
works on the shard as it is. Attention goes through DeepSpeed's `UlyssesSPAttentionHF`: an
all-to-all turns [shard of the sequence, all heads] into [whole sequence, 1/N of the heads],
the model's own kernel attends over the whole sequence, and a second all-to-all turns it
back. Its backward is the same exchange reversed, so each rank's gradient is its shard's part
of the gradient of the group's summed loss; the engine's all-reduce over every rank then adds
the parts (and the data-parallel groups), as it adds the ranks of plain DDP.

The loss needs no gather: a shard's labels are shifted before the split (the label after the
shard's last token is the next shard's first), so the shards' summed token losses add up to
the whole sequence's, and the window's token count (summed over every rank) counts each token
once.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from dtune.data.batching import label_positions
from dtune.data.formatting import IGNORE
from dtune.distributed import Ranks
from dtune.errors import DtuneError

log = logging.getLogger("dtune")

ATTENTION = "dtune_ulysses"  # the attention implementation's name in transformers' registry
# Kernels that attend over the gathered sequence. eager needs a materialized additive
# [L x L] mask of the whole sequence (DeepSpeed refuses it too); flash_attention_2 reads a
# packed row's boundaries from the gathered position ids, sdpa from the mask built here.
KERNELS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def data_ranks(ranks: Ranks, size: int) -> Ranks:
    """The ranks the batch stream sees: one per group, so a group's ranks draw the same
    micro-batches. Only the stream's rank and world size change; local ranks stay."""
    return dataclasses.replace(ranks, rank=ranks.rank // size,
                               world_size=ranks.world_size // size)


def shard_batch(batch: dict[str, torch.Tensor], size: int, rank: int,
                pad_id: int) -> dict[str, torch.Tensor]:
    """This rank's contiguous 1/size of each row of a collated (padded or packed) batch.

    The rows are padded on the right to a multiple of `size` (pad tokens, no labels, no
    attention mask, positions continuing). Every shard carries `position_ids`, the global
    positions of its tokens (RoPE, and the causal order once attention gathers the sequence),
    and labels one column wider than its tokens, already aligned for next-token loss: its
    column j + 1 is the target of token j, the last one the next shard's first label."""
    rows, length = batch["input_ids"].shape
    width = -(-length // size)
    extra = width * size - length
    positions = batch.get("position_ids")
    if positions is None:  # a padded batch: one example per row, from position 0
        positions = torch.arange(length).expand(rows, length)
    if extra:
        positions = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(extra)], 1)
    ids = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_id)
    mask = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
    labels = torch.nn.functional.pad(batch["labels"], (0, extra + 1), value=IGNORE)
    start, end = rank * width, (rank + 1) * width
    shard = {"input_ids": ids[:, start:end], "attention_mask": mask[:, start:end],
             "position_ids": positions[:, start:end].contiguous(),
             "labels": labels[:, start:end + 1]}
    return {**shard, **label_positions(shard["labels"])}


def check_heads(model_config, size: int, name: str) -> None:
    """Refuse a model whose heads cannot be split over `size` ranks, in one paragraph."""
    text = model_config.get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % size or (kv % size and size % kv):
        raise DtuneError(
            f"parallelism.sequence_parallel={size} cannot split the attention of "
            f"model.name_or_path={name!r}: it has {heads} attention heads and {kv} key/value "
            f"heads, and each rank of a group attends with 1/{size} of them, so {size} must "
            f"divide the attention heads and divide (or be a multiple of) the key/value heads. "
            f"Choose a parallelism.sequence_parallel that does, such as "
            f"{max(d for d in range(1, size + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0))}.")


def check_kernel(kernel: str, name: str, size: int) -> None:
    if kernel not in KERNELS:
        raise DtuneError(
            f"parallelism.sequence_parallel={size} needs an attention kernel that attends over "
            f"the gathered sequence without a materialized mask, but {name!r} runs "
            f"{kernel!r} attention. Set model.attn_implementation=sdpa (or "
            "flash_attention_2 on GPUs).")


@dataclass
class SequenceParallel:
    """The group this rank shares its sequences with, and the attention that spans it."""

    size: int = 1
    rank: int = 0  # this rank's shard
    group: Any = None  # the process group of this rank's sequence-parallel group
    pad_id: int = 0

    def shard_window(self, window: list[dict]) -> list[dict]:
        if self.size == 1:
            return window
        return [shard_batch(b, self.size, self.rank, self.pad_id) for b in window]


def set_up(model, size: int, ranks: Ranks, packed: bool, pad_id: int,
           name: str) -> SequenceParallel:
    """Make the groups (every rank takes part in making each) and route `model`'s attention
    through Ulysses. Size 1: nothing changes."""
    if size == 1:
        return SequenceParallel(pad_id=pad_id)
    import deepspeed
    import torch.distributed as dist
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from dtune.deepspeed_ops import load_deepspeed_ops
    from dtune.logs import without_printed_lines

    base = getattr(model, "get_base_model", lambda: model)()
    check_heads(base.config, size, name)
    kernel = base.config._attn_implementation
    check_kernel(kernel, name, size)
    # DeepSpeed's module counts ranks through deepspeed.comm, which adopts this process group
    # (its CPU all-reduce kernel is built first, in dtune's cache: dtune/deepspeed_ops.py).
    load_deepspeed_ops(offload=False)
    with without_printed_lines():
        deepspeed.init_distributed()
    groups = [dist.new_group(list(range(g * size, (g + 1) * size)))
              for g in range(ranks.world_size // size)]
    group = groups[ranks.rank // size]
    AttentionInterface.register(ATTENTION, ulysses_attention(
        ALL_ATTENTION_FUNCTIONS[kernel], base.config, group, packed and kernel == "sdpa"))
    if kernel in ALL_MASK_ATTENTION_FUNCTIONS:  # evaluation attends with the kernel's masks
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS[kernel])
    base.set_attn_implementation(ATTENTION)
    log.info("Sequence parallelism: %d ranks per sequence (%s attention, heads exchanged "
             "all-to-all), %d data-parallel group(s)", size, kernel, ranks.world_size // size)
    return SequenceParallel(size, ranks.rank % size, group, pad_id)


def ulysses_attention(kernel, model_config, group, mask_packed: bool):
    """transformers' attention function for the model: Ulysses around `kernel` in training;
    in evaluation (each rank scores its own examples, whole) `kernel` alone."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    text = model_config.get_text_config()
    by_rows: dict[int, UlyssesSPAttentionHF] = {}

    def gathered(module, query, key, value, mask, *args, position_ids=None, **kwargs):
        # The whole sequence, 1/N of the heads. A packed row's examples stay apart: sdpa gets
        # a block-diagonal causal mask from where the gathered positions restart; without
        # packing there is nothing to mask but the future, which sdpa does by itself.
        if mask_packed:
            mask = segment_causal_mask(position_ids)
        return kernel(module, query, key, value, mask, *args, position_ids=position_ids,
                      **kwargs)

    def attention(module, query, key, value, mask, *args, **kwargs):
        if not module.training:
            return kernel(module, query, key, value, mask, *args, **kwargs)
        rows = query.size(0)
        if rows not in by_rows:  # its shapes are fixed per batch size; packed rows vary
            by_rows[rows] = UlyssesSPAttentionHF(
                gathered, batch_size=rows, attn_head_count=text.num_attention_heads,
                attn_head_size=getattr(text, "head_dim", None)
                or text.hidden_size // text.num_attention_heads,
                kv_head_count=getattr(text, "num_key_value_heads", None)
                or text.num_attention_heads,
                num_hidden_layers=text.num_hidden_layers, process_group=group,
                seq_length_is_variable=True)
        # the local mask transformers built is for the shard alone: the gathered sequence's
        # attention is decided in `gathered`
        return by_rows[rows](module, query, key, value, None, *args, **kwargs)

    return attention


def segment_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[rows, 1, L, L] bool: token i sees token j when j <= i and both are in the same
    example (an example starts where its position is 0)."""
    segment = (position_ids == 0).cumsum(1)
    length = position_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
