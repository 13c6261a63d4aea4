"""The config, settled once, before launch.

`settle(config, machine)` turns a checked config (dtune.compose.to_config) and the machine the
run will train on into the config every process of the run trains with:

- the `auto` values made concrete: precision (bf16 on a GPU that has it, else fp32) and the
  QLoRA compute dtype that follows it; `parallelism=auto` (the memory planner's choice, which
  names the engine);
- the method's learning rate where train.lr is unset;
- the loss plan (`settled.loss_chunk_size`, `settled.response_head`);
- every check that needs neither the model nor the data (the group combinations again, now
  that nothing is `auto`, and the data settings': dtune/data/settings.py);

and then frozen: setting a field of the result raises. It runs once, where launch begins
(dtune/app.py), before a SLURM job is submitted or a worker starts: a refusal costs no time
in a queue. The workers receive the settled config in DTUNE_SETTLED_CONFIG and a SLURM job
receives it pickled; neither settles again. For a SLURM job the machine is the job's nodes as
the launcher settings describe them, not the login node that submits it.
"""
from __future__ import annotations

import copy
import logging
import os
import subprocess
from dataclasses import dataclass, is_dataclass
from typing import Mapping, Optional

from omegaconf import OmegaConf

from dtune.compose import check_combination
from dtune.config import Config
from dtune.engines import engine_spec
from dtune.errors import DtuneError
from dtune.methods import METHODS

log = logging.getLogger("dtune")
GIB = 1024 ** 3
SETTLED_ENV = "DTUNE_SETTLED_CONFIG"  # the settled config, for the workers a launch starts


@dataclass(frozen=True)
class Machine:
    """What the run trains on, as far as settling needs to know."""
    gpus: int  # per node, that the run may use
    device_memory: Optional[int]  # bytes of one device (a GPU's, or the host's RAM); None: unknown
    bf16: bool  # its GPUs compute in bf16
    nodes: int
    described: str  # in words, for messages and the settled record


def this_machine() -> Machine:
    import torch

    from dtune.plan import device_memory_bytes

    gpus = torch.cuda.device_count()
    memory, _ = device_memory_bytes()
    bf16 = gpus > 0 and torch.cuda.is_bf16_supported()
    what = f"{gpus} GPU(s) of {memory / GIB:.0f} GiB" if gpus else \
        f"CPU, {memory / GIB:.0f} GiB of memory"
    return Machine(gpus, memory, bf16, 1, f"this machine ({what})")


def slurm_job(cfg: Config) -> Machine:
    """The job's nodes, as launcher.* asks for them. Their GPUs are taken to compute in bf16
    (every data-centre GPU since Ampere; torch emulates it on older ones)."""
    launcher = cfg.launcher
    gpus = launcher.gpus_per_node
    if gpus:
        memory = int(launcher.gpu_memory_gib * GIB) if launcher.gpu_memory_gib else None
        what = f"{gpus} GPU(s) per node" + (f" of {launcher.gpu_memory_gib:g} GiB"
                                             if memory else "")
    else:
        # asked of sinfo only where parallelism=auto plans with it: nothing else runs a
        # cluster command before the job's own settings are checked (launchers/slurm.py)
        memory = partition_memory(launcher.partition) if cfg.parallelism.name == "auto" \
            else None
        what = "without GPUs (launcher.gpus_per_node=0)"
    return Machine(gpus, memory, gpus > 0, launcher.nodes,
                   f"the SLURM job's {launcher.nodes} node(s), {what}")


def partition_memory(partition: Optional[str]) -> Optional[int]:
    """The smallest node memory of `partition` (the default one if None), from sinfo; None
    where sinfo cannot say."""
    command = ["sinfo", "-h", "-o", "%m"] + (["-p", partition] if partition else [])
    try:
        listed = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                check=True).stdout.split()
        return min(int(m.rstrip("+")) for m in listed) * 1024 ** 2 if listed else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def machine_for(cfg: Config) -> Machine:
    return slurm_job(cfg) if cfg.launcher.name == "slurm" else this_machine()


def settle(config: Config, machine: Optional[Machine] = None) -> Config:
    """The settled, frozen copy of `config` for `machine` (where the launcher runs it when
    None); `config` itself is left as it was. Raises DtuneError for what cannot run."""
    if is_settled(config):
        raise DtuneError("internal: the config is settled already; settle the config "
                         "to_config returned, once.")
    cfg = copy.deepcopy(config)
    machine = machine or machine_for(cfg)
    settle_precision(cfg, machine)
    if cfg.parallelism.name == "auto":  # the planner counts in the settled precision
        settle_parallelism(cfg, machine)
    check_fp16(cfg, machine)
    check_sequence_groups(cfg, machine)
    if cfg.train.lr is None:
        cfg.train.lr = METHODS[cfg.method.name].recommended_lr
    from dtune.loss_plan import planned_loss

    cfg.settled.loss_chunk_size, cfg.settled.response_head = planned_loss(cfg)
    cfg.settled.machine = machine.described
    if cfg.model.init_from:  # the weights this run starts from, as they are now
        from pathlib import Path

        from dtune.checkpoint import folder_fingerprint
        from dtune.run_dir import RunDir

        cfg.settled.init_from = folder_fingerprint(RunDir(Path(cfg.model.init_from)).final)
    check_combination(cfg)  # again: nothing is `auto` now
    from dtune.data.settings import check_data_settings

    check_data_settings(cfg)
    return freeze(cfg)


