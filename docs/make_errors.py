"""Regenerate docs/errors.md: run every case of tests/test_bad_inputs.py and record its message,
then the run-directory situations below (each one's test is named beside it).

    python docs/make_errors.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from conftest import TINY, run_dtune  # noqa: E402
from test_bad_inputs import CASES  # noqa: E402


def message(case, tmp: Path) -> str:
    for name, content in case.files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    args = [a.replace("{tmp}", str(tmp)) for a in case.overrides]
    shown = " ".join(a.replace("{tmp}", "DIR") for a in case.overrides)
    if case.module:
        args = [*TINY, *args, f"hydra.run.dir={tmp / 'run'}"]
    result = run_dtune(*args, module=case.module, env={"HF_HUB_OFFLINE": "1"})
    text = " ".join(result.stderr.replace(str(tmp), "DIR").replace(str(ROOT), "REPO").split())
    text = text.replace(" (set HYDRA_FULL_ERROR=1 to see the traceback)", "")
    command = f"python -m dtune {shown}" if case.module else f"dtune {shown}"
    return f"### {case.name}\n\n`{command}`\n\n> {text}\n"


RUN = [*TINY, "train.max_steps=2", "train.save_every=1"]


def trained(tmp: Path) -> Path:
    """A finished tiny run with checkpoints at steps 1 and 2."""
    run = tmp / "run"
    result = run_dtune(*RUN, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def held(tmp: Path):
    from dtune import run_lock
    from dtune.run_dir import RunDir

    (tmp / "run").mkdir()
    run_lock.hold(RunDir(tmp / "run"))  # this process holds it while the command runs
    return [*RUN, "hydra.run.dir={tmp}/run"], True


def used(tmp: Path):
    trained(tmp)
    return [*RUN, "train.lr=3e-3", "hydra.run.dir={tmp}/run"], True


def changed(tmp: Path):
    trained(tmp)
    return [*RUN, "train.resume=true", "train.micro_batch_size=2", "hydra.run.dir={tmp}/run"], True


def damaged(tmp: Path):
    run = trained(tmp)
    for manifest in run.glob("checkpoints/step-*/manifest.json"):
        manifest.unlink()
    return [*RUN, "train.resume=true", "hydra.run.dir={tmp}/run"], True


def linked(tmp: Path):
    run = trained(tmp)
    (run / ".hydra" / "config.yaml").unlink()
    (run / ".hydra" / "config.yaml").symlink_to(tmp / "yours.yaml")
    return [*RUN, "train.resume=true", "hydra.run.dir={tmp}/run"], True


def report_into_final(tmp: Path):
    trained(tmp)
    return ["report", "{tmp}/run", "--out", "{tmp}/run/final"], False


def merge_into_root(tmp: Path):
    trained(tmp)
    return ["merge", "{tmp}/run", "--out", "/", "--force"], False


def damaged_summary(tmp: Path):
    run = trained(tmp)
    (run / "summary.json").write_text("[1, 2]")
    return ["report", "{tmp}/run"], False


# Situations a config alone cannot make (tests/test_security_rundir.py and
# tests/test_security_outputs.py hold their tests).
SITUATIONS = [
    ("a second run in a directory another run holds", held),
    ("a fresh run in a directory that holds another run", used),
    ("a resume under settings that change training", changed),
    ("a resume whose every checkpoint is damaged", damaged),
    ("a link planted in the run directory", linked),
    ("report --out a run's final/ folder", report_into_final),
    ("merge --out / --force", merge_into_root),
    ("report of a run whose summary.json is damaged", damaged_summary),
]


def situation(name: str, make, tmp: Path) -> str:
    overrides, module = make(tmp)
    args = [a.replace("{tmp}", str(tmp)) for a in overrides]
    shown = " ".join(a.replace("{tmp}", "DIR") for a in overrides if a not in TINY)
    result = run_dtune(*args, module=module, env={"HF_HUB_OFFLINE": "1"})
    text = " ".join(result.stderr.replace(str(tmp), "DIR").replace(str(ROOT), "REPO").split())
    text = text.replace(" (set HYDRA_FULL_ERROR=1 to see the traceback)", "")
    command = f"python -m dtune {shown}" if module else f"dtune {shown}"
    return f"### {name}\n\n`{command}`\n\n> {text[text.find('dtune: error'):]}\n"


def main() -> None:
    parts = ["# Error catalogue", "",
             "What dtune says for each bad input its tests cover (`tests/test_bad_inputs.py`); "
             "search this page for the start of your message. DIR stands for your folder. "
             "Regenerate with `python docs/make_errors.py`.", ""]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            parts.append(message(case, Path(tmp)))
            print(case.name, flush=True)
    parts += ["## Run directories and outputs", "",
              "What dtune says where a run directory is shared, reused or damaged (the tiny "
              "model's settings are left out of each command).", ""]
    for name, make in SITUATIONS:
        with tempfile.TemporaryDirectory() as tmp:
            parts.append(situation(name, make, Path(tmp)))
            print(name, flush=True)
    (ROOT / "docs" / "errors.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
