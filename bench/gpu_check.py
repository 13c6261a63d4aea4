"""The GPU check: every method, precision and engine once on a real GPU (call 1), then a
~1B-parameter random-weight model with a 32k vocabulary measured (call 2: tokens/s, MFU against
a measured bf16 matmul peak, the allocator's reserved peak). bench/gpu_check.sh installs what
the machine lacks and runs this; each call fits one device command of at most 8 minutes.

    python bench/gpu_check.py --out DIR --call 1                 # on a CUDA GPU
    python bench/gpu_check.py --out DIR --call 2
    python bench/gpu_check.py --out DIR --cpu-dry-run            # both calls, tiny, on a CPU

It fails loudly: the exit status is non-zero when a step fails, leaves no summary.json, logs a
non-finite loss, times out, is not reached before --deadline, breaks what it is there to show
(a bf16 LoRA base holding more than about 2 bytes a parameter, say), or is not refused clearly
where a refusal is expected (flash-attention without its package); the failing step is named.
Each step's result is appended to DIR/callN.md, DIR/callN.jsonl and DIR/callN.log as soon as it
ends, so a call stopped at the device's limit still returns everything done before. Run folders
go to a temporary folder outside DIR (what DIR holds must come back in a few small files).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=tiny-llama", "data.builtin.train_size=256", "data.builtin.eval_size=16",
        "eval.exact_match_samples=0", "eval.max_new_tokens=8", "train.micro_batch_size=4",
        "train.log_every=1", "train.save_every=0", "train.warmup_steps=0", "train.max_steps=4"]
# About 1B parameters: 18 layers of hidden 2048, MLP 5632, 16 heads (8 for keys and values),
# a 32k vocabulary (the tokenizer's filled up to it). Random weights: no hub on the device.
BIG = ["model=tiny-llama", "model.name=random-1b", "model.name_or_path=random-1b",
       "model.random_init.hidden_size=2048", "model.random_init.num_layers=18",
       "model.random_init.num_heads=16", "model.random_init.num_kv_heads=8",
       "model.random_init.intermediate_size=5632", "model.random_init.vocab_size=32000",
       "model.random_init.max_position_embeddings=4096", "data.builtin.train_size=4000",
       "data.max_seq_len=2048", "data.packing=true", "train.micro_batch_size=8",
       "train.max_steps=12", "train.warmup_steps=0", "train.save_every=0", "train.log_every=1",
       "train.save_final=false", "train.loss_chunk_size=4096", "eval.exact_match_samples=0",
       "eval.max_loss_samples=16", "precision=bf16"]
BIG_DRY = ["model=tiny-llama", "model.name=random-small", "model.name_or_path=random-small",
           "model.random_init.vocab_size=32000", "data.builtin.train_size=256",
           "data.max_seq_len=256", "data.packing=true", "train.micro_batch_size=2",
           "train.max_steps=4", "train.warmup_steps=0", "train.save_every=0",
           "train.save_final=false", "train.log_every=1", "eval.exact_match_samples=0",
           "eval.max_loss_samples=8", "precision=bf16"]
FLASH_REFUSAL = "flash_attention_2 needs a CUDA GPU and the flash-attn"
MIN_START_S = 20  # a step started with less left of the call's budget could not finish
STEP_TIMEOUT_S = {1: 170, 2: 240}  # on a GPU, per call; a CPU dry run allows 600


@dataclass
class Step:
    name: str
    overrides: list[str]
    checks: list[str] = field(default_factory=list)  # names of CHECKS to apply
    tool: list[str] | None = None  # a `dtune` tool command on a run dir, instead of training
    call: int = 1  # 1: the tiny correctness steps; 2: the ~1B measurements
    # given dry_run: the message dtune must refuse the step with, or None when it must run
    refused: Callable[[bool], str | None] = lambda dry_run: None
    flops_per_token: int = 0  # measurements: k in the k*N FLOPs a token, for MFU


def flash_attn_present() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


STEPS = [
    Step("lora-bf16", ["+method=lora", "precision=bf16", "eval.exact_match_samples=16",
                       "train.save_every=2"], ["exact_match", "base_2_bytes"]),
    Step("qlora-bf16", ["+method=qlora", "precision=bf16"], ["quantized"]),
    Step("lora-int8", ["+method=lora_int8", "precision=bf16"], ["quantized"]),
    Step("dora-bf16", ["+method=dora", "precision=bf16"]),
    Step("prompt-tuning-bf16", ["+method=prompt_tuning", "precision=bf16"]),
    Step("full-fp16", ["+method=full", "precision=fp16"], ["loss_scale"]),
    # DeepSpeed's own fp16 (its loss scaler); on a CPU dtune refuses it before loading
    Step("full-fp16-zero2", ["+method=full", "precision=fp16", "parallelism=zero2",
                             "parallelism.nproc_per_node=1"], ["loss_scale"],
         refused=lambda dry_run: "precision=fp16 with parallelism=zero2 needs a GPU"
         if dry_run else None),
    Step("full-bf16-zero2", ["+method=full", "precision=bf16", "parallelism=zero2",
                             "parallelism.nproc_per_node=1"]),
    # generation under ZeRO-3 (every rank gathers each layer as it decodes): exact match
    Step("full-bf16-zero3", ["+method=full", "precision=bf16", "parallelism=zero3",
                             "parallelism.nproc_per_node=1", "train.loss_chunk_size=0",
                             "eval.exact_match_samples=8"], ["exact_match"]),
    Step("full-bf16-zero2-offload", ["+method=full", "precision=bf16",
                                     "parallelism=zero2_offload",
                                     "parallelism.nproc_per_node=1"]),
    # FSDP2: bf16 policy over fp32 shards, DCP checkpoint, final/ gathered, generation with
    # every rank joining; then per-layer torch.compile (Triton kernels on a GPU) under it
    Step("full-bf16-fsdp2", ["+method=full", "precision=bf16", "parallelism=fsdp2",
                             "parallelism.nproc_per_node=1", "train.save_every=2",
                             "eval.exact_match_samples=8"], ["exact_match"]),
    Step("lora-bf16-fsdp2-compile", ["+method=lora", "precision=bf16", "parallelism=fsdp2",
                                     "parallelism.nproc_per_node=1", "train.compile=true"]),
    # bitsandbytes' 4-bit weights lose their quantization state when sharded: refused
    Step("qlora-bf16-fsdp2", ["+method=qlora", "precision=bf16", "parallelism=fsdp2",
                              "parallelism.nproc_per_node=1"],
         refused=lambda dry_run: "+method=qlora with parallelism=fsdp2 is not supported"),
    # long context on one GPU: the MLP in tiles and the layers' checkpoints in pinned host
    # memory (a CPU run keeps them where they are); sequence parallelism needs 2 GPUs
    Step("full-bf16-long-context", ["+method=full", "precision=bf16", "data=builtin_long",
                                    "data.builtin.document_lines=24", "data.max_seq_len=1024",
                                    "data.builtin.train_size=64", "data.builtin.eval_size=4",
                                    "train.gradient_checkpointing=true", "train.mlp_tiles=4",
                                    "train.offload_activations=true"]),
    # packed rows under flash-attention where the package is there; a clear refusal where not
    Step("lora-bf16-packed-flash-attn", ["+method=lora", "precision=bf16", "data.packing=true",
                                         "model.attn_implementation=flash_attention_2"],
         refused=lambda dry_run: FLASH_REFUSAL if dry_run or not flash_attn_present()
         else None),
    # the LoRA run again, from its step-2 checkpoint to step 6
    Step("lora-bf16-resume", ["+method=lora", "precision=bf16", "eval.exact_match_samples=16",
                              "train.save_every=2", "train.max_steps=6", "train.resume=true"],
         ["resumed"]),
    Step("eval", [], tool=["eval", "{lora-bf16}", "--samples", "8"]),
    Step("generate", [], tool=["generate", "{lora-bf16}", "--prompt", "What is 12 + 30?",
                               "--max-new-tokens", "8"]),
    Step("merge", [], tool=["merge", "{lora-bf16}", "--out", "{work}/merged"]),
    Step("big-full-bf16", ["+method=full"], call=2, flops_per_token=6),
    Step("big-lora-bf16", ["+method=lora"], call=2, flops_per_token=4),
]


def command_of(step: Step, work: Path, dry_run: bool) -> list[str]:
    if step.tool:
        args = [a.replace("{work}", str(work)).replace("{lora-bf16}", str(work / "lora-bf16"))
                for a in step.tool]
        return [sys.executable, "-m", "dtune.cli", *args]
    base = TINY if step.call == 1 else BIG_DRY if dry_run else BIG
    run_dir = work / step.name.removesuffix("-resume")  # a resume continues the run's folder
    return [sys.executable, "-m", "dtune", *base, *step.overrides, f"hydra.run.dir={run_dir}"]


def run_step(step: Step, work: Path, env: dict, timeout: float, dry_run: bool) -> dict:
    started = time.perf_counter()
    command = command_of(step, work, dry_run)
    code, output = run_bounded(command, env, timeout)
    result = {"step": step.name, "exit": code, "seconds": round(time.perf_counter() - started, 1),
              "command": " ".join(command[1:]), "output": output, "problems": []}
    refusal = step.refused(dry_run)
    if refusal:
        judge_refusal(result, refusal)
        return result
    if code:
        result["problems"].append(f"timed out after {timeout:.0f} s" if code == 124
                                  else f"exit status {code}")
    if not step.tool:
        result.update(inspect_run(work / step.name.removesuffix("-resume"), step.checks,
                                  result["problems"]))
    return result


def run_bounded(command: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """Run `command` in a session of its own; past `timeout` kill that whole session (dtune's
    launcher starts workers that a kill of it alone would leave holding the GPU) and keep
    what it printed until then. Exit status 124 for a timeout."""
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace",
                          start_new_session=True) as process:
        RUNNING.add(process.pid)
        try:
            output = process.communicate(timeout=timeout)[0]
            return process.returncode, output
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            return 124, f"{process.communicate()[0]}\ngpu_check: timed out after {timeout:.0f} s"
        finally:
            RUNNING.discard(process.pid)


RUNNING: set[int] = set()  # the sessions of steps under way


def stop_steps(signum, frame) -> None:
    """Stopped from outside (the device tool's limit, ^C): the step's session goes too, or it
    would run on, holding the GPU, into the next call on a warm machine."""
    for pid in list(RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def judge_refusal(result: dict, expected: str) -> None:
    """A refusal passes when dtune stops with its one-paragraph message, no traceback."""
    flat = " ".join(result["output"].split())
    result["refused"] = True
    if result["exit"] == 0:
        result["problems"].append(f"ran, where dtune should refuse it ('{expected}')")
    elif expected not in flat or "Traceback" in flat:
        result["problems"].append(f"failed without the clear refusal '{expected}'")


def inspect_run(run_dir: Path, checks: list[str], problems: list[str]) -> dict:
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        problems.append("no summary.json")
        return {}
    summary = json.loads(summary_file.read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r]
    losses = [r.get("loss") for r in steps]
    if not losses or any(x is None or not math.isfinite(x) for x in losses):
        problems.append(f"non-finite or missing losses: {losses}")
    for name in checks:
        message = CHECKS[name](summary, records)
        if message:
            problems.append(message)
    return {"summary": summary, "losses": losses, "steps": steps}


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


def matmul_peak(dry_run: bool) -> dict:
    """bf16 matmul FLOP/s of this device (fp32 threads on a CPU dry run)."""
    import torch

    device, dtype, n, reps = ("cpu", torch.float32, 1024, 5) if dry_run else \
        ("cuda", torch.bfloat16, 8192, 20)
    started = time.perf_counter()
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    timed = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    flops = reps * 2 * n**3 / (time.perf_counter() - timed)
    del a, b
    if device == "cuda":  # the measured runs get the whole GPU but this process's context
        torch.cuda.empty_cache()
    return {"step": "matmul-peak", "flops": flops, "problems": [],
            "seconds": round(time.perf_counter() - started, 1)}


def add_speed(result: dict, k: int, peak: float | None) -> None:
    """Median tokens/s over the steps after the first two (warm-up), and MFU against `peak`."""
    if "summary" not in result:
        return
    steps = result["steps"][2:] or result["steps"][-1:]
    result["tokens_per_s"] = statistics.median(m["tokens_per_s"] for m in steps)
    if peak:
        result["mfu"] = result["tokens_per_s"] * k * result["summary"]["total_params"] / peak
        result["mfu_count"] = f"{k}N"


# --- the report, appended step by step -----------------------------------------------------

class Report:
    """One call's results, appended as each step ends: callN.md (a table), callN.jsonl (one
    result a line) and callN.log (each step's command and output)."""

    COLUMNS = ["step", "result", "seconds", "final loss", "tokens/s", "MFU", "peak reserved",
               "frozen bytes/param"]

    def __init__(self, out: Path, call: int, dry_run: bool):
        self.md, self.jsonl, self.log = (out / f"call{call}.{x}" for x in ("md", "jsonl", "log"))
        import torch  # not CUDA: this process leaves the GPU to the steps until call 2's peak

        where = "a CPU (dry run)" if dry_run else gpu_name()
        lines = [f"GPU check, call {call} of 2, on {where}, torch {torch.__version__}, "
                 f"{time.strftime('%Y-%m-%d %H:%M')}. Command: `bash bench/gpu_check.sh "
                 f"--call {call}{' --cpu-dry-run' if dry_run else ''}`", ""]
        if call == 1:
            lines += image_section(out)
        lines += ["| " + " | ".join(self.COLUMNS) + " |", "|---" * len(self.COLUMNS) + "|"]
        self.md.write_text("\n".join(lines) + "\n")
        self.jsonl.write_text("")
        self.log.write_text("")

    def add(self, result: dict) -> None:
        status = "FAIL: " + "; ".join(result["problems"]) if result["problems"] else "ok"
        print(f"== {result['step']}: {status} ({result.get('seconds', '')} s)", flush=True)
        append(self.md, "| " + " | ".join(cells(result)) + " |\n")
        kept = {k: v for k, v in result.items() if k not in ("output", "steps")}
        kept["output_tail"] = result.get("output", "")[-3000:]
        append(self.jsonl, json.dumps(kept, default=str) + "\n")
        if "command" in result:
            append(self.log, f"\n===== {result['step']}: {status} (exit {result['exit']}, "
                             f"{result['seconds']} s)\n$ {result['command']}\n"
                             f"{result['output'][-20000:]}\n")


def append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:  # closed at once: a kill loses nothing
        handle.write(text)


def cells(r: dict) -> list[str]:
    s = r.get("summary") or {}
    reserved = s.get("peak_memory_reserved_bytes") or s.get("peak_memory_bytes")
    result = "FAIL: " + "; ".join(r["problems"]) if r["problems"] else \
        "ok: refused clearly" if r.get("refused") else "ok"
    if "flops" in r:  # a CPU's is in GFLOP/s
        result += f": {r['flops'] / 1e12:.1f} TFLOP/s" if r["flops"] > 1e12 else \
            f": {r['flops'] / 1e9:.1f} GFLOP/s"
    return [r["step"], result, str(r.get("seconds", "")),
            f"{s['final_loss']:.3f}" if s.get("final_loss") is not None else "",
            f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "",
            f"{100 * r['mfu']:.1f}% ({r['mfu_count']})" if "mfu" in r else "",
            f"{reserved / 2**30:.2f} GiB" if reserved else "",
            f"{frozen_bytes_per_param(s):.2f}"
            if s.get("total_params", 0) > s.get("trainable_params", 0) else ""]


def gpu_name() -> str:
    """From nvidia-smi: asking torch would hold a CUDA context here through every step."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30)
        return done.stdout.strip().replace("\n", "; ") or "a GPU nvidia-smi does not name"
    except (OSError, subprocess.TimeoutExpired):
        return "a GPU (no nvidia-smi)"


def image_section(out: Path) -> list[str]:
    """The image's packages as gpu_check.sh found them before installing, against what
    bench/gpu_image.txt recorded: what the next session corrects that file by."""
    listed = out / "image-pip-list.txt"
    if not listed.is_file():
        return ["Image packages: not listed (installed earlier on this machine, or a dry run "
                "without install).", ""]
    from gpu_wheels import read_image  # bench/, this script's folder
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    found = {}
    for line in listed.read_text().splitlines():
        name, _, pinned = line.partition("==")
        try:
            found[canonicalize_name(name)] = Version(pinned)
        except InvalidVersion:  # `name @ file:...` and the like
            continue
    recorded = read_image()
    differ = [f"{name} {v} recorded, " + (f"{found[name]} found" if name in found
                                         else "not found")
              for name, v in recorded.items()
              if name not in found or found[name].public != v.public]
    head = (f"Image packages (image-pip-list.txt, {len(found)}) against bench/gpu_image.txt "
            f"({len(recorded)}): ")
    return [head + ("every recorded version found." if not differ
                    else f"{len(differ)} differ: " + "; ".join(differ) + "."), "",
            "The image's whole list: " + ", ".join(
                line.strip() for line in listed.read_text().splitlines() if line.strip()), ""]


# --- the calls -----------------------------------------------------------------------------

def run_folder_parent(dry_run: bool) -> str | None:
    """Run folders go outside OUT, on tmpfs where it has room. The measurement runs skip their
    final checkpoint and final/ (train.save_final=false); the tiny steps' cost nothing there."""
    shm = Path("/dev/shm")
    if not dry_run and shm.is_dir() and shutil.disk_usage(shm).free > 48 * 2**30:
        return str(shm)
    return None


def run_call(call: int, args, work: Path, env: dict) -> list[dict]:
    steps = [s for s in STEPS if s.call == call and (not args.only or s.name in args.only)]
    if not steps:
        return []
    report, results, peak = Report(args.out, call, args.cpu_dry_run), [], None
    if call == 2:
        results.append(matmul_peak(args.cpu_dry_run))
        report.add(results[-1])
        peak = results[-1]["flops"]
    default_timeout = args.step_timeout or (600 if args.cpu_dry_run else STEP_TIMEOUT_S[call])
    for step in steps:
        if step.name == args.break_step:
            step.overrides = [*step.overrides, "train.lr=-1"]
        left = args.deadline - time.time() if args.deadline else math.inf
        if left < MIN_START_S:
            result = {"step": step.name, "exit": None, "seconds": 0, "output": "",
                      "problems": ["not run: the call's time budget was spent"]}
        else:
            result = run_step(step, work, env, min(default_timeout, left), args.cpu_dry_run)
            if step.flops_per_token:
                add_speed(result, step.flops_per_token, peak)
        report.add(result)
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--call", choices=["1", "2", "all"], default="all")
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--deadline", type=float, help="epoch seconds: start no step after")
    parser.add_argument("--step-timeout", type=float, help="seconds a step may take")
    parser.add_argument("--break-step", help="(tests) give this step a bad override")
    parser.add_argument("--only", nargs="*", help="(tests) these steps alone")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(stop, stop_steps)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME",
                                                                        "lo")}
    work = Path(tempfile.mkdtemp(prefix="dtune-gpu-check-",
                                 dir=run_folder_parent(args.cpu_dry_run)))
    results = []
    try:
        for call in ([1, 2] if args.call == "all" else [int(args.call)]):
            results += run_call(call, args, work, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in results if r["problems"]]
    for r in failed:
        print(f"\n--- {r['step']} failed: {'; '.join(r['problems'])}\n"
              f"{r.get('output', '')[-1500:]}", file=sys.stderr)
    if failed:
        raise SystemExit(f"gpu_check: {len(failed)} step(s) failed: "
                         f"{', '.join(r['step'] for r in failed)}")


if __name__ == "__main__":
    main()
