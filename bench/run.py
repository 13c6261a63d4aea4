"""dtune against the tools users would pick instead, on the same work, side by side.

    python bench/run.py [--steps 6] [--methods lora full qlora lora_int8] [--quick]

Same model (SmolLM2-135M-Instruct), data file, max sequence length, micro-batch, lr, LoRA
settings (r=8, alpha=16, dropout 0, all linear layers), step count and seed for every run:

- dtune at its defaults (chunked loss), with `data.packing=true` and with padded batches;
- TRL's SFTTrainer with peft, without and with its packing;
- the plain transformers Trainer with peft (padding collator).

Each run is its own process (so peak RSS is its own). Per run: median step time (first step
left out), real (non-pad) tokens/s, loss-carrying tokens/s, peak memory (RSS on CPU,
torch.cuda.max_memory_allocated on GPU), final loss, and MFU =
real tokens/s x k x N / measured peak, with N the parameter count (tied embeddings counted
once: the LM head matmul) and k = 6 for full fine-tuning, 4 for a frozen base (forward 2N,
backward to the activations 2N, no weight gradients). The peak is a large fp32 matmul on CPU,
bf16 on GPU, measured here. Writes bench/results/run.json and bench/results/run.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
LR = {"full": 1e-5}  # adapters use 1e-4


def is_adapter(method: str) -> bool:
    """dtune's one answer (the method's spec), imported here as the other dtune imports are."""
    from dtune.methods import METHODS

    return METHODS[method].adapter


def flops_per_token_factor(method: str) -> int:
    """6N per token when every weight trains, 4N when only an adapter does (no weight grads)."""
    return 4 if is_adapter(method) else 6


# --- the measurements every run shares -------------------------------------------------------

def matmul_peak(device: str, size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of the best of a few large square matmuls (fp32 on CPU, bf16 on GPU)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = size if device == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepMeter:
    """Counts each forward's real and loss tokens, and each optimizer step's time.

    For the Trainer-based tools it hooks the model's forward (real tokens: the attention
    mask's ones, or every input token when a padding-free collator sends no mask) and the
    Trainer's step callbacks."""

    def __init__(self):
        self.steps, self._real, self._loss, self._started = [], 0, 0, None

    def forward_hook(self, module, args, kwargs):
        ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), \
            kwargs.get("labels")
        if ids is not None:
            self._real += int(mask.sum()) if mask is not None and mask.dim() == 2 \
                else ids.numel()
        if labels is not None:
            self._loss += int((labels[..., 1:] != -100).sum())

    def begin(self):
        self._started, self._real, self._loss = time.perf_counter(), 0, 0

    def end(self, loss=None):
        self.steps.append({"time_s": time.perf_counter() - self._started,
                           "real_tokens": self._real, "loss_tokens": self._loss, "loss": loss})


