"""What rank 0 tells the world: metrics.jsonl, the tracker, the progress display and the
summary. Every other rank gets a `SilentReporter`, so the loop never asks which rank it is.
"""
from __future__ import annotations

import logging

from dtune.config import Config
from dtune.metrics import GIB, MetricsLog, peak_memory_bytes
from dtune.progress import Progress, summary_table
from dtune.run_dir import RunDir
from dtune.tracking import create_tracker

log = logging.getLogger("dtune")


class SilentReporter:
    """The reporter of every rank but 0: it does nothing."""

    def training_started(self, total_steps: int, start_step: int) -> None: ...
    def log_step(self, record: dict, last_step: bool) -> None: ...
    def training_finished(self) -> None: ...
    def log_eval(self, record: dict) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self, summary: dict) -> None: ...
    def close(self) -> None: ...


class Reporter(SilentReporter):
    """Rank 0's: owns metrics.jsonl, the tracker, the progress bar or lines, and summary.json."""

    def __init__(self, cfg: Config, run_dir: RunDir, run_id: str, resumed_step: int | None):
        self.cfg, self.run_dir = cfg, run_dir
        self.metrics = MetricsLog(run_dir.metrics_file, resume_step=resumed_step)
        self.tracker = create_tracker(cfg, run_dir.path, run_id)
        self.progress: Progress | None = None
        self.closed = False

    def training_started(self, total_steps: int, start_step: int) -> None:
        self.progress = Progress(total_steps, start_step, self.cfg.train.log_every)

    def log_step(self, record: dict, last_step: bool) -> None:
        """A training step: metrics.jsonl and the tracker every train.log_every steps (and
        at the last), the progress display every step."""
        memory = peak_memory_bytes()
        if record["step"] % self.cfg.train.log_every == 0 or last_step:
            self.metrics.write(record)
            # memory goes on the tracker's step row; metrics.jsonl has it in the summary
            self.tracker.log({**record, "peak_memory_gib": memory / GIB})
        if self.progress is not None:
            self.progress.update(record["step"], record["loss"], record["lr"],
                                 record["tokens_per_s"], memory / GIB, record.get("reward/mean"))

    def training_finished(self) -> None:
        self._close_display()

    def log_eval(self, record: dict) -> None:
        if len(record) <= 2:  # step and split only: nothing was measured
            return
        self.metrics.write(record)
        self.tracker.log(record)
        if self.progress is not None and "eval_loss" in record:
            self.progress.write(f"step {record['step']}: eval_loss {record['eval_loss']:.4f}")

    def note(self, message: str) -> None:
        if self.progress is not None:
            self.progress.write(message)
        else:
            log.info(message)

    def finish(self, summary: dict) -> None:
        """Close the log, write summary.json, end the tracker's run, print the summary table."""
        self.run_dir.write_summary(summary)
        self.tracker.summary(summary)
        self.close()
        print(summary_table(summary_rows(summary, self.run_dir), "dtune run summary"),
              flush=True)

    def _close_display(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def close(self) -> None:
        """Idempotent: after `finish`, or when the run stops early or fails."""
        if self.closed:
            return
        self.closed = True
        self._close_display()
        self.metrics.close()
        self.tracker.finish()


def create_reporter(cfg: Config, run_dir: RunDir, run_id: str, is_main: bool,
                    resumed_step: int | None) -> SilentReporter:
    return Reporter(cfg, run_dir, run_id, resumed_step) if is_main else SilentReporter()


def summary_rows(summary: dict, run_dir: RunDir) -> list[tuple[str, str]]:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt="{:.4f}"):
        return "n/a" if x is None else fmt.format(x)

    preference = [("objective", f"{summary['objective']} (reference: {summary['reference']})"),
                  ("preference accuracy before", pct(summary["preference_accuracy_before"])),
                  ("preference accuracy after", pct(summary["preference_accuracy_after"]))] \
        if "preference_accuracy_after" in summary else []
    return [
        ("model", summary["model"]),
        ("method / precision", f"{summary['method']} / {summary['precision']}"),
        ("parallelism", f"{summary['parallelism']} x {summary['world_size']} process(es)"),
        ("trainable params", f"{summary['trainable_params']:,} of {summary['total_params']:,}"),
        ("steps x global batch", f"{summary['steps']} x {summary['global_batch_size']}"),
        ("final train loss", num(summary["final_loss"])),
        ("eval loss", num(summary["eval_loss"])),
        ("exact match before", pct(summary["exact_match_before"])),
        ("exact match after", pct(summary["exact_match_after"])),
        *preference,
        ("tokens/s", num(summary["tokens_per_s"], "{:,.0f}")),
        ("peak memory", f"{summary['peak_memory_bytes'] / GIB:.2f} GiB"),
        ("wall time", f"{summary['wall_time_s']:.0f} s"),
        ("run dir", str(run_dir.path)),
    ]
