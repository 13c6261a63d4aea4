"""The README's headline figures: `python -m dtune` as written, measured, and written into the
README by this script (not by hand), with the date and the machine.

    python bench/default_run.py             # about 5 minutes on 2 cores; rewrites the block
    python bench/default_run.py --render    # the README block again from the recorded figures

It runs the default fine-tune in a temporary run directory, records what it measured in
bench/results/default_run.json and rewrites the README between its markers.
tests/test_docs.py fails when the README's block is not the one the recorded figures give.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "default_run.json"
START, END = "<!-- default run: bench/default_run.py -->", "<!-- end of default run -->"
TASKS = [("add", "addition"), ("convert_units", "unit conversion"),
         ("extract_json", "JSON extraction"), ("reverse_words", "word reversal")]


def measure() -> dict:
    """Run `python -m dtune` (nothing overridden but where the run directory goes)."""
    run_dir = Path(tempfile.mkdtemp(prefix="dtune-default-run-")) / "run"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dtune", f"hydra.run.dir={run_dir}"], cwd=ROOT,
                   check=True)
    wall = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"split": "eval"' in line]
    import torch

    return {
        "date": time.strftime("%Y-%m-%d"), "command": "python -m dtune",
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                   f"torch {torch.__version__}",
        "wall_time_s": wall, "steps": summary["steps"],
        "examples": summary["steps"] * summary["global_batch_size"],
        "exact_match": [summary["exact_match_before"], summary["exact_match_after"]],
        "by_task": {task: [evals[0].get(f"exact_match/{task}"),
                           summary["exact_match_after_by_task"].get(task)]
                    for task, _ in TASKS},
        "eval_loss": [evals[0].get("eval_loss"), summary["eval_loss"]],
        "tokens_per_s": summary["tokens_per_s"],
        "peak_memory_gib": summary["peak_memory_bytes"] / 2**30,
        "eval_samples": summary.get("exact_match_samples", 100),
    }


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}"


def block(figures: dict) -> str:
    """The README's table and sentence for the recorded figures."""
    names = " / ".join(name for _, name in TASKS)
    before = " / ".join(pct(figures["by_task"][t][0]) for t, _ in TASKS)
    after = " / ".join(pct(figures["by_task"][t][1]) for t, _ in TASKS)
    minutes, seconds = divmod(round(figures["wall_time_s"]), 60)
    return "\n".join([
        START,
        f"Measured with `{figures['command']}` and nothing else overridden, on "
        f"{figures['machine']}, {figures['date']} (written by `python bench/default_run.py`):",
        "",
        f"| | before | after {figures['steps']} steps ({figures['examples']} examples) |",
        "|---|---|---|",
        f"| held-out exact match (100 prompts) | {100 * figures['exact_match'][0]:.1f}% | "
        f"{100 * figures['exact_match'][1]:.1f}% |",
        f"| {names} | {before}% | {after}% |",
        f"| held-out loss | {figures['eval_loss'][0]:.2f} | {figures['eval_loss'][1]:.2f} |",
        "",
        f"Wall time {minutes} min {seconds} s, {figures['tokens_per_s']:.0f} real tokens/s in "
        f"training, peak memory {figures['peak_memory_gib']:.1f} GiB.",
        END])


def render(readme: str, figures: dict) -> str:
    head, rest = readme.split(START, 1)
    return head + block(figures) + rest.split(END, 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--render", action="store_true",
                        help="rewrite the README from the recorded figures, measuring nothing")
    args = parser.parse_args()
    if not args.render:
        RESULTS.write_text(json.dumps(measure(), indent=1) + "\n")
    readme = ROOT / "README.md"
    readme.write_text(render(readme.read_text(), json.loads(RESULTS.read_text())))
    print(block(json.loads(RESULTS.read_text())))


if __name__ == "__main__":
    main()
