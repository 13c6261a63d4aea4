"""dtune on a real SLURM cluster (slurm/local-cluster: two nodes on this host), never a mock.

The tests use a cluster that is already running (`.ci/run` starts it with
slurm/local-cluster/start.sh); they never start one, since that installs packages and rewrites
/etc. Without one they skip, and DTUNE_REQUIRE_SLURM=1 (set by .ci/run) makes that a failure.
Every test submits tiny jobs with a
fresh submitit folder under tmp_path, so no test can be handed another's result.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, one_line, run_dtune
from dtune.parity import step_losses

pytestmark = pytest.mark.slurm
LORA = [*TINY, "+method=lora", "method.dropout=0", "train.lr=1e-2", "eval.exact_match_samples=0",
        "data.builtin.train_size=64", "data.builtin.eval_size=8"]
ENV = {"GLOO_SOCKET_IFNAME": "lo"}


NO_CLUSTER = ("no SLURM cluster answers `sinfo` here; start the local one with "
              "`bash slurm/local-cluster/start.sh` (as root; it installs and configures SLURM)")


def cluster_running() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session", autouse=True)
def cluster():
    if not cluster_running():
        if os.environ.get("DTUNE_REQUIRE_SLURM") == "1":
            pytest.fail(f"DTUNE_REQUIRE_SLURM=1, but {NO_CLUSTER}")
        pytest.skip(NO_CLUSTER)
    os.environ.update(ENV)


def submit(run_dir, *overrides, wait=True):
    try:
        result = run_dtune(*overrides, "launcher=slurm", "launcher.partition=debug",
                           f"launcher.wait={str(wait).lower()}", f"hydra.run.dir={run_dir}",
                           env=ENV, timeout=300)
    except subprocess.TimeoutExpired as late:  # what dtune said while it waited, and why
        said = late.output.decode() if isinstance(late.output, bytes) else late.output or ""
        found = re.search(r"Submitted SLURM job (\d+)", said)
        if found:
            subprocess.run(["scancel", found.group(1)])
        queue = subprocess.run(["sh", "-c", "squeue; sinfo -R"], capture_output=True, text=True)
        pytest.fail(f"no result in 300 s; dtune said:\n{said}\n{queue.stdout}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def final_state(job: str, timeout: float = 60) -> str:
    """The job's state in accounting once it has left the queue (sacct lags a few seconds)."""
    deadline = time.time() + timeout
    while True:
        state = subprocess.run(["sacct", "-n", "-X", "-j", job, "-o", "State"], text=True,
                               capture_output=True).stdout.strip()
        if state and state not in ("RUNNING", "PENDING", "REQUEUED") or time.time() > deadline:
            return state
        time.sleep(1)


def job_id(output: str) -> str:
    return re.search(r"Submitted SLURM job (\d+)", output).group(1)


def test_single_node_job_prints_where_to_look_and_finishes(tmp_path):
    result = submit(tmp_path, *LORA, "train.max_steps=2")
    job = job_id(result.stdout)
    assert f"tail -f {tmp_path}/slurm/{job}_0_log.out" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 1
    assert final_state(job) == "COMPLETED"


