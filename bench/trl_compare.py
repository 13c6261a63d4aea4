"""What the dtune-vs-TRL benchmarks share (bench/dpo_vs_trl.py, bench/grpo_vs_trl.py).

The models and the LoRA both sides train, dtune's data order, how memory and throughput are
measured, the command line every such benchmark takes, running each side in its own fresh
process one after the other, and the report's header (date, machine, versions, command).
A benchmark script gives `run_sides` its runners (one function per tool, run in the worker
process) and writes its own table from the report `base_report` returns.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's dtune, not another one installed in the venv
RESULTS = ROOT / "bench" / "results"
MODELS = {"smollm2": "smollm2-135m", "tiny": "tiny-llama"}  # dtune model group names
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    """Wait for the GPU's queued work, so a timer read after it counts that work."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def dtune_order(count: int, seed: int) -> list[int]:
    """Epoch 0's order of dtune's BatchStream (dtune/data/batching.py: _permutation)."""
    import torch

    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def dtune_overrides_common(spec: dict) -> list[str]:
    """The overrides of a dtune run that every comparison sets alike: the model, the LoRA, the
    built-in data's size and seed, the optimizer and its schedule, fp32 on a CPU (bf16 on a
    GPU), and no eval, saving or tracker during training."""
    return [
        f"model={MODELS[spec['model']]}",
        "+method=lora", f"method.r={LORA['r']}", f"method.alpha={LORA['alpha']}",
        f"method.dropout={LORA['dropout']}", "method.target_modules=all-linear",
        f"data.builtin.train_size={spec['train_size']}",
        f"data.builtin.eval_size={spec['eval_size']}", f"data.builtin.seed={spec['data_seed']}",
        f"train.max_steps={spec['steps'] + spec['warmup']}", "train.grad_accum_steps=1",
        f"train.lr={spec['lr']}", "train.lr_schedule=constant", "train.warmup_steps=0",
        "train.weight_decay=0.0", "train.max_grad_norm=1.0", f"train.seed={spec['seed']}",
        "train.log_every=1", "train.eval_every=0", "train.save_every=0",
        "train.gradient_checkpointing=false", f"precision={'bf16' if on_gpu() else 'fp32'}",
        "tracker=none",
    ]


def trl_common_args(spec: dict, output_dir: str) -> dict:
    """TRL's arguments that match `dtune_overrides_common` (its defaults of gradient
    checkpointing on and bf16 on, CPU included, turned off where dtune has them off)."""
    gpu = on_gpu()
    return dict(
        output_dir=output_dir, max_steps=spec["steps"] + spec["warmup"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        gradient_checkpointing=False, bf16=gpu, fp16=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=spec["seed"], data_seed=spec["seed"],
        use_cpu=not gpu, disable_tqdm=True,
    )


def trl_lora():
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rates(steps: list[dict], warmup: int, key: str) -> dict:
    """Tokens `key` of the steps after the first `warmup`: their sum, the sum over the summed
    step time, and the median of the per-step rates."""
    timed = steps[warmup:]
    tokens = sum(s[key] for s in timed)
    return {"tokens": tokens, "per_s": tokens / sum(s["time_s"] for s in timed),
            "median_step_per_s": statistics.median(s[key] / s["time_s"] for s in timed)}


def median_of(steps: list[dict], warmup: int, key: str):
    values = [s[key] for s in steps[warmup:] if s.get(key) is not None]
    return statistics.median(values) if values else None


# --- the worker and the sides ------------------------------------------------------------

def worker(runners: dict[str, Callable[[dict], dict]], spec: dict) -> None:
    """One side in this process; prints its result as the last line."""
    import logging

    import torch

    logging.disable(logging.WARNING)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = runners[spec["tool"]](spec)
    result.update(spec=spec, load_1min_before=load, load_1min_after=os.getloadavg()[0],
                  process_wall_s=time.perf_counter() - started,
                  torch_threads=torch.get_num_threads())
    print("RESULT " + json.dumps(result), flush=True)


def run_sides(script: str, settings: dict, tools: list[str],
              describe: Callable[[dict], str]) -> list[dict]:
    """Each tool's side in a fresh `python script --worker SPEC`, one after the other; a side
    that fails gives {"spec", "error"} (its output's tail goes to stderr)."""
    results = []
    for tool in tools:
        spec = {**settings, "tool": tool}
        print(f"[bench] {tool} ...", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)],
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
        print(f"[bench]   {describe(r)}, peak {r['peak_memory_bytes'] / 1024**3:.2f} GiB, load "
              f"{r['load_1min_before']:.1f}->{r['load_1min_after']:.1f}", flush=True)
    return results


