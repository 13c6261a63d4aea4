"""Stop cleanly on a signal: checkpoint at the next step boundary, then requeue or explain.

SIGTERM (preemption, `scancel`), SIGINT (Ctrl-C), SIGUSR1 (`sbatch --signal=USR1@120`) and
SIGUSR2 (submitit's time-limit signal) only set a flag in the handler; the training loop reads
it between steps, where model, optimizer and data state agree, so the checkpoint it saves
resumes to the same losses. A second SIGINT exits at once, for a user who really means it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from dtune.errors import DtuneError
from dtune.run_dir import resume_overrides

log = logging.getLogger("dtune")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# Exit code after a requeue: the job is coming back, so this run did not fail.
REQUEUED_EXIT_CODE = 0


class StopFlag:
    """Install with `install()`, read `signum` once per step (every rank learns of it through
    the step's one collective: train.window_counts), `restore()` at the end."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.finishing = False  # past the last step: the final eval and save run to the end
        self._previous: dict = {}

    def install(self) -> "StopFlag":
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker): no handlers
                break
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
        self.signum = signum
        name = signal.Signals(signum).name
        if self.finishing:
            # Training is done: dying here would lose the final save for nothing to resume.
            log.warning("Received %s after the last step: finishing the final evaluation and "
                        "save first", name)
        else:
            log.warning("Received %s: saving a checkpoint at the end of this step, then "
                        "stopping", name)


def stop_after_checkpoint(flag: StopFlag, run_dir, step: int, is_main: bool) -> None:
    """Called once the checkpoint at `step` is saved: requeue a SLURM job, else explain how
    to resume. Never returns."""
    flag.restore()
    name = signal.Signals(flag.signum).name
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id and flag.signum != signal.SIGINT:
        # Array jobs: requeue this task, not the whole array.
        target = os.environ.get("SLURM_ARRAY_JOB_ID")
        target = f"{target}_{os.environ['SLURM_ARRAY_TASK_ID']}" if target else job_id
        if not is_main or requeue(target):
            log.warning("%s: checkpoint saved at step %d in %s; SLURM job %s requeued, it "
                        "resumes from there (SLURM_RESTART_COUNT > 0 turns on train.resume)",
                        name, step, run_dir, target)
            # SystemExit, not an exception: submitit then writes no result, and waits on
            # the requeued job.
            sys.exit(REQUEUED_EXIT_CODE)
    raise DtuneError(
        f"stopped by {name} after step {step}; a complete checkpoint is in "
        f"{run_dir}/checkpoints. Resume it with the same overrides plus "
        f"`{resume_overrides(run_dir)}`, e.g. `python -m dtune ... "
        f"{resume_overrides(run_dir)}`."
    )


def requeue(job_id: str) -> bool:
    """`scontrol requeue JOB`; False (logged) when SLURM refuses, e.g. --no-requeue jobs."""
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True,
                       text=True, timeout=60)
        return True
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        log.warning("could not requeue SLURM job %s (%s)", job_id, str(detail).strip())
        return False


def slurm_restarted() -> bool:
    """True in a SLURM job that was requeued: it must resume, not start over."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
