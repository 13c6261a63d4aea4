"""One process, or torch DistributedDataParallel over several: torch's own optimizer step,
autocast and (fp16) GradScaler."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from dtune.checkpoint import check_same_parameters, save_final, trainable_state
from dtune.config import Config
from dtune.distributed import Ranks
from dtune.errors import DtuneError
from dtune.engines.base import (StepResult, StepStatus, adamw, compile_layers, lr_lambda,
                                move_batch, param_groups, process_device)
from dtune.files import refuse_symlink
from dtune.precision import Precision, setup_precision


@dataclass
class TorchEngine:
    model: torch.nn.Module  # the DDP wrapper, or the model itself in one process
    module: torch.nn.Module
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    ranks: Ranks
    max_norm: float
    synced_forward: bool = False

    @classmethod
    def create(cls, cfg: Config, model, ranks: Ranks, total_steps: int) -> "TorchEngine":
        device = process_device(ranks)
        precision = setup_precision(cfg.precision, model, device.type)  # casts before moving
        if not getattr(model, "is_loaded_in_4bit", False) \
                and not getattr(model, "is_loaded_in_8bit", False):
            model.to(device)  # quantized bases were placed by bitsandbytes when loaded
        optimizer = adamw(cfg, param_groups(model, cfg.train.weight_decay), device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
        if cfg.train.compile:
            compile_layers(model)
        wrapped = model
        if ranks.world_size > 1:
            wrapped = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        return cls(wrapped, model, device, optimizer, scheduler, precision, ranks,
                   cfg.train.max_grad_norm or math.inf)

    def to_device(self, batch: dict) -> dict:
        return move_batch(batch, self.device)

    def forward_context(self, last_in_window: bool):
        """Autocast, and for DDP no gradient all-reduce until the window's last micro-batch."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.precision.autocast())
        if self.model is not self.module and not last_in_window:
            stack.enter_context(self.model.no_sync())
        return stack

    def eval_context(self):
        return self.precision.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; the loss is this rank's share of a global sum.
        self.precision.backward(loss * self.ranks.world_size)

    def step(self, loss: torch.Tensor) -> StepResult:
        """Clip and apply the window's update; a NaN/inf is caught before the optimizer runs."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_norm, loss_value, status = self.precision.step(self.optimizer, params,
                                                            self.max_norm, loss)
        if status == "applied":  # a skipped step moved no weight, so the schedule waits too
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm, StepStatus(status), loss_value)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def loss_scale(self) -> Optional[float]:
        return self.precision.loss_scale

    def save_state(self, folder: Path, extra: dict) -> None:
        if self.precision.scaler is not None:
            extra["loss_scaler"] = self.precision.scaler.state_dict()
        if self.ranks.is_main:  # DDP keeps identical weights and optimizer state on every rank
            save_file({k: v.cpu() for k, v in trainable_state(self.module).items()},
                      folder / "model.safetensors")
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load_state(self, folder: Path, extra: dict) -> None:
        weights = load_file(folder / "model.safetensors")
        check_same_parameters(folder, weights, self.module)
        self.module.load_state_dict(weights, strict=False)
        # Loaded to the CPU first, then placed by the optimizer next to its parameters: a
        # tensor saved on rank 0's GPU would otherwise land on GPU 0 on every rank.
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu",
                                                  weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu",
                                                  weights_only=True))
        if self.precision.scaler is not None and "loss_scaler" in extra:
            self.precision.scaler.load_state_dict(extra["loss_scaler"])

    def save_final(self, out_dir: Path, tokenizer) -> None:
        if self.ranks.is_main:
            save_final(self.module, tokenizer, out_dir)


create = TorchEngine.create  # what dtune.engines.build_engine calls


def checkpoint_weights(folder: Path, model) -> dict:
    """What trained, whole: every rank held the same, and rank 0 wrote it."""
    weights = folder / "model.safetensors"
    refuse_symlink(weights)
    if not weights.is_file():  # a ZeRO checkpoint from before checkpoints named their engine
        raise DtuneError(
            f"{folder} holds no model.safetensors: it was written by a sharding engine, whose "
            "files dtune reads back only when resuming under it, not in eval, generate, merge "
            "or export. Use the run's final/ (leave --checkpoint out).")
    return load_file(weights)
