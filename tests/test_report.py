"""`dtune report`: an HTML dashboard of runs and sweeps, checked in a real headless browser."""
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import TINY, one_line, run_dtune
from dtune.errors import DtuneError
from dtune.report import CHROMIUM_FLAGS, find_chromium, write_report

LRS = ["0.001", "0.003", "0.01", "0.03"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A real 4-run Hydra sweep of the learning rate: SWEEP/0 ... SWEEP/3."""
    sweep = tmp_path_factory.mktemp("report") / "lr-sweep"
    result = run_dtune("-m", *TINY, "+method=lora", "train.max_steps=6", "train.eval_every=2",
                       "eval.exact_match_samples=4", "eval.max_new_tokens=8",
                       f"train.lr={','.join(LRS)}", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    return sweep


@pytest.fixture(scope="module")
def report(sweep_dir) -> Path:
    result = run_dtune("report", str(sweep_dir), module=False)
    assert result.returncode == 0, result.stderr[-3000:]
    page = sweep_dir / "report" / "report.html"
    assert str(page) in result.stdout
    return page


def chromium() -> str:
    browser = find_chromium()
    if browser is None:
        if os.environ.get("DTUNE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("DTUNE_REQUIRE_CHROMIUM=1 (.ci/run installs Chromium), but no Chromium "
                        "is on PATH")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return browser


def browse(url: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               "--window-size=1400,2000", "--virtual-time-budget=5000",
                               *args, url], capture_output=True, text=True, timeout=180)


def dom_rows(dom: str) -> list[str]:
    return re.findall(r'<tr data-run="([^"]+)"', dom)


def test_report_writes_an_html_page_with_png_plots_beside_it(report):
    from PIL import Image

    for name in ("loss.png", "lr.png", "tokens_per_s.png", "sweep.png"):
        with Image.open(report.parent / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200, name
    page = report.read_text()
    # Opens with no network: nothing is fetched from anywhere, the plots are inline too.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert page.count('<img src="data:image/png;base64,') == 4


def test_report_renders_its_plots_and_table_in_headless_chromium(report, tmp_path):
    import numpy as np
    from PIL import Image

    shot = tmp_path / "report.png"
    result = browse(report.as_uri(), f"--screenshot={shot}")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1400, 2000)
        rgb = np.asarray(image.convert("RGB")).astype(int)
    ink = (rgb.min(axis=2) < 235).mean()  # text, axes, table rules
    curves = (rgb.max(axis=2) - rgb.min(axis=2) > 60).mean()  # saturated: the plotted lines
    assert ink > 0.02 and curves > 0.002, (ink, curves)  # not a blank or an error page

    dom = browse(report.as_uri(), "--dump-dom").stdout
    assert 'data-plots-loaded="4"' in dom and 'data-plots="4"' in dom  # every plot decoded
    assert dom_rows(dom) == [f"lr-sweep/{i}" for i in range(4)]
    for lr in LRS:
        assert f"train.lr={lr}" in dom
    for header in ("trainable params", "peak memory", "wall time", "exact match before",
                   "exact match after", "parallelism"):
        assert f"<th>{header}</th>" in dom


def test_the_run_table_sorts_in_the_browser(report, sweep_dir):
    eval_loss = {f"lr-sweep/{i}": json.loads((sweep_dir / str(i) / "summary.json").read_text())
                 ["eval_loss"] for i in range(4)}
    dom = browse(report.as_uri() + "#sort=eval%20loss", "--dump-dom").stdout
    assert dom_rows(dom) == sorted(eval_loss, key=eval_loss.get)
    assert dom_rows(dom) != [f"lr-sweep/{i}" for i in range(4)]  # the sort did something


def test_report_shows_an_unfinished_run_beside_finished_ones(sweep_dir, tmp_path):
    killed = tmp_path / "killed-run"
    shutil.copytree(sweep_dir / "0", killed, ignore=shutil.ignore_patterns("report"))
    (killed / "summary.json").unlink()
    page = write_report([sweep_dir, killed], tmp_path / "out").read_text()
    assert re.findall(r'<tr data-run="([^"]+)"', page) == \
        [f"lr-sweep/{i}" for i in range(4)] + ["killed-run"]
    assert page.count(">incomplete<") == 1 and page.count(">finished<") == 4
    assert "5 runs (4 finished)" in one_line(page)


def test_report_on_a_folder_without_runs_is_refused(tmp_path):
    with pytest.raises(DtuneError) as caught:
        write_report([tmp_path], tmp_path / "out")
    assert str(tmp_path) in str(caught.value) and "sweep directory" in str(caught.value)
    result = run_dtune("report", str(tmp_path / "missing"), module=False)
    assert result.returncode == 2 and "does not exist" in one_line(result.stderr)