def settle_precision(cfg: Config, machine: Machine) -> None:
    """precision=auto becomes bf16 where the GPUs compute in it, else fp32; QLoRA's
    compute_dtype=auto follows the precision."""
    from dtune.precision import AUTOCAST

    if cfg.precision.name == "auto":
        cfg.precision.name = "bf16" if machine.bf16 else "fp32"
    if cfg.method.compute_dtype == "auto" and "compute_dtype" in METHODS[cfg.method.name].fields:
        cfg.method.compute_dtype = cfg.precision.name if cfg.precision.name in AUTOCAST \
            else "fp32"


def process_count(cfg: Config, machine: Machine) -> int:
    """How many processes train: per node (0: one per GPU, one on a CPU machine) x nodes."""
    p = cfg.parallelism
    per_node = p.nproc_per_node if p.nproc_per_node > 0 else max(machine.gpus, 1)
    return per_node * max(machine.nodes, p.nnodes)


def check_sequence_groups(cfg: Config, machine: Machine) -> None:
    size = cfg.parallelism.sequence_parallel
    world = process_count(cfg, machine)
    if world % size:
        raise DtuneError(
            f"parallelism.sequence_parallel={size} groups the ranks {size} at a time, but "
            f"parallelism={cfg.parallelism.name} runs {world} process(es), which {size} "
            "does not divide. Set "
            f"parallelism.nproc_per_node (x launcher.nodes) to a multiple of {size}, e.g. "
            f"parallelism=ddp parallelism.nproc_per_node={size}, or lower "
            "parallelism.sequence_parallel.")


def check_fp16(cfg: Config, machine: Machine) -> None:
    if cfg.precision.name == "fp16" and not engine_spec(cfg.parallelism).fp16_on_cpu \
            and not machine.gpus:
        raise DtuneError(
            f"precision=fp16 with parallelism={cfg.parallelism.name} needs a GPU, but the run "
            f"trains on {machine.described}: DeepSpeed's fp16 mode has no CPU kernels. Use "
            "precision=bf16 (or fp32) there, or parallelism=ddp.")


def settle_parallelism(cfg: Config, machine: Machine) -> None:
    """parallelism=auto becomes the cheapest layout the planner finds fitting one device."""
    from dtune.plan import auto_layout

    if machine.device_memory is None:
        raise DtuneError(
            "parallelism=auto plans for the memory of one device, which dtune cannot see "
            f"from here: the run trains on {machine.described}. Give it: "
            "launcher.gpu_memory_gib=80 (one GPU's memory; an H100's is 80), or choose the "
            "layout yourself, e.g. parallelism=ddp or parallelism=zero3 (`dtune plan --device "
            "gpu --device-gib 80` compares them).")
    p = cfg.parallelism
    world = process_count(cfg, machine)
    layout, why = auto_layout(cfg, world, machine.device_memory, machine.gpus > 0)
    p.name, p.engine, p.zero_stage, p.offload = \
        layout.name, layout.engine, layout.zero_stage, layout.offload
    log.info("parallelism=auto chose %s with %d process(es) on %s: %s", layout.name, world,
             machine.described, why)


def freeze(cfg: Config) -> Config:
    """Make every section of `cfg` refuse changes (dtune.config.Section)."""
    def walk(node) -> None:
        if is_dataclass(node) and not isinstance(node, type):
            object.__setattr__(node, "_settled", True)
            for value in vars(node).values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)
    walk(cfg)
    return cfg


def is_settled(cfg: Config) -> bool:
    return cfg.settled.machine is not None


def require_settled(cfg: Config) -> None:
    """Training takes a settled config only: settling where it trains would settle twice."""
    if not is_settled(cfg):
        raise DtuneError("internal: training was handed a config that was not settled; call "
                         "dtune.settle.settle(config) once, where launch begins.")


def settled_text(cfg: Config) -> str:
    """The settled config as YAML, for DTUNE_SETTLED_CONFIG (it holds no secret: to_config
    refuses secrets in settings, which come from the environment)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def received(environ: Optional[Mapping[str, str]] = None) -> Optional[Config]:
    """The settled config this process's launcher handed it, or None. Only the process that
    started this one sets it: it travels in the environment, not through a file of the run
    directory that someone else may have written."""
    # os.environ is looked up now, not bound as a default when this module was imported:
    # whatever stood in for it then (a test's private copy) is not this process's environment.
    text = (os.environ if environ is None else environ).get(SETTLED_ENV)
    if not text:
        return None
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    cfg: Config = OmegaConf.to_object(merged)
    require_settled(cfg)
    return freeze(cfg)


def settled_config(overrides: list[str]) -> Config:
    """The config `python -m dtune <overrides>` trains with on this machine: composed,
    checked and settled (what scripts and tests hand to dtune.train.run)."""
    from dtune.compose import compose_config

    return settle(compose_config(overrides))