def logical_params(model) -> int:
    """Parameters as the model computes with them, tied weights counted once: a 4-bit
    bitsandbytes weight is stored packed two to a byte, but multiplies as its full shape."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return total


def summarise(meter_steps: list[dict], model, k: int, peak: float) -> dict:
    timed = meter_steps[1:] or meter_steps  # the first step warms caches and allocators
    seconds = sum(s["time_s"] for s in timed)
    real = sum(s["real_tokens"] for s in timed) / seconds
    params = logical_params(model)
    losses = [s["loss"] for s in meter_steps if s.get("loss") is not None]
    return {
        "steps": meter_steps,
        "median_step_time_s": statistics.median(s["time_s"] for s in timed),
        "real_tokens_per_s": real,
        "loss_tokens_per_s": sum(s["loss_tokens"] for s in timed) / seconds,
        "real_tokens_per_step": statistics.mean(s["real_tokens"] for s in timed),
        "peak_memory_gib": peak_memory_bytes() / 1024**3,
        "final_loss": losses[-1] if losses else None,
        "params": params,
        "mfu": real * k * params / peak,
        "flops_per_token": f"{k}N",
    }


# --- the runs --------------------------------------------------------------------------------

def run_dtune(spec: dict, peak: float) -> dict:
    from dtune.settle import settled_config
    from dtune.train import run

    method = spec["method"]
    overrides = [
        f"+method={method}", "model=smollm2-135m", "data=file", f"data.path={spec['data']}",
        "data.format=chat", f"data.max_seq_len={spec['seq_len']}", "data.eval_fraction=0",
        f"train.max_steps={spec['steps']}", f"train.micro_batch_size={spec['micro_batch']}",
        f"train.lr={spec['lr']}", f"train.seed={spec['seed']}", "train.warmup_steps=0",
        "train.lr_schedule=constant", "train.save_every=0", "train.log_every=1", "eval.exact_match_samples=0",
        f"data.packing={str(spec.get('packing', False)).lower()}",
        f"train.gradient_checkpointing={str(spec.get('gradient_checkpointing', False)).lower()}",
    ]
    if "loss_chunk_size" in spec:  # else dtune's default
        overrides.append(f"train.loss_chunk_size={spec['loss_chunk_size']}")
    if is_adapter(method):
        overrides += [f"method.r={LORA['r']}", f"method.alpha={LORA['alpha']}",
                      f"method.dropout={LORA['dropout']}", "method.target_modules=all-linear"]
    cfg = settled_config(overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-dtune-"))
    result = run(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time_s" in r]
    steps, previous = [], {"trained_tokens": 0, "loss_tokens": 0}
    for r in rows:
        steps.append({"time_s": r["step_time_s"], "loss": r["loss"],
                      "real_tokens": r["trained_tokens"] - previous["trained_tokens"],
                      "loss_tokens": r["loss_tokens"] - previous["loss_tokens"]})
        previous = r
    summary = summarise(steps, result.model, flops_per_token_factor(method), peak)
    from dtune.plan import plan

    estimate = plan(cfg, 1, on_gpu=torch.cuda.is_available())[0]
    summary["plan_gib"] = estimate.total / 1024**3
    summary["plan_error"] = estimate.total / 1024**3 / summary["peak_memory_gib"] - 1
    summary["train_loop_peak_gib"] = result.summary["train_peak_memory_bytes"] / 1024**3
    return summary


def training_records(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def load_hf(method: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dtune.compose import compose_config
    from dtune.models import resolve_model

    # the folder dtune's own run loads (its GGUF conversion, keyed by the file's hash, offline)
    folder, _ = resolve_model(compose_config(["model=smollm2-135m"]).model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if is_adapter(method):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules="all-linear", task_type="CAUSAL_LM"))
    return model, tokenizer, folder


def trainer_args(spec: dict, cls):
    return cls(
        output_dir=tempfile.mkdtemp(prefix="bench-hf-"), max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro_batch"], learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, seed=spec["seed"], data_seed=spec["seed"],
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        max_grad_norm=1.0, weight_decay=0.0, disable_tqdm=True,
    )


def meter_callback(meter: StepMeter):
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            meter.end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and meter.steps:
                meter.steps[-1]["loss"] = logs["loss"]

    return Meter()


def run_trl(spec: dict, peak: float) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer, _ = load_hf(spec["method"])
    # prompt-completion form: TRL then takes loss on the answer only, like dtune's default
    records = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
               for r in training_records(spec["data"])]
    args = trainer_args(spec, SFTConfig)
    args.max_length = spec["seq_len"]
    args.packing = spec.get("packing", False)
    args.completion_only_loss = True
    meter = StepMeter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, callbacks=[meter_callback(meter)])
    model.register_forward_pre_hook(meter.forward_hook, with_kwargs=True)
    trainer.train()
    return summarise(meter.steps, model, flops_per_token_factor(spec["method"]), peak)


def run_hf_trainer(spec: dict, peak: float) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from dtune.data.formatting import tokenize

    model, tokenizer, _ = load_hf(spec["method"])
    # the tokens dtune trains on (same template, same answer-only labels), as a user would
    # prepare them for the plain Trainer
    examples = [tokenize(r, "chat", tokenizer, spec["seq_len"], False)
                for r in training_records(spec["data"])]
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels,
                                  "attention_mask": [1] * len(e.input_ids)} for e in examples])
    meter = StepMeter()
    trainer = Trainer(model=model, args=trainer_args(spec, TrainingArguments),
                      train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
                      callbacks=[meter_callback(meter)])
    model.register_forward_pre_hook(meter.forward_hook, with_kwargs=True)
    trainer.train()
    return summarise(meter.steps, model, flops_per_token_factor(spec["method"]), peak)


RUNNERS = {"dtune": run_dtune, "trl": run_trl, "hf_trainer": run_hf_trainer}


def worker(spec: dict) -> None:
    """One run in this process; prints its result as the last line."""
    import logging

    logging.disable(logging.WARNING)
    torch.manual_seed(spec["seed"])
    load = os.getloadavg()[0]
    result = RUNNERS[spec["tool"]](spec, spec["peak_flops"])
    result.update(spec=spec, load_1min_before=load, load_1min_after=os.getloadavg()[0])
    print("RESULT " + json.dumps(result), flush=True)


def make_data(path: Path, size: int, seed: int) -> None:
    """dtune's generated instruction tasks: chat records of varied length."""
    from dtune.data.builtin import generate

    records, _ = generate(["add", "reverse_words", "convert_units", "extract_json"], size, 0,
                          seed=seed)
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))


