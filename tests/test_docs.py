"""Documentation that is generated from the code stays in step with it, and the README's
commands run as written."""
import os
import sys

import pytest

from conftest import ROOT

sys.path[:0] = [str(ROOT / "docs"), str(ROOT / "bench")]
import default_run  # noqa: E402
import make_tables  # noqa: E402


def test_the_readme_headline_figures_are_the_ones_the_benchmark_recorded():
    import json

    readme = (ROOT / "README.md").read_text()
    figures = json.loads(default_run.RESULTS.read_text())
    assert default_run.render(readme, figures) == readme, "run: python bench/default_run.py"


def test_the_readme_method_table_is_the_one_the_specs_give():
    readme = (ROOT / "README.md").read_text()
    assert make_tables.render(readme) == readme, "run: python docs/make_tables.py"
    for name in ("full", "lora", "qlora", "prompt_tuning"):
        assert f"| `{name}` |" in readme


# --- the README's commands run as written, on the tiny model ---------------------------------

# The one set of overrides every README training command gets here, last, so that it runs on
# the tiny random model in seconds (the README says so under "Tests").
SHRINK = ["model=tiny-llama", "data.builtin.train_size=64", "data.builtin.eval_size=8",
          "eval.exact_match_samples=2", "eval.max_new_tokens=4", "eval.max_loss_samples=8",
          "train.micro_batch_size=4", "train.log_every=1", "train.max_steps=2"]
# What a README command needs that a test run does not have, and where it is tested instead.
NOT_HERE = {
    "launcher=slurm": "a SLURM cluster: tests/test_slurm.py submits",
    "sbatch ": "a SLURM cluster: tests/test_slurm.py submits",
    "submitit_slurm": "a SLURM cluster: tests/test_slurm.py submits",
    "hydra/sweeper=optuna": "many trials: tests/test_slurm.py runs a short Optuna sweep",
    "Qwen/": "the hub", "acme/": "the hub",
    "gpu_check.sh": "a GPU: its CPU dry run is tests/test_gpu_ready.py",
    "dtune check": "minutes of every layout: tests/test_distributed.py runs it",
    "nproc_per_node=2": "two DeepSpeed processes: tests/test_distributed.py trains them",
    "nproc_per_node=8": "eight GPUs: tests/test_distributed.py trains two processes",
    "tracker=wandb": "W&B's service: tests/test_tracking.py runs it offline",
    "--screenshot": "Chromium: tests/test_report.py takes one",
}
EXAMPLE_FILES = {
    "my_chats.jsonl": [{"messages": [{"role": "user", "content": f"Say {i}."},
                                     {"role": "assistant", "content": str(i)}]}
                       for i in range(24)],
    "pairs.jsonl": [{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i),
                     "rejected": str(2 * i + 1)} for i in range(24)],
}


def readme_commands() -> list[str]:
    """Every `python -m dtune` and `dtune` command of the README's bash blocks, in order, with
    line continuations joined and comments dropped."""
    import re

    commands, block = [], re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(),
                                     re.S)
    for text in block:
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(("python -m dtune", "dtune ")):
                commands.append(line)
    return commands


def distinct(commands: list[str]) -> list[str]:
    """The commands whose runnable form has not come before (a tool shown twice runs once)."""
    seen, kept = set(), []
    for command in commands:
        argv = tuple(runnable(command)[0])
        if argv not in seen:
            seen.add(argv)
            kept.append(command)
    return kept


def runnable(command: str) -> tuple[list[str], str | None]:
    """(the argv to run, or why it is not run here): placeholders filled (RUN_DIR is the
    README's first run, runs/first), optional [arguments] left out, training commands shrunk."""
    import re
    import shlex

    text = re.sub(r"\s*\[(--|overrides)[^\]]*\]", "", command)
    why = next((reason for marker, reason in NOT_HERE.items() if marker in text), None)
    text = text.replace("RUN_OR_SWEEP_DIR...", "runs/first").replace("RUN_DIR", "runs/first")
    text = text.replace('"..."', '"What is 12 + 30?"').replace("step-N", "step-2")
    argv = shlex.split(text)
    if argv[:3] == ["python", "-m", "dtune"]:
        argv = ["-m", "dtune", *argv[3:]]
    elif argv[:2] == ["dtune", "train"]:
        argv = ["-m", "dtune", *argv[2:]]
    else:
        return ["-m", "dtune.cli", *argv[1:]], why
    return [*argv, *SHRINK], why


@pytest.fixture(scope="module")
def readme_cwd(tmp_path_factory):
    """A folder to run the README's commands in, with the data files they name and the files
    its YAML blocks show (a block whose first line is `# PATH`)."""
    import json
    import re

    cwd = tmp_path_factory.mktemp("readme")
    for name, rows in EXAMPLE_FILES.items():
        (cwd / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    readme = (ROOT / "README.md").read_text()
    for name, text in re.findall(r"```yaml\n# (\S+)\n(.*?)```", readme, re.S):
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (cwd / name).write_text(text)
    return cwd


@pytest.mark.parametrize("command", distinct(readme_commands()))
def test_a_readme_command_runs_as_written(readme_cwd, command):
    import subprocess

    argv, why = runnable(command)
    if why:
        pytest.skip(f"not run here, it needs {why}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
           "WANDB_DIR": str(readme_cwd)}
    result = subprocess.run([sys.executable, *argv], cwd=readme_cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
