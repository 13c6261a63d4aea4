"""Regenerate docs/errors.md: run every case and run-directory situation of
tests/test_bad_inputs.py and write down its message (tests/catalogue.py), as the tests compare.

    python docs/make_errors.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import catalogue  # noqa: E402
from conftest import TINY, run_dtune  # noqa: E402
from test_bad_inputs import CASES, SITUATIONS, situation, train_run  # noqa: E402


def case_entry(case, tmp: Path) -> str:
    for name, content in case.files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    args = [a.replace("{tmp}", str(tmp)) for a in case.overrides]
    shown = " ".join(a.replace("{tmp}", "DIR") for a in case.overrides)
    if case.module:
        args = [*TINY, *args, f"hydra.run.dir={tmp / 'run'}"]
    result = run_dtune(*args, module=case.module, env={"HF_HUB_OFFLINE": "1"})
    command = f"python -m dtune {shown}" if case.module else f"dtune {shown}"
    return catalogue.entry(case.name, command, catalogue.message(result.stderr, tmp))


def main() -> None:
    parts = ["# Error catalogue", "",
             "What dtune says for each bad input its tests cover (`tests/test_bad_inputs.py`, "
             "which runs every command below and compares its message with this page); search "
             "this page for the start of your message. DIR stands for your folder. Regenerate "
             "with `python docs/make_errors.py`.", ""]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            parts.append(case_entry(case, Path(tmp)))
            print(case.name, flush=True)
    parts += ["## Run directories and outputs", "",
              "What dtune says where a run directory is shared, reused or damaged (the tiny "
              "model's settings are left out of each command).", ""]
    with tempfile.TemporaryDirectory() as work:
        trained = train_run(Path(work) / "trained")
        for name, make in SITUATIONS:
            with tempfile.TemporaryDirectory() as tmp:
                command, text = situation(make, Path(tmp), trained)
                parts.append(catalogue.entry(name, command, text))
                print(name, flush=True)
    catalogue.PAGE.write_text("\n".join(parts))


if __name__ == "__main__":
    main()
