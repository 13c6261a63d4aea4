"""Engines carry out the training step: one process, torch DDP, or DeepSpeed ZeRO.

Each owns the optimizer, the schedule and the precision, and offers the same few calls to the
loop: `forward` context, `backward` per micro-batch, `step` per window, checkpoint save/load,
and `save_final`. The loss handed to `backward` is the window's token-mean share of this rank;
engines that average gradients over ranks are compensated, so every layout computes the same
update as one process seeing the whole global batch.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dtune.config import Config
from dtune.distributed import Ranks
from dtune.precision import Precision, setup_precision


def build_engine(cfg: Config, model, ranks: Ranks, total_steps: int):
    """The engine for `cfg.parallelism` around an already adapted (PEFT or full) model."""
    if cfg.parallelism.zero_stage is not None:
        return DeepSpeedEngine.create(cfg, model, ranks, total_steps)
    return TorchEngine.create(cfg, model, ranks, total_steps)


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
    """Linear warmup, then cosine or linear decay to `min_lr_ratio`, or constant."""
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


def _adamw(cfg: Config, groups: list[dict]) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)


@dataclass
class TorchEngine:
    """One process, or torch DistributedDataParallel over several."""

    model: torch.nn.Module  # what the loop calls: the DDP wrapper or the model itself
    module: torch.nn.Module  # the model to save and generate with
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    ranks: Ranks
    max_norm: float
    eval_on_every_rank: bool = False

    @classmethod
    def create(cls, cfg: Config, model, ranks: Ranks, total_steps: int) -> "TorchEngine":
        device = torch.device("cuda", ranks.local_rank) if torch.cuda.is_available() else None
        if device is not None and not getattr(model, "is_loaded_in_4bit", False) \
                and not getattr(model, "is_loaded_in_8bit", False):
            model.to(device)
        precision = setup_precision(cfg.precision, model,
                                    "cuda" if torch.cuda.is_available() else "cpu")
        optimizer = _adamw(cfg, param_groups(model, cfg.train.weight_decay))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
        wrapped = model
        if ranks.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(
                model, device_ids=[ranks.local_rank] if device is not None else None)
        return cls(wrapped, model, optimizer, scheduler, precision, ranks,
                   cfg.train.max_grad_norm or math.inf)

    def forward_context(self, last_in_window: bool):
        """Autocast, and for DDP no gradient all-reduce until the window's last micro-batch."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.precision.autocast())
        if self.model is not self.module and not last_in_window:
            stack.enter_context(self.model.no_sync())
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; the loss is this rank's share of a global sum.
        self.precision.backward(loss * self.ranks.world_size)

    # A NaN/inf step is caught before the optimizer runs, so it can be skipped.
    can_skip_nonfinite = True

    def step(self, loss_finite: bool) -> tuple[float, str]:
        """Apply the window's update; status as `Precision.step`."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_norm, status = self.precision.step(self.optimizer, params, self.max_norm,
                                                loss_finite)
        if status == "ok":  # a skipped step moved no weight, so the schedule waits too
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, status

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def loss_scale(self) -> Optional[float]:
        return self.precision.loss_scale

    def save_state(self, folder: Path, trainer_state: dict) -> None:
        from safetensors.torch import save_file

        from dtune.checkpoint import trainable_state

        if self.precision.scaler is not None:
            trainer_state["loss_scaler"] = self.precision.scaler.state_dict()
        if self.ranks.is_main:  # DDP keeps identical weights and optimizer state on every rank
            save_file({k: v.cpu() for k, v in trainable_state(self.module).items()},
                      folder / "model.safetensors")
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load_state(self, folder: Path, trainer_state: dict) -> None:
        from safetensors.torch import load_file

        from dtune.checkpoint import check_same_parameters

        weights = load_file(folder / "model.safetensors")
        check_same_parameters(folder, weights, self.module)
        self.module.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        if self.precision.scaler is not None and "loss_scaler" in trainer_state:
            self.precision.scaler.load_state_dict(trainer_state["loss_scaler"])

    def save_final(self, out_dir: Path, tokenizer) -> None:
        from dtune.checkpoint import save_final

        if self.ranks.is_main:
            save_final(self.module, tokenizer, out_dir)


@dataclass
class DeepSpeedEngine:
    """DeepSpeed ZeRO stage 1, 2 or 3, optionally offloading to CPU memory."""

    model: Any  # the DeepSpeed engine; calling it runs the wrapped module
    module: torch.nn.Module
    ranks: Ranks
    stage: int
    skipped_before: int = 0
    eval_on_every_rank: bool = False  # stage 3 shards parameters: every rank joins each forward
    config: dict = field(default_factory=dict)

    @classmethod
    def create(cls, cfg: Config, model, ranks: Ranks, total_steps: int) -> "DeepSpeedEngine":
        import deepspeed

        from dtune.deepspeed_ops import load_deepspeed_ops

        ds_config = deepspeed_config(cfg, ranks.world_size)
        groups = param_groups(model, cfg.train.weight_decay)
        offload = "offload_optimizer" in ds_config["zero_optimization"]
        load_deepspeed_ops(offload)
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            t = cfg.train
            optimizer = DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                         eps=t.adam_eps, adamw_mode=True)
        else:
            optimizer = _adamw(cfg, groups)
        factor = lr_lambda(cfg, total_steps)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        )
        stage = cfg.parallelism.zero_stage
        return cls(engine, engine.module, ranks, stage, eval_on_every_rank=stage == 3,
                   config=ds_config)

    def forward_context(self, last_in_window: bool):
        return contextlib.nullcontext()  # DeepSpeed casts and accumulates itself

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks, and would divide by the accumulation steps;
        # the loss is already this rank's share of the window's token mean.
        self.model.backward(loss * self.ranks.world_size, scale_wrt_gas=False)
        self.model.step()  # only updates on the window's last micro-batch

    # DeepSpeed applies the update inside `backward`: a NaN/inf step cannot be undone.
    can_skip_nonfinite = False

    def step(self, loss_finite: bool) -> tuple[float, str]:
        norm = self.model.get_global_grad_norm()
        overflow = self.model.skipped_steps > self.skipped_before
        self.skipped_before = self.model.skipped_steps
        norm = float(norm) if norm is not None else float("nan")
        if overflow:
            return norm, "overflow"
        return norm, "ok" if loss_finite and math.isfinite(norm) else "nonfinite"

    def lr(self) -> float:
        return self.model.get_lr()[0]

    @property
    def loss_scale(self) -> Optional[float]:
        optimizer = self.model.optimizer
        return float(optimizer.cur_scale) if self.config["fp16"]["enabled"] and \
            hasattr(optimizer, "cur_scale") else None

    def save_state(self, folder: Path, trainer_state: dict) -> None:
        trainer_state["zero_world_size"] = self.ranks.world_size
        self.model.save_checkpoint(str(folder), tag="deepspeed")

    def load_state(self, folder: Path, trainer_state: dict) -> None:
        from dtune.errors import DtuneError

        saved = trainer_state.get("zero_world_size")
        if saved != self.ranks.world_size:
            raise DtuneError(
                f"the checkpoint {folder} was written by {saved} ZeRO ranks and this run has "
                f"{self.ranks.world_size}. ZeRO shards optimizer state by rank, so resume with "
                f"{saved} processes (parallelism.nproc_per_node x parallelism.nnodes), or start "
                "a new run from its final/ model."
            )
        self.model.load_checkpoint(str(folder), tag="deepspeed")
        self.skipped_before = self.model.skipped_steps

    @contextlib.contextmanager
    def full_weights(self):
        """Every rank gathers the stage-3 shards, so the whole model can be read."""
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
                yield self.module
        else:
            yield self.module

    def save_final(self, out_dir: Path, tokenizer) -> None:
        from dtune.checkpoint import save_final

        with self.full_weights() as module:  # ZeRO-3: the full weights, not empty shards
            if self.ranks.is_main:
                save_final(module, tokenizer, out_dir)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed's JSON config, generated from the same settings as a one-process run."""
    t, p, precision = cfg.train, cfg.parallelism, cfg.precision
    zero: dict = {"stage": p.zero_stage}
    if p.name.endswith("_offload"):
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
    return _deep_merge(generated, dict(p.deepspeed_overrides))


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
