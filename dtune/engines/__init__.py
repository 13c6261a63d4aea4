"""Engines carry out the training step: one process or torch DDP (`torch_ddp`), or DeepSpeed
ZeRO (`deepspeed_zero`). The loop sees only the `Engine` interface of `base`.

A new engine is one module here with a `create(cfg, model, ranks, total_steps)` and one entry
in ENGINES; a parallelism YAML selects it through its fields.
"""
from __future__ import annotations

import contextlib

from dtune.config import Config, ParallelismConfig
from dtune.distributed import Ranks
from dtune.engines import deepspeed_zero, torch_ddp
from dtune.engines.base import Engine

ENGINES = {"torch": torch_ddp.TorchEngine.create,
           "deepspeed": deepspeed_zero.DeepSpeedEngine.create}


def engine_name(parallelism: ParallelismConfig) -> str:
    return "torch" if parallelism.zero_stage is None else "deepspeed"


def run_context(cfg: Config, ranks: Ranks):
    """What an engine needs held for the whole run, from before the model loads: ZeRO-3's
    configuration, so that the weights load partitioned."""
    if cfg.parallelism.zero_stage == 3:
        return deepspeed_zero.zero3_run(cfg, ranks)
    return contextlib.nullcontext()


def build_engine(cfg: Config, model, ranks: Ranks, total_steps: int) -> Engine:
    """The engine for `cfg.parallelism` around an already adapted (PEFT or full) model."""
    return ENGINES[engine_name(cfg.parallelism)](cfg, model, ranks, total_steps)
