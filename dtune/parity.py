"""`dtune check`: prove on this machine that parallelism changes nothing but speed.

It trains the tiny model with the same global batch and seed under several layouts and
compares the loss at every step: 1 process vs DDP, DDP vs each ZeRO stage and FSDP2, and
gradient accumulation traded for ranks. A new cluster is validated in minutes. `dtune check
objective=dpo` (or orpo, simpo) runs the same comparisons for a preference objective, on the
built-in preference pairs, with the micro-batch counted in pairs; DPO's reference is then
precomputed (full fine-tuning), by every rank of each layout together.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dtune.errors import DtuneError
from dtune.run_dir import RunDir

BASE = ["model=tiny-llama", "+method=full", "train.lr=1e-3", "train.warmup_steps=0",
        "train.save_every=0", "train.log_every=1", "eval.exact_match_samples=0",
        "data.builtin.train_size=512", "data.builtin.eval_size=8", "train.max_grad_norm=1.0",
        # one loss path for every layout (ZeRO-3 cannot take the chunked one), so that the
        # comparison isolates the parallelism
        "train.loss_chunk_size=0"]


@dataclass
class Layout:
    name: str
    overrides: list[str]


@dataclass
class Comparison:
    name: str
    reference: str
    candidate: str
    tolerance: float
    max_abs_diff: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def layouts(micro_batch: int) -> dict[str, Layout]:
    mb = f"train.micro_batch_size={micro_batch}"

    def parallel(name: str, procs: int, accum: int) -> list[str]:
        return [f"parallelism={name}", f"parallelism.nproc_per_node={procs}", mb,
                f"train.grad_accum_steps={accum}"]

    return {
        "1 process": Layout("1 process", parallel("single", 1, 1)),
        "ddp 2 ranks, sequences split in 2": Layout(
            "ddp 2 ranks, sequences split in 2",
            [*parallel("ddp", 2, 1), "parallelism.sequence_parallel=2"]),
        "1 process x 2 accum": Layout("1 process x 2 accum", parallel("single", 1, 2)),
        "ddp 2 ranks": Layout("ddp 2 ranks", parallel("ddp", 2, 1)),
        "zero1 2 ranks": Layout("zero1 2 ranks", parallel("zero1", 2, 1)),
        "zero2 2 ranks": Layout("zero2 2 ranks", parallel("zero2", 2, 1)),
        "zero3 2 ranks": Layout("zero3 2 ranks", parallel("zero3", 2, 1)),
        "fsdp2 2 ranks": Layout("fsdp2 2 ranks", parallel("fsdp2", 2, 1)),
        "1 process x 4 accum": Layout("1 process x 4 accum", parallel("single", 1, 4)),
        "ddp 2 ranks x 2 accum": Layout("ddp 2 ranks x 2 accum", parallel("ddp", 2, 2)),
    }


# (reference, candidate, kind): ranks traded for accumulation ("ddp"), or ZeRO or FSDP2
# against DDP.
COMPARISONS = [
    ("1 process x 2 accum", "ddp 2 ranks", "ddp"),
    ("ddp 2 ranks", "zero1 2 ranks", "zero"),
    ("ddp 2 ranks", "zero2 2 ranks", "zero"),
    ("ddp 2 ranks", "zero3 2 ranks", "zero"),
    ("ddp 2 ranks", "fsdp2 2 ranks", "fsdp2"),
    ("1 process x 4 accum", "ddp 2 ranks x 2 accum", "ddp"),
    ("1 process", "ddp 2 ranks, sequences split in 2", "sequence"),
]
# The largest loss difference over the steps that still passes, per precision. fp32: sums in
# another order. bf16/fp16 under DDP: the same autocast, where a reordered sum can round an
# update differently. bf16/fp16 under ZeRO: DeepSpeed keeps the module itself in 16 bits
# (fp32 master weights in the optimizer), where one process rounds fp32 weights at each
# matmul: the same matmuls, other roundings in norms and embeddings. Measured on CPU, 20
# steps (`dtune check --precision P`): fp32 0 (ddp) and 4.8e-7 (zero); bf16 1.7e-4 and
# 1.9e-3; fp16 3.4e-5 (ddp; DeepSpeed's fp16 mode runs on GPUs only).
# FSDP2 in fp32 sums the same gradients in another order (measured 4.8e-7 over 20 steps on
# CPU); under bf16/fp16 its policy runs the whole module in 16 bits, as DeepSpeed does, so
# ZeRO's bounds (bf16 measured 1.75e-3; fp16 not measured).
# Sequence parallelism attends over the same whole sequence, per head, as one process does, so
# it is held to DDP's bounds.
TOLERANCES = {"fp32": {"ddp": 1e-5, "zero": 1e-4, "fsdp2": 1e-5, "sequence": 1e-5},
              "bf16": {"ddp": 5e-4, "zero": 5e-3, "fsdp2": 5e-3, "sequence": 5e-4},
              "fp16": {"ddp": 1e-4, "zero": 5e-3, "fsdp2": 5e-3, "sequence": 1e-4}}


def objective_overrides(overrides: list[str]) -> list[str]:
    """The user's `dtune check` overrides (an objective and its settings), with the
    objective's built-in data added (preference pairs, GRPO's prompts) unless a data group is
    named; GRPO samples short completions, few per prompt (GRPO_CHECK)."""
    from dtune.objectives import OBJECTIVES

    chosen = chosen_objective(overrides)
    spec = OBJECTIVES.get(chosen)
    if spec is None or chosen == "sft" or any(o.startswith("data=") for o in overrides):
        return list(overrides)
    extra = GRPO_CHECK if spec.online else []
    return [f"data={spec.builtin_data}", *extra, *overrides]


def chosen_objective(overrides) -> str:
    return next((o.split("=", 1)[1] for o in reversed(list(overrides))
                 if o.split("=", 1)[0] == "objective"), "sft")


# A parity check compares the loss, not learning: completions of 16 tokens, 2 per prompt (the
# same global batch of prompts), keep 20 steps of 8 layouts within minutes on a CPU. The tiny
# random model never gives a built-in task's exact answer, so exact_match would make every
# advantage, and so every loss, 0 under any layout; whether a completion holds a digit splits
# its samples, so the losses carry the advantages and their normaliser.
GRPO_CHECK = ["objective.num_generations=2", "objective.max_new_tokens=16",
              "objective.rewards=[{name:format,weight:1.0,pattern:'[^0-9]*'}]"]


def train_layout(layout: Layout, work_dir: Path, steps: int,
                 precision: str = "fp32", overrides: tuple = ()) -> list[float]:
    suffix = "" if precision == "fp32" else f"-{precision}"
    run_dir = work_dir / f"{layout.name.replace(' ', '_')}{suffix}"
    # The folder goes by the environment: in an override, a --work-dir with a space, a comma
    # or '=' would break the command line or turn the run into a sweep.
    command = [sys.executable, "-m", "dtune", *BASE, *objective_overrides(list(overrides)),
               *layout.overrides, f"precision={precision}", f"train.max_steps={steps}",
               "hydra.run.dir=${oc.env:DTUNE_RUN_DIR}"]
    # On a GPU, deterministic kernels: a difference is then the layout's, not atomics' order.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "DTUNE_RUN_DIR": str(run_dir)}
    done = subprocess.run(command + ["train.deterministic=true"], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise DtuneError(f"dtune check: the run '{layout.name}' failed (exit "
                         f"{done.returncode}); its output ends:\n{done.stderr[-2000:]}")
    return step_losses(run_dir)


def step_losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in RunDir(run_dir).step_records()]


def run_check(work_dir: Path, steps: int = 20, micro_batch: int = 4,
              only: list[str] | None = None, precision: str = "fp32",
              overrides: tuple = ()) -> list[Comparison]:
    """Each comparison of COMPARISONS (those whose candidate is in `only`), every layout run
    with `overrides` too (an objective, e.g. ["objective=dpo"])."""
    wanted = [c for c in COMPARISONS if only is None or c[1] in only]
    if chosen_objective(overrides) != "sft":  # sequence parallelism trains SFT alone
        wanted = [c for c in wanted if c[2] != "sequence"]
    if precision == "fp16" and not torch.cuda.is_available():  # DeepSpeed's fp16: GPUs only
        wanted = [c for c in wanted if c[2] != "zero"]
    needed = {name for ref, cand, _ in wanted for name in (ref, cand)}
    all_layouts = layouts(micro_batch)
    losses = {name: train_layout(all_layouts[name], work_dir, steps, precision, overrides)
              for name in all_layouts if name in needed}
    results = []
    for reference, candidate, kind in wanted:
        diff = max(abs(a - b) for a, b in zip(losses[reference], losses[candidate]))
        if len(losses[reference]) != len(losses[candidate]):
            diff = float("inf")
        results.append(Comparison(f"{candidate} vs {reference}", reference, candidate,
                                  TOLERANCES[precision][kind], diff))
    return results


def table(results: list[Comparison], steps: int, precision: str = "fp32") -> str:
    lines = [f"Parity over {steps} steps (tiny model, {precision}, same global batch and seed):",
             "",
             f"{'comparison':48} {'max |loss diff|':>16} {'tolerance':>10}  result"]
    for r in results:
        lines.append(f"{r.name:48} {r.max_abs_diff:16.2e} {r.tolerance:10.0e}  "
                     f"{'PASS' if r.passed else 'FAIL'}")
    return "\n".join(lines)
