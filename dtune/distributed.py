"""Ranks and the process group: which rank this process is (torchrun, the deepspeed launcher
or SLURM's srun), the group's set-up and teardown, and the few collectives the loop uses.

Collectives run on tensors of the backend's device: NCCL takes CUDA tensors only.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta

from submitit.slurm.slurm import SlurmJobEnvironment
import torch
import torch.distributed as dist

from dtune.config import ParallelismConfig
from dtune.engines import engine_spec


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
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, read through submitit's SLURM environment
    (whether or not submitit started the job), and here
    MASTER_ADDR/PORT are derived from the job. One SLURM task per node with several processes
    per node is not a rank yet: it starts its node's workers (dtune/launch.py).
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                     int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))))
    one_task_per_node = env.get("SLURM_NTASKS") == env.get("SLURM_NNODES")
    if one_task_per_node and processes_per_node(cfg) > 1:
        return None
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = SlurmJobEnvironment()
        env.setdefault("MASTER_ADDR", job.hostnames[0])
        env.setdefault("MASTER_PORT", str(slurm_port()))
        ranks = Ranks(job.global_rank, job.num_tasks, job.local_rank, job.node)
        env.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world_size),
                   LOCAL_RANK=str(ranks.local_rank))
        return ranks
    return None


def slurm_hosts() -> list[str]:
    """The hosts of this SLURM job, in order (rank 0 runs on the first)."""
    return SlurmJobEnvironment().hostnames


def slurm_port() -> int:
    """A port derived from the job id, so every task of the job agrees on it without talking,
    and two jobs sharing a first node do not collide. Kept below Linux's ephemeral ports
    (32768 and up), which any outgoing connection on the node may hold at that moment."""
    return 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 12000


def processes_per_node(cfg: ParallelismConfig) -> int:
    if cfg.nproc_per_node > 0:
        return cfg.nproc_per_node
    return max(torch.cuda.device_count(), 1)  # 0 means one per GPU, or one on a CPU machine


def wanted_processes(cfg: ParallelismConfig) -> int:
    return processes_per_node(cfg) * cfg.nnodes


def die_with_parent(signal_number: int = 9) -> None:
    """Ask Linux to send this process `signal_number` when its parent dies. dtune's starter
    and torch's launcher start each worker in a session of its own, so without this a killed
    run leaves its workers training on as orphans."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal_number)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def process_group(cfg: ParallelismConfig, ranks: Ranks):
    """The process group for the run, torn down when it ends.

    NCCL on GPUs, gloo on CPU (or as configured). DeepSpeed needs a group even for one
    process (without one it looks for MPI), so a lone ZeRO process gets a group of one.
    A worker that dtune's own launch started leaves without teardown once the run is done:
    every file is written, every rank is past the last collective, and gloo's and DeepSpeed's
    threads can abort during teardown under load (SIGABRT), failing a good run. A SLURM task
    (launchers/slurm.py) must first hand its result to submitit, so it keeps the group and
    leaves without teardown when the interpreter exits (`leave_without_teardown`): under load,
    rank 0 of a finished two-node DDP job was seen to hang after its summary, its job left
    running until cancelled.
    """
    created = not dist.is_initialized() and (ranks.distributed
                                             or engine_spec(cfg).group_for_one_process)
    # DeepSpeed insists on LOCAL_RANK even for one process; set it for the run alone, so that
    # a caller's later processes do not inherit a rank.
    lone = created and not ranks.distributed
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if lone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if created:
        init_process_group(cfg, ranks)
    completed = False
    try:
        yield
        completed = True
    finally:
        if completed and created and ranks.world_size > 1 \
                and os.environ.get("DTUNE_DIE_WITH_PARENT") == "1":
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        if completed and created and ranks.world_size > 1 and _LEAVE_AT_EXIT:
            atexit.register(_exit_now)  # registered last, so it runs first
            return
        if created and dist.is_initialized():
            destroy_process_group()
        if lone:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.update({key: value})


_LEAVE_AT_EXIT = False


def leave_without_teardown() -> None:
    """Make a finished multi-process run of this process keep its process group and leave
    without teardown at interpreter exit, once its caller has handed back what it returns."""
    global _LEAVE_AT_EXIT
    _LEAVE_AT_EXIT = True


def _exit_now() -> None:
    logging.shutdown()  # the log files' last lines: the exit below skips the usual flush
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def destroy_process_group() -> None:
    """DeepSpeed keeps references to the groups it made; its own destroy releases them too,
    so that a later run in this process (a notebook, a test) can build new ones."""
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def init_process_group(cfg: ParallelismConfig, ranks: Ranks) -> None:
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = None
    if torch.cuda.is_available():
        device = local_gpu(ranks)
        torch.cuda.set_device(device)
    # A lone process (ZeRO in one process), and the workers dtune starts on one machine
    # (DTUNE_STORE_FILE, dtune/launch.py), rendezvous through a file in a private folder:
    # they listen on no port. A lone one leaves the environment alone for what it starts.
    store = os.environ.get("DTUNE_STORE_FILE") if ranks.distributed else \
        os.path.join(tempfile.mkdtemp(prefix="dtune-group-"), "store")
    dist.init_process_group(backend=backend, rank=ranks.rank, world_size=ranks.world_size,
                            timeout=timedelta(minutes=cfg.timeout_minutes),
                            device_id=device if backend == "nccl" else None,
                            **({"init_method": "file://" + store} if store else {}))


def local_gpu(ranks: Ranks) -> torch.device:
    """This process's GPU among those it can see: `cuda:LOCAL_RANK` where every process of the
    node sees every GPU, `cuda:0` where each sees only its own (SLURM's --gpus-per-task=1,
    or CUDA_VISIBLE_DEVICES set per rank), where LOCAL_RANK would name a device that is not
    there."""
    return torch.device("cuda", ranks.local_rank % max(torch.cuda.device_count(), 1))


def collective_device() -> torch.device:
    """Where a collective's tensors must live: the GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float) -> float:
    """Sum a Python number over ranks (identity when not distributed)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_reduce_sums(values: list[float]) -> list[float]:
    """Sum several host numbers over ranks in one collective, read back once (themselves when
    not distributed)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks where it lies, without reading it back: the caller reads it
    once, with whatever else it reads at that moment."""
    if dist.is_initialized():
        moved = tensor.to(collective_device())
        dist.all_reduce(moved)
        return moved.to(tensor.device)
    return tensor


def all_reduce_max(value: float) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def gather(value: int | float | torch.Tensor) -> list:
    """Every rank's `value`, in rank order (just [value] when not distributed): a number
    (an int comes back an int, exact below 2**53), or a tensor of rows whose count may differ
    between ranks (each comes back as its own float64 rows, on the CPU).

    Only numbers cross between ranks: torch's *_object collectives unpickle what another rank
    sends, which runs the code of whoever reaches the group's sockets.
    """
    if not dist.is_initialized():
        return [value]
    tensor = torch.as_tensor(value, dtype=torch.float64)
    rows = tensor.reshape(1) if tensor.dim() == 0 else tensor
    device = collective_device()
    count = torch.tensor([rows.shape[0]], dtype=torch.float64, device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    if longest == 0:  # no rank has a row (an empty all_gather is not every backend's)
        return [torch.zeros_like(rows, device="cpu") for _ in counts]
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=torch.float64, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    parts = [part[: int(c.item())].cpu() for part, c in zip(parts, counts)]
    if tensor.dim() > 0:
        return parts
    kind = int if isinstance(value, int) else float
    return [kind(part.item()) for part in parts]
