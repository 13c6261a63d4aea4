"""The GPU check: every method, precision and engine once on a real GPU, then a ~1B-parameter
random-weight model measured (tokens/s, MFU against a measured bf16 matmul peak, the
allocator's reserved peak). bench/gpu_check.sh installs what the machine lacks and runs this.

    python bench/gpu_check.py --out DIR             # on a CUDA GPU (about 8 minutes on an H200)
    python bench/gpu_check.py --out DIR --cpu-dry-run   # the same sequence, tiny, on a CPU

It fails loudly: the exit status is non-zero when a step fails, leaves no summary.json, logs a
non-finite loss, or breaks what it is there to show (a bf16 LoRA base holding more than about
2 bytes a parameter, say), and the failing step is named. Results: DIR/gpu_check.json and
DIR/gpu_check.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=tiny-llama", "data.builtin.train_size=256", "data.builtin.eval_size=16",
        "eval.exact_match_samples=0", "eval.max_new_tokens=8", "train.micro_batch_size=4",
        "train.log_every=1", "train.save_every=0", "train.warmup_steps=0", "train.max_steps=4"]
# About 1B parameters: 18 layers of hidden 2048, MLP 5632, 16 heads (8 for keys and values),
# a 32k vocabulary. Random weights: no hub on the device machine.
BIG = ["model=tiny-llama", "model.name=random-1b", "model.name_or_path=random-1b",
       "model.random_init.hidden_size=2048", "model.random_init.num_layers=18",
       "model.random_init.num_heads=16", "model.random_init.num_kv_heads=8",
       "model.random_init.intermediate_size=5632", "model.random_init.vocab_size=32000",
       "model.random_init.max_position_embeddings=4096", "data.builtin.train_size=4000",
       "data.max_seq_len=2048", "data.packing=true", "train.micro_batch_size=8",
       "train.max_steps=12", "train.warmup_steps=0", "train.save_every=0", "train.log_every=1",
       "train.loss_chunk_size=4096", "eval.exact_match_samples=0", "eval.max_loss_samples=16",
       "precision=bf16"]
BIG_DRY = ["model=tiny-llama", "model.name=random-small", "model.name_or_path=random-small",
           "data.builtin.train_size=256", "data.max_seq_len=256", "data.packing=true",
           "train.micro_batch_size=2", "train.max_steps=4", "train.warmup_steps=0",
           "train.save_every=0", "train.log_every=1", "eval.exact_match_samples=0",
           "eval.max_loss_samples=8", "precision=bf16"]


@dataclass
class Step:
    name: str
    overrides: list[str]
    checks: list[str] = field(default_factory=list)  # names of CHECKS to apply
    tool: list[str] | None = None  # a `dtune` tool command on a run dir, instead of training


STEPS = [
    Step("lora-bf16", ["+method=lora", "precision=bf16", "eval.exact_match_samples=16",
                       "train.save_every=2"], ["exact_match", "base_2_bytes"]),
    Step("qlora-bf16", ["+method=qlora", "precision=bf16"], ["quantized"]),
    Step("lora-int8", ["+method=lora_int8", "precision=bf16"], ["quantized"]),
    Step("dora-bf16", ["+method=dora", "precision=bf16"]),
    Step("prompt-tuning-bf16", ["+method=prompt_tuning", "precision=bf16"]),
    Step("full-fp16", ["+method=full", "precision=fp16"], ["loss_scale"]),
    Step("full-bf16-zero2", ["+method=full", "precision=bf16", "parallelism=zero2",
                             "parallelism.nproc_per_node=1"]),
    Step("full-bf16-zero3", ["+method=full", "precision=bf16", "parallelism=zero3",
                             "parallelism.nproc_per_node=1", "train.loss_chunk_size=0"]),
    Step("full-bf16-zero2-offload", ["+method=full", "precision=bf16",
                                     "parallelism=zero2_offload",
                                     "parallelism.nproc_per_node=1"]),
    # the LoRA run again, from its step-2 checkpoint to step 6
    Step("lora-bf16-resume", ["+method=lora", "precision=bf16", "eval.exact_match_samples=16",
                              "train.save_every=2", "train.max_steps=6", "train.resume=true"],
         ["resumed"]),
    Step("eval", [], tool=["eval", "{lora-bf16}", "--samples", "8"]),
    Step("generate", [], tool=["generate", "{lora-bf16}", "--prompt", "What is 12 + 30?",
                               "--max-new-tokens", "8"]),
    Step("merge", [], tool=["merge", "{lora-bf16}", "--out", "{work}/merged"]),
]


def run_step(step: Step, work: Path, env: dict, timeout: int) -> dict:
    run_dir = work / step.name.removesuffix("-resume")  # a resume continues the run's folder
    if step.tool:
        args = [a.replace("{work}", str(work)).replace("{lora-bf16}", str(work / "lora-bf16"))
                for a in step.tool]
        command = [sys.executable, "-m", "dtune.cli", *args]
    else:
        command = [sys.executable, "-m", "dtune", *TINY, *step.overrides,
                   f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        code, output = 124, f"timed out after {timeout} s\n{expired.stdout or ''}"
    result = {"step": step.name, "exit": code, "seconds": round(time.perf_counter() - started, 1),
              "output_tail": output[-1500:], "problems": []}
    if code:
        result["problems"].append(f"exit status {code}")
    if not step.tool:
        result.update(inspect_run(run_dir, step.checks, result["problems"]))
    return result


def inspect_run(run_dir: Path, checks: list[str], problems: list[str]) -> dict:
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        problems.append("no summary.json")
        return {}
    summary = json.loads(summary_file.read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r.get("loss") for r in records if "step_time_s" in r]
    if not losses or any(x is None or not math.isfinite(x) for x in losses):
        problems.append(f"non-finite or missing losses: {losses}")
    for name in checks:
        message = CHECKS[name](summary, records)
        if message:
            problems.append(message)
    return {"summary": summary, "losses": losses}


def frozen_bytes_per_param(summary: dict) -> float:
    return summary["frozen_parameter_bytes"] / (summary["total_params"]
                                                - summary["trainable_params"])


CHECKS = {
    "exact_match": lambda s, r: None if s.get("exact_match_after") is not None
    else "no exact match was measured (generation did not run)",
    "base_2_bytes": lambda s, r: None if frozen_bytes_per_param(s) < 2.2
    else f"the bf16 LoRA base holds {frozen_bytes_per_param(s):.2f} bytes a parameter",
    # below fp32's 4 whatever the model: the linear layers hold 0.5 or 1 byte, the rest 4
    "quantized": lambda s, r: None if frozen_bytes_per_param(s) < 3
    else f"the quantized base holds {frozen_bytes_per_param(s):.2f} bytes a parameter",
    "loss_scale": lambda s, r: None if s.get("loss_scale") else "fp16 ran without loss scale",
    "resumed": lambda s, r: None if (s.get("resumed_from") or "").endswith("step-4")
    else f"resumed from {s.get('resumed_from')}, not step-4",
}


def matmul_peak(dry_run: bool) -> float:
    """bf16 matmul FLOP/s of this device (fp32 threads on a CPU dry run)."""
    import torch

    device, dtype, n, reps = ("cpu", torch.float32, 1024, 5) if dry_run else \
        ("cuda", torch.bfloat16, 8192, 20)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return reps * 2 * n**3 / (time.perf_counter() - started)


def measure(work: Path, env: dict, dry_run: bool, timeout: int) -> list[dict]:
    """Full bf16 and LoRA bf16 on the big random model: tokens/s, MFU, reserved memory."""
    peak, rows = matmul_peak(dry_run), []
    for name, method, k in (("big-full-bf16", "full", 6), ("big-lora-bf16", "lora", 4)):
        step = Step(name, [*(BIG_DRY if dry_run else BIG), f"+method={method}"])
        run_dir = work / name
        command = [sys.executable, "-m", "dtune", *step.overrides, f"hydra.run.dir={run_dir}"]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        row = {"step": name, "exit": done.returncode, "problems": [],
               "output_tail": (done.stdout + done.stderr)[-1500:]}
        if done.returncode:
            row["problems"].append(f"exit status {done.returncode}")
        row.update(inspect_run(run_dir, [], row["problems"]))
        if "summary" in row:
            steps = [json.loads(line) for line in
                     (run_dir / "metrics.jsonl").read_text().splitlines()]
            steps = [m for m in steps if "step_time_s" in m][2:] or steps[-1:]
            s = row["summary"]
            row["tokens_per_s"] = statistics.median(m["tokens_per_s"] for m in steps)
            row["mfu"] = row["tokens_per_s"] * k * s["total_params"] / peak
            row["mfu_count"] = f"{k}N"
        rows.append(row)
    return [{"step": "matmul-peak", "flops": peak, "problems": []}] + rows


def report(results: list[dict], out: Path, dry_run: bool) -> None:
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    import torch

    where = "CPU dry run" if dry_run else torch.cuda.get_device_name()
    lines = [f"GPU check on {where}, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}. Command: `bash bench/gpu_check.sh"
             f"{' --cpu-dry-run' if dry_run else ''}`", "",
             "| step | result | seconds | final loss | tokens/s | MFU | peak reserved | "
             "frozen bytes/param |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["step"] == "matmul-peak":
            lines.insert(1, f"Matmul peak: {r['flops'] / 1e12:.1f} TFLOP/s "
                            f"({'fp32 CPU' if dry_run else 'bf16'}).")
            continue
        s = r.get("summary") or {}
        reserved = s.get("peak_memory_reserved_bytes") or s.get("peak_memory_bytes")
        cells = [r["step"], "FAIL: " + "; ".join(r["problems"]) if r["problems"] else "ok",
                 str(r.get("seconds", "")),
                 f"{s['final_loss']:.3f}" if s.get("final_loss") is not None else "",
                 f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "",
                 f"{100 * r['mfu']:.1f}% ({r['mfu_count']})" if "mfu" in r else "",
                 f"{reserved / 2**30:.2f} GiB" if reserved else "",
                 f"{frozen_bytes_per_param(s):.2f}"
                 if s.get("total_params", 0) > s.get("trainable_params", 0) else ""]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--break-step", help="(tests) give this step a bad override")
    parser.add_argument("--only", nargs="*", help="(tests) these steps alone, no measurement")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "runs"
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME",
                                                                        "lo")}
    timeout = 600 if args.cpu_dry_run else 170
    results = []
    for step in STEPS:
        if args.only and step.name not in args.only:
            continue
        if step.name == args.break_step:
            step.overrides = [*step.overrides, "train.lr=-1"]
        results.append(run_step(step, work, env, timeout))
        status = "FAIL: " + "; ".join(results[-1]["problems"]) if results[-1]["problems"] \
            else "ok"
        print(f"== {step.name}: {status} ({results[-1]['seconds']} s)", flush=True)
    if not args.only:
        results += measure(work, env, args.cpu_dry_run, 600 if args.cpu_dry_run else 240)
    report(results, args.out, args.cpu_dry_run)
    failed = [r["step"] for r in results if r["problems"]]
    for r in results:
        if r["problems"]:
            print(f"\n--- {r['step']} failed: {'; '.join(r['problems'])}\n"
                  f"{r.get('output_tail', '')}", file=sys.stderr)
    if failed:
        raise SystemExit(f"gpu_check: {len(failed)} step(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
