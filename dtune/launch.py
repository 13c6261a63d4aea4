"""Process start-up: train in this process, or start the workers a multi-process run asks for.

`run_training` is the local launcher (`launcher=local`, conf/launcher/local.yaml) and what a
SLURM job runs on each of its tasks (dtune/launchers/slurm.py).
"""
from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dtune import distributed, run_start, train
from dtune.config import Config, ParallelismConfig
from dtune.errors import DtuneError
from dtune.run_dir import RunDir
from dtune.settle import SETTLED_ENV, settled_text
from dtune.signals import STOP_SIGNALS

log = logging.getLogger("dtune")


def run_training(config: Config, run_dir: str, overrides: list[str]) -> float | None:
    """Train here: in this process, or in workers started for the processes asked for.
    Returns the final eval loss (what Hydra sweepers minimise)."""
    warn_if_gpus_unseen()
    parallel = config.parallelism  # settled where launch began (dtune/settle.py)
    if distributed.launched_ranks(parallel) is None and parallel.name != "single" \
            and distributed.wanted_processes(parallel) > 1:
        check_process_count(parallel)
        with held_for_workers(config, RunDir(Path(run_dir))) as run_id:
            code = launch_workers(config, run_dir, overrides, run_id)
        if code:
            sys.exit(code)
        summary = RunDir(Path(run_dir)).read_summary()
        return summary.get("eval_loss") if summary else None
    return train.run(config, Path(run_dir)).summary.get("eval_loss")


def held_for_workers(config: Config, run_dir: RunDir):
    """The run directory held by this process for the workers it starts (they take no lock;
    DTUNE_RUN_ID tells them the run), or nothing where another process answers for it."""
    if run_start.answers_for_run(config):
        return run_start.claimed(config, run_dir)
    return contextlib.nullcontext(None)


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


def launch_workers(config: Config, run_dir: str, overrides: list[str],
                   run_id: str | None = None) -> int:
    """Re-run this command as `nproc_per_node` workers, all writing into the same run
    directory: on one machine through dtune's own starter, across several through torch's
    elastic launcher (what `torchrun` runs). They train with `config` as it was settled here
    (DTUNE_SETTLED_CONFIG). Returns the exit code (0 when all succeeded)."""
    cfg = config.parallelism
    nnodes, node_rank = cfg.nnodes, cfg.node_rank
    if "SLURM_NNODES" in os.environ:  # one SLURM task per node: the job decides the nodes
        nnodes = int(os.environ["SLURM_NNODES"])
        node_rank = int(os.environ.get("SLURM_NODEID", node_rank))
    kept = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    per_node = distributed.processes_per_node(cfg)
    # The run dir travels in the environment: as an override, a path with a space, a comma
    # or '=' would break the workers' command line or turn the run into a sweep.
    env = {**os.environ, "DTUNE_DIE_WITH_PARENT": "1", "DTUNE_RUN_DIR": run_dir,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                             str(threads_per_worker(per_node)))}
    env[SETTLED_ENV] = settled_text(config)
    if run_id is not None:  # this process holds the run dir for them (dtune/run_start.py)
        env["DTUNE_RUN_ID"] = run_id
    args = ["-m", "dtune", *kept, "hydra.run.dir=${oc.env:DTUNE_RUN_DIR}"]
    if nnodes == 1:
        return run_local_workers(per_node, args, env)
    env.pop("DTUNE_STORE_FILE", None)  # a store of another run's: these meet through torch's
    master_addr = cfg.master_addr
    if master_addr == "auto":
        master_addr = distributed.slurm_hosts()[0] if "SLURM_JOB_NODELIST" in os.environ \
            else "127.0.0.1"
    port = master_port(cfg, nnodes)
    if node_rank == 0:
        check_port_free(master_addr, port)
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={per_node}",
        f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
        f"--master-port={port}", *args,
    ]
    # If this process is killed (kill -9, OOM), the launcher goes too, and it stops the workers.
    return subprocess.call(command, env=env,
                           preexec_fn=lambda: distributed.die_with_parent(15))


