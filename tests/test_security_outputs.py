"""Outputs (`merge --out`, `report --out`, a run's final/) replace only their own kind, never a
run's own files or a folder holding what a command reads, and dtune's temporary folders are
cleaned up after a kill, and only dtune's. Also: a DeepSpeed setting that would unpickle past
the weights-only loader is refused.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose
from dtune.errors import DtuneError
from dtune.files import OUTPUT_MARKER, TEMP_MARKER, make_temp_dir, output_folder
from dtune.merge import merge_run
from dtune.report import write_report
from dtune.run_dir import RunDir


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


def fingerprint(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def mark_dead(tmp: Path) -> Path:
    """Make a temporary folder look like one a killed dtune process left."""
    marker = json.loads((tmp / TEMP_MARKER).read_text())
    (tmp / TEMP_MARKER).write_text(json.dumps({**marker, "pid": dead_pid()}))
    return tmp


def test_report_and_merge_never_replace_a_runs_own_files(tiny_lora_run, tmp_path):
    """Before: `report RUN --out RUN/final` replaced the trained adapter with plots, and
    `merge RUN2 --out RUN/final` replaced another run's final/, both without --force."""
    run = copy_run(tiny_lora_run, tmp_path / "run")
    other = copy_run(tiny_lora_run, tmp_path / "other")
    before = fingerprint(run)
    for out, force, expect in [
        (RunDir(run).final, False, "final/ folder of the run"),
        (RunDir(run).final, True, "final/ folder of the run"),
        (RunDir(run).checkpoints, True, "checkpoints/ folder of the run"),
        (RunDir(run).checkpoints / "step-6", True, "inside the checkpoints/ folder"),
        (run, True, "is a run directory"),
    ]:
        with pytest.raises(DtuneError, match=expect) as caught:
            write_report([run], out, force=force)
        message = str(caught.value)
        assert "--force or not" in message and f"--out {RunDir(run).report}" in message
    with pytest.raises(DtuneError, match="final/ folder of the run") as caught:
        merge_run(other, RunDir(run).final, force=True)  # refused before the model loads
    assert f"--out {RunDir(other).merged}" in str(caught.value)
    assert fingerprint(run) == before  # the adapter, checkpoints and config untouched


def test_an_output_replaces_only_an_output_of_its_own_kind(tiny_lora_run, tmp_path):
    run = copy_run(tiny_lora_run, tmp_path / "run")
    report = tmp_path / "report"
    write_report([run], report)
    write_report([run], report)  # its own kind: replaced without --force
    with pytest.raises(DtuneError, match="holds a report .* writes a merged model") as caught:
        merge_run(run, report)  # refused before the model loads
    assert "--force" in str(caught.value)
    assert (report / "report.html").is_file()
    final_kind = json.loads((RunDir(run).final / OUTPUT_MARKER).read_text())["kind"]
    assert final_kind == "final"
    # A run's trained model moved elsewhere is still never replaced through --out.
    moved = copy_run(RunDir(run).final, tmp_path / "adapter")
    with pytest.raises(DtuneError, match="trained model .* --force or not"):
        write_report([run], moved, force=True)
    assert (moved / "adapter_config.json").is_file()


def test_out_never_names_the_root_home_current_or_a_folder_holding_the_runs(
        tiny_lora_run, tmp_path, monkeypatch):
    run = copy_run(tiny_lora_run, tmp_path / "runs" / "sweep" / "0")
    home, work = tmp_path / "home", tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for out, expect in [(home, "your home folder"), (work, "the current directory"),
                        (tmp_path / "work", "a folder that holds the current directory"),
                        (tmp_path / "runs", "a folder that holds a folder this command reads"),
                        (tmp_path / "runs" / "sweep", "holds run directories")]:
        with pytest.raises(DtuneError, match=expect):
            write_report([run], out, force=True)
    with pytest.raises(DtuneError, match="--out / is the root folder"):
        merge_run(run, Path("/"), force=True)
    assert (home / "notes.txt").read_text() == "mine" and RunDir(run).final.is_dir()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["deep"]


def test_report_removes_the_temporary_folders_a_killed_run_left_and_only_those(
        tiny_lora_run, tmp_path):
    run = copy_run(tiny_lora_run, tmp_path / "run")
    out = tmp_path / "report"
    stale = mark_dead(make_temp_dir(tmp_path, "report"))  # a killed dtune's leftover
    (stale / "loss.png").write_bytes(b"half a plot")
    live = make_temp_dir(tmp_path, "report")  # a running dtune's (this process)
    foreign = tmp_path / ".report.tmp-x"  # someone else's, with a name like ours
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    write_report([run], out)
    assert not stale.exists()
    assert live.is_dir() and (foreign / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["run", "report", live.name, foreign.name])
    assert not (out / TEMP_MARKER).exists()


def test_an_output_is_built_in_a_private_marked_folder(tmp_path):
    out = tmp_path / "merged"
    with output_folder(out, "merged", {"method": "lora"}) as building:
        assert building.parent == tmp_path and building.name.startswith(".merged.tmp-")
        assert len(building.name) >= len(".merged.tmp-") + 8  # unguessable
        assert building.stat().st_mode & 0o777 == 0o700
        assert (building / TEMP_MARKER).is_file()
        (building / "model.safetensors").write_bytes(b"weights")
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # shared as any folder the user makes
    assert not (out / TEMP_MARKER).exists()
    assert json.loads((out / OUTPUT_MARKER).read_text())["kind"] == "merged"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_a_kill_between_the_renames_of_a_replacement_loses_nothing(tmp_path):
    out = tmp_path / "report"
    with output_folder(out, "report") as building:
        (building / "report.html").write_text("old")
    # Killed after the old output moved aside, before the new one took its place:
    aside = mark_dead(make_temp_dir(tmp_path, "report"))
    os.rename(out, aside / "previous")
    with pytest.raises(KeyboardInterrupt), output_folder(out, "report"):
        raise KeyboardInterrupt  # the next attempt is stopped too
    assert (out / "report.html").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_a_deepspeed_setting_that_unpickles_past_the_weights_only_loader_is_refused():
    """checkpoint.load_universal makes DeepSpeed torch.load(weights_only=False) its files."""
    with pytest.raises(DtuneError) as caught:
        compose("model=tiny-llama", "parallelism=zero2",
                "parallelism.deepspeed_overrides={checkpoint: {load_universal: true}}")
    message = str(caught.value)
    assert "parallelism.deepspeed_overrides.checkpoint.load_universal=true" in message
    assert "weights_only=False" in message
    compose("model=tiny-llama", "parallelism=zero2",
            "parallelism.deepspeed_overrides={checkpoint: {load_universal: false}}")
