"""DeepSpeed ZeRO stage 1, 2 or 3, optionally offloading to host memory.

DeepSpeed is imported inside `create`, deliberately: its import takes seconds and probes for
accelerators, and only ZeRO runs need it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from dtune.checkpoint import save_final
from dtune.config import Config
from dtune.deepspeed_ops import load_deepspeed_ops
from dtune.distributed import Ranks
from dtune.engines.base import (StepResult, StepStatus, adamw, lr_lambda, move_batch,
                                param_groups, process_device)
from dtune.errors import DtuneError


@dataclass
class DeepSpeedEngine:
    model: Any  # the DeepSpeed engine; calling it runs the wrapped module
    module: torch.nn.Module
    device: torch.device
    ranks: Ranks
    stage: int
    synced_forward: bool  # stage 3 shards parameters: every rank joins each forward
    config: dict = field(default_factory=dict)
    skipped_before: int = 0

    @classmethod
    def create(cls, cfg: Config, model, ranks: Ranks, total_steps: int) -> "DeepSpeedEngine":
        import deepspeed

        ds_config = deepspeed_config(cfg, ranks.world_size)
        groups = param_groups(model, cfg.train.weight_decay)
        load_deepspeed_ops(cfg.parallelism.offload)
        if cfg.parallelism.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            t = cfg.train
            optimizer = DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                         eps=t.adam_eps, adamw_mode=True)
        else:
            optimizer = adamw(cfg, groups)
        factor = lr_lambda(cfg, total_steps)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        )
        stage = cfg.parallelism.zero_stage
        return cls(engine, engine.module, process_device(ranks), ranks, stage,
                   synced_forward=stage == 3, config=ds_config)

    def to_device(self, batch: dict) -> dict:
        return move_batch(batch, self.device)

    def forward_context(self, last_in_window: bool):
        # DeepSpeed casts the module itself. Naming the window's last micro-batch lets one
        # step() close the window, however many micro-batches it has.
        self.model.set_gradient_accumulation_boundary(last_in_window)
        return contextlib.nullcontext()

    def eval_context(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks, and would divide by the accumulation steps;
        # the loss is already this rank's share of the window's token mean.
        self.model.backward(loss * self.ranks.world_size, scale_wrt_gas=False)

    def step(self, loss_finite: bool) -> StepResult:
        """DeepSpeed's step: it checks the gradient norm first and skips a NaN/inf update
        (counted in its skipped_steps), as the fp16 loss scaler does with an overflow."""
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = self.model.skipped_steps > self.skipped_before
        self.skipped_before = self.model.skipped_steps
        if skipped:
            overflow = self.config["fp16"]["enabled"] and loss_finite
            return StepResult(norm, StepStatus.OVERFLOW if overflow else StepStatus.NONFINITE)
        if not (loss_finite and math.isfinite(norm)):
            raise DtuneError(
                "DeepSpeed applied an update whose loss or gradient norm was not finite "
                f"(gradient norm {norm}); the weights are no longer usable. Resume from the "
                "last checkpoint with train.resume=true once the cause is fixed.")
        return StepResult(norm, StepStatus.APPLIED)

    def lr(self) -> float:
        return self.model.get_lr()[0]

    @property
    def loss_scale(self) -> Optional[float]:
        optimizer = self.model.optimizer
        return float(optimizer.cur_scale) if self.config["fp16"]["enabled"] and \
            hasattr(optimizer, "cur_scale") else None

    def save_state(self, folder: Path, extra: dict) -> None:
        extra["zero_world_size"] = self.ranks.world_size
        self.model.save_checkpoint(str(folder), tag="deepspeed")

    def load_state(self, folder: Path, extra: dict) -> None:
        saved = extra.get("zero_world_size")
        if saved != self.ranks.world_size:
            raise DtuneError(
                f"the checkpoint {folder} was written by {saved} ZeRO ranks and this run has "
                f"{self.ranks.world_size}. ZeRO shards optimizer state by rank, so resume with "
                f"{saved} processes (parallelism.nproc_per_node x parallelism.nnodes), or start "
                "a new run from its final/ model."
            )
        self.model.load_checkpoint(str(folder), tag="deepspeed")
        self.skipped_before = self.model.skipped_steps

    def save_final(self, out_dir: Path, tokenizer) -> None:
        if self.stage == 3:  # every rank gathers the shards, so the whole model can be read
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
                if self.ranks.is_main:
                    save_final(self.module, tokenizer, out_dir)
        elif self.ranks.is_main:
            save_final(self.module, tokenizer, out_dir)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed's JSON config, generated from the same settings as a one-process run."""
    t, p, precision = cfg.train, cfg.parallelism, cfg.precision
    zero: dict = {"stage": p.zero_stage}
    if p.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    generated = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "fp16": {"enabled": precision.name == "fp16",
                 "initial_scale_power": int(math.log2(precision.init_loss_scale)),
                 "loss_scale_window": precision.growth_interval},
        "bf16": {"enabled": precision.name == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    merged = OmegaConf.merge(OmegaConf.create(generated), OmegaConf.create(
        dict(p.deepspeed_overrides)))
    return OmegaConf.to_container(merged)
