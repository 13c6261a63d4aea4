"""A stop signal checkpoints at a step boundary and the resumed run equals an unbroken one."""
import json
import shlex
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, one_line, run_dtune
from dtune.parity import step_losses
from dtune.checkpoint import valid_checkpoints

COMMON = [*TINY, "+method=lora", "method.dropout=0", "train.max_steps=8", "train.lr=1e-2",
          "eval.exact_match_samples=0"]


def wait_for_step(run_dir, step: int, process, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and any(json.loads(line).get("step", 0) >= step and
                                     "loss" in line for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"run never reached step {step}")


def test_sigterm_checkpoints_explains_and_resumes_to_the_same_losses(tmp_path):
    run_dir = tmp_path / "cut"
    process = subprocess.Popen([sys.executable, "-m", "dtune", *COMMON,
                                f"hydra.run.dir={run_dir}"], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(run_dir, 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    message = one_line(stderr)
    assert "stopped by SIGTERM after step" in message and "Traceback" not in stderr
    assert f"hydra.run.dir={run_dir} train.resume=true" in message
    checkpoints = valid_checkpoints(run_dir)
    assert checkpoints, "no complete checkpoint after SIGTERM"
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 2 <= stopped_at < 8 and not (run_dir / "final").exists()

    resumed = run_dtune(*COMMON, f"hydra.run.dir={run_dir}", "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    unbroken = run_dtune(*COMMON, f"hydra.run.dir={tmp_path / 'unbroken'}")
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    assert step_losses(run_dir) == step_losses(tmp_path / "unbroken")  # bitwise, CPU fp32
    assert len(step_losses(run_dir)) == 8


def test_sigterm_under_ddp_checkpoints_every_rank_and_resumes_to_the_same_losses(tmp_path):
    """SIGTERM to `python -m dtune`: its launcher passes the stop to both workers, which agree
    on it, checkpoint at the same step boundary and exit; the resumed run equals an unbroken
    one."""
    ddp = [*COMMON, "parallelism=ddp", "parallelism.nproc_per_node=2"]
    run_dir = tmp_path / "cut"
    process = subprocess.Popen([sys.executable, "-m", "dtune", *ddp, f"hydra.run.dir={run_dir}"],
                               cwd=ROOT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    wait_for_step(run_dir, 2, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=180)
    assert process.returncode != 0
    checkpoints = valid_checkpoints(run_dir)
    assert checkpoints, "no complete checkpoint after SIGTERM"
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 2 <= stopped_at < 8 and not (run_dir / "final").exists()
    assert {p.name for p in checkpoints[0].glob("rng-rank*.pt")} == {"rng-rank0.pt",
                                                                      "rng-rank1.pt"}
    resumed = run_dtune(*ddp, f"hydra.run.dir={run_dir}", "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    unbroken = run_dtune(*ddp, f"hydra.run.dir={tmp_path / 'unbroken'}")
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    assert step_losses(run_dir) == step_losses(tmp_path / "unbroken")  # bitwise, CPU fp32


def test_a_signal_after_the_last_step_lets_the_final_eval_and_save_finish(tmp_path, monkeypatch,
                                                                         caplog):
    """SLURM's warning signal can land while the final eval runs; the default action for
    SIGUSR1 would kill the process and lose the final model for nothing left to resume."""
    from conftest import train
    import dtune.train

    real_eval = dtune.train.evaluate_now
    full_evals = []  # before training, and the final one after step 8

    def eval_then_signal(recipe, step, with_generation):
        result = real_eval(recipe, step, with_generation)
        full_evals.extend([with_generation] if with_generation else [])
        if len(full_evals) == 2:
            signal.raise_signal(signal.SIGUSR1)
        return result

    monkeypatch.setattr(dtune.train, "evaluate_now", eval_then_signal)
    before = signal.getsignal(signal.SIGUSR1)
    result = train(tmp_path, *COMMON)
    assert result.summary["steps"] == 8
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert "Received SIGUSR1 after the last step" in caplog.text
    assert signal.getsignal(signal.SIGUSR1) is before  # handlers restored once run() is done


@pytest.mark.parametrize("path", ["/runs/plain-1", "/tmp/my runs/a,b", "/tmp/it's [x]=y",
                                  "/tmp/back\\slash {z}", "/tmp/q\\'s", "/tmp/end\\"])
def test_the_printed_resume_command_reaches_hydra_with_the_exact_run_dir(path):
    """The resume hint is pasted into a shell; Hydra must then see the very same path (a bare
    comma would make a sweep, a space or quote would split or break the override)."""
    from dtune.compose import compose_dict
    from dtune.run_dir import resume_overrides

    overrides = shlex.split(resume_overrides(path))
    assert overrides[1] == "train.resume=true"
    composed = compose_dict(["model=tiny-llama", *overrides], with_hydra=True)
    assert composed.hydra.run.dir == path and composed.train.resume is True
