"""Peak memory and step time per method on SmolLM2-135M-Instruct (same data, sequence length,
micro-batch and steps). Each method runs in its own process, so peak RSS is its own.

    python bench/methods.py [--steps 8] [--methods full lora qlora lora_int8]

Writes bench/results/methods.json and bench/results/methods.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LR = {"full": "1e-5"}  # full fine-tuning needs a far smaller step than adapters


def run_method(method: str, steps: int, micro_batch: int, seq_len: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{method}-"))
    command = [
        sys.executable, "-m", "dtune", f"+method={method}", "model=smollm2-135m",
        f"train.max_steps={steps}", f"train.micro_batch_size={micro_batch}",
        f"data.max_seq_len={seq_len}", f"train.lr={LR.get(method, '1e-3')}",
        "train.save_every=0", "train.warmup_steps=0", "eval.exact_match_samples=0",
        "eval.batch_size=4", "eval.max_loss_samples=8", f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_times = [m["step_time_s"] for m in metrics if "step_time_s" in m][1:]  # skip warm-up
    return {
        "method": method,
        "median_step_time_s": statistics.median(step_times),
        "tokens_per_s": summary["tokens_per_s"],
        "peak_rss_gib": summary["peak_memory_bytes"] / 1024**3,
        "train_peak_rss_gib": summary["train_peak_memory_bytes"] / 1024**3,
        "trainable_params": summary["trainable_params"],
        "final_loss": summary["final_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "qlora", "lora_int8"])
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        rows.append(run_method(method, args.steps, args.micro_batch, args.seq_len))
        print(json.dumps(rows[-1]), flush=True)
    full = next((r for r in rows if r["method"] == "full"), None)
    setting = (f"SmolLM2-135M-Instruct, built-in dataset, micro-batch {args.micro_batch}, "
               f"max_seq_len {args.seq_len}, {args.steps} steps, fp32, torch {torch.__version__}, "
               f"{platform.machine()} with {torch.get_num_threads()} threads")
    lines = [f"Settings: {setting}.", "", "Command: `python bench/methods.py "
             + " ".join(sys.argv[1:]) + "`", "",
             "Peak RSS is the whole process, load included; training peak is the highest RSS "
             "sampled during the training loop; both include ~0.5 GiB of Python, torch and "
             "library code present before any model loads.", "",
             "| method | median step time | tokens/s | peak RSS | training peak RSS | "
             "training peak vs full | trainable params |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['train_peak_rss_gib'] / full['train_peak_rss_gib']:.0%}" if full else "-"
        lines.append(f"| {r['method']} | {r['median_step_time_s']:.2f} s | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_rss_gib']:.2f} GiB | "
                     f"{r['train_peak_rss_gib']:.2f} GiB | {ratio} | "
                     f"{r['trainable_params']:,} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "methods.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=2))
    (RESULTS / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