def threads_per_worker(workers: int) -> int:
    """The cores this process may use, shared among the node's workers. Not torchrun's one
    each: that leaves most cores of a GPU node idle, and makes CPU Adam (the optimizer step
    of an offload run, on the host) single-threaded; more than a share each, and the
    workers' threads fight over the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(1, cores // max(workers, 1))


def master_port(cfg: ParallelismConfig, nnodes: int) -> int:
    """The rendezvous port every node of a multi-node run must agree on without talking."""
    if cfg.master_port:
        return cfg.master_port
    if "SLURM_JOB_ID" in os.environ:
        return distributed.slurm_port()
    raise DtuneError(
        f"parallelism.nnodes={nnodes} runs on several machines, which meet on one port of the "
        "first node (parallelism.master_addr), and parallelism.master_port=0 names none: "
        "outside a SLURM job (where dtune derives it from the job id) no node can guess the "
        "port the others chose. Set parallelism.master_port to a free port of the first node, "
        "the same on every node, e.g. parallelism.master_port=29500."
    )


# Seconds the other workers get to stop on SIGTERM once one has failed, before SIGKILL.
STOP_GRACE_S = 15


def run_local_workers(count: int, args: list[str], env: dict) -> int:
    """Start one machine's `count` workers and wait for them; the first failure's exit code.

    dtune keeps its own starter here rather than torch.distributed.run because torch's
    launcher always serves its rendezvous TCPStore on every interface, without
    authentication, so that anyone who reaches this machine could join or disrupt the run.
    These workers meet through a file store in a private folder instead, and gloo's and
    NCCL's sockets stay on loopback: a one-machine run listens on nothing beyond it.
    """
    store = tempfile.mkdtemp(prefix="dtune-group-")  # mode 0700: this user's alone
    common = {**env, "WORLD_SIZE": str(count), "LOCAL_WORLD_SIZE": str(count),
              "MASTER_ADDR": "127.0.0.1", "GROUP_RANK": "0",
              "DTUNE_STORE_FILE": os.path.join(store, "store")}
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        common.setdefault(key, "lo")
    started: list[subprocess.Popen] = []
    previous = {}

    def forward(signum, frame) -> None:
        for worker in started:
            if worker.poll() is None:
                worker.send_signal(signum)

    try:
        for signum in STOP_SIGNALS:
            try:
                previous[signum] = signal.signal(signum, forward)
            except ValueError:  # not the main thread (a notebook's worker): no forwarding
                break
        for rank in range(count):
            # A session of its own: a Ctrl-C reaches each worker once, through `forward`;
            # and a worker whose parent dies (kill -9, OOM) goes too.
            started.append(subprocess.Popen(
                [sys.executable, *args], env={**common, "RANK": str(rank),
                                              "LOCAL_RANK": str(rank)},
                start_new_session=True, preexec_fn=distributed.die_with_parent))
        return wait_for_workers(started)
    finally:
        for worker in started:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(store, ignore_errors=True)


def wait_for_workers(started: list[subprocess.Popen]) -> int:
    """Wait for every worker; once one fails, stop the others (SIGTERM, then SIGKILL), since
    they would wait for it in their next collective until the group's timeout."""
    failure, stopping_since = 0, None
    while any(worker.poll() is None for worker in started):
        if stopping_since is None:
            failure = next((exit_code(w) for w in started if w.poll()), 0)
            if failure:
                stopping_since = time.monotonic()
                for worker in started:
                    if worker.poll() is None:
                        worker.terminate()
        elif time.monotonic() - stopping_since > STOP_GRACE_S:
            for worker in started:
                if worker.poll() is None:
                    worker.kill()
        time.sleep(0.1)
    return failure or next((exit_code(w) for w in started if w.returncode), 0)


def exit_code(worker: subprocess.Popen) -> int:
    """A worker's exit status as a shell reports it: 128 + N for death by signal N."""
    return 128 - worker.returncode if worker.returncode < 0 else worker.returncode


def check_port_free(address: str, port: int) -> None:
    """On the first node, refuse a rendezvous port another program holds, in words, before
    any worker starts (torch would fail later with a traceback, or meet the wrong program)."""
    if not is_this_machine(address):
        return  # the first node is another machine: only it can tell
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))  # torch's store binds every interface
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise DtuneError(
                    f"parallelism.master_port={port}: port {port} is already in use on this "
                    f"machine, the first node (parallelism.master_addr={address}), so the "
                    "nodes cannot meet there. Stop the program that holds it (`ss -ltnp "
                    f"sport = :{port}` names it) or choose another free port with "
                    "parallelism.master_port=<port>, the same on every node."
                ) from None
            # no IPv6 here, or the like: nothing to learn from this family


def is_this_machine(address: str) -> bool:
    """Whether `address` names this machine: only this machine can bind it."""
    try:
        infos = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False  # torch will say the address does not resolve
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((sockaddr[0], 0))
                return True
        except OSError:
            pass
    return False
