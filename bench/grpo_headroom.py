"""How much a GRPO run can gain on the built-in tasks from a given start, measured.

    python bench/grpo_headroom.py RUN_DIR [RUN_DIR ...] [--per-task 25] [--g 8] [--temperature 1.0]

GRPO with an exact-match reward learns from groups that hold right and wrong samples: it
makes the answers the policy already samples now and then into its greedy answer. So on
prompts where none of G samples is right, it has nothing to learn from, and pass@G (one of G
samples right) is roughly the ceiling of greedy exact match after a short run. For each run
(an SFT run's directory, as `model.init_from` takes it) and each task of
`data=builtin_rl` (its four tasks, its 200 held-out prompts: the ones a GRPO run scores itself
on), on the first `--per-task` held-out prompts of the task: greedy exact match (as the
run's own evaluation scores it), the mean exact match of G samples at `--temperature`, and
pass@G. Writes bench/results/grpo_headroom.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def measure(run_dir: Path, per_task: int, g: int, temperature: float) -> dict:
    from dtune.data.builtin import generate as builtin_records
    from dtune.data.formatting import render_chat
    from dtune.evaluate import Inference, generate
    from dtune.load_run import load_for_generation
    from dtune.rewards import exact_match  # scored as the GRPO reward and the eval score it
    model, tokenizer, _ = load_for_generation(run_dir)
    engine = Inference.place(model)
    tasks = ["add", "reverse_words", "convert_units", "extract_json"]  # data=builtin_rl's
    _, held_out = builtin_records(tasks, 0, 200, 0)  # data=builtin_rl's held-out split
    torch.manual_seed(0)
    by_task: dict[str, dict] = {}
    for task in tasks:
        rows = [r for r in held_out if r["task"] == task][:per_task]
        greedy = sampled = any_right = 0
        for row in rows:
            prompt = render_chat(tokenizer, row["messages"][:2],  # system and user turns
                                 add_generation_prompt=True)
            answer = row["messages"][2]["content"].strip()
            first = generate(engine, tokenizer, [prompt], 40, 1, add_special_tokens=False)[0]
            samples = generate(engine, tokenizer, [prompt] * g, 32, g, add_special_tokens=False,
                               do_sample=True, temperature=temperature, top_p=1.0)
            right = exact_match(samples, [answer] * g, None)
            greedy += exact_match([first], [answer], None)[0]
            sampled += sum(right)
            any_right += max(right)
        n = len(rows)
        by_task[task] = {"prompts": n, "greedy": greedy / n, "sampled": sampled / (n * g),
                         "pass_at_g": any_right / n}
        print(f"{run_dir.name} {task}: {by_task[task]}", flush=True)
    mean = {k: sum(t[k] for t in by_task.values()) / len(by_task)
            for k in ("greedy", "sampled", "pass_at_g")}
    return {"run": str(run_dir), "by_task": by_task, "mean": mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--per-task", type=int, default=25)
    parser.add_argument("--g", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    started = time.time()
    results = [measure(run, args.per_task, args.g, args.temperature) for run in args.runs]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grpo_headroom.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
         "seconds": time.time() - started}, indent=2))
    lines = [
        "# GRPO headroom on the built-in tasks: greedy exact match against pass@G", "",
        f"`python bench/grpo_headroom.py {' '.join(str(r) for r in args.runs)} --per-task "
        f"{args.per_task} --g {args.g} --temperature {args.temperature}` "
        f"({time.time() - started:.0f} s). Per task, on its first {args.per_task} held-out "
        f"prompts: greedy exact match (up to 40 new tokens), the mean exact match of "
        f"{args.g} samples at temperature {args.temperature} (up to 32 new tokens, as GRPO "
        f"samples), and pass@{args.g}, the share of prompts with at least one right sample.",
        "", f"| start | task | greedy | sampled | pass@{args.g} |", "|---|---|---|---|---|"]
    for result in results:
        name = Path(result["run"]).name
        for task, t in [*result["by_task"].items(), ("mean", result["mean"])]:
            lines.append(f"| {name} | {task} | {t['greedy']:.0%} | {t['sampled']:.0%} | "
                         f"{t['pass_at_g']:.0%} |")
    (RESULTS / "grpo_headroom.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
