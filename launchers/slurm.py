"""`launcher=slurm`: submit the run as a SLURM job through submitit.

The job runs the same validated Config in the run dir Hydra already made here, one task per
node; dtune's SLURM detection (dtune/distributed.py) turns the tasks into ranks. A requeued job
(preemption, time limit, `scontrol requeue`) resumes from its newest checkpoint because
SLURM_RESTART_COUNT > 0 turns on train.resume (dtune/signals.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import submitit

from dtune import distributed, run_start
from dtune.config import Config, LauncherConfig, check_no_control_characters
from dtune.errors import DtuneError
from dtune.files import NoFollowFileHandler, refuse_symlink, write_atomically
from dtune.launch import run_training
from dtune.run_dir import RunDir

log = logging.getLogger("dtune")


def submit(config: Config, run_dir: str, overrides: list[str]) -> float | None:
    """Submit; print the job id, log paths and how to follow them. With launcher.wait=true,
    wait for the job and return its final eval loss (what Hydra sweepers minimise)."""
    launcher = config.launcher
    run_dir = Path(run_dir)
    folder = Path(launcher.folder) if launcher.folder else RunDir(run_dir).slurm
    check_script_paths(run_dir, folder)
    refuse_symlink(RunDir(run_dir).slurm_job_id_file)  # before a job exists to lose track of
    check_cluster(launcher)
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**sbatch_parameters(launcher))
    # Workers started inside the job must train, not submit again.
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith("launcher")]
    # The job takes the run directory's lock itself, as the run this submission claimed; this
    # process gives it back first (with launcher.wait=true it would wait on its own job).
    run_id = run_start.claimed_id(RunDir(run_dir))
    run_start.release(RunDir(run_dir))
    try:
        job = executor.submit(run_job, config, str(run_dir), job_overrides + ["launcher=local"],
                              run_id)
    except subprocess.CalledProcessError as error:  # sbatch refused the job
        raise DtuneError(f"sbatch refused the job: {_text(error.stderr or error.output)}. "
                         "Check the launcher.* settings (partition, account, qos, "
                         "constraint, sbatch_extra).") from None
    except submitit.core.utils.FailedJobError as error:
        raise DtuneError(f"sbatch refused the job: {error}. Check the launcher.* settings "
                         "(partition, account, qos, constraint, sbatch_extra).") from None
    print(f"Submitted SLURM job {job.job_id} ({launcher.nodes} node(s)); run dir {run_dir}\n"
          f"  log:    {job.paths.stdout}\n  errors: {job.paths.stderr}\n"
          f"  follow: tail -f {job.paths.stdout}\n"
          f"  status: squeue -j {job.job_id}   cancel: scancel {job.job_id}", flush=True)
    write_atomically(RunDir(run_dir).slurm_job_id_file, f"{job.job_id}\n")
    if not launcher.wait:
        return None
    return wait_for(job)


# SLURM's pending reasons that pass on their own: the job waits its turn or its start time.
WAITING_ITS_TURN = {"None", "Priority", "Resources", "BeginTime", "Dependency", "JobHeldUser"}
POLL_S = 2.0


def wait_for(job: submitit.Job) -> float | None:
    """launcher.wait=true: wait for the job and return rank 0's result (what a sweeper
    minimises), saying what the job does each time that changes. submitit's own wait is
    silent, and it looks at accounting only every few minutes: a job that cannot start (a
    node down, more nodes than the partition has) would wait without a word, and one whose
    task died would be noticed minutes late."""
    said = None
    while not job.done():
        now = queue_state(job.job_id)
        if now is None:  # left the queue without a result file: ask accounting now
            if job.done(force_check=True):
                break
        elif now != said:
            print(f"  job {job.job_id}: {now}", flush=True)
            said = now
        time.sleep(POLL_S)
    try:
        return job.results()[0]  # one result per task; rank 0's is the run's
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
        state = job.watcher.get_state(job.job_id, mode="force")
        raise DtuneError(
            f"SLURM job {job.job_id} ended {state} without finishing the run"
            f"{raised_in_job(error)}. What it printed "
            f"is in {job.paths.stdout} and {job.paths.stderr} (one pair per node: "
            f"_0_ is rank 0). Its checkpoints stay in the run dir: submit the same command "
            "with train.resume=true to go on from the newest one.") from None


def raised_in_job(error: Exception) -> str:
    """': <the error's last line>' from a task's traceback that submitit hands back (a
    DtuneError's paragraph is that line), or '' where the task left none (it was killed)."""
    parts = str(error).split("-" * 22)
    lines = [line.strip() for line in (parts[1] if len(parts) > 2 else "").splitlines()]
    last = next((line for line in reversed(lines) if line), "")
    return f": {last}" if last else ""


def queue_state(job_id: str) -> str | None:
    """The job's state in the queue in words ("pending (Resources)", "running on
    node[1-2]"), or None once it has left the queue."""
    try:
        listed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r|%N"],
                                capture_output=True, text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "state unknown (squeue did not answer)"
    state, _, rest = listed[0].strip().partition("|")
    if not state:
        return None
    reason, _, nodes = rest.partition("|")
    if state == "PENDING":
        hint = "" if reason in WAITING_ITS_TURN else \
            "; SLURM will not start it while that holds: `sinfo -R` says why nodes are out"
        return f"pending ({reason}{hint})"
    return f"{state.lower()}" + (f" on {nodes}" if nodes else "")


def check_script_paths(run_dir: Path, folder: Path) -> None:
    """Refuse, before anything is submitted, a control character in a path that reaches the
    batch script: submitit writes the log folder into `#SBATCH --output=...` lines and the
    command, shell-quoted, but a newline inside quotes still ends an #SBATCH line, and sbatch
    ignores every directive after the first line that is not one. (The run dir itself travels
    pickled, and its slurm/ folder is the default log folder.)"""
    check_no_control_characters("hydra.run.dir", run_dir)
    check_no_control_characters("launcher.folder", folder.absolute())


def sbatch_parameters(launcher: LauncherConfig) -> dict:
    """submitit's SlurmExecutor parameters for the launcher config (None: SLURM's default)."""
    params = {
        "job_name": launcher.job_name, "partition": launcher.partition,
        "nodes": launcher.nodes, "ntasks_per_node": 1, "time": launcher.time,
        "cpus_per_task": launcher.cpus_per_task, "mem": launcher.mem,
        "account": launcher.account, "qos": launcher.qos, "constraint": launcher.constraint,
        "signal_delay_s": launcher.signal_delay_s,
        "additional_parameters": {"requeue": True, **launcher.sbatch_extra},
        # One task failing ends the job: the others would wait for it in a collective until
        # parallelism.timeout_minutes runs out.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if launcher.gpus_per_node:
        params["gpus_per_node"] = launcher.gpus_per_node
    return {key: value for key, value in params.items() if value is not None}


def check_cluster(launcher: LauncherConfig) -> None:
    """Refuse early, in words, what sbatch would refuse later in its own."""
    require_sbatch("launcher=slurm", "or train here with launcher=local")
    try:
        # partition (the default marked *) and generic resources, such as gpu:8
        listed = subprocess.run(["sinfo", "-h", "-o", "%P %G"], capture_output=True, text=True,
                                timeout=60, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return  # sinfo unusable: let sbatch judge
    gres = {}
    for line in listed:
        name, _, resources = line.partition(" ")
        gres.setdefault(name.rstrip("*"), set()).add(resources.strip())
    if launcher.partition is None:
        default = next((line.split()[0].rstrip("*") for line in listed
                        if line.split() and line.split()[0].endswith("*")), None)
        warning = gpu_warning(default, gres.get(default, set()), launcher.gpus_per_node)
    elif gres and launcher.partition not in gres:
        raise DtuneError(
            f"launcher.partition={launcher.partition!r} is not a partition of this cluster; "
            f"it has {', '.join(sorted(gres))}. Set launcher.partition to one of them "
            "(or leave it unset for the default partition)."
        )
    else:
        warning = gpu_warning(launcher.partition, gres.get(launcher.partition, set()),
                              launcher.gpus_per_node)
    if warning:
        log.warning(warning)


def require_sbatch(what: str, alternative: str) -> None:
    """Refuse, in words, to submit where SLURM's `sbatch` is missing."""
    if shutil.which("sbatch") is None:
        raise DtuneError(
            f"{what} submits with `sbatch`, which is not on PATH. Run dtune on a SLURM login "
            "node (or load SLURM, e.g. `module load slurm`), start the local test cluster with "
            f"slurm/local-cluster/start.sh, {alternative}.")


def gpu_warning(partition: str | None, gres: set[str], gpus_per_node: int) -> str | None:
    """A partition whose nodes have GPUs, asked for none: the job would train on the CPU."""
    gpus = sorted(g for g in gres if "gpu" in g)
    if partition is None or gpus_per_node or not gpus:
        return None
    return (f"the partition {partition} has GPUs ({', '.join(gpus)}), but "
            "launcher.gpus_per_node=0 asks for none: the job would train on the CPU. Set "
            "launcher.gpus_per_node to the GPUs each node should use.")


def run_job(config: Config, run_dir: str, overrides: list[str],
            run_id: str | None = None) -> float | None:
    """The function submitit runs on every task of the job. Task 0 holds the run directory
    for the job's life, as the run `run_id` that the submission claimed it for."""
    rank0 = os.environ.get("SLURM_PROCID", "0") == "0"
    handlers = [logging.StreamHandler()]
    if rank0:
        handlers.append(NoFollowFileHandler(RunDir(run_dir).log_file))
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, handlers=handlers,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True)
    distributed.leave_without_teardown()  # once submitit has the result (dtune/distributed.py)
    if not run_start.answers_for_run(config):
        return run_training(config, run_dir, overrides)
    with run_start.claimed(config, RunDir(run_dir), expected_id=run_id):
        return run_training(config, run_dir, overrides)


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return " ".join(str(value or "").split())
