"""`dtune check`: prove on this machine that parallelism changes nothing but speed.

It trains the tiny model with the same global batch and seed under several layouts and
compares the loss at every step: 1 process vs DDP, DDP vs each ZeRO stage, and gradient
accumulation traded for ranks. A new cluster is validated in minutes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
        "1 process x 2 accum": Layout("1 process x 2 accum", parallel("single", 1, 2)),
        "ddp 2 ranks": Layout("ddp 2 ranks", parallel("ddp", 2, 1)),
        "zero1 2 ranks": Layout("zero1 2 ranks", parallel("zero1", 2, 1)),
        "zero2 2 ranks": Layout("zero2 2 ranks", parallel("zero2", 2, 1)),
        "zero3 2 ranks": Layout("zero3 2 ranks", parallel("zero3", 2, 1)),
        "1 process x 4 accum": Layout("1 process x 4 accum", parallel("single", 1, 4)),
        "ddp 2 ranks x 2 accum": Layout("ddp 2 ranks x 2 accum", parallel("ddp", 2, 2)),
    }


# (reference, candidate, tolerance): what the issue promises, within fp32 reordering noise.
COMPARISONS = [
    ("1 process x 2 accum", "ddp 2 ranks", 1e-5),
    ("ddp 2 ranks", "zero1 2 ranks", 1e-4),
    ("ddp 2 ranks", "zero2 2 ranks", 1e-4),
    ("ddp 2 ranks", "zero3 2 ranks", 1e-4),
    ("1 process x 4 accum", "ddp 2 ranks x 2 accum", 1e-5),
]


def train_layout(layout: Layout, work_dir: Path, steps: int) -> list[float]:
    run_dir = work_dir / layout.name.replace(" ", "_")
    command = [sys.executable, "-m", "dtune", *BASE, *layout.overrides,
               f"train.max_steps={steps}", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get(
                              "GLOO_SOCKET_IFNAME", "lo")})
    if done.returncode != 0:
        raise DtuneError(f"dtune check: the run '{layout.name}' failed (exit "
                         f"{done.returncode}); its output ends:\n{done.stderr[-2000:]}")
    return step_losses(run_dir)


def step_losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in RunDir(run_dir).step_records()]


def run_check(work_dir: Path, steps: int = 20, micro_batch: int = 4,
              only: list[str] | None = None) -> list[Comparison]:
    wanted = [c for c in COMPARISONS if only is None or c[1] in only]
    needed = {name for ref, cand, _ in wanted for name in (ref, cand)}
    all_layouts = layouts(micro_batch)
    losses = {name: train_layout(all_layouts[name], work_dir, steps)
              for name in all_layouts if name in needed}
    results = []
    for reference, candidate, tolerance in wanted:
        diff = max(abs(a - b) for a, b in zip(losses[reference], losses[candidate]))
        if len(losses[reference]) != len(losses[candidate]):
            diff = float("inf")
        results.append(Comparison(f"{candidate} vs {reference}", reference, candidate,
                                  tolerance, diff))
    return results


def table(results: list[Comparison], steps: int) -> str:
    lines = [f"Parity over {steps} steps (tiny model, fp32, same global batch and seed):", "",
             f"{'comparison':48} {'max |loss diff|':>16} {'tolerance':>10}  result"]
    for r in results:
        lines.append(f"{r.name:48} {r.max_abs_diff:16.2e} {r.tolerance:10.0e}  "
                     f"{'PASS' if r.passed else 'FAIL'}")
    return "\n".join(lines)
