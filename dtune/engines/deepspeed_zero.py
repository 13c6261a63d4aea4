"""DeepSpeed ZeRO stage 1, 2 or 3, optionally offloading to host memory.

DeepSpeed is imported inside `create`, deliberately: its import takes seconds and probes for
accelerators, and only ZeRO runs need it.
"""
from __future__ import annotations

import contextlib
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from dtune.checkpoint import save_final
from dtune.config import Config
from dtune.deepspeed_ops import load_deepspeed_ops
from dtune.distributed import Ranks
from dtune.engines.base import (StepResult, StepStatus, adamw, compile_layers, lr_lambda,
                                move_batch, param_groups, process_device)
from dtune.errors import DtuneError
from dtune.logs import without_printed_lines
from dtune.methods import method_spec
from dtune.precision import read_together


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine, loading through torch's weights-only unpickler.

    DeepSpeed unpickles its checkpoints with weights_only=False, so a run directory someone
    else wrote could run code on `train.resume=true`. Its files hold tensors, plain Python
    values and the few DeepSpeed records below; nothing else may be rebuilt from them."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # saving, commit, naming: DeepSpeed's own
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        records = [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]
        try:
            with torch.serialization.safe_globals(records):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DtuneError(
                f"the checkpoint file {path} asks to rebuild objects other than tensors and "
                f"DeepSpeed's checkpoint records ({' '.join(str(exc).split())[:300]}), so dtune "
                "will not load it: unpickling them could run code. If you wrote this checkpoint "
                "yourself with another DeepSpeed version, report it; otherwise delete that "
                "checkpoint folder, or set train.resume=false."
            ) from None


@dataclass
class DeepSpeedEngine:
    model: Any  # the DeepSpeed engine; calling it runs the wrapped module
    module: torch.nn.Module
    device: torch.device
    ranks: Ranks
    stage: int
    synced_forward: bool  # stage 3 shards parameters: every rank joins each forward
    adapter: bool  # the method's final/ is an adapter: only what trained is gathered
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
            optimizer = adamw(cfg, groups, process_device(ranks))
        factor = lr_lambda(cfg, total_steps)
        if cfg.train.compile:
            compile_layers(model)
        with without_printed_lines():  # ZeRO-1/2 start DeepSpeed's communication here
            engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=ds_config,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
            )
        engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
        stage = cfg.parallelism.zero_stage
        return cls(engine, engine.module, process_device(ranks), ranks, stage,
                   synced_forward=stage == 3, adapter=method_spec(cfg.method).adapter,
                   config=ds_config)

    def to_device(self, batch: dict) -> dict:
        return move_batch(batch, self.device)

    def forward_context(self, last_in_window: bool):
        # DeepSpeed casts the module itself. Naming the window's last micro-batch lets one
        # step() close the window, however many micro-batches it has.
        self.model.set_gradient_accumulation_boundary(last_in_window)
        return contextlib.nullcontext()

    def eval_context(self):
        return contextlib.nullcontext()  # the module is already in the compute dtype

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks, and would divide by the accumulation steps;
        # the loss is already this rank's share of the window's token mean.
        self.model.backward(loss * self.ranks.world_size, scale_wrt_gas=False)

    def step(self, loss: torch.Tensor) -> StepResult:
        """DeepSpeed's step: it checks the gradient norm first and skips a NaN/inf update
        (counted in its skipped_steps), as the fp16 loss scaler does with an overflow."""
        self.model.step()
        norm = self.model.get_global_grad_norm()
        if torch.is_tensor(norm):
            norm, loss_value = read_together(norm, loss)
        else:  # DeepSpeed has read it already
            norm, loss_value = float("nan") if norm is None else float(norm), float(loss)
        loss_finite = math.isfinite(loss_value)
        skipped = self.model.skipped_steps > self.skipped_before
        self.skipped_before = self.model.skipped_steps
        if skipped:
            overflow = self.config["fp16"]["enabled"] and loss_finite
            return StepResult(norm, StepStatus.OVERFLOW if overflow else StepStatus.NONFINITE,
                              loss_value)
        if not (loss_finite and math.isfinite(norm)):
            raise DtuneError(
                "DeepSpeed applied an update whose loss or gradient norm was not finite "
                f"(gradient norm {norm}); the weights are no longer usable. Resume from the "
                "last checkpoint with train.resume=true once the cause is fixed.")
        return StepResult(norm, StepStatus.APPLIED, loss_value)

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
        state_dict = None
        if self.stage == 3:
            # Every rank takes part; rank 0 receives the weights one layer at a time, on the
            # host. An adapter gathers only what trained: the base is the checkpoint's.
            state_dict = self.model._zero3_consolidated_16bit_state_dict(
                exclude_frozen_parameters=self.adapter)
        if self.ranks.is_main:
            save_final(self.module, tokenizer, out_dir, state_dict=state_dict)


create = DeepSpeedEngine.create  # what dtune.engines.build_engine calls


@contextlib.contextmanager
def sharded_loading(cfg: Config, ranks: Ranks):
    """Held for a whole ZeRO-3 run. While transformers sees this config, from_pretrained
    partitions the weights as it loads them (each rank holds its shard, never the whole model
    moved onto one GPU first), and peft gathers a partitioned weight where it must read one
    (DoRA's magnitudes)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # Its kernels first: init_distributed builds the shared-memory all-reduce on a CPU machine,
    # which must happen in dtune's folder, under its lock and with its message.
    load_deepspeed_ops(cfg.parallelism.offload)
    with without_printed_lines():  # "DeepSpeed ... built successfully", once per rank
        deepspeed.init_distributed()  # adopts dtune's process group: zero.Init sees the ranks
    held = HfDeepSpeedConfig(deepspeed_config(cfg, ranks.world_size))
    try:
        yield held
    finally:
        del held


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed's JSON config, generated from the same settings as a one-process run."""
    t, p, precision = cfg.train, cfg.parallelism, cfg.precision
    zero: dict = {"stage": p.zero_stage}
    if p.zero_stage == 3:  # final/ is written from the consolidated weights
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    pinned = torch.cuda.is_available()  # pinned host buffers: asynchronous copies to the GPU
    if p.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pinned}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pinned}
    generated = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        # DeepSpeed's own 16-bit modes: the module in bf16/fp16, fp32 master weights in the
        # optimizer (fp16: a dynamic loss scale), and gradients accumulated in fp32 as one
        # process and DDP accumulate them. Not torch autocast over fp32 weights: under ZeRO-3
        # autocast's 16-bit copy of every weight would stay alive until backward, unsharded.
        "fp16": {"enabled": precision.name == "fp16",
                 "initial_scale_power": int(math.log2(precision.init_loss_scale)),
                 "loss_scale_window": precision.growth_interval},
        "bf16": {"enabled": precision.name == "bf16"},
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    merged = OmegaConf.merge(OmegaConf.create(generated), OmegaConf.create(
        dict(p.deepspeed_overrides)))
    return OmegaConf.to_container(merged)


def checkpoint_weights(folder: Path, model) -> dict:
    raise DtuneError(
        f"{folder} was written by DeepSpeed ZeRO (parallelism=zero*): its weights are sharded "
        "in DeepSpeed's own files, which dtune reads back only when resuming under DeepSpeed, "
        "not in eval, generate, merge or export. Use the run's final/ (leave --checkpoint out).")
