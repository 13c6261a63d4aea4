"""Peak memory and step time per method on SmolLM2-135M-Instruct (same data, sequence length,
micro-batch and steps). Each run is its own process, so peak RSS is its own.

    python bench/methods.py [--steps 8] [--methods full lora qlora lora_int8]
                            [--variants plain checkpointing full_logits]

Variants: `plain` (dtune's defaults), `checkpointing` (train.gradient_checkpointing=true),
`full_logits` (train.loss_chunk_size=0: every position's logits at once, the usual loss). The baseline is the RSS of a process that has imported
everything a run imports but loaded no model; "above baseline" is the memory training adds.

Writes bench/results/methods.json and bench/results/methods.md.
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
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LR = {"full": "1e-5"}  # full fine-tuning needs a far smaller step than adapters
VARIANTS = {"plain": [], "checkpointing": ["train.gradient_checkpointing=true"],
            "full_logits": ["train.loss_chunk_size=0"]}
BASELINE = """
import resource, torch, transformers, peft, bitsandbytes, deepspeed, dtune.train
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def baseline_rss_gib() -> float:
    done = subprocess.run([sys.executable, "-c", BASELINE], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024**3


def run_method(method: str, variant: str, steps: int, micro_batch: int, seq_len: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{method}-"))
    command = [
        sys.executable, "-m", "dtune", f"+method={method}", "model=smollm2-135m",
        f"train.max_steps={steps}", f"train.micro_batch_size={micro_batch}",
        f"data.max_seq_len={seq_len}", f"train.lr={LR.get(method, '1e-3')}", "data.packing=true",
        "train.save_every=0", "train.warmup_steps=0", "eval.exact_match_samples=0",
        "train.log_every=1",
        "eval.batch_size=4", "eval.max_loss_samples=8", f"hydra.run.dir={run_dir}",
        *VARIANTS[variant],
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_times = [m["step_time_s"] for m in metrics if "step_time_s" in m][1:]  # skip warm-up
    return {
        "method": method,
        "variant": variant,
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
    parser.add_argument("--variants", nargs="+", default=["plain"], choices=list(VARIANTS))
    parser.add_argument("--out", default="methods", help="file stem under bench/results/")
    args = parser.parse_args()
    baseline = baseline_rss_gib()
    rows = []
    for variant in args.variants:
        for method in args.methods:
            rows.append(run_method(method, variant, args.steps, args.micro_batch, args.seq_len))
            print(json.dumps(rows[-1]), flush=True)
    setting = (f"SmolLM2-135M-Instruct, built-in dataset packed (data.packing=true), "
               f"micro-batch {args.micro_batch}, "
               f"max_seq_len {args.seq_len}, {args.steps} steps, fp32, torch {torch.__version__}, "
               f"{platform.machine()} with {torch.get_num_threads()} threads")
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M')}; 1-minute load before: "
             f"{os.getloadavg()[0]:.1f}. Settings: {setting}.", "",
             "Command: `python bench/methods.py " + " ".join(sys.argv[1:]) + "`", "",
             "Peak RSS is the whole process, load included; training peak is the highest RSS "
             "sampled during the training loop. Both include the baseline: "
             f"{baseline:.2f} GiB of Python, torch and libraries, before any model loads.", "",
             "| method | variant | median step time | tokens/s | final loss | peak RSS | "
             "training peak | above baseline | training peak vs full | above baseline vs full "
             "| trainable params |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["above_baseline_gib"] = r["train_peak_rss_gib"] - baseline
        full = next((f for f in rows if f["method"] == "full" and f["variant"] == r["variant"]),
                    None)
        ratio = f"{r['train_peak_rss_gib'] / full['train_peak_rss_gib']:.0%}" if full else "-"
        above = f"{r['above_baseline_gib'] / (full['train_peak_rss_gib'] - baseline):.0%}" \
            if full else "-"
        lines.append(f"| {r['method']} | {r['variant']} | {r['median_step_time_s']:.2f} s | "
                     f"{r['tokens_per_s']:.0f} | {r['final_loss']:.3f} | "
                     f"{r['peak_rss_gib']:.2f} GiB | {r['train_peak_rss_gib']:.2f} GiB | "
                     f"{r['above_baseline_gib']:.2f} GiB | {ratio} | {above} | "
                     f"{r['trainable_params']:,} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(
        {"setting": setting, "baseline_rss_gib": baseline, "rows": rows}, indent=2))
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
