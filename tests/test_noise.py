"""Quiet by default, loud when it matters: a run's terminal holds dtune's own lines (its log,
the progress lines, the summary table) and nothing from a library: no warning, no library
logger's line, no compiler command, no print of DeepSpeed's. And the long wait of a default
run, exact match before training, says what it does while it does it."""
import os
import re
from pathlib import Path

import torch

from conftest import TINY, run_dtune

# Each log line names its logger, so that a library logger's line cannot pass for dtune's.
# The console format is all this changes; the filtering under test is every run's. (The
# workers of a multi-process run keep the usual "[12:34:56] " format: the command line they
# are started with carries the config's overrides, not Hydra's.)
NAMED = 'hydra.job_logging.formatters.simple.format="[%(name)s] %(message)s"'
DTUNE_LINE = re.compile(r"\[dtune\] |step \d+/\d+ \| |[+|]")  # log, progress, summary table
WORKER_LOG = re.compile(r"\[\d\d:\d\d:\d\d\] ")
# library noise seen before, whatever the line's shape
KNOWN_NOISE = re.compile(r"Warning|warnings\.warn|\b(gcc|g\+\+|c\+\+) |built successfully|"
                         r"Skipping publisher trust check|\[(INFO|WARNING)\]")


def noise(result, workers: bool) -> list[str]:
    """The lines of a finished run that dtune did not write: every line on stderr (a
    successful run writes none there), every stdout line of another shape, and any line of
    known library noise."""
    def dtune_wrote(line: str) -> bool:
        return bool(DTUNE_LINE.match(line) or workers and WORKER_LOG.match(line)) and \
            not KNOWN_NOISE.search(line)

    return ([f"stderr: {line}" for line in result.stderr.splitlines() if line.strip()] +
            [f"stdout: {line}" for line in result.stdout.splitlines()
             if line.strip() and not dtune_wrote(line)])


def quiet_run(tmp_path, *overrides, workers: bool = False) -> list[str]:
    # PYTHONWARNINGS would show every library warning again, as it is meant to
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = run_dtune(*TINY, NAMED, *overrides, f"hydra.run.dir={tmp_path}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not noise(result, workers), "\n".join(noise(result, workers))
    return result.stdout.splitlines()


def test_a_lora_run_prints_only_dtune_and_shows_exact_match_progress_before_training(tmp_path):
    # the default method; stdout is a pipe, as in a SLURM log: progress comes as plain lines
    lines = quiet_run(tmp_path, "train.max_steps=2", "eval.batch_size=4")
    evaluating = lines.index("[dtune] Evaluating the starting model: held-out loss on 32 "
                             "examples, then exact match on 8 prompts (greedy, up to 12 new "
                             "tokens each)")
    progress = [i for i, line in enumerate(lines)
                if line.startswith("[dtune] Exact match before training: ")]
    result = next(i for i, line in enumerate(lines)
                  if line.startswith("[dtune] Held-out exact match before training: "))
    assert evaluating < progress[0] and progress[-1] < result, lines
    assert [re.sub(r" \| .*", "", lines[i]) for i in progress] == [
        "[dtune] Exact match before training: 4/8 prompts",
        "[dtune] Exact match before training: 8/8 prompts"]
    assert re.search(r"\| \d\d:\d\d elapsed \| ETA \d\d:\d\d$", lines[progress[0]])


def shm_kernel() -> list[Path]:
    """DeepSpeed's shared-memory all-reduce (its CPU collectives), as dtune's cache holds it."""
    return list(Path(os.environ["DTUNE_CACHE_DIR"]).glob(
        "torch-extensions/*/deepspeed_shm_comm/deepspeed_shm_comm.so"))


def test_a_zero3_run_on_two_processes_prints_only_dtune(tmp_path):
    # torch's renamed collectives warned twice per rank and step; DeepSpeed printed a line per
    # rank, and setuptools' compiler the commands of DeepSpeed's probes
    built_before = bool(shm_kernel())
    lines = quiet_run(tmp_path, "+method=full", "parallelism=zero3",
                      "parallelism.nproc_per_node=2", "train.max_steps=3", workers=True)
    if torch.cuda.is_available():
        return  # NCCL: no CPU kernel to build
    # The kernel is built in dtune's cache, under its lock (not in torch's folder that every
    # environment shares, by DeepSpeed's start-up), and a first build says so before the wait.
    assert shm_kernel()
    compiling = [i for i, line in enumerate(lines)
                 if "Compiling DeepSpeed's deepspeed_shm_comm kernel, once: later runs in this "
                    "environment reuse it" in line]
    assert len(compiling) == (0 if built_before else 1), lines
    assert all(i < lines.index(next(x for x in lines if "Model tiny-llama" in x))
               for i in compiling), lines


def test_a_prefix_tuning_run_prints_only_dtune(tmp_path):
    # peft's prefixes reach transformers under a deprecated keyword, in training and generation
    quiet_run(tmp_path, "+method=prefix_tuning", "train.max_steps=2")
