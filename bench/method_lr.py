"""The learning rate each method trains with when train.lr is unset: candidates side by side
on SmolLM2-135M-Instruct, built-in data, 30 steps, micro-batch 8 (the default run's settings
otherwise). Writes bench/results/method_lr.md and .json.

    python bench/method_lr.py [--steps 30] [--only ia3 prompt_tuning]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = {"full": [5e-5, 2e-5], "ia3": [3e-2, 3e-3, 1e-1],
              "prompt_tuning": [3e-2, 3e-1], "prefix_tuning": [1e-2, 3e-2]}


def measure(method: str, lr: float, steps: int, work: Path) -> dict:
    run_dir = work / f"{method}-{lr:g}"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dtune", f"+method={method}", f"train.lr={lr}",
                           f"train.max_steps={steps}", "eval.exact_match_samples=0",
                           "train.save_every=0", "train.log_every=1",
                           "data.builtin.eval_size=64", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return {"method": method, "lr": lr, "train_first5": sum(train[:5]) / 5,
            "train_last5": sum(train[-5:]) / 5, "eval_before": evals[0], "eval_after": evals[-1],
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="*", default=list(CANDIDATES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(m, lr, args.steps, Path(work)) for m in args.only for lr in CANDIDATES[m]]
    out = ROOT / "bench" / "results"
    (out / "method_lr.json").write_text(json.dumps(rows, indent=1))
    lines = [f"Command: `python bench/method_lr.py --steps {args.steps}` "
             f"({time.strftime('%Y-%m-%d')}); SmolLM2-135M-Instruct, built-in data, "
             "micro-batch 8, fp32, CPU.", "",
             "| method | train.lr | train loss (first 5 -> last 5 steps) | held-out loss "
             "(before -> after) |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['lr']:g} | {r['train_first5']:.3f} -> "
              f"{r['train_last5']:.3f} | {r['eval_before']:.3f} -> {r['eval_after']:.3f} |"
              for r in rows]
    (out / "method_lr.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
