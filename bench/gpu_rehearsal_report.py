"""Write bench/results/gpu_rehearsal.md and gpu_rehearsal.log from what bench/gpu_rehearse.sh
left in its scratch folder (times.txt, out1/, out2/).

    python bench/gpu_rehearsal_report.py .rehearsal
"""
from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STEP_LOG_CHARS = 4000  # of each step's output, in gpu_rehearsal.log


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load() -> str:
    """The 1, 5 and 15 minute load averages: how much else shared the cores."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def install_seconds(out: Path) -> str:
    found = re.search(r"== install: (\d+) s", read(out / "install.log"))
    return found.group(1) if found else ""


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else f"({path.name} missing)\n"


def trimmed_steps(log: str) -> str:
    """Each step's block of callN.log cut to its last STEP_LOG_CHARS characters."""
    blocks = re.split(r"(?m)^(?====== )", log)
    return "".join(b if len(b) <= STEP_LOG_CHARS else
                   b.split("\n", 2)[0] + "\n" + b.split("\n", 2)[1] + "\n[...]\n"
                   + b[-STEP_LOG_CHARS:] for b in blocks)


def summary(scratch: Path, times: dict) -> list[str]:
    imports = re.search(r"imports ok.*", read(scratch / "out1" / "install.log"))
    rows = [f"| {call} | {times.get(f'call{call}_exit', '?')} | "
            f"{times.get(f'call{call}_s', '?')} | {install_seconds(scratch / f'out{call}')} |"
            for call in (1, 2)]
    return [
        "# The GPU check, rehearsed on a CPU", "",
        f"`bash bench/gpu_rehearse.sh` on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} cores "
        f"({cpu_model()}; load average {load()} at the end, other jobs included: the seconds "
        f"below are upper bounds), Python {sys.version.split()[0]} (the image has 3.12.3). "
        "The image's "
        f"packages (bench/gpu_image.txt) installed into a fresh venv in "
        f"{times.get('image_venv_s', '?')} s; the working tree that travels, with bench/wheels: "
        f"{times.get('tree_mib', '?')} MiB (limit 64). Each call ran on a fresh copy of that "
        "venv, installing as the device does.", "",
        f"What the install found: {imports.group(0) if imports else 'no imports line'}", "",
        "| call | exit | wall seconds (install included) | install seconds |", "|---|---|---|---|",
        *rows, ""]


def main() -> None:
    scratch = Path(sys.argv[1])
    times = dict(line.split() for line in read(scratch / "times.txt").splitlines()
                 if len(line.split()) == 2)
    lines = summary(scratch, times)
    log = []
    for call in (1, 2):
        out = scratch / f"out{call}"
        lines += [f"## Call {call}", "", read(out / f"call{call}.md").rstrip(), ""]
        log += [f"######## call {call}: install.log", read(out / "install.log"),
                f"######## call {call}: call{call}.log (each step's last {STEP_LOG_CHARS} "
                "characters)", trimmed_steps(read(out / f"call{call}.log"))]
    lines += ["The install logs and each step's output: gpu_rehearsal.log beside this file."]
    (RESULTS / "gpu_rehearsal.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "gpu_rehearsal.log").write_text("\n".join(log) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
