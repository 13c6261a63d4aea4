"""Per-rank peak memory of full fine-tuning of SmolLM2-135M-Instruct with 2 processes under
ddp, zero1, zero2, zero3 and zero3_offload (same data, micro-batch, steps and seed).

    python bench/parallel.py [--steps 6] [--layouts ddp zero1 zero2 zero3 zero3_offload]

Writes bench/results/parallel.json and bench/results/parallel.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
GIB = 1024**3
PARAMS = 134_515_008  # SmolLM2-135M


def run_layout(layout: str, steps: int, micro_batch: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{layout}-"))
    command = [
        sys.executable, "-m", "dtune", "+method=full", "model=smollm2-135m",
        f"parallelism={layout}", "parallelism.nproc_per_node=2", f"train.max_steps={steps}",
        f"train.micro_batch_size={micro_batch}", "train.lr=1e-5", "train.save_every=0",
        "train.warmup_steps=0", "eval.exact_match_samples=0", "eval.batch_size=2",
        "eval.max_loss_samples=4", f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{layout} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "layout": layout,
        "train_peak_rss_gib_per_rank": [b / GIB for b in
                                         summary["train_peak_memory_bytes_per_rank"]],
        "peak_rss_gib_per_rank": [b / GIB for b in summary["peak_memory_bytes_per_rank"]],
        "final_loss": summary["final_loss"],
        "tokens_per_s": summary["tokens_per_s"],
    }


def model_state_gib(layout: str, ranks: int = 2) -> float:
    """Textbook fp32 model state per rank: weights 4 B, gradients 4 B, Adam moments 8 B per
    parameter, divided by the ranks for what the stage shards."""
    weights, grads, adam = 4 * PARAMS, 4 * PARAMS, 8 * PARAMS
    stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}[layout]
    if stage >= 1:
        adam /= ranks
    if stage >= 2:
        grads /= ranks
    if stage >= 3:
        weights /= ranks
    return (weights + grads + adam) / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--layouts", nargs="+",
                        default=["ddp", "zero1", "zero2", "zero3", "zero3_offload"])
    args = parser.parse_args()
    rows = []
    for layout in args.layouts:
        rows.append(run_layout(layout, args.steps, args.micro_batch))
        print(json.dumps(rows[-1]), flush=True)
    setting = (f"SmolLM2-135M-Instruct full fine-tuning, fp32, 2 processes (gloo, CPU), "
               f"micro-batch {args.micro_batch}, {args.steps} steps, torch {torch.__version__}, "
               f"{platform.machine()}")
    lines = [f"Settings: {setting}.", "",
             f"Command: `python bench/parallel.py {' '.join(sys.argv[1:])}`", "",
             "Training peak RSS is sampled during the training loop on each rank; it includes "
             "~0.5 GiB of Python and libraries and the mapped checkpoint. On a CPU machine "
             "'offload' moves state to the same memory, so it cannot lower RSS here.", "",
             "| layout | rank 0 training peak | rank 1 training peak | model state per rank "
             "(fp32 Adam, expected) | final loss |", "|---|---|---|---|---|"]
    for r in rows:
        r0, r1 = r["train_peak_rss_gib_per_rank"]
        lines.append(f"| {r['layout']} | {r0:.2f} GiB | {r1:.2f} GiB | "
                     f"{model_state_gib(r['layout']):.2f} GiB | {r['final_loss']:.4f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "parallel.json").write_text(json.dumps({"setting": setting, "rows": rows},
                                                      indent=2))
    (RESULTS / "parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
