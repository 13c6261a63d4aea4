"""Long context on this machine, side by side in one run: peak memory per process and tokens/s
at several sequence lengths, one process (N=1) against 2 processes splitting each sequence
(parallelism.sequence_parallel=2, N=2), each with the MLP whole and in tiles
(train.mlp_tiles), and the longest length of the grid each fits under a memory cap.

    python bench/long_context.py [--lengths 2048 4096 8192 16384] [--cap-gib 1.5] [--steps 3]

The model is a random Llama big enough for its activations to show (hidden 256, 4 layers,
8 heads, 4 key/value heads, MLP 1024, fp32), trained in full on the built-in long-context task
(data=builtin_long, documents sized to the length), one sequence per micro-batch, sdpa
attention. Every figure is from `python -m dtune` itself: memory is each rank's peak RSS while
training (summary.json), throughput the median of the steps after the first (metrics.jsonl).
A length whose run needs more than the cap is not run with the longer ones.

Writes bench/results/long_context.json and bench/results/long_context.md.
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
MODEL = ["model=tiny-llama", "model.random_init.hidden_size=256",
         "model.random_init.num_layers=4", "model.random_init.num_heads=8",
         "model.random_init.num_kv_heads=4", "model.random_init.intermediate_size=1024",
         "model.random_init.max_position_embeddings=32768"]
TOKENS_PER_LINE = 31  # the tiny tokenizer's, for a find_value document line (measured)
LAYOUTS = {  # name: (processes, overrides)
    "N=1": (1, ["parallelism=single"]),
    "N=1, mlp_tiles=8": (1, ["parallelism=single", "train.mlp_tiles=8"]),
    "N=2": (2, ["parallelism=ddp", "parallelism.nproc_per_node=2",
                "parallelism.sequence_parallel=2"]),
    "N=2, mlp_tiles=8": (2, ["parallelism=ddp", "parallelism.nproc_per_node=2",
                             "parallelism.sequence_parallel=2", "train.mlp_tiles=8"]),
}


def run(layout: str, length: int, steps: int) -> dict:
    processes, overrides = LAYOUTS[layout]
    run_dir = Path(tempfile.mkdtemp(prefix="bench-long-"))
    command = [sys.executable, "-m", "dtune", *MODEL, "+method=full", "data=builtin_long",
               f"data.max_seq_len={length}",
               f"data.builtin.document_lines={int(0.95 * length / TOKENS_PER_LINE)}",
               "data.builtin.train_size=16", "data.builtin.eval_size=2",
               f"train.max_steps={steps}", "train.micro_batch_size=1", "train.lr=1e-4",
               "train.save_every=0", "train.log_every=1", "train.save_final=false",
               "train.warmup_steps=0", "eval.exact_match_samples=0", "precision=fp32",
               "model.attn_implementation=sdpa", *overrides,
               "hydra.run.dir=${oc.env:DTUNE_RUN_DIR}"]
    env = {**os.environ, "DTUNE_RUN_DIR": str(run_dir), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{layout} at {length} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "tokens_per_s" in r]
    return {"layout": layout, "length": length, "processes": processes,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in trained[1:]),
            "step_s": statistics.median(r["step_time_s"] for r in trained[1:]),
            "train_peak_gib_per_rank": [b / GIB for b in
                                        summary["train_peak_memory_bytes_per_rank"]],
            "losses": [r["loss"] for r in trained]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--cap-gib", type=float, default=1.5,
                        help="the memory cap per process (peak RSS while training)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()
    rows, longest = [], {}
    for layout in args.layouts:
        longest[layout] = 0
        for length in sorted(args.lengths):
            row = run(layout, length, args.steps)
            rows.append(row)
            peak = max(row["train_peak_gib_per_rank"])
            print(f"{layout:18} {length:6} tokens: {row['tokens_per_s']:8.0f} tok/s, "
                  f"{row['step_s']:6.2f} s/step, peak {peak:.2f} GiB per process", flush=True)
            if peak > args.cap_gib:
                break  # longer ones need more still
            longest[layout] = length
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
              f"torch {torch.__version__}"
    (RESULTS / "long_context.json").write_text(json.dumps(
        {"machine": machine, "cap_gib": args.cap_gib, "rows": rows, "longest": longest},
        indent=2) + "\n")
    lines = [f"# Long context: sequence parallelism and the tiled MLP ({machine})", "",
             f"`python bench/long_context.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
             "| layout | length | tokens/s | s/step | peak per process (GiB) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['length']:,} | {r['tokens_per_s']:,.0f} | "
                     f"{r['step_s']:.2f} | {max(r['train_peak_gib_per_rank']):.2f} |")
    lines += ["", f"Longest length of the grid under {args.cap_gib} GiB per process:", ""]
    lines += [f"- {layout}: {length:,}" if length else f"- {layout}: none of the grid"
              for layout, length in longest.items()]
    (RESULTS / "long_context.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
