"""GRPO with LoRA: dtune against TRL's GRPOTrainer, on the same prompts, model and settings.

    python bench/grpo_vs_trl.py [--model smollm2|tiny] [--steps 10] [--warmup 2] [--only dtune]
                                [--start RUN_DIR]

--start RUN_DIR: both sides start from an earlier dtune LoRA run's result (e.g. a short SFT
run, `python -m dtune train.max_steps=20 hydra.run.dir=RUN_DIR`), as users run GRPO after
SFT: dtune with `model.init_from=RUN_DIR` (its adapter merged into the base), TRL from the
folder `dtune merge RUN_DIR` writes (the same merged weights). The base model scores 0 on
every built-in prompt, so without it no group has a signal and both updates compute a loss
of 0.

Both sides train the same LoRA (r=16, alpha=32, dropout 0, all linear layers of the decoder,
not the LM head) with GRPO as DAPO's token-level loss (loss_type dapo: every completion
token's clipped surrogate summed, divided by the step's completion tokens), epsilon 0.2 both
ways, beta 0 (no reference model), one update per generation (num_iterations 1), rewards
scaled by the group's std, on the built-in exact_match reward alone (1 where the completion,
stripped, equals the reference answer, stripped: dtune's `exact_match`, which TRL's reward
function calls too). Each step: 4 prompts, G=4 completions of each (16 sequences, one
micro-batch, gradient accumulation 1; TRL: per_device_train_batch_size 16, so its generation
batch is 16 and steps_per_generation 1), sampled at temperature 1.0, top_p 1.0, no top-k cut
(top_k 0), up to 32 new tokens, with the KV cache; fp32 on a CPU (bf16 autocast on a GPU),
no gradient checkpointing, constant lr, AdamW (torch), weight decay 0, max_grad_norm 1, no
eval or saving during training, no dataloader workers. Prompts: dtune's built-in tasks
(data=builtin), as chat messages (system + user) rendered with the model's chat template and
its generation prompt by each tool (the same tokens on both sides: the report checks each
step's prompt token count); the answer is the reference.

Same prompts: dtune walks its examples in the seeded permutation of its BatchStream
(torch.randperm with train.seed); TRL gets the prompts in that very order with its own
sampler unshuffled (shuffle_dataset=False: RepeatSampler yields each prompt G times in a
row, in dataset order), so step k of both holds the same 4 prompts (checked on TRL's side).
The completions differ: each tool draws its samples from its own RNG use, so completion
lengths and rewards differ too, and throughput is reported per token.

What is counted, the same way for both:
- generated tokens of a step: the completion tokens of its 16 sequences up to and including
  each one's first EOS (dtune: the completion mask's ones, its `loss_tokens` with every group
  kept; TRL: its completion_mask's ones).
- rollout tokens of a step: every real token of its 16 sequences, prompt and completion
  (dtune: the rollouts' attention masks, its `trained_tokens`; TRL: prompt_mask plus
  completion_mask), counted once per step. TRL's update reads them all; dtune's reads only
  the rows with a gradient (`update_rows`: a group whose rewards are all equal has advantage
  0, and with beta 0 its rows add nothing to the loss or the gradient, dtune/grpo.py
  `trained_rows`), so it does less work for the same update.
- zero-signal groups: groups whose G rewards are all equal (dtune: `zero_std_groups`; TRL:
  its `frac_reward_zero_std` x the step's groups).
- step time: from the step's first generation through scoring, the update's forward and
  backward, gradient clipping and the optimizer step (dtune: train_step's step_time_s from
  metrics.jsonl, which spans grpo_step's generation_time_s and update_time_s; TRL: the start
  of training_step, which generates inside, to on_step_end, with a CUDA synchronize on a GPU).
  Not counted: model loading, fetching the step's prompts, logging, and anything before the
  first or after the last step (dtune's final adapter save).
- generation time: sampling the completions, decoding them, scoring them and the advantages
  (dtune: generation_time_s; TRL: _generate_and_score_completions); update time: the rest of
  the step (dtune: update_time_s; TRL: from the end of _generate_and_score_completions to
  on_step_end).
- tokens/s: the measured steps' tokens over their summed step time (the `--warmup` first
  steps are left out); the median of the per-step rates is reported too.
- decode steps: the completion width of a step's batch (its longest completion, up to 32),
  i.e. how many times generation ran the model over all 16 rows.
- peak memory: the worker process's peak RSS (getrusage) on a CPU, over its whole life
  (model load included, the same model for both); torch.cuda.max_memory_allocated on a GPU.

Each side runs in its own fresh process, one after the other. Writes
bench/results/OUT.json and bench/results/OUT.md (OUT: --out, default grpo_vs_trl).
"""
from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_compare import (LORA, ROOT, compare, doc_section, dtune_order,  # noqa: E402
                         dtune_overrides_common, header, median_of, model_folder, notes,
                         peak_memory_bytes, rates, sync, trainable_params, trl_common_args,
                         trl_lora, write_report)

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


