"""Every parallelism layout side by side in one run on this machine: full fine-tuning of the
tiny model with 2 processes under ddp, zero1/2/3 (+ offload) and fsdp2 (+ offload), and FSDP2
with train.compile=true against eager. Same data, micro-batch, steps and seed for all.

    python bench/fsdp2.py [--steps 30] [--repeats 2] [--layouts ddp zero3 fsdp2 ...]
                          [--no-compile]

Writes bench/results/fsdp2.json and bench/results/fsdp2.md. Throughput is the median of the
steps after the first --warmup ones (train.compile's first steps compile), from each run's
metrics.jsonl, the best of --repeats round-robin repeats; memory is each rank's peak while
training (RSS on a CPU machine, allocated GPU memory on a GPU), from its summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
GIB = 1024**3
LAYOUTS = ["ddp", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "fsdp2",
           "fsdp2_offload"]


def run(name: str, overrides: list[str], steps: int, warmup: int, processes: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    command = [sys.executable, "-m", "dtune", "model=tiny-llama", "+method=full",
               f"parallelism.nproc_per_node={processes}", f"train.max_steps={steps}",
               "train.micro_batch_size=4", "train.lr=1e-3", "train.save_every=0",
               "train.log_every=1", "train.save_final=false", "train.warmup_steps=0",
               "train.loss_chunk_size=0", "eval.exact_match_samples=0",
               "eval.max_loss_samples=8", "data.builtin.train_size=512", *overrides,
               "hydra.run.dir=${oc.env:DTUNE_RUN_DIR}"]
    env = {**os.environ, "DTUNE_RUN_DIR": str(run_dir), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_seen = [r for r in records if "tokens_per_s" in r and r.get("split") != "eval"]
    steady = [r["tokens_per_s"] for r in steps_seen[warmup:]]
    return {
        "name": name, "overrides": overrides,
        "tokens_per_s": statistics.median(steady),
        "first_step_s": steps_seen[0]["step_time_s"],
        "train_peak_gib_per_rank": [b / GIB for b in summary["train_peak_memory_bytes_per_rank"]],
        "peak_gib_per_rank": [b / GIB for b in summary["peak_memory_bytes_per_rank"]],
        "losses": [r["loss"] for r in steps_seen],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", default=LAYOUTS)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # other jobs on the machine slow every figure
    many = args.processes
    plan = [(layout, [f"parallelism={layout}"], many) for layout in args.layouts]
    if not args.no_compile:  # compile against eager, under FSDP2 and in one process
        plan += [("fsdp2 + compile", ["parallelism=fsdp2", "train.compile=true"], many),
                 ("single", ["parallelism=single"], 1),
                 ("single + compile", ["parallelism=single", "train.compile=true"], 1)]
    # Round-robin repeats, the best of each kept: on a shared machine another job's load
    # slows a run down, never speeds it up; every measurement stays in the JSON.
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
    for _ in range(args.repeats):
        for name, overrides, processes in plan:
            runs[name].append(run(name, overrides, args.steps, args.warmup, processes))
            print(json.dumps({k: v for k, v in runs[name][-1].items() if k != "losses"}),
                  flush=True)
    rows = []
    for name, measured in runs.items():
        best = max(measured, key=lambda r: r["tokens_per_s"])
        rows.append({**best, "tokens_per_s_each_repeat": [r["tokens_per_s"] for r in measured]})
    setting = (f"tiny-llama (164k parameters) full fine-tuning, fp32, {args.processes} processes "
               f"(gloo) unless named single, micro-batch 4, {args.steps} steps, "
               f"{'CUDA' if torch.cuda.is_available() else 'CPU'} ({os.cpu_count()} cores), "
               f"torch {torch.__version__}, {platform.machine()}; 1-minute load average "
               f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    command = f"python bench/fsdp2.py {' '.join(sys.argv[1:])}".strip()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fsdp2.json").write_text(json.dumps(
        {"setting": setting, "command": command, "rows": rows}, indent=1))
    lines = [f"Settings: {setting}.", "", f"Command: `{command}`", "",
             f"Tokens/s: the median over steps {args.warmup + 1}-{args.steps} (not the first "
             f"{args.warmup}, where train.compile compiles), the best of {args.repeats} "
             "round-robin repeats (each repeat's in brackets). Peak memory: each rank's, while "
             "training (RSS on a CPU machine: about 0.5 GiB of it is Python and the libraries; "
             "the tiny model's own state is a few MiB).", "",
             "| layout | tokens/s | first step (s) | training peak per rank (GiB) | "
             "final loss |", "|---|---|---|---|---|"]
    for r in rows:
        peaks = " / ".join(f"{g:.2f}" for g in r["train_peak_gib_per_rank"])
        each = ", ".join(f"{t:,.0f}" for t in r["tokens_per_s_each_repeat"])
        lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} ({each}) | "
                     f"{r['first_step_s']:.2f} | {peaks} | {r['losses'][-1]:.4f} |")
    (RESULTS / "fsdp2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
