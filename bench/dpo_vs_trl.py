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

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's dtune, not another one installed in the venv
RESULTS = ROOT / "bench" / "results"
MODELS = {"smollm2": "smollm2-135m", "tiny": "tiny-llama"}  # dtune model group names
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_folder(model: str) -> str:
    from dtune.compose import compose_config
    from dtune.models import resolve_model

    folder, _ = resolve_model(compose_config([f"model={MODELS[model]}"]).model)
    return str(folder)


def summarise(steps: list[dict], warmup: int) -> dict:
    timed = steps[warmup:]
    seconds = sum(s["time_s"] for s in timed)
    tokens = sum(s["real_tokens"] for s in timed)
    return {
        "steps": steps,
        "measured_steps": len(timed),
        "measured_real_tokens": tokens,
        "measured_seconds": seconds,
        "real_tokens_per_s": tokens / seconds,
        "median_step_real_tokens_per_s": statistics.median(
            s["real_tokens"] / s["time_s"] for s in timed),
        "median_step_time_s": statistics.median(s["time_s"] for s in timed),
        "peak_memory_bytes": peak_memory_bytes(),
        "losses": [s.get("loss") for s in steps],
    }


# --- dtune -------------------------------------------------------------------------------

def dtune_overrides(spec: dict) -> list[str]:
    import torch

    gpu = torch.cuda.is_available()
    return [
        f"model={MODELS[spec['model']]}", "objective=dpo", "data=builtin_preference",
        "+method=lora", f"method.r={LORA['r']}", f"method.alpha={LORA['alpha']}",
        f"method.dropout={LORA['dropout']}", "method.target_modules=all-linear",
        "objective.beta=0.1", "objective.loss_type=sigmoid", "objective.label_smoothing=0.0",
        "objective.reference=adapter_disabled",
        f"data.max_seq_len={spec['max_len']}", f"data.builtin.train_size={spec['train_size']}",
        f"data.builtin.eval_size={spec['eval_size']}", f"data.builtin.seed={spec['data_seed']}",
        f"train.max_steps={spec['steps'] + spec['warmup']}",
        f"train.micro_batch_size={spec['micro_batch']}", "train.grad_accum_steps=1",
        f"train.lr={spec['lr']}", "train.lr_schedule=constant", "train.warmup_steps=0",
        "train.weight_decay=0.0", "train.max_grad_norm=1.0", f"train.seed={spec['seed']}",
        "train.log_every=1", "train.eval_every=0", "train.save_every=0",
        "train.gradient_checkpointing=false", f"precision={'bf16' if gpu else 'fp32'}",
        "tracker=none",
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
    out.update(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
               reference=result.summary.get("reference"),
               train_loop_peak_memory_bytes=result.summary.get("train_peak_memory_bytes"),
               dtune_command="python -m dtune " + " ".join(dtune_overrides(spec)),
               run_dir=str(run_dir))
    return out


# --- TRL ---------------------------------------------------------------------------------

def dtune_order(count: int, seed: int) -> list[int]:
    """Epoch 0's order of dtune's BatchStream (dtune/data/batching.py: _permutation)."""
    import torch

    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


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
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    gpu = torch.cuda.is_available()
    folder = model_folder(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    steps: list[dict] = []
    current: dict = {}

    def sync():
        if gpu:
            torch.cuda.synchronize()

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
        output_dir=tempfile.mkdtemp(prefix="bench-dpo-trl-"),
        max_steps=spec["steps"] + spec["warmup"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        beta=0.1, loss_type=["sigmoid"], label_smoothing=0.0, max_length=spec["max_len"],
        precompute_ref_log_probs=False,
        # TRL's defaults are gradient checkpointing on and bf16 on (CPU included): matched
        gradient_checkpointing=False, bf16=gpu, fp16=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=spec["seed"], data_seed=spec["seed"],
        use_cpu=not gpu, disable_tqdm=True,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    rows = trl_rows(spec)
    trainer = InOrder(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=[Meter()])
    trainer.train()
    out = summarise(steps, spec["warmup"])
    out.update(trainable_params=sum(p.numel() for p in trainer.model.parameters()
                                    if p.requires_grad),
               reference="adapters disabled (peft model, no ref_model)",
               pairs_after_filter=len(trainer.train_dataset), pairs_given=len(rows))
    return out


RUNNERS = {"dtune": run_dtune, "trl": run_trl}


def worker(spec: dict) -> None:
    """One side in this process; prints its result as the last line."""
    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.manual_seed(spec["seed"])
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = RUNNERS[spec["tool"]](spec)
    result.update(spec=spec, load_1min_before=load, load_1min_after=os.getloadavg()[0],
                  process_wall_s=time.perf_counter() - started)
    print("RESULT " + json.dumps(result), flush=True)


# --- the report --------------------------------------------------------------------------

def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "trl", "accelerate", "datasets", "dtune"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU threads visible, torch threads {torch.get_num_threads()}"


def markdown(report: dict) -> str:
    runs = {r["spec"]["tool"]: r for r in report["runs"] if "error" not in r}
    s = report["settings"]
    lines = [
        "# DPO with LoRA: dtune vs TRL DPOTrainer",
        "",
        f"Measured {report['date']} on {report['machine']} ({report['device']}).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        f"Command: `{report['command']}`",
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
    lines += ["", "## What is measured", "", __doc__.split("What is counted", 1)[1]
              .split("Each side runs")[0].strip().replace(", the same way for both:\n", "")]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first, not measured")
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=1,
                        help="held-out pairs generated (dtune needs >= 1; it scores them before and after training, outside the measured steps)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--only", choices=sorted(RUNNERS), action="append",
                        help="run this side only (repeatable); default both")
    parser.add_argument("--out", default="dpo_vs_trl", help="file stem under bench/results/")
    parser.add_argument("--note", action="append", default=[], help="a note for the report")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other tools' runs (and notes) of an existing OUT.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    import torch

    settings = {"model": args.model, "steps": args.steps, "warmup": args.warmup,
                "micro_batch": args.micro_batch, "max_len": args.max_len, "lr": args.lr,
                "seed": args.seed, "train_size": args.train_size, "eval_size": args.eval_size,
                "data_seed": args.data_seed}
    results = []
    for tool in args.only or ["dtune", "trl"]:
        spec = {**settings, "tool": tool}
        print(f"[bench] {tool} ...", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                              cwd=ROOT, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            tail = done.stderr.strip().splitlines()
            results.append({"spec": spec, "error": tail[-1] if tail else
                            f"exit {done.returncode}"})
            print(done.stdout[-3000:], done.stderr[-5000:], file=sys.stderr)
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        r["subprocess_wall_s"] = time.perf_counter() - started
        results.append(r)
        print(f"[bench]   {r['real_tokens_per_s']:.0f} real tok/s (median per step "
              f"{r['median_step_real_tokens_per_s']:.0f}), {r['median_step_time_s']:.3f} s/step,"
              f" peak {r['peak_memory_bytes'] / 1024**3:.2f} GiB, load "
              f"{r['load_1min_before']:.1f}->{r['load_1min_after']:.1f}", flush=True)

    gpu = torch.cuda.is_available()
    previous = RESULTS / f"{args.out}.json"
    notes = list(args.note)
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        if old["settings"] != settings:
            raise SystemExit(f"--merge: {previous} was measured with other settings")
        mine = {r["spec"]["tool"] for r in results}
        results = [r for r in old["runs"] if r["spec"]["tool"] not in mine] + results
        notes = old.get("notes", []) + notes
        command = old["command"] + " ; then " + " ".join(["python", "bench/dpo_vs_trl.py",
                                                           *sys.argv[1:]])
    else:
        command = " ".join(["python", "bench/dpo_vs_trl.py", *sys.argv[1:]])
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "machine": machine(), "device": "cuda" if gpu else "cpu",
        "memory_kind": "torch.cuda.max_memory_allocated" if gpu else "peak RSS",
        "versions": versions(), "model_folder": model_folder(args.model),
        "settings": settings, "runs": results, "notes": notes,
    }
    ok = {r["spec"]["tool"]: r for r in results if "error" not in r}
    if len(ok) == 2:
        d, t = ok["dtune"], ok["trl"]
        report["ratio"] = d["real_tokens_per_s"] / t["real_tokens_per_s"]
        report["ratio_median"] = d["median_step_real_tokens_per_s"] \
            / t["median_step_real_tokens_per_s"]
        report["memory_ratio"] = d["peak_memory_bytes"] / t["peak_memory_bytes"]
        report["same_tokens"] = [s["real_tokens"] for s in d["steps"]] == \
            [s["real_tokens"] for s in t["steps"]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)
    return None


if __name__ == "__main__":
    main()
