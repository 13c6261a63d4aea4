"""What a person watching the run sees: a live bar on a terminal, plain lines in a log file,
and a summary table at the end."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


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

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, mem_gib: float):
        done = step - self.start_step
        rate = (time.perf_counter() - self.started) / max(done, 1)
        eta = _duration(rate * (self.total - step))
        fields = (f"loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
                  f"mem {mem_gib:.1f} GiB")
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


def summary_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    inner = max(width + 3 + max(len(v) for _, v in rows), len(title))
    line = "+" + "-" * (inner + 2) + "+"
    out = [line, f"| {title.ljust(inner)} |", line]
    out += [f"| {(k.ljust(width) + ' : ' + v).ljust(inner)} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)
