"""What a person watching a run sees: plain periodic lines in a log, a live bar on a terminal,
and a summary table at the end."""
import io
import re
import sys

from conftest import TINY, run_dtune
from dtune.progress import Progress

LINE = re.compile(r"^step (\d+)/(\d+) \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| "
                  r"[\d,]+ tok/s \| mem \d+\.\d GiB \| ETA \d\d:\d\d$")


def test_without_a_tty_progress_is_plain_periodic_lines_then_a_summary_table(tmp_path):
    # stdout is a pipe here, as in a SLURM log
    result = run_dtune(*TINY, "train.max_steps=7", "train.log_every=3",
                       "eval.exact_match_samples=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "\r" not in out  # no bar redrawing itself
    lines = out.splitlines()
    progress = [(i, LINE.match(line)) for i, line in enumerate(lines) if line.startswith("step ")]
    assert all(m for _, m in progress), [lines[i] for i, m in progress if not m]
    assert [(int(m[1]), int(m[2])) for _, m in progress] == [(3, 7), (6, 7), (7, 7)]
    table = next(i for i, line in enumerate(lines) if line.startswith("| dtune run summary"))
    assert table > progress[-1][0]
    for field in ("model", "trainable params", "final train loss", "tokens/s", "peak memory",
                  "wall time", "run dir"):
        assert any(line.startswith(f"| {field}") for line in lines[table:]), field


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_tty_a_live_bar_shows_step_total_loss_lr_throughput_and_memory(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    progress = Progress(total_steps=4, start_step=0, every=100)
    for step in (1, 2):
        progress.update(step, loss=1.2345, lr=2e-4, tokens_per_s=1234.0, mem_gib=1.5)
    progress.close()
    screen = terminal.getvalue().split("\r")[-1]
    assert "2/4" in screen
    for text in ("loss 1.2345", "lr 2.00e-04", "1,234 tok/s", "mem 1.5 GiB"):
        assert text in screen, screen
    assert re.search(r"<\d\d:\d\d", screen)  # tqdm's remaining-time estimate
