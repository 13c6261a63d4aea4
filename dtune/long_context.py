"""Memory for long sequences: the MLP over sequence tiles, and saved activations in host memory.

At long context the largest activations of a step are the MLP's ([tokens x intermediate],
three of them, ~3.5x the hidden size each in Llama) and whatever backward keeps from forward.
`tile_mlp` runs each decoder layer's MLP over `tiles` slices of the sequence, each under
non-reentrant activation checkpointing: forward keeps a tile's input alone, and backward
recomputes one tile at a time, so the intermediate activations exist for one tile, not the
sequence. Every token's MLP is independent of the others', so the result is the same. This is
the Arctic Long Sequence Training recipe's tiled MLP; DeepSpeed's `TiledMLP` does it with its
own backward that accumulates each tile's gradient into `.grad`, which DDP and FSDP2 take as
the gradient being ready (its own comment says so), so checkpointing, which autograd and every
engine already handle, does it here.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from dtune.engines.base import decoder_layers
from dtune.errors import DtuneError


def tile_mlp(model, tiles: int, name: str) -> None:
    """train.mlp_tiles: each decoder layer's `mlp` over `tiles` sequence tiles in training."""
    if tiles <= 1:
        return
    layers = decoder_layers(model)
    if not layers or not all(isinstance(getattr(layer, "mlp", None), torch.nn.Module)
                             for layer in layers):
        raise DtuneError(
            f"train.mlp_tiles={tiles} needs decoder layers with an `mlp` module, and "
            f"model.name_or_path={name!r} has none that dtune finds. Set train.mlp_tiles=0.")
    for layer in layers:
        layer.mlp.forward = tiled(layer.mlp.forward, tiles)


def tiled(forward, tiles: int):
    def tiled_forward(hidden: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or hidden.size(-2) < tiles:
            return forward(hidden)
        return torch.cat([checkpoint(forward, part, use_reentrant=False)
                          for part in hidden.chunk(tiles, dim=-2)], dim=-2)
    return tiled_forward


def saved_activations(offload: bool, device: torch.device):
    """train.offload_activations: what autograd saves in forward goes to host memory (pinned,
    so that it comes back asynchronously) until backward unpacks it. On a CPU it is there
    already."""
    if not offload or device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=True)