def plan(methods: list[str], quick: bool) -> list[dict]:
    runs = []
    for method in methods:
        runs.append({"tool": "dtune", "label": "dtune packed", "method": method,
                     "packing": True})
        if method == "lora":
            runs.append({"tool": "dtune", "label": "dtune padded", "method": method})
        if method in ("lora", "full"):
            runs.append({"tool": "hf_trainer", "label": "transformers Trainer", "method": method})
            runs.append({"tool": "trl", "label": "TRL SFTTrainer", "method": method})
            if method == "lora" or not quick:
                runs.append({"tool": "trl", "label": "TRL SFTTrainer packing", "method": method,
                             "packing": True})
    return runs


def robust_rates(r: dict) -> None:
    """Tokens/s as the median of per-step rates: one step slowed by a neighbour's load spike
    (a shared machine) then moves the figure far less than a plain mean does."""
    timed = r.get("steps", [])[1:]
    if timed:
        r["real_tokens_per_s"] = statistics.median(s["real_tokens"] / s["time_s"] for s in timed)
        r["loss_tokens_per_s"] = statistics.median(s["loss_tokens"] / s["time_s"] for s in timed)
    else:  # older results: mean tokens per step over the median step time
        r["loss_tokens_per_s"] *= r["real_tokens_per_step"] / r["median_step_time_s"] \
            / r["real_tokens_per_s"]
        r["real_tokens_per_s"] = r["real_tokens_per_step"] / r["median_step_time_s"]
    r["mfu"] = r["real_tokens_per_s"] * int(r["flops_per_token"][0]) * r["params"] \
        / r["spec"]["peak_flops"]


