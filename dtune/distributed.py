"""Processes and ranks: detect torchrun/DeepSpeed/SLURM environments, start workers when the
user asked for several processes and nothing launched them, and set up the process group.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dtune.config import ParallelismConfig
from dtune.errors import DtuneError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def launched_ranks(cfg: ParallelismConfig) -> Ranks | None:
    """The ranks a launcher assigned to this process, or None if nothing launched it.

    torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK; SLURM's srun sets
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and here MASTER_ADDR/PORT are derived from it.
    One SLURM task per node with several processes per node is not a rank yet: it launches
    its node's workers (`launch_workers`).
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                     int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))))
    one_task_per_node = env.get("SLURM_NTASKS") == env.get("SLURM_NNODES")
    if one_task_per_node and processes_per_node(cfg) > 1:
        return None
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", slurm_master_addr())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        ranks = Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                      int(env.get("SLURM_LOCALID", 0)), int(env.get("SLURM_NODEID", 0)))
        env.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world_size),
                   LOCAL_RANK=str(ranks.local_rank))
        return ranks
    return None


def slurm_master_addr() -> str:
    """The first host of the job's node list (rank 0 runs there)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                               capture_output=True, text=True, timeout=30).stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_nodelist(nodelist)[0]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list, e.g. 'gpu[01-03,07],cpu1' (no scontrol needed)."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            start, _, end = part.partition("-")
            for number in range(int(start), int(end or start) + 1):
                hosts.append(f"{prefix}{number:0{len(start)}d}")
    if not hosts:
        raise DtuneError(f"SLURM_JOB_NODELIST={nodelist!r} names no host; is this a SLURM job?")
    return hosts


def wanted_processes(cfg: ParallelismConfig) -> int:
    return processes_per_node(cfg) * cfg.nnodes


def processes_per_node(cfg: ParallelismConfig) -> int:
    if cfg.nproc_per_node > 0:
        return cfg.nproc_per_node
    return max(torch.cuda.device_count(), 1)  # 0 means one per GPU, or one on a CPU machine


def check_process_count(cfg: ParallelismConfig) -> None:
    per_node = processes_per_node(cfg)
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
        master_addr = slurm_master_addr() if "SLURM_JOB_NODELIST" in os.environ else "127.0.0.1"
    port = cfg.master_port or (_free_port() if nnodes == 1 else 29500)
    kept = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    env = {**os.environ, "DTUNE_DIE_WITH_PARENT": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={processes_per_node(cfg)}", f"--nnodes={nnodes}",
        f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={port}",
        "-m", "dtune", *kept, f"hydra.run.dir={run_dir}",
    ]
    # If this process is killed (kill -9, OOM), the launcher goes too, and it stops the workers.
    return subprocess.call(command, env=env, preexec_fn=lambda: die_with_parent(15))


def die_with_parent(signal_number: int = 9) -> None:
    """Ask Linux to send this process `signal_number` when its parent dies. torch's launcher
    starts each worker in a session of its own, so without this a killed run leaves its
    workers training on as orphans."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal_number)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(cfg: ParallelismConfig, ranks: Ranks) -> None:
    """NCCL on GPUs, gloo on CPU (or as configured), with the configured timeout.

    DeepSpeed needs a process group even for one process (without one it looks for MPI),
    so a lone ZeRO process gets a group of one."""
    if dist.is_initialized() or (not ranks.distributed and cfg.zero_stage is None):
        return
    if not ranks.distributed:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(backend=backend, rank=ranks.rank, world_size=ranks.world_size,
                            timeout=timedelta(minutes=cfg.timeout_minutes))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float) -> float:
    """Sum a Python number over ranks (identity when not distributed)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item())


def gather(value) -> list:
    """Every rank's `value`, in rank order (just [value] when not distributed)."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
