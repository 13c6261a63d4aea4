"""Trust boundaries: what a run directory, checkpoint or model folder someone else wrote can do.

Each test builds the attack (a crafted run directory, a planted link, a pickle that runs code)
and checks that dtune refuses it or defuses it, leaving everything outside what it wrote alone.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TINY, one_line, run_dtune, train
from dtune.checkpoint import seal, valid_checkpoints
from dtune.errors import DtuneError
from dtune.files import OUTPUT_MARKER, write_atomically
from dtune.metrics import MetricsLog
from dtune.run_dir import RunDir

EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "evil"
"""


def evil_model_folder(folder: Path, marker: Path) -> Path:
    """A model folder whose config names its own Python file: loading it with remote code
    allowed runs that file."""
    folder.mkdir(parents=True)
    (folder / "configuration_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["LlamaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "configuration_evil.EvilConfig"}}))
    return folder


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


def test_a_run_directorys_config_never_turns_on_remote_code(tiny_lora_run, tmp_path):
    marker = tmp_path / "code-ran"
    run = copy_run(tiny_lora_run, tmp_path / "their-run")
    config = yaml.safe_load(RunDir(run).config_file.read_text())
    config["model"].update(name_or_path=str(evil_model_folder(tmp_path / "evil", marker)),
                           trust_remote_code=True, random_init=None)
    RunDir(run).config_file.write_text(yaml.safe_dump(config))

    for command in (["eval", str(run)], ["merge", str(run), "--out", str(tmp_path / "m")],
                    ["generate", str(run), "--prompt", "hi"]):
        result = run_dtune(*command, module=False)
        assert result.returncode != 0
        assert not marker.exists(), f"dtune {command[0]} ran the run directory's code"
        message = one_line(result.stderr)
        assert "never enables remote code" in message and "--trust-remote-code" in message
        assert f"Loading the base model {tmp_path / 'evil'}" in message  # said before loading

    # the user's own flag is what allows it (the folder is no real model, so the load fails)
    run_dtune("eval", str(run), "--trust-remote-code", module=False)
    assert marker.exists()


