"""GRPO after SFT on the tiny random model, measured (README, "Reinforcement learning").

    python bench/grpo_tiny.py [--sft-steps 9] [--grpo-steps 10] [--temperature 0.03]

A chat task a frozen random base can learn (200 rows, one fixed answer: "the answer is
yes"; held out: 5%). An SFT run of `--sft-steps` that leaves held-out exact match partial,
then `objective=grpo model.init_from=<that run>` (the exact_match reward, G=4, 4 prompts a
step) for `--grpo-steps`. The tiny model's next-token distribution is nearly flat even where
its greedy answer is right (its top token holds about 0.5% of the mass), so the completions
are sampled at a low temperature, where they differ from greedy decoding now and then: the
groups then hold right and wrong answers to learn from. For comparison, an SFT run of
`--sft-steps + --grpo-steps` steps. Writes bench/results/grpo_tiny.md and .json.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

COMMON = ["model=tiny-llama", "data=file", "data.format=chat", "train.lr=3e-3",
          "train.micro_batch_size=4", "train.warmup_steps=0", "train.save_every=0",
          "train.log_every=1", "eval.exact_match_samples=20", "eval.max_new_tokens=8"]


def write_data(path: Path) -> None:
    from dtune.data.builtin import WORDS

    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(200):
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join(rng.sample(WORDS, 4))},
                {"role": "assistant", "content": "the answer is yes"}]}) + "\n")


def train(run_dir: Path, *overrides: str) -> tuple[dict, list[dict], float]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "dtune", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    return (json.loads((run_dir / "summary.json").read_text()), steps,
            time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=9)
    parser.add_argument("--grpo-steps", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=0.03)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-grpo-tiny-"))
    write_data(work / "constant.jsonl")
    data = f"data.path={work / 'constant.jsonl'}"
    sft, _, sft_s = train(work / "sft", data, f"train.max_steps={args.sft_steps}")
    grpo, steps, grpo_s = train(
        work / "grpo", data, "objective=grpo", f"model.init_from={work / 'sft'}",
        "objective.max_new_tokens=8", f"objective.temperature={args.temperature}",
        f"train.max_steps={args.grpo_steps}")
    longer, _, _ = train(work / "sft_longer", data,
                         f"train.max_steps={args.sft_steps + args.grpo_steps}")
    figures = {
        "sft_steps": args.sft_steps, "grpo_steps": args.grpo_steps,
        "temperature": args.temperature,
        "exact_match_after_sft": sft["exact_match_after"],
        "exact_match_before_grpo": grpo["exact_match_before"],
        "exact_match_after_grpo": grpo["exact_match_after"],
        "exact_match_sft_only": longer["exact_match_after"],
        "reward_by_step": [round(m["reward/mean"], 4) for m in steps],
        "zero_std_groups_by_step": [m["zero_std_groups"] for m in steps],
        "grpo_generation_s": round(sum(m["generation_time_s"] for m in steps), 2),
        "grpo_update_s": round(sum(m["update_time_s"] for m in steps), 2),
        "sft_wall_s": round(sft_s, 1), "grpo_wall_s": round(grpo_s, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpo_tiny.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = ["# GRPO after SFT on the tiny model", "", f"`python bench/grpo_tiny.py "
             f"--sft-steps {args.sft_steps} --grpo-steps {args.grpo_steps} --temperature "
             f"{args.temperature}`", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in figures.items()]
    (RESULTS / "grpo_tiny.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
