"""What a person watching a run sees: plain periodic lines in a log, a live bar on a terminal,
and a summary table at the end."""
import io
import logging
import re
import sys

from conftest import TINY, compose, run_dtune
from dtune.progress import Progress, WorkProgress

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


def test_a_long_wait_without_a_tty_logs_about_ten_lines_each_a_whole_number_of_batches(caplog):
    caplog.set_level(logging.INFO, logger="dtune")
    progress = WorkProgress("Exact match before training", total=100, unit="prompts", step=25)
    for _ in range(4):
        progress.advance(25)
    progress.close()
    lines = [re.sub(r" \| .*", "", r.getMessage()) for r in caplog.records]
    assert lines == [f"Exact match before training: {n}/100 prompts" for n in (25, 50, 75, 100)]
    caplog.clear()
    many = WorkProgress("Exact match", total=1000, unit="prompts", step=8)
    for _ in range(125):
        many.advance(8)
    assert len(caplog.records) == 10  # a line every 104 prompts (13 batches), and the last
    assert re.fullmatch(r"Exact match: 1000/1000 prompts \| \d\d:\d\d elapsed \| ETA 00:00",
                        caplog.records[-1].getMessage())


def test_a_long_wait_on_a_tty_is_a_bar_and_other_ranks_show_nothing(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dtune")
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    progress = WorkProgress("Exact match after training", total=64, unit="prompts", step=16)
    progress.advance(16)
    assert "Exact match after training" in terminal.getvalue()
    assert "16/64" in terminal.getvalue().split("\r")[-1]
    progress.close()
    silent = WorkProgress("Exact match", total=64, unit="prompts", show=False)
    silent.advance(64)
    silent.close()
    assert "64/64" not in terminal.getvalue() and not caplog.records


def test_tokenizing_many_rows_says_how_many_first_and_how_long_after(caplog, monkeypatch):
    from dtune.data import prepare
    from dtune.models import build_tiny_tokenizer

    caplog.set_level(logging.INFO, logger="dtune")
    cfg = compose(*TINY, "data=file", "data.path=unused.jsonl", "data.format=text")
    records = [{"text": f"row {i}"} for i in range(40)]
    prepare.tokenize_records(records, cfg, build_tiny_tokenizer(512), "training")
    assert not caplog.records  # a few rows: quick, nothing to say
    monkeypatch.setattr(prepare, "ANNOUNCE_ROWS", 30)
    prepare.tokenize_records(records, cfg, build_tiny_tokenizer(512), "training")
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == "Tokenizing 40 training rows (data.num_proc=1)", said
    assert re.fullmatch(r"Tokenized 40 training rows in \d+ s", said[1]), said


def test_a_large_save_says_its_size_and_where_first(tmp_path, caplog, monkeypatch):
    import torch

    from dtune import checkpoint
    from dtune.models import build_tiny_tokenizer

    caplog.set_level(logging.INFO, logger="dtune")
    model = torch.nn.Linear(256, 1024)  # 1 MiB of fp32 weights
    model.save_pretrained = lambda folder, **_: torch.save(model.state_dict(), folder / "w.pt")
    checkpoint.save_final(model, build_tiny_tokenizer(512), tmp_path / "small")
    assert not caplog.records
    monkeypatch.setattr(checkpoint, "ANNOUNCE_BYTES", 1 << 19)
    checkpoint.save_final(model, build_tiny_tokenizer(512), tmp_path / "final")
    assert [r.getMessage() for r in caplog.records] == \
        [f"Saving the model's weights (about 0.0 GiB) to {tmp_path / 'final'}"]
    assert checkpoint.checkpoint_bytes(model) == 12 * (256 * 1024 + 1024)
