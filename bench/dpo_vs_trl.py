"""DPO with LoRA: dtune against TRL's DPOTrainer, on the same pairs, model and settings.

    python bench/dpo_vs_trl.py [--model smollm2|tiny] [--steps 20] [--warmup 3] [--only dtune]

Both sides train the same LoRA (r=16, alpha=32, dropout 0, all linear layers of the
decoder, not the LM head) with sigmoid DPO (beta 0.1) against the reference that is the same
model with its adapters disabled (no second copy; TRL's default for a peft model), fp32 on a
CPU (bf16 autocast on a GPU), no gradient checkpointing, micro-batch 8 pairs, gradient
accumulation 1, constant lr, AdamW (torch), max_grad_norm 1, max length 128 tokens, no eval
or saving during training, no dataloader workers, on dtune's built-in preference pairs
(data=builtin_preference: the built-in tasks' prompts as chat messages, system + user, the
right answer as `chosen`, a subtly wrong one as `rejected`), rendered with the model's chat
template by each tool (TRL's conversational format: the answers as assistant turns).

Same batches: dtune walks its pairs in the seeded permutation of its BatchStream
(torch.randperm with train.seed); TRL gets the pairs in that very order and a sequential
sampler, so step k of both holds the same 8 pairs. The report checks that each step's real
token count is the same on both sides (it is, when both tokenize identically).

What is counted, the same way for both:
- real tokens of a step: the ones of the attention mask of the step's batch, i.e. every
  non-padding token of the 8 chosen and 8 rejected sequences (prompt and response), counted
  once per step, although each passes through the model twice (reference without grad,
  policy with grad).
- step time: from fetching the step's batch (dtune: BatchStream.next_window, which collates;
  TRL: Trainer.get_batch_samples, which collates) through the reference forward, the policy
  forward and backward, gradient clipping and the optimizer step (dtune: train_step's
  step_time_s from metrics.jsonl; TRL: get_batch_samples start to on_step_end, with a CUDA
  synchronize on a GPU). Not counted: model loading, tokenization, logging, and anything
  before the first or after the last step (dtune's final adapter save).
- tokens/s: the measured steps' real tokens over their summed step time (the `--warmup`
  first steps are left out); the median of the per-step rates is reported too.
- peak memory: the worker process's peak RSS (getrusage) on a CPU, over its whole life
  (model load included, the same model for both); torch.cuda.max_memory_allocated on a GPU.

Each side runs in its own fresh process, one after the other. Writes
bench/results/OUT.json and bench/results/OUT.md (OUT: --out, default dpo_vs_trl).
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_compare import (LORA, compare, doc_section, dtune_order,  # noqa: E402
                         dtune_overrides_common, header, model_folder, notes, peak_memory_bytes,
                         rates, sync, trainable_params, trl_common_args, trl_lora, write_report)


def summarise(steps: list[dict], warmup: int) -> dict:
    real = rates(steps, warmup, "real_tokens")
    return {
        "steps": steps,
        "measured_steps": len(steps[warmup:]),
        "measured_real_tokens": real["tokens"],
        "measured_seconds": sum(s["time_s"] for s in steps[warmup:]),
        "real_tokens_per_s": real["per_s"],
        "median_step_real_tokens_per_s": real["median_step_per_s"],
        "median_step_time_s": statistics.median(s["time_s"] for s in steps[warmup:]),
        "peak_memory_bytes": peak_memory_bytes(),
        "losses": [s.get("loss") for s in steps],
    }


# --- dtune -------------------------------------------------------------------------------

def dtune_overrides(spec: dict) -> list[str]:
    return dtune_overrides_common(spec) + [
        "objective=dpo", "data=builtin_preference",
        "objective.beta=0.1", "objective.loss_type=sigmoid", "objective.label_smoothing=0.0",
        "objective.reference=adapter_disabled",
        f"data.max_seq_len={spec['max_len']}", f"train.micro_batch_size={spec['micro_batch']}",
    ]


def run_dtune(spec: dict) -> dict:
    from dtune.settle import settled_config
    from dtune.train import run

    cfg = settled_config(dtune_overrides(spec))
    run_dir = Path(tempfile.mkdtemp(prefix="bench-dpo-dtune-"))
    result = run(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time_s" in r]
    steps, before = [], 0
    for r in rows:  # trained_tokens: the attention mask's ones so far (train_step)
        steps.append({"time_s": r["step_time_s"], "real_tokens": r["trained_tokens"] - before,
                      "loss": r["loss"]})
        before = r["trained_tokens"]
    out = summarise(steps, spec["warmup"])
    model = result.model
    out.update(trainable_params=trainable_params(model),
               reference=result.summary.get("reference"),
               train_loop_peak_memory_bytes=result.summary.get("train_peak_memory_bytes"),
               dtune_command="python -m dtune " + " ".join(dtune_overrides(spec)),
               run_dir=str(run_dir))
    return out


# --- TRL ---------------------------------------------------------------------------------

def trl_rows(spec: dict) -> list[dict]:
    """dtune's built-in preference pairs, in the order dtune trains on them, in TRL's
    conversational preference format: the prompt as the chat messages (system, user), each
    answer as one assistant message."""
    from dtune.compose import compose_config
    from dtune.data.builtin import generate_pairs

    tasks = compose_config(["objective=dpo", "data=builtin_preference"]).data.builtin.tasks
    pairs, _ = generate_pairs(tasks, spec["train_size"], spec["eval_size"], spec["data_seed"])
    order = dtune_order(len(pairs), spec["seed"])
    return [{"prompt": pairs[i]["messages"],
             "chosen": [{"role": "assistant", "content": pairs[i]["chosen"]}],
             "rejected": [{"role": "assistant", "content": pairs[i]["rejected"]}]}
            for i in order]


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    folder = model_folder(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    steps: list[dict] = []
    current: dict = {}

    class InOrder(DPOTrainer):
        """The pairs in the order given (dtune's), not reshuffled; each step's batch fetch
        timed and its real tokens counted."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None
                                     else self.train_dataset)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            sync()
            current.clear()
            current["start"] = time.perf_counter()
            batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
            current["real_tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
            current["padded_tokens"] = sum(int(b["attention_mask"].numel()) for b in batches)
            current["fetch_s"] = time.perf_counter() - current["start"]
            return batches, items

    class Meter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            steps.append({"time_s": time.perf_counter() - current["start"],
                          "real_tokens": current["real_tokens"],
                          "padded_tokens": current["padded_tokens"],
                          "fetch_s": current["fetch_s"]})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = logs["loss"]

    args = DPOConfig(
        **trl_common_args(spec, tempfile.mkdtemp(prefix="bench-dpo-trl-")),
        per_device_train_batch_size=spec["micro_batch"],
        beta=0.1, loss_type=["sigmoid"], label_smoothing=0.0, max_length=spec["max_len"],
        precompute_ref_log_probs=False,
    )
    rows = trl_rows(spec)
    trainer = InOrder(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=trl_lora(), callbacks=[Meter()])
    trainer.train()
    out = summarise(steps, spec["warmup"])
    out.update(trainable_params=trainable_params(trainer.model),
               reference="adapters disabled (peft model, no ref_model)",
               pairs_after_filter=len(trainer.train_dataset), pairs_given=len(rows))
    return out


RUNNERS = {"dtune": run_dtune, "trl": run_trl}


# --- the report --------------------------------------------------------------------------

def markdown(report: dict) -> str:
    runs = {r["spec"]["tool"]: r for r in report["runs"] if "error" not in r}
    s = report["settings"]
    lines = header("DPO with LoRA: dtune vs TRL DPOTrainer", report) + [
        "",
        f"Model {report['model_folder']} ({s['model']}); dtune's built-in preference pairs "
        f"(train_size {s['train_size']}, eval_size {s['eval_size']}, seed {s['data_seed']}), "
        f"max length {s['max_len']}, micro-batch {s['micro_batch']} pairs (16 sequences), "
        f"grad accumulation 1, lr {s['lr']} constant, LoRA r={LORA['r']} alpha={LORA['alpha']} "
        f"all-linear, sigmoid DPO beta 0.1, reference = adapters disabled, "
        f"{s['steps']} measured steps after {s['warmup']} warm-up steps, same batches in the "
        "same order on both sides.",
        "",
        "| tool | real tok/s (sum/sum) | median per-step tok/s | median step time | peak memory "
        "| trainable params | load (1 min) before/after |",
        "|---|---|---|---|---|---|---|",
    ]
    for tool, r in runs.items():
        lines.append(
            f"| {tool} | {r['real_tokens_per_s']:.0f} | {r['median_step_real_tokens_per_s']:.0f}"
            f" | {r['median_step_time_s']:.3f} s | {r['peak_memory_bytes'] / 1024**3:.2f} GiB "
            f"({report['memory_kind']}) | {r['trainable_params']:,} | "
            f"{r['load_1min_before']:.1f} / {r['load_1min_after']:.1f} |")
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['spec']['tool']} | failed: {r['error'][:120]} ||||||")
    if "ratio" in report:
        lines += ["", f"**dtune / TRL real tokens/s: {report['ratio']:.2f}x** (median per-step "
                      f"rates: {report['ratio_median']:.2f}x; goal 1.3x). Peak memory dtune / "
                      f"TRL: {report['memory_ratio']:.2f}x.",
                  f"Same real tokens in every step on both sides: "
                  f"{'yes' if report['same_tokens'] else 'no (see notes)'}; measured real "
                  f"tokens: dtune {runs['dtune']['measured_real_tokens']}, TRL "
                  f"{runs['trl']['measured_real_tokens']}."]
        lines += ["", "Losses per step (dtune / TRL; both start at ln 2 = 0.693):", "",
                  "| step | dtune | TRL |", "|---|---|---|"]
        for i, (a, b) in enumerate(zip(runs["dtune"]["losses"], runs["trl"]["losses"])):
            fa = "-" if a is None else f"{a:.4f}"
            fb = "-" if b is None else f"{b:.4f}"
            lines.append(f"| {i + 1} | {fa} | {fb} |")
    if "dtune" in runs:
        lines += ["", f"dtune's run as a command line: `{runs['dtune']['dtune_command']}`"]
    lines += ["", "## What is measured", "",
              doc_section(__doc__, "What is counted", "Each side runs")]
    return "\n".join(lines + notes(report)) + "\n"


OPTIONS = {"--micro-batch": (int, 8, "pairs per step"), "--max-len": (int, 128, "tokens")}


def main() -> None:
    done = compare(__file__, __doc__, RUNNERS, "dpo_vs_trl", 20, 3, OPTIONS, lambda r: (
        f"{r['real_tokens_per_s']:.0f} real tok/s (median per step "
        f"{r['median_step_real_tokens_per_s']:.0f}), {r['median_step_time_s']:.3f} s/step"))
    if done is None:
        return None
    args, report = done
    ok = {r["spec"]["tool"]: r for r in report["runs"] if "error" not in r}
    if len(ok) == 2:
        d, t = ok["dtune"], ok["trl"]
        report["ratio"] = d["real_tokens_per_s"] / t["real_tokens_per_s"]
        report["ratio_median"] = d["median_step_real_tokens_per_s"] \
            / t["median_step_real_tokens_per_s"]
        report["memory_ratio"] = d["peak_memory_bytes"] / t["peak_memory_bytes"]
        report["same_tokens"] = [s["real_tokens"] for s in d["steps"]] == \
            [s["real_tokens"] for s in t["steps"]]
    write_report(report, markdown(report), args.out)
    return None


if __name__ == "__main__":
    main()
