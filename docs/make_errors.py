"""Regenerate docs/errors.md: run every case of tests/test_bad_inputs.py and record its message.

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


def main() -> None:
    parts = ["# Error catalogue", "",
             "What dtune says for each bad input its tests cover (`tests/test_bad_inputs.py`); "
             "search this page for the start of your message. DIR stands for your folder. "
             "Regenerate with `python docs/make_errors.py`.", ""]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            parts.append(message(case, Path(tmp)))
            print(case.name, flush=True)
    (ROOT / "docs" / "errors.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
