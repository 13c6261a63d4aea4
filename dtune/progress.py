"""What a person watching the run sees: a live bar on a terminal, plain lines in a log file,
and a summary table at the end."""
from __future__ import annotations

import logging
import math
import sys
import time

from tqdm import tqdm

log = logging.getLogger("dtune")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """tqdm on a TTY; otherwise a line every `every` steps (SLURM logs stay readable)."""

    def __init__(self, total_steps: int, start_step: int, every: int):
        self.total, self.every = total_steps, every
        self.start_step, self.started = start_step, time.perf_counter()
        self.bar = None
        if sys.stdout.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, file=sys.stdout)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, mem_gib: float,
               reward: float | None = None):
        """`reward`: an online objective's mean reward (GRPO), whose loss says little."""
        done = step - self.start_step
        rate = (time.perf_counter() - self.started) / max(done, 1)
        eta = _duration(rate * (self.total - step))
        fields = (f"loss {loss:.4f} | " + ("" if reward is None else f"reward {reward:.3f} | ")
                  + f"lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | mem {mem_gib:.1f} GiB")
        if self.bar is not None:
            self.bar.set_postfix_str(fields, refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} | {fields} | ETA {eta}", flush=True)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class WorkProgress:
    """A wait of known size that is not a training step (prompts answered for exact match):
    a tqdm bar on a TTY; otherwise a line in dtune's log every tenth or so of the work (and at
    its end), as `Progress` does for steps. `show=False` (every rank but 0) shows nothing."""

    def __init__(self, what: str, total: int, unit: str, show: bool = True, lines: int = 10,
                 step: int = 1):
        self.what, self.total, self.unit = what, total, unit
        # a line every `every` items: about `lines` of them, each a whole number of `step`s
        self.every = step * max(1, math.ceil(total / lines / step))
        self.done, self.started, self.show = 0, time.perf_counter(), show and total > 0
        self.bar = None
        if self.show and sys.stdout.isatty():
            # each advance is a batch of seconds: drawn every time (mininterval=0)
            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", dynamic_ncols=True,
                            leave=False, mininterval=0, file=sys.stdout)

    def advance(self, count: int) -> None:
        before, self.done = self.done, min(self.total, self.done + count)
        if not self.show or self.done == before:
            return
        if self.bar is not None:
            self.bar.update(self.done - before)
        elif self.done // self.every > before // self.every or self.done == self.total:
            elapsed = time.perf_counter() - self.started
            left = elapsed / self.done * (self.total - self.done)
            log.info(f"{self.what}: {self.done}/{self.total} {self.unit} | "
                     f"{_duration(elapsed)} elapsed | ETA {_duration(left)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summary_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    inner = max(width + 3 + max(len(v) for _, v in rows), len(title))
    line = "+" + "-" * (inner + 2) + "+"
    out = [line, f"| {title.ljust(inner)} |", line]
    out += [f"| {(k.ljust(width) + ' : ' + v).ljust(inner)} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)
