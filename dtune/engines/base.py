"""The engine interface the training loop sees, and what every engine shares.

The loss handed to `backward` is this rank's share of the window's token mean; engines that
average gradients over ranks are compensated, so every layout computes the same update as one
process seeing the whole global batch. `step` applies the update, or skips it and says why.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional, Protocol

import torch

from dtune.config import Config
from dtune.distributed import Ranks, local_gpu
from dtune.errors import DtuneError


class StepStatus(enum.Enum):
    APPLIED = "applied"
    OVERFLOW = "overflow"  # fp16: the loss scale was too high; skipped, the scale lowered
    NONFINITE = "nonfinite"  # a NaN/inf loss or gradient; skipped, the weights untouched


@dataclass(frozen=True)
class StepResult:
    grad_norm: float
    status: StepStatus
    loss: float  # the window's loss, read with the gradient norm: one host read a step


class Engine(Protocol):
    model: torch.nn.Module  # what the training step calls (a DDP or DeepSpeed wrapper)
    module: torch.nn.Module  # the bare model: evaluated, generated with, saved
    device: torch.device  # where this process's batches go
    ranks: Ranks
    synced_forward: bool  # every rank must join every forward (ZeRO-3 gathers the weights)

    def to_device(self, batch: dict) -> dict: ...
    def forward_context(self, last_in_window: bool) -> ContextManager: ...
    def eval_context(self) -> ContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, loss: torch.Tensor) -> StepResult: ...
    def lr(self) -> float: ...
    @property
    def loss_scale(self) -> Optional[float]: ...
    def save_state(self, folder: Path, extra: dict) -> None: ...
    def load_state(self, folder: Path, extra: dict) -> None: ...
    def save_final(self, out_dir: Path, tokenizer) -> None: ...


def process_device(ranks: Ranks) -> torch.device:
    """The one device this process trains on: its local GPU, else the CPU. On a GPU, fp32
    matmuls may use TF32 (10-bit mantissa inputs, fp32 accumulation): several times faster on
    Ampere and later, and far below the noise of stochastic training."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    allow_tf32(True)
    return local_gpu(ranks)


def allow_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def move_batch(batch: dict, device: torch.device) -> dict:
    """Every tensor the model sees enters through here. With a CUDA runtime, host batches are
    pinned first so that the copy to the GPU runs asynchronously (`non_blocking`); on the CPU
    they are used as they are."""
    if device.type == "cpu":
        return dict(batch)
    pin = torch.cuda.is_available()
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True)
            if torch.is_tensor(v) else v for k, v in batch.items()}


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # Norms and biases are not decayed, as in most LLM fine-tuning recipes.
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine or linear decay to `min_lr_ratio`, or constant.

    Our own, not transformers' schedules: theirs start warmup at a learning rate of 0 (a first
    step that trains nothing) and decay linearly to 0, with no floor."""
    t = cfg.train
    warmup = min(t.warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.lr_schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        shape = 1.0 - progress if t.lr_schedule == "linear" else \
            0.5 * (1.0 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return factor


def adamw(cfg: Config, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW; on a GPU its fused kernel (one launch for every parameter, not several
    per tensor). Not on the CPU, whose fused kernel rounds differently from the one every
    recorded CPU run used."""
    t = cfg.train
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             fused=device.type == "cuda")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (under a PEFT wrapper too): the modules
    its `_no_split_modules` names, which transformers keeps whole on one device. FSDP2
    shards each, and train.compile compiles each."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_layers(model) -> None:
    """train.compile: each decoder layer's forward through torch.compile. One layer's graph
    is compiled once and reused by every layer of its shape; the module itself stays what it
    was (no `_orig_mod.` in its parameter names), and the hooks of DDP, FSDP2 and gradient
    checkpointing around it run as before."""
    layers = decoder_layers(model)
    if not layers:
        raise DtuneError(
            f"train.compile=true: dtune found no decoder layers to compile in "
            f"{type(model).__name__} (it compiles the modules the model's _no_split_modules "
            "names). Set train.compile=false.")
    for layer in layers:
        # dynamic: batches padded to their longest row change shape every step
        layer.forward = torch.compile(layer.forward, dynamic=True)


def held_here(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, its FSDP2 shard, or all."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    return param.to_local() if hasattr(param, "to_local") else param