def summarise(steps: list[dict], warmup: int) -> dict:
    timed = steps[warmup:]
    generated = rates(steps, warmup, "generated_tokens")
    trained = rates(steps, warmup, "rollout_tokens")
    generation_s = sum(s["generation_s"] for s in timed)
    update_s = sum(s["update_s"] for s in timed)
    return {
        "steps": steps,
        "measured_steps": len(timed),
        "measured_seconds": sum(s["time_s"] for s in timed),
        "measured_generated_tokens": generated["tokens"],
        "measured_rollout_tokens": trained["tokens"],
        "generated_tokens_per_s": generated["per_s"],
        "rollout_tokens_per_s": trained["per_s"],
        "median_step_generated_tokens_per_s": generated["median_step_per_s"],
        "median_step_rollout_tokens_per_s": trained["median_step_per_s"],
        "median_step_time_s": median_of(steps, warmup, "time_s"),
        "median_generation_s": median_of(steps, warmup, "generation_s"),
        "median_update_s": median_of(steps, warmup, "update_s"),
        "median_decode_steps": median_of(steps, warmup, "decode_steps"),
        # generation alone: generated tokens, and row x decode-step positions, per second of it
        "generation_tokens_per_s": generated["tokens"] / generation_s,
        "generation_positions_per_s": sum(s["rows"] * s["decode_steps"] for s in timed)
        / generation_s,
        # the update alone: rollout tokens per second of it
        "update_tokens_per_s": trained["tokens"] / update_s,
        "zero_std_groups": sum(s["zero_std_groups"] for s in timed),
        "update_rows": sum(s["update_rows"] for s in timed),
        "rows": sum(s["rows"] for s in timed),
        "groups": sum(s["groups"] for s in timed),
        "mean_completion_length": generated["tokens"] / sum(s["rows"] for s in timed),
        "mean_completion_length_all_steps": sum(s["generated_tokens"] for s in steps)
        / sum(s["rows"] for s in steps),
        "mean_reward": statistics.mean(s["reward"] for s in timed),
        "peak_memory_bytes": peak_memory_bytes(),
        "rewards": [s["reward"] for s in steps],
        "losses": [s.get("loss") for s in steps],
    }


# --- dtune -------------------------------------------------------------------------------

def dtune_overrides(spec: dict) -> list[str]:
    start = [f"model.init_from={spec['start']}"] if spec.get("start") else []
    return dtune_overrides_common(spec) + start + [
        "objective=grpo", "data=builtin",
        f"objective.num_generations={spec['generations']}",
        f"objective.max_new_tokens={spec['max_new_tokens']}",
        f"objective.temperature={SAMPLING['temperature']}", f"objective.top_p={SAMPLING['top_p']}",
        "objective.beta=0.0", "objective.num_iterations=1", "objective.loss_type=dapo",
        "objective.epsilon=0.2", "objective.epsilon_high=null",
        "objective.skip_zero_std_groups=false",
        "objective.rewards=[{name:exact_match,weight:1.0}]",
        f"train.micro_batch_size={spec['prompts']}", "eval.exact_match_samples=0",
    ]