def test_model_folder_loads_ask_for_no_remote_code(tmp_path, monkeypatch, tiny_lora_run):
    """transformers stops at an interactive [y/N] prompt when trust_remote_code is unset."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dtune import load_run

    seen = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "unset")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    run = tmp_path / "full"
    train(run, *TINY, "+method=full", "train.max_steps=1", "eval.exact_match_samples=0")
    load_run.load_for_generation(run / "final")  # a plain model folder
    load_run.load_final_model(run)  # a full run
    load_run.load_final_model(tiny_lora_run)  # base + adapter
    assert seen and all(flag is False for _, flag in seen), seen


def test_a_model_folder_with_its_own_code_is_refused_without_the_flag(tmp_path):
    marker = tmp_path / "code-ran"
    folder = evil_model_folder(tmp_path / "model", marker)
    result = run_dtune("generate", str(folder), "--prompt", "hi", module=False)
    assert result.returncode != 0 and not marker.exists()
    assert "Traceback" not in result.stderr


class RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


ZERO = [*TINY, "+method=full", "parallelism=zero2", "eval.exact_match_samples=0",
        "data.builtin.train_size=64", "data.builtin.eval_size=8", "train.save_every=2"]


def test_resuming_a_zero_checkpoint_never_unpickles_code(tmp_path):
    run = tmp_path / "run"
    first = run_dtune(*ZERO, "train.max_steps=2", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-2000:]
    [optim] = (run / "checkpoints" / "step-2" / "deepspeed").glob("*optim_states.pt")
    state = torch.load(optim, weights_only=False)
    marker = tmp_path / "code-ran"
    state["planted"] = RunsCode(str(marker))
    torch.save(state, optim)
    (run / "checkpoints" / "step-2" / "manifest.json").unlink()
    seal(run / "checkpoints" / "step-2", 2)  # whoever planted it can rewrite the manifest too

    result = run_dtune(*ZERO, "train.max_steps=4", "train.resume=true", f"hydra.run.dir={run}")
    assert result.returncode != 0
    assert not marker.exists(), "resuming ran code from the checkpoint"
    message = one_line(result.stderr)
    assert "will not load it" in message and str(optim) in message
    assert "Traceback" not in result.stderr


def test_a_checkpoint_file_changed_after_its_save_is_not_resumed(tmp_path):
    folder = tmp_path / "checkpoints" / "step-3"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    seal(folder, 3)
    assert valid_checkpoints(tmp_path) == [folder]
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[10] ^= 1  # same size, one bit different
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert valid_checkpoints(tmp_path) == []
    assert "sha256" in json.loads((folder / "manifest.json").read_text())["files"][
        "model.safetensors"]


def test_merge_out_never_replaces_a_folder_dtune_did_not_write(tiny_lora_run, tmp_path):
    run = copy_run(tiny_lora_run, tmp_path / "run")
    models = tmp_path / "models"  # meant as a parent folder
    (models / "keep").mkdir(parents=True)
    (models / "keep" / "weights.bin").write_text("precious")
    result = run_dtune("merge", str(run), "--out", str(models), module=False)
    assert result.returncode != 0
    assert "dtune did not write" in one_line(result.stderr) and "--force" in result.stderr
    # the run directory itself is never replaced: tests/test_security_outputs.py
    assert (models / "keep" / "weights.bin").read_text() == "precious"
    assert RunDir(run).config_file.is_file() and RunDir(run).final.is_dir()

    out = tmp_path / "merged"
    assert run_dtune("merge", str(run), "--out", str(out), module=False).returncode == 0
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["kind"] == "merged" and marker["run_dir"] == str(run.resolve())
    assert (out / "model.safetensors").is_file()
    again = run_dtune("merge", str(run), "--out", str(out), module=False)  # dtune's own
    assert again.returncode == 0, again.stderr[-2000:]
    assert not list(tmp_path.glob(".merged.*")), "temporary folders left behind"
    forced = run_dtune("merge", str(run), "--out", str(models), "--force", module=False)
    assert forced.returncode == 0 and (models / "model.safetensors").is_file()


def test_writes_into_a_run_directory_do_not_follow_planted_links(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    for name in ("eval.json", "summary.json", "metrics.jsonl"):
        (run.path / name).symlink_to(victim)
    with pytest.raises(DtuneError, match="symbolic link"):
        run.write_json(run.eval_file, {"eval_loss": 1.0})
    with pytest.raises(DtuneError, match="symbolic link"):
        run.write_summary({"final_loss": 1.0})
    with pytest.raises(DtuneError, match="symbolic link"):
        MetricsLog(run.metrics_file, resume_step=3)
    assert victim.read_text() == "precious"
    (run.path / "checkpoints").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(DtuneError, match="symbolic link"):
        train(run.path, *TINY, "+method=lora", "train.max_steps=1", "train.save_every=1",
              "eval.exact_match_samples=0")
    assert victim.read_text() == "precious"


def test_report_rebuilds_its_folder_instead_of_writing_through_links(tiny_lora_run, tmp_path):
    run = copy_run(tiny_lora_run, tmp_path / "run")
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    report = RunDir(run).report
    report.mkdir()
    # even one that looks like dtune's report
    (report / OUTPUT_MARKER).write_text(json.dumps({"written_by": "dtune", "kind": "report"}))
    (report / "loss.png").symlink_to(victim)
    result = run_dtune("report", str(run), module=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert victim.read_bytes() == b"precious"
    assert not (report / "loss.png").is_symlink() and (report / "report.html").is_file()
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    refused = run_dtune("report", str(run), "--out", str(mine), module=False)
    assert refused.returncode != 0 and (mine / "todo.txt").read_text() == "mine"


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_reported(tmp_path):
    run = tmp_path / "run"
    overrides = [*TINY, "+method=lora", "train.save_every=2", "eval.exact_match_samples=0"]
    first = run_dtune(*overrides, "train.max_steps=2", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-2000:]
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "loss": 6.1')  # killed mid-write (or a full disk)
    report = run_dtune("report", str(run), module=False)
    assert report.returncode == 0 and "last line is cut short" in one_line(report.stderr)
    resumed = run_dtune(*overrides, "train.max_steps=4", "train.resume=true",
                        f"hydra.run.dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "last line is cut short" in one_line(resumed.stdout + resumed.stderr)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4]


def test_a_temporary_file_name_cannot_be_planted(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "summary.json"
    for guess in (f".summary.json.tmp-{os.getpid()}", ".summary.json.tmp"):
        (tmp_path / guess).symlink_to(victim)
    write_atomically(target, "{}")
    assert victim.read_text() == "precious" and target.read_text() == "{}"
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # the umask's mode, not mkstemp's


def test_kills_inside_checkpoint_writes_leave_no_half_visible_checkpoint(tmp_path):
    """One trial of bench/kill_fuzz.py --in-save (the benchmark runs 20): the kill lands while
    a checkpoint's files are being written, and the resume continues from the last complete
    one, training exactly as an uninterrupted run."""
    result = subprocess.run([sys.executable, "bench/kill_fuzz.py", "--trials", "1",
                             "--in-save", "--seed", "5", "--work-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    [row] = json.loads((tmp_path / "kill_fuzz.json").read_text())["rows"]
    assert row["killed"] and row["kill_during_save"], row
    assert row["resume_ok"] and not row["silent_jump"] and not row["half_visible"], row


def test_the_slurm_tests_skip_without_a_cluster_and_fail_when_one_is_required(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "DTUNE_REQUIRE"))}
    env["PATH"] = str(tmp_path)  # no sinfo, sbatch or start.sh's apt-get on this PATH
    (tmp_path / "python").symlink_to(sys.executable)
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               "tests/test_slurm.py"]
    skipped = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert skipped.returncode == 0, skipped.stdout[-2000:]
    assert "skipped" in skipped.stdout and "slurm/local-cluster/start.sh" in skipped.stdout
    required = subprocess.run(command, cwd=ROOT, env={**env, "DTUNE_REQUIRE_SLURM": "1"},
                              capture_output=True, text=True, timeout=300)
    assert required.returncode != 0 and "DTUNE_REQUIRE_SLURM=1" in required.stdout