@pytest.mark.parametrize("layout", ["ddp", "zero2"])
def test_two_nodes_match_the_same_run_launched_locally(tmp_path, layout):
    common = [*LORA, "train.max_steps=3", f"parallelism={layout}"]
    submit(tmp_path / "slurm", *common, "launcher.nodes=2")
    local = run_dtune(*common, "parallelism.nproc_per_node=2",
                      f"hydra.run.dir={tmp_path / 'local'}", env=ENV)
    assert local.returncode == 0, local.stderr[-3000:]
    summary = json.loads((tmp_path / "slurm" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert step_losses(tmp_path / "slurm") == pytest.approx(step_losses(tmp_path / "local"),
                                                            abs=1e-6)


def test_a_waiting_job_says_why_and_a_cancelled_one_is_explained(tmp_path):
    # A start time an hour away keeps the job pending: while dtune waits for it, it says so
    # (not a silent wait); once cancelled, dtune says how the job ended, in words.
    waiting = subprocess.Popen(
        [sys.executable, "-m", "dtune", *LORA, "train.max_steps=2", "launcher=slurm",
         "launcher.partition=debug", "launcher.wait=true",
         "+launcher.sbatch_extra.begin=now+1hour", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env={**os.environ, **ENV}, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    lines = []
    try:
        for line in waiting.stdout:
            lines.append(line)
            if ": pending (BeginTime)" in line:
                break
        job = job_id("".join(lines))
        assert f"job {job}: pending (BeginTime)" in lines[-1], "".join(lines)
        subprocess.run(["scancel", job], check=True)
        output, errors = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    message = one_line(errors)
    assert waiting.returncode == 2 and "Traceback" not in errors, errors[-3000:]
    assert f"SLURM job {job} ended CANCELLED" in message, message
    assert f"{job}_0_log.err" in message and "train.resume=true" in message
    script = (tmp_path / "slurm" / f"{job}_submission.sh").read_text()
    assert "srun --unbuffered" in script and "--kill-on-bad-exit=1" in script


def release_when_requeued(job: str, timeout_s: float = 120) -> None:
    """SLURM holds a requeued job for a fixed 2 minutes (EligibleTime = requeue + 120 s)
    before it may start again; once the job (dtune's own `scontrol requeue`) is back in the
    queue, let it start now: the test is about what dtune does, not about that wait."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], text=True,
                               capture_output=True).stdout.split()
        if state[:2] == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            return
        time.sleep(0.5)


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(tmp_path):
    # Enough steps that the signal lands mid-run: 8 tiny steps can all finish before it does.
    common = [*LORA, "train.max_steps=40"]
    run_dir = tmp_path / "requeued"
    waiting = subprocess.Popen(
        [sys.executable, "-m", "dtune", *common, "launcher=slurm", "launcher.wait=true",
         f"hydra.run.dir={run_dir}"], cwd=ROOT, env={**os.environ, **ENV}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, job = time.time() + 240, None
    while time.time() < deadline and waiting.poll() is None:
        slurm_id = run_dir / "slurm_job_id"
        if job is None and slurm_id.is_file():
            job = slurm_id.read_text().strip()
        if job and len(step_losses(run_dir) if (run_dir / "metrics.jsonl").is_file() else []) >= 2:
            break
        time.sleep(0.2)
    assert job, "the job never started training"
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    assert not (run_dir / "summary.json").exists(), "the run ended before the signal was sent"
    release_when_requeued(job)
    output = waiting.communicate(timeout=400)[0]
    assert waiting.returncode == 0, output[-3000:]
    log = (run_dir / "slurm" / f"{job}_0_log.err").read_text()
    assert "Received SIGUSR1" in log and "requeued" in log, log[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] and summary["steps"] == 40  # came back and finished
    assert final_state(job) == "COMPLETED"
    unbroken = run_dtune(*common, f"hydra.run.dir={tmp_path / 'unbroken'}")
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    assert step_losses(run_dir) == step_losses(tmp_path / "unbroken")  # CPU fp32: bitwise


def test_multirun_on_slurm_is_an_array_job_with_a_results_table(tmp_path):
    base = [o for o in LORA if not o.startswith("train.lr=")]
    result = run_dtune("-m", *base, "train.max_steps=1", "train.lr=1e-4,3e-4",
                       "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
                       "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}", env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    job_folders = [p.name for p in (tmp_path / ".submitit").iterdir()
                   if "_" in p.name and not p.name.startswith(".")]
    array = {name.split("_")[0] for name in job_folders}
    assert len(array) == 1 and {n.split("_")[1] for n in job_folders} == {"0", "1"}
    table = (tmp_path / "results.md").read_text()
    assert table.count("| completed |") == 2 and "train.lr=0.0003" in table
    assert (tmp_path / "results.csv").read_text().count("completed") == 2


def test_optuna_sweep_of_4_trials_on_slurm_writes_results(tmp_path):
    base = [o for o in LORA if not o.startswith("train.lr=")]
    result = run_dtune("-m", *base, "train.max_steps=1", "hydra/sweeper=optuna",
                       "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                       "hydra.sweeper.sampler.seed=0", "train.lr=interval(1e-4,1e-2)",
                       "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
                       "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}", env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_value" in best and "train.lr" in best
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and all(",completed," in row for row in rows[1:])


def test_sbatch_template_runs_a_tiny_fine_tune(tmp_path):
    # The CPU test cluster has no GPUs: the command line overrides the template's GPU line.
    result = subprocess.run(
        ["sbatch", "--wait", "--gpus-per-node=0", f"--output={tmp_path}/job-%j.out",
         str(ROOT / "slurm/dtune.sbatch"), *LORA, "train.max_steps=2"],
        cwd=tmp_path, text=True, capture_output=True, timeout=300, env={**os.environ, **ENV})
    assert result.returncode == 0, result.stdout + result.stderr
    job = re.search(r"Submitted batch job (\d+)", result.stdout).group(1)
    summary = json.loads((tmp_path / "runs" / "slurm" / job / "summary.json").read_text())
    assert summary["steps"] == 2


def test_unknown_partition_is_named_with_the_fix(tmp_path):
    result = run_dtune(*LORA, "launcher=slurm", "launcher.partition=nosuch",
                       f"hydra.run.dir={tmp_path}")
    message = one_line(result.stderr)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "launcher.partition='nosuch' is not a partition of this cluster" in message
    assert "debug" in message


def test_missing_sbatch_is_explained(tmp_path):
    bare_path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin/nonexistent"])
    result = run_dtune(*LORA, "launcher=slurm", f"hydra.run.dir={tmp_path}",
                       env={"PATH": bare_path})
    message = one_line(result.stderr)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "submits with `sbatch`, which is not on PATH" in message
    assert "start.sh" in message and "launcher=local" in message
