"""Engines carry out the training step: one process or torch DDP (`torch_ddp`), DeepSpeed
ZeRO (`deepspeed_zero`), or PyTorch's FSDP2 (`fsdp2`). The loop sees only the `Engine`
interface of `base`.

ENGINES is the one list of engines: a parallelism YAML names one in `engine:`, config
validation checks the name and the layout against its spec, and everything outside this
package that must know what an engine does (does it shard parameters? does it need a process
group for one process?) reads the spec, never the engine's name or a ZeRO stage. A new engine
is one module here with a `create(cfg, model, ranks, total_steps)` and one EngineSpec below.

This file imports no torch, deliberately: config validation reads ENGINES before anything
heavy is loaded; an engine's module is imported when a run builds it.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable

from dtune.config import Config, ParallelismConfig
from dtune.errors import DtuneError

# `ranks` below is a dtune.distributed.Ranks and build_engine returns a dtune.engines.base
# Engine; neither is imported, even for type checking: dtune.distributed reads these specs,
# so the import would make a circle (and base loads torch).


def never(parallelism: ParallelismConfig) -> bool:
    return False


def always(parallelism: ParallelismConfig) -> bool:
    return True


def check_no_zero_stage(p: ParallelismConfig) -> None:
    if p.zero_stage is not None:
        raise DtuneError(
            f"parallelism.zero_stage={p.zero_stage} is a DeepSpeed ZeRO setting, but "
            f"parallelism.engine={p.engine} does not shard. Choose a ZeRO layout such as "
            f"parallelism=zero{p.zero_stage} (engine deepspeed), or remove "
            "parallelism.zero_stage.")
    if p.offload:
        raise DtuneError(
            f"parallelism.offload=true needs a sharding engine (parallelism={p.name} runs "
            f"parallelism.engine={p.engine}, which keeps every weight on the device); choose "
            "parallelism=zero2_offload, zero3_offload or fsdp2_offload.")


def check_fsdp2(p: ParallelismConfig) -> None:
    if p.zero_stage is not None:
        raise DtuneError(
            f"parallelism.zero_stage={p.zero_stage} is a DeepSpeed ZeRO setting, and "
            f"parallelism.engine={p.engine} is PyTorch's FSDP2, which shards parameters, "
            "gradients and optimizer state alike (as ZeRO-3 does). Remove "
            f"parallelism.zero_stage, or choose parallelism=zero{p.zero_stage}.")


def check_zero_stage(p: ParallelismConfig) -> None:
    if p.zero_stage is None:
        raise DtuneError(
            f"parallelism.engine={p.engine} needs a ZeRO stage, and parallelism={p.name} sets "
            "no parallelism.zero_stage. Choose parallelism=zero1, zero2 or zero3, or set "
            "parallelism.zero_stage to 1, 2 or 3.")


def zero3(p: ParallelismConfig) -> bool:
    return p.zero_stage == 3


@dataclass(frozen=True)
class EngineSpec:
    name: str
    module: str  # its module in dtune/engines/, with create(cfg, model, ranks, total_steps)
    what: str  # in words
    # the parallelism fields the engine needs (or refuses): raises DtuneError
    check: Callable[[ParallelismConfig], None]
    # each rank holds a shard of the parameters: the model loads inside the module's
    # `sharded_loading(cfg, ranks)` (ZeRO-3 partitions it there; FSDP2 shards it in create),
    # on no device of dtune's choosing, and nothing may read a weight outside the forward
    # pass (the chunked loss reads the LM head)
    shards_parameters: Callable[[ParallelismConfig], bool] = never
    # optimizer state (at least) is split by rank: bitsandbytes' packed quantized weights
    # cannot be split, so a quantized base is refused
    shards_state: bool = False
    # its checkpoints hold one file per rank that only that rank can read: the process count
    # is part of a checkpoint (ZeRO). False: a resume reshards onto any number (FSDP2's DCP)
    fixed_world_size: bool = False
    # 0-3, as ZeRO's stages count it: what it splits across ranks (1 optimizer state, 2 and
    # gradients, 3 and parameters); the memory planner reads it
    sharding: Callable[[ParallelismConfig], int] = lambda p: 0
    # under bf16/fp16 the module itself is 16-bit and the optimizer keeps fp32 masters
    # (DeepSpeed); False: fp32 weights, cast for the matmuls (autocast, FSDP2's policy)
    sixteen_bit_module: bool = False
    soft_prompts: bool = True  # it can train prompt/prefix tuning's virtual tokens
    # dtune's tools (eval, generate, merge, export --checkpoint) can read its checkpoints'
    # weights in one process (`checkpoint_weights`); False: only a resume under it can
    tools_read_checkpoints: bool = True
    # the planner's: bf16/fp16 run under torch autocast (a 16-bit copy of each fp32 weight a
    # matmul reads lives until backward); the weights are partitioned as they load (else
    # whole in host memory first); a window's earlier micro-batches accumulate whole
    # (unsharded) gradients, reduced once at its end
    autocast: bool = True
    partitions_while_loading: Callable[[ParallelismConfig], bool] = never
    accumulates_unsharded: bool = False
    group_for_one_process: bool = False  # needs a process group even for one process
    fp16_on_cpu: bool = True  # its fp16 mode runs without a GPU
    bf16_pure: bool = True  # it can train bf16 weights with no fp32 master copy


ENGINES: dict[str, EngineSpec] = {spec.name: spec for spec in (
    EngineSpec("torch", "torch_ddp", "one process, or torch DistributedDataParallel",
               check_no_zero_stage),
    # DeepSpeed wants a process group even alone (without one it looks for MPI); its fp16
    # mode has no CPU kernels; its bf16 mode keeps fp32 master weights
    EngineSpec("deepspeed", "deepspeed_zero", "DeepSpeed ZeRO stage 1, 2 or 3",
               check_zero_stage, shards_parameters=zero3, shards_state=True,
               fixed_world_size=True, sharding=lambda p: p.zero_stage or 0,
               sixteen_bit_module=True, autocast=False, partitions_while_loading=zero3,
               group_for_one_process=True, fp16_on_cpu=False, bf16_pure=False,
               tools_read_checkpoints=False),
    # Its mesh needs a process group even for one process. PEFT reads a soft prompt's
    # embeddings outside the model's forward while generating, where they are still shards.
    EngineSpec("fsdp2", "fsdp2", "PyTorch FSDP2: parameters, gradients and optimizer state "
               "sharded by rank, one layer gathered at a time", check_fsdp2,
               shards_parameters=always, shards_state=True, sharding=lambda p: 3,
               autocast=False, accumulates_unsharded=True, group_for_one_process=True,
               soft_prompts=False),
)}


def engine_spec(parallelism: ParallelismConfig) -> EngineSpec:
    return ENGINES[parallelism.engine]


def shards_parameters(parallelism: ParallelismConfig) -> bool:
    return engine_spec(parallelism).shards_parameters(parallelism)


def engine_module(parallelism: ParallelismConfig):
    return importlib.import_module(f"dtune.engines.{engine_spec(parallelism).module}")


def run_context(cfg: Config, ranks):
    """What an engine needs held for the whole run, from before the model loads: where it
    shards parameters (ZeRO-3), its configuration, so that the weights load partitioned."""
    if shards_parameters(cfg.parallelism):
        return engine_module(cfg.parallelism).sharded_loading(cfg, ranks)
    return contextlib.nullcontext()


def build_engine(cfg: Config, model, ranks, total_steps: int):
    """The engine for `cfg.parallelism` around an already adapted (PEFT or full) model."""
    return engine_module(cfg.parallelism).create(cfg, model, ranks, total_steps)


def checkpoint_weights(engine: str, folder, model) -> dict:
    """The trained weights a sealed checkpoint that `engine` wrote holds, whole, read in this
    one process, for dtune's tools (eval, generate, merge, export --checkpoint): its module's
    `checkpoint_weights(folder, model)`, which refuses where only a resume can read them."""
    module = importlib.import_module(f"dtune.engines.{ENGINES[engine].module}")
    return module.checkpoint_weights(folder, model)


def refuse_unreadable_checkpoint(engine: str, folder) -> None:
    """Before any model loads: the engine's refusal, where dtune's tools cannot read what it
    wrote (ZeRO's files)."""
    if not ENGINES[engine].tools_read_checkpoints:
        checkpoint_weights(engine, folder, None)  # raises the engine's own paragraph