def run_dtune(spec: dict) -> dict:
    from dtune.settle import settled_config
    from dtune.train import run

    cfg = settled_config(dtune_overrides(spec))
    run_dir = Path(tempfile.mkdtemp(prefix="bench-grpo-dtune-"))
    result = run(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time_s" in r]
    steps, trained_before, loss_before = [], 0, 0
    for r in rows:  # trained_tokens: the rollouts' attention masks so far; loss_tokens: their
        # kept completion tokens (every group is kept: skip_zero_std_groups=false)
        generated = r["loss_tokens"] - loss_before
        trained = r["trained_tokens"] - trained_before
        count = round(r["groups"]) * spec["generations"]
        steps.append({
            "time_s": r["step_time_s"], "generation_s": r["generation_time_s"],
            "update_s": r["update_time_s"], "generated_tokens": generated,
            "rollout_tokens": trained, "prompt_tokens": trained - generated, "rows": count,
            "groups": round(r["groups"]), "zero_std_groups": round(r["zero_std_groups"]),
            "update_rows": round(r["update_rows"]),
            "decode_steps": round(r["completion_length/max"]),
            "completion_tokens_from_mean": round(r["completion_length/mean"] * count),
            "reward": r["reward/mean"], "loss": r["loss"]})
        trained_before, loss_before = r["trained_tokens"], r["loss_tokens"]
    out = summarise(steps, spec["warmup"])
    out.update(trainable_params=trainable_params(result.model),
               train_loop_peak_memory_bytes=result.summary.get("train_peak_memory_bytes"),
               dtune_command="python -m dtune " + shlex.join(dtune_overrides(spec)),
               run_dir=str(run_dir))
    return out


# --- TRL ---------------------------------------------------------------------------------

def trl_rows(spec: dict) -> list[dict]:
    """dtune's built-in training examples, in the order dtune trains on them, in TRL's
    conversational prompt format: the prompt as the chat messages before the answer (system,
    user), the reference answer in its own column for the reward."""
    from dtune.compose import compose_config
    from dtune.data.builtin import generate

    tasks = compose_config(["objective=grpo", "data=builtin"]).data.builtin.tasks
    train, _ = generate(tasks, spec["train_size"], spec["eval_size"], spec["data_seed"])
    order = dtune_order(len(train), spec["seed"])
    return [{"prompt": train[i]["messages"][:-1], "answer": train[i]["messages"][-1]["content"]}
            for i in order]


def exact_match_reward(completions, answer, **_) -> list[float]:
    """dtune's exact_match reward, on TRL's completions (conversational: one assistant
    message each)."""
    from dtune.rewards import exact_match

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return exact_match(texts, answer, None)


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    folder = model_folder(spec["model"])
    if spec.get("start"):  # the start run's adapter merged into its base, as dtune's init_from
        from dtune.merge import merge_run
        folder = str(merge_run(Path(spec["start"]),
                               Path(tempfile.mkdtemp(prefix="bench-grpo-start-")) / "merged"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = trl_rows(spec)
    group, prompts = spec["generations"], spec["prompts"]
    steps: list[dict] = []
    current: dict = {}
    in_order = []  # per step: were its prompts the ones dtune's step takes, each G times?

    class Measured(GRPOTrainer):
        """Each step timed from the start of training_step (which generates, then trains),
        its generation timed apart, and its tokens counted from the masks it trains on."""

        def training_step(self, model, inputs, num_items_in_batch):
            sync()
            current.clear()
            current["start"] = time.perf_counter()
            return super().training_step(model, inputs, num_items_in_batch)

        def _generate_and_score_completions(self, inputs):
            sync()
            began = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            sync()
            current["generated"] = time.perf_counter()
            current["generation_s"] = current["generated"] - began
            current["generated_tokens"] = int(out["completion_mask"].sum())
            current["prompt_tokens"] = int(out["prompt_mask"].sum())
            current["rows"] = int(out["completion_mask"].size(0))
            current["decode_steps"] = int(out["completion_ids"].size(1))
            current["reward"] = self._metrics["train"]["reward"][-1]
            current["groups"] = current["rows"] // group
            current["zero_std_groups"] = round(
                self._metrics["train"]["frac_reward_zero_std"][-1] * current["groups"])
            k = len(steps)
            expected = [r["prompt"][-1]["content"] for r in rows[k * prompts:(k + 1) * prompts]
                        for _ in range(group)]
            in_order.append([x["prompt"][-1]["content"] for x in inputs] == expected)
            return out

    class Meter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            end = time.perf_counter()
            steps.append({
                "time_s": end - current["start"], "generation_s": current["generation_s"],
                "update_s": end - current["generated"],
                "generated_tokens": current["generated_tokens"],
                "rollout_tokens": current["prompt_tokens"] + current["generated_tokens"],
                "prompt_tokens": current["prompt_tokens"], "rows": current["rows"],
                "groups": current["groups"], "zero_std_groups": current["zero_std_groups"],
                "update_rows": current["rows"],
                "decode_steps": current["decode_steps"], "reward": current["reward"]})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = logs["loss"]

    args = GRPOConfig(
        **trl_common_args(spec, tempfile.mkdtemp(prefix="bench-grpo-trl-")),
        per_device_train_batch_size=prompts * group,  # completions: the generation batch
        num_generations=group, max_completion_length=spec["max_new_tokens"],
        temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"], top_k=SAMPLING["top_k"],
        beta=0.0, num_iterations=1, epsilon=0.2, epsilon_high=None, loss_type="dapo",
        scale_rewards="group", mask_truncated_completions=False, shuffle_dataset=False,
        log_completions=False,
    )
    trainer = Measured(model=model, reward_funcs=[exact_match_reward], args=args,
                       train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                       peft_config=trl_lora(), callbacks=[Meter()])
    trainer.train()
    out = summarise(steps, spec["warmup"])
    out.update(trainable_params=trainable_params(trainer.model),
               prompts_in_dtune_order=all(in_order) and len(in_order) == len(steps),
               generation_batch_size=args.generation_batch_size,
               steps_per_generation=args.steps_per_generation)
    return out


RUNNERS = {"dtune": run_dtune, "trl": run_trl}


# --- the report --------------------------------------------------------------------------

def dtune_tree() -> str:
    """The checkout dtune ran from: its commit, and the dtune/ and conf/ files changed
    against it (uncommitted work is measured as it stood)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short", "HEAD").strip()
    changed = git("status", "--porcelain", "--", "dtune", "conf").split()
    changed = [c for c in changed if "/" in c]
    return commit + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    runs = {r["spec"]["tool"]: r for r in report["runs"] if "error" not in r}
    s = report["settings"]
    start = f"the run {s['start']} (its adapter merged into the base)" if s.get("start") \
        else "the base model"
    lines = header("GRPO with LoRA: dtune vs TRL GRPOTrainer", report) + [
        f"dtune from {report.get('dtune_tree', '?')}.",
        "",
        f"Model {report['model_folder']} ({s['model']}); dtune's built-in tasks (train_size "
        f"{s['train_size']}, seed {s['data_seed']}) as chat prompts, {s['prompts']} prompts a "
        f"step x G={s['generations']} completions, up to {s['max_new_tokens']} new tokens, "
        f"temperature {SAMPLING['temperature']}, top_p {SAMPLING['top_p']}, no top-k; "
        f"exact_match reward; loss dapo, epsilon 0.2, beta 0, 1 iteration; lr {s['lr']} "
        f"constant; starting from {start}; LoRA r={LORA['r']} alpha={LORA['alpha']} "
        f"all-linear; {s['steps']} "
        f"measured steps after {s['warmup']} warm-up steps; the same prompts in the same "
        "order on both sides.",
        "",
        "| tool | generated tok/s | rollout tok/s | median step time | median generation "
        "/ update | mean completion length | median decode steps | zero-signal groups | "
        "rows updated | peak memory | trainable params | torch threads | load (1 min) "
        "before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tool, r in runs.items():
        lines.append(
            f"| {tool} | {r['generated_tokens_per_s']:.1f} | {r['rollout_tokens_per_s']:.1f} "
            f"| {r['median_step_time_s']:.2f} s | {r['median_generation_s']:.2f} s / "
            f"{r['median_update_s']:.2f} s | {r['mean_completion_length']:.1f} | "
            f"{r['median_decode_steps']:.0f} | {r['zero_std_groups']} of {r['groups']} | "
            f"{r['update_rows']} of {r['rows']} | {r['peak_memory_bytes'] / 1024**3:.2f} GiB "
            f"({report['memory_kind']}) | {r['trainable_params']:,} | "
            f"{r.get('torch_threads', '?')} | {r['load_1min_before']:.1f} / "
            f"{r['load_1min_after']:.1f} |")
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['spec']['tool']} | failed: {r['error'][:120]} ||||||||||||")
    if "ratios" in report:
        q = report["ratios"]
        lines += ["", f"**dtune / TRL: generated tokens/s {q['generated']:.2f}x, rollout "
                      f"tokens/s {q['rollout']:.2f}x** (goal 1.3x; medians of the per-step "
                      f"rates: {q['generated_median']:.2f}x and {q['rollout_median']:.2f}x). "
                      f"Peak memory dtune / TRL: {q['memory']:.2f}x.",
                  "",
                  "Where the time goes (measured steps; generation: sampling, decoding and "
                  "scoring; update: forward, backward, clipping, optimizer step):",
                  "",
                  "| tool | generation s/step | update s/step | generated tok per generation-s "
                  "| row x decode-step positions per generation-s | rollout tok per update-s |",
                  "|---|---|---|---|---|---|"]
        for tool, r in runs.items():
            lines.append(
                f"| {tool} | {r['median_generation_s']:.2f} | {r['median_update_s']:.2f} | "
                f"{r['generation_tokens_per_s']:.1f} | {r['generation_positions_per_s']:.1f} "
                f"| {r['update_tokens_per_s']:.1f} |")
        lines += ["", "dtune / TRL: generation positions per second "
                      f"{q['generation_positions']:.2f}x, update tokens per second "
                      f"{q['update']:.2f}x.",
                  "",
                  f"Same prompts: prompt tokens equal in every step on both sides: "
                  f"{'yes' if report['same_prompt_tokens'] else 'no (see notes)'}; TRL's "
                  "prompts were dtune's, in dtune's order, each repeated G times: "
                  f"{'yes' if runs['trl']['prompts_in_dtune_order'] else 'no'}.",
                  "",
                  "Per step (time in s as generation + update; tokens generated / rollout; "
                  "the completions differ between the tools, so rewards and losses do too):",
                  "",
                  "| step | dtune time | TRL time | dtune tokens | TRL tokens | dtune reward "
                  "| TRL reward | dtune loss | TRL loss |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for i, (d, t) in enumerate(zip(runs["dtune"]["steps"], runs["trl"]["steps"])):
            mark = " (warm-up)" if i < s["warmup"] else ""
            lines.append(
                f"| {i + 1}{mark} | {d['time_s']:.2f} ({d['generation_s']:.2f} + "
                f"{d['update_s']:.2f}) | {t['time_s']:.2f} ({t['generation_s']:.2f} + "
                f"{t['update_s']:.2f}) | {d['generated_tokens']} / {d['rollout_tokens']} | "
                f"{t['generated_tokens']} / {t['rollout_tokens']} | {d['reward']:.3f} | "
                f"{t['reward']:.3f} | {fmt(d.get('loss'), '.4f')} | {fmt(t.get('loss'), '.4f')} |")
    if "dtune" in runs:
        lines += ["", f"dtune's run as a command line: `{runs['dtune']['dtune_command']}`"]
    lines += ["", "## What is measured", "",
              doc_section(__doc__, "What is counted", "Each side runs"),
              "", "## Caveats", "",
              "- The samples differ: each tool draws its completions with its own RNG use (dtune "
              "seeds each step's sampling from train.seed and the step; TRL samples from the "
              "global generator as training left it), so completion lengths, rewards, losses "
              "and what the LoRA learns differ. Throughput is therefore compared per token; "
              "generation's cost follows the decode steps (the longest completion of the "
              "step's 16) more than the tokens kept, hence the positions-per-second column.",
              "- TRL on a CPU scores every position of the sequence in its update (its fused "
              "LM head computes only the completion's positions on Triton devices, i.e. CUDA, "
              "and all of them elsewhere); dtune computes the LM head for the last completion "
              "width + 1 positions on every device. TRL runs the decoder over every row, "
              "dtune over the rows with a gradient (its `update_rows`)."]
    if s.get("threads"):
        lines.append(f"- Each side ran with torch's CPU threads set to {s['threads']} "
                     f"(--threads {s['threads']}), the same for both: on a machine whose cores "
                     "other jobs share, a side with more threads than the cores it gets stalls "
                     "at every parallel region (its threads wait on a descheduled peer).")
    rewards = [x for r in runs.values() for x in r["rewards"]]
    if rewards and not any(rewards):
        lines.append("- Every completion of every step scored 0 on both sides: no group had a "
                     "signal, so every advantage, loss and gradient was 0 and the LoRA never "
                     "changed. TRL still ran the update's forward and backward in full, dtune "
                     "on one row per micro-batch; the losses and rewards say nothing. Give "
                     "--start an SFT run for a comparison where groups have a signal.")
    return "\n".join(lines + notes(report)) + "\n"


OPTIONS = {"--prompts": (int, 4, "prompts per step"),
           "--generations": (int, 4, "G: completions per prompt"),
           "--max-new-tokens": (int, 32, "new tokens per completion at most"),
           "--start": (str, "", "an earlier dtune LoRA run both sides start from (merged)")}


def main() -> None:
    done = compare(__file__, __doc__, RUNNERS, "grpo_vs_trl", 10, 2, OPTIONS, lambda r: (
        f"{r['generated_tokens_per_s']:.1f} generated tok/s, {r['rollout_tokens_per_s']:.1f} "
        f"rollout tok/s, {r['median_step_time_s']:.2f} s/step (generation "
        f"{r['median_generation_s']:.2f} s, update {r['median_update_s']:.2f} s), mean "
        f"completion {r['mean_completion_length']:.1f} tokens"))
    if done is None:
        return None
    args, report = done
    report["dtune_tree"] = dtune_tree()
    ok = {r["spec"]["tool"]: r for r in report["runs"] if "error" not in r}
    if len(ok) == 2:
        d, t = ok["dtune"], ok["trl"]
        report["ratios"] = {
            "generated": d["generated_tokens_per_s"] / t["generated_tokens_per_s"],
            "rollout": d["rollout_tokens_per_s"] / t["rollout_tokens_per_s"],
            "generated_median": d["median_step_generated_tokens_per_s"]
            / t["median_step_generated_tokens_per_s"],
            "rollout_median": d["median_step_rollout_tokens_per_s"]
            / t["median_step_rollout_tokens_per_s"],
            "generation_positions": d["generation_positions_per_s"]
            / t["generation_positions_per_s"],
            "update": d["update_tokens_per_s"] / t["update_tokens_per_s"],
            "memory": d["peak_memory_bytes"] / t["peak_memory_bytes"],
        }
        report["same_prompt_tokens"] = [s["prompt_tokens"] for s in d["steps"]] == \
            [s["prompt_tokens"] for s in t["steps"]]
    write_report(report, markdown(report), args.out)
    return None


if __name__ == "__main__":
    main()
