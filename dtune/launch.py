"""Process start-up: train in this process, or start the workers a multi-process run asks for.

`run_training` is the local launcher (`launcher=local`, conf/launcher/local.yaml) and what a
SLURM job runs on each of its tasks (dtune/launchers/slurm.py).
"""
from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from dtune import distributed, precision, train
from dtune.config import Config, ParallelismConfig
from dtune.errors import DtuneError
from dtune.plan import resolve_auto
from dtune.run_dir import RunDir

log = logging.getLogger("dtune")


def run_training(config: Config, run_dir: str, overrides: list[str]) -> float | None:
    """Train here: in this process, or in workers started for the processes asked for.
    Returns the final eval loss (what Hydra sweepers minimise)."""
    warn_if_gpus_unseen()
    precision.resolve(config)  # here: a SLURM job settles precision=auto on its own node
    if config.parallelism.name == "auto":
        resolve_auto(config)
    parallel = config.parallelism
    if distributed.launched_ranks(parallel) is None and parallel.name != "single" \
            and distributed.wanted_processes(parallel) > 1:
        check_process_count(parallel)
        code = launch_workers(parallel, run_dir, overrides)
        if code:
            sys.exit(code)
        summary = RunDir(Path(run_dir)).read_summary()
        return summary.get("eval_loss") if summary else None
    return train.run(config, Path(run_dir)).summary.get("eval_loss")


def warn_if_gpus_unseen() -> None:
    """A machine with NVIDIA GPUs whose torch sees none trains on the CPU, slowly: say why."""
    if not torch.cuda.is_available() and glob.glob("/dev/nvidia[0-9]*"):
        log.warning(
            "This machine has NVIDIA GPUs, but torch sees none, so training runs on the CPU. "
            "Is CUDA_VISIBLE_DEVICES empty, did the SLURM job ask for none (--gpus-per-node, "
            "launcher.gpus_per_node), or is this torch a CPU build (%s)?", torch.__version__)


def check_process_count(cfg: ParallelismConfig) -> None:
    per_node = distributed.processes_per_node(cfg)
    gpus = torch.cuda.device_count()
    if gpus and per_node > gpus:
        raise DtuneError(
            f"parallelism.nproc_per_node={per_node} asks for more processes than the {gpus} "
            f"GPUs on this node; set parallelism.nproc_per_node<={gpus}."
        )
    cores = os.cpu_count() or 1
    if not gpus and per_node > cores:
        raise DtuneError(
            f"parallelism.nproc_per_node={per_node} asks for more processes than the {cores} "
            f"CPU cores on this machine; set parallelism.nproc_per_node<={cores}."
        )


def launch_workers(cfg: ParallelismConfig, run_dir: str, overrides: list[str]) -> int:
    """Re-run this command as `nproc_per_node` workers through torch's elastic launcher
    (what `torchrun` runs), all writing into the same run directory; return its exit code."""
    nnodes, node_rank = cfg.nnodes, cfg.node_rank
    if "SLURM_NNODES" in os.environ:  # one SLURM task per node: the job decides the nodes
        nnodes = int(os.environ["SLURM_NNODES"])
        node_rank = int(os.environ.get("SLURM_NODEID", node_rank))
    master_addr = cfg.master_addr
    if master_addr == "auto":
        master_addr = distributed.slurm_hosts()[0] if "SLURM_JOB_NODELIST" in os.environ \
            else "127.0.0.1"
    port = cfg.master_port or (distributed.free_port() if nnodes == 1 else 29500)
    kept = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    env = {**os.environ, "DTUNE_DIE_WITH_PARENT": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={distributed.processes_per_node(cfg)}", f"--nnodes={nnodes}",
        f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={port}",
        "-m", "dtune", *kept, f"hydra.run.dir={run_dir}",
    ]
    # If this process is killed (kill -9, OOM), the launcher goes too, and it stops the workers.
    return subprocess.call(command, env=env,
                           preexec_fn=lambda: distributed.die_with_parent(15))
