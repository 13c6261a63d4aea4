"""Issue #15's accuracy claim: `python -m dtune objective=dpo data=builtin_preference` (the
default model SmolLM2-135M-Instruct, the default method and settings) on a CPU lifts held-out
preference accuracy by at least 30 points, in at most 10 minutes.

    python bench/dpo_accuracy.py [--timeout 1500] [--out dpo_smollm2] [extra dtune overrides]

Runs that command as a subprocess (its run directory under /tmp, via hydra.run.dir), timing
it from start to exit, and writes bench/results/OUT.md and OUT.json from its summary.json:
held-out preference accuracy before and after (the share of held-out pairs whose chosen
response the policy scores higher, by summed log-prob; dtune/evaluate.py), wall time (the
summary's and the process's), train time, tokens/s, final loss and rewards. A run stopped by
--timeout is reported from its metrics.jsonl, as far as it got.
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
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds, then stop it")
    parser.add_argument("--out", default="dpo_smollm2", help="file stem under bench/results/")
    parser.add_argument("overrides", nargs="*", help="extra dtune overrides (default: none)")
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="bench-dpo-acc-"))
    command = ["python", "-m", "dtune", "objective=dpo", "data=builtin_preference",
               *args.overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started, load = time.perf_counter(), os.getloadavg()[0]
    log = run_dir.parent / f"{run_dir.name}.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, *command[1:], f"hydra.run.dir={run_dir}"],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=args.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            process.terminate()  # dtune checkpoints and stops on SIGTERM
            try:
                code = process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            timed_out = True
    seconds = time.perf_counter() - started
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    metrics_file = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] \
        if metrics_file.exists() else []
    steps = [r for r in rows if "step_time_s" in r]
    evals = [r for r in rows if "preference_accuracy" in r]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(command),
        "run_dir_override": f"hydra.run.dir={run_dir}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads",
        "load_1min_before": load, "load_1min_after": os.getloadavg()[0],
        "exit_code": code, "timed_out": timed_out, "timeout_s": args.timeout,
        "process_wall_s": seconds, "summary": summary, "last_step": steps[-1] if steps else None,
        "evals": evals, "log_tail": log.read_text()[-4000:],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(r: dict) -> str:
    s = r["summary"] or {}
    lines = [
        "# DPO on SmolLM2-135M-Instruct (CPU): held-out preference accuracy",
        "",
        f"Measured {r['date']} on {r['machine']}; load (1 min) {r['load_1min_before']:.1f} "
        f"before, {r['load_1min_after']:.1f} after.",
        "",
        f"Command: `{r['command']}` (run directory set with `{r['run_dir_override']}`).",
        "",
    ]
    if s:
        before, after = s.get("preference_accuracy_before"), s.get("preference_accuracy_after")
        lift = None if before is None or after is None else 100 * (after - before)
        lines += [
            "| | value |", "|---|---|",
            f"| held-out preference accuracy before | {pct(before)} |",
            f"| held-out preference accuracy after | {pct(after)} |",
            f"| lift | {'n/a' if lift is None else f'{lift:+.1f} points'} (claim: >= +30) |",
            f"| wall time (summary) | {s['wall_time_s']:.0f} s = {s['wall_time_s'] / 60:.1f} min "
            f"(claim: <= 10 min) |",
            f"| wall time (process, start to exit) | {r['process_wall_s']:.0f} s = "
            f"{r['process_wall_s'] / 60:.1f} min |",
            f"| train time | {s['train_time_s']:.0f} s |",
            f"| steps x global batch | {s['steps']} x {s['global_batch_size']} pairs |",
            f"| method / precision / reference | {s['method']} / {s['precision']} / "
            f"{s.get('reference')} |",
            f"| final train loss | {s['final_loss']:.4f} |",
            f"| final rewards/accuracy, margin | {s.get('final_rewards/accuracy')}, "
            f"{s.get('final_rewards/margin')} |",
            f"| tokens/s | {s['tokens_per_s']:.0f} |",
            f"| peak memory | {s['peak_memory_bytes'] / 1024**3:.2f} GiB |",
        ]
    else:
        last = r["last_step"]
        lines += [
            f"No summary.json: the run {'was stopped after the timeout of ' if r['timed_out'] else 'exited with code '}"
            f"{r['timeout_s'] if r['timed_out'] else r['exit_code']}"
            f"{' s' if r['timed_out'] else ''}, {r['process_wall_s']:.0f} s after it started.",
            f"Last step logged: {json.dumps(last) if last else 'none'}.",
            f"Preference-accuracy evals logged: {json.dumps(r['evals'])}.",
        ]
    lines += ["", "Log tail:", "", "```", r["log_tail"][-2500:].strip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