# --- the command line and the report -----------------------------------------------------

def parser(doc: str, out: str, steps: int, warmup: int,
           runners: dict) -> argparse.ArgumentParser:
    """The options every comparison takes; a script adds its own."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--steps", type=int, default=steps, help="measured steps")
    p.add_argument("--warmup", type=int, default=warmup, help="steps run first, not measured")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--eval-size", type=int, default=1,
                   help="held-out rows generated (dtune needs >= 1; it scores them before and "
                        "after training, outside the measured steps)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int,
                   help="torch's CPU threads in each side's process (default: torch's own); "
                        "1 keeps a side from stalling on a core another process holds")
    p.add_argument("--only", choices=sorted(runners), action="append",
                   help="run this side only (repeatable); default both")
    p.add_argument("--out", default=out, help="file stem under bench/results/")
    p.add_argument("--note", action="append", default=[], help="a note for the report")
    p.add_argument("--merge", action="store_true",
                   help="keep the other tools' runs (and notes) of an existing OUT.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def compare(script: str, doc: str, runners: dict, out: str, steps: int, warmup: int,
            options: dict, describe: Callable[[dict], str]):
    """A comparison's command line: in a worker (--worker SPEC), that side, then None;
    otherwise each side in its own process and (args, the report's common part). `options`:
    the script's own flags, {"--flag": (type, default, help)}, which join its settings."""
    p = parser(doc, out, steps, warmup, runners)
    for flag, (kind, default, text) in options.items():
        p.add_argument(flag, type=kind, default=default, help=text)
    args = p.parse_args()
    if args.worker:
        worker(runners, json.loads(args.worker))
        return None
    settings = {"model": args.model, "steps": args.steps, "warmup": args.warmup,
                "lr": args.lr, "seed": args.seed, "train_size": args.train_size,
                "eval_size": args.eval_size, "data_seed": args.data_seed}
    for flag in options:
        name = flag.lstrip("-").replace("-", "_")
        settings[name] = getattr(args, name)
    if args.threads:
        settings["threads"] = args.threads
    results = run_sides(script, settings, args.only or ["dtune", "trl"], describe)
    return args, base_report(f"bench/{Path(script).name}", args, settings, results)


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


def machine(threads: int | None = None) -> str:
    """The GPU's name, or the CPU's with its threads and torch's (`threads`: the workers')."""
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
    return (f"{cpu}, {os.cpu_count()} CPU threads visible, torch threads "
            f"{threads or torch.get_num_threads()}")


def base_report(script: str, args, settings: dict, results: list[dict]) -> dict:
    """The report's common part: when, where, which versions, the command (with --merge, the
    earlier command too, and the other tools' runs and notes of OUT.json kept)."""
    gpu = on_gpu()
    previous = RESULTS / f"{args.out}.json"
    notes = list(args.note)
    command = shlex.join(["python", script, *sys.argv[1:]])
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        if old["settings"] != settings:
            raise SystemExit(f"--merge: {previous} was measured with other settings")
        mine = {r["spec"]["tool"] for r in results}
        results = [r for r in old["runs"] if r["spec"]["tool"] not in mine] + results
        notes = old.get("notes", []) + notes
        command = old["command"] + " ; then " + command
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "machine": machine(settings.get("threads")), "device": "cuda" if gpu else "cpu",
        "memory_kind": "torch.cuda.max_memory_allocated" if gpu else "peak RSS",
        "versions": versions(), "model_folder": model_folder(args.model),
        "settings": settings, "runs": results, "notes": notes,
    }


def header(title: str, report: dict) -> list[str]:
    return [
        f"# {title}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Measured {report['date']} on {report['machine']} ({report['device']}).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
    ]


def notes(report: dict) -> list[str]:
    return ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]] if report.get("notes") \
        else []


def doc_section(doc: str, start: str, end: str) -> str:
    """The part of a script's docstring from `start` (left out) to `end`: what it measures."""
    return doc.split(start, 1)[1].split(end)[0].strip() \
        .replace(", the same way for both:\n", "")


def write_report(report: dict, text: str, out: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{out}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{out}.md").write_text(text)
    print(text)