def markdown(report: dict) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']}, torch {report['torch']}; "
        f"{report['model']}, max_seq_len {report['seq_len']}, micro-batch "
        f"{report['micro_batch']}, {report['steps']} steps (median over steps 2..), "
        f"LoRA r={LORA['r']} all linear, fp32. Matmul peak: "
        f"{report['peak_flops'] / 1e9:.0f} GFLOP/s ({report['peak_dtype']}).",
        f"Command: `{report['command']}`",
        "",
        "| method | run | step time | real tok/s | loss tok/s | MFU | peak mem | final loss "
        "| vs best alternative (real tok/s) | `dtune plan` estimate (error) | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['spec']['method']} | {r['spec']['label']} | failed: "
                         f"{r['error'][:80]} ||||||||||")
            continue
        ratio = f"{r['ratio_to_best_alternative']:.2f}x" if r.get(
            "ratio_to_best_alternative") else "-"
        loss = "n/a" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        planned = f"{r['plan_gib']:.2f} GiB ({100 * r['plan_error']:+.0f}%)" \
            if "plan_gib" in r else "-"
        lines.append(
            f"| {r['spec']['method']} | {r['spec']['label']} | {r['median_step_time_s']:.2f} s "
            f"| {r['real_tokens_per_s']:.0f} | {r['loss_tokens_per_s']:.0f} | "
            f"{100 * r['mfu']:.0f}% ({r['flops_per_token']}) | {r['peak_memory_gib']:.2f} GiB "
            f"| {loss} | {ratio} | {planned} | {r['load_1min_before']:.1f} / "
            f"{r['load_1min_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--methods", nargs="+", default=["lora", "full", "qlora", "lora_int8"])
    parser.add_argument("--quick", action="store_true",
                        help="no padded dtune run, TRL packing for LoRA only")
    parser.add_argument("--out", default="run", help="file stem under bench/results/")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--render", action="store_true",
                        help="rewrite the .md (and ratios) from bench/results/OUT.json")
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.render:
        report = json.loads((RESULTS / f"{args.out}.json").read_text())
        args.steps, args.seq_len = report["steps"], report["seq_len"]
        args.micro_batch, args.date = report["micro_batch"], report["date"]
        args.methods = list(dict.fromkeys(r["spec"]["method"] for r in report["runs"]))
        sys.argv = ["bench/run.py"] + report["command"].split()[2:]
        print(write_report(args, report["runs"], report["peak_flops"],
                           "cuda" if report["peak_dtype"] == "bf16" else "cpu"))
        return None

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_peak(device)
    data = Path(tempfile.mkdtemp(prefix="bench-data-")) / "train.jsonl"
    make_data(data, args.examples, args.seed)
    results = []
    for run_spec in plan(args.methods, args.quick):
        spec = {**run_spec, "data": str(data), "steps": args.steps, "seq_len": args.seq_len,
                "micro_batch": args.micro_batch, "seed": args.seed,
                "lr": LR.get(run_spec["method"], 1e-4), "peak_flops": peak}
        print(f"[bench] {spec['method']}: {spec['label']} ...", flush=True)
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                              cwd=ROOT, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            results.append({"spec": spec, "error": done.stderr.strip().splitlines()[-1]
                            if done.stderr.strip() else f"exit {done.returncode}"})
            print(done.stderr[-2000:], file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        r = results[-1]
        print(f"[bench]   {r['median_step_time_s']:.2f} s/step, {r['real_tokens_per_s']:.0f} "
              f"real tok/s, MFU {100 * r['mfu']:.0f}%, {r['peak_memory_gib']:.2f} GiB "
              f"(load {r['load_1min_before']:.1f})", flush=True)
        write_report(args, results, peak, device)  # partial results survive an interruption
    print(write_report(args, results, peak, device))


def write_report(args, results: list[dict], peak: float, device: str) -> str:
    for r in results:
        if "error" not in r and not r.get("robust"):
            robust_rates(r)
            r["robust"] = True
    for method in args.methods:
        alternatives = [r for r in results if "error" not in r and r["spec"]["tool"] != "dtune"
                        and r["spec"]["method"] == method]
        if not alternatives:  # quantised bases: compare with the best LoRA alternative
            alternatives = [r for r in results if "error" not in r
                            and r["spec"]["tool"] != "dtune" and r["spec"]["method"] == "lora"]
        best = max((r["real_tokens_per_s"] for r in alternatives), default=None)
        for r in results:
            if "error" not in r and r["spec"]["method"] == method and best:
                r["ratio_to_best_alternative"] = r["real_tokens_per_s"] / best
    report = {
        "date": getattr(args, "date", None) or time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"
                   + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ""),
        "torch": torch.__version__, "model": "SmolLM2-135M-Instruct", "steps": args.steps,
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "peak_flops": peak,
        "peak_dtype": "bf16" if device == "cuda" else "fp32",
        "command": "python bench/run.py " + " ".join(sys.argv[1:]),
        "runs": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(report))
    return markdown(report)


if __name__ == "__main__":
    main()
