"""Run directories under sharing, reuse and mistakes (issue 21): no write or read through a
planted link, one run per directory, a fresh run never takes another run's state, a resume
continues only its own checkpoints under the settings that wrote them, and nothing secret or
unsealed is trusted.

Each test builds the situation as a user or an attacker would, then checks that dtune refuses
it in one paragraph, or defuses it, and that what it did not write stays as it was.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, compose, one_line, run_dtune
from dtune.checkpoint import seal, valid_checkpoints
from dtune.errors import DtuneError
from dtune.run_dir import RunDir

FULL = [*TINY, "+method=full", "train.lr=1e-3", "eval.exact_match_samples=0"]
SECRET = "hf_dtuneRunDirSecret0123456789abcd"


def run_in(path: Path, *overrides: str):
    """Train in-process as the CLI's run would, without writing .hydra/ first."""
    from dtune.train import run

    return run(compose(*overrides), path)


def tree(path: Path) -> dict:
    """Every file under `path` and its SHA-256 (links as their target's name), but the lock
    file, which names whoever last held the directory."""
    out = {}
    for item in sorted(Path(path).rglob("*")):
        if item.name == ".dtune.lock":
            continue
        if item.is_symlink():
            out[str(item.relative_to(path))] = "-> " + os.readlink(item)
        elif item.is_file():
            out[str(item.relative_to(path))] = hashlib.sha256(item.read_bytes()).hexdigest()
    return out


def run_id(path: Path) -> str:
    return json.loads(RunDir(path).run_file.read_text())["run_id"]


# --- 1. links ---------------------------------------------------------------------------------

def test_a_resume_writes_through_no_link_planted_in_the_run_dir(tiny_lora_run, tmp_path):
    """.hydra's files and the job log linked to the user's own files: a resume refuses to write
    through them, and leaves them and their targets alone."""
    run = tmp_path / "run"
    shutil.copytree(tiny_lora_run, run, symlinks=True)
    victims = {}
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "dtune.log"):
        victim = tmp_path / f"victim-{Path(name).name}"
        victim.write_text(f"precious {name}\n")
        victims[victim] = victim.read_text()
        (run / name).unlink()
        (run / name).symlink_to(victim)
    wandb_link = run / "wandb_run_id"  # an older dtune's file, linked to a token file
    (tmp_path / "token").write_text(SECRET)
    wandb_link.symlink_to(tmp_path / "token")
    before = tree(run)
    result = run_dtune(*TINY, "+method=lora", "train.max_steps=12", "train.lr=3e-3",
                       "train.save_every=6", "train.eval_every=4", "train.resume=true",
                       "tracker=wandb", f"hydra.run.dir={run}", env={"WANDB_MODE": "offline"})
    assert result.returncode != 0
    message = one_line(result.stderr)
    assert "is a symbolic link" in message and "config.yaml" in message
    assert "Traceback" not in result.stderr
    assert all(victim.read_text() == text for victim, text in victims.items())
    assert tree(run) == before  # a refused resume changes nothing in the run dir


def test_the_job_log_and_wandb_id_never_follow_a_link(tmp_path):
    from dtune.files import NoFollowFileHandler
    import logging

    victim = tmp_path / "victim.log"
    victim.write_text("precious\n")
    (tmp_path / "dtune.log").symlink_to(victim)
    handler = NoFollowFileHandler(str(tmp_path / "dtune.log"))
    handler.emit(logging.makeLogRecord({"msg": "a line for the run's log"}))
    handler.close()
    assert victim.read_text() == "precious\n"


def test_a_sweep_refuses_links_planted_in_its_directory_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    victim = tmp_path / "victim.md"
    victim.write_text("precious")
    (sweep / "results.md").symlink_to(victim)
    result = run_dtune("-m", *TINY, "train.max_steps=1", "train.lr=1e-3,2e-3",
                       f"hydra.sweep.dir={sweep}")
    assert result.returncode != 0
    assert "is a symbolic link" in one_line(result.stderr) and "results.md" in result.stderr
    assert victim.read_text() == "precious" and sorted(os.listdir(sweep)) == ["results.md"]


def test_a_slurm_job_id_link_is_refused_before_anything_is_submitted(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "slurm_job_id").symlink_to(victim)
    result = run_dtune(*TINY, "launcher=slurm", f"hydra.run.dir={run}")
    assert result.returncode != 0 and "slurm_job_id" in one_line(result.stderr)
    assert "is a symbolic link" in one_line(result.stderr) and victim.read_text() == "precious"
    assert not (run / "slurm").exists()  # no job was submitted


def test_checkpoint_temp_folders_are_private_unguessable_and_cleaned_only_when_ours(
        tmp_path, monkeypatch):
    import dtune.checkpoint as checkpoint
    from dtune.files import TEMP_MARKER

    made = []
    real = checkpoint.make_temp_dir

    def spy(beside, name, token=None):
        folder = real(beside, name, token)
        made.append((folder, folder.stat().st_mode & 0o777))
        return folder

    monkeypatch.setattr(checkpoint, "make_temp_dir", spy)
    victim = tmp_path / "victim"
    victim.mkdir()
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / ".tmp-step-1").symlink_to(victim, target_is_directory=True)  # the old fixed name
    run_in(tmp_path / "run", *FULL, "train.max_steps=2", "train.save_every=1")
    assert len(made) == 2 and all(mode == 0o700 for _, mode in made)
    assert len({folder.name for folder, _ in made}) == 2
    assert not any(folder.name.startswith(".tmp-step") for folder, _ in made)
    assert os.listdir(victim) == [] and (root / ".tmp-step-1").is_symlink()
    assert oct(os.stat(root / "step-2").st_mode & 0o777) != oct(0o700)  # usual once done
    # A killed save's folder (dtune's marker) goes at the next start; an unmarked one stays.
    killed = root / ".step-3.tmp-0123456789ab"
    killed.mkdir()
    (killed / TEMP_MARKER).write_text(json.dumps({"written_by": "dtune", "host": "h", "pid": 1}))
    stranger = root / ".step-4.tmp-somebodys"
    stranger.mkdir()
    run_in(tmp_path / "run", *FULL, "train.max_steps=3", "train.save_every=1",
           "train.resume=true")
    assert not killed.exists() and stranger.is_dir()


# --- 2. one run per directory -----------------------------------------------------------------

def test_a_second_run_in_a_held_directory_is_refused_naming_the_holder(tmp_path):
    from dtune import run_lock

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run_lock.hold(run)
    try:
        result = run_dtune(*TINY, "train.max_steps=1", f"hydra.run.dir={run.path}")
    finally:
        run_lock.release(run)
    assert result.returncode != 0
    message = one_line(result.stderr)
    assert f"PID {os.getpid()}" in message and "another run is using" in message
    assert sorted(os.listdir(run.path)) == [".dtune.lock"]  # nothing written, nothing removed


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    """flock: kill -9 leaves no stale lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dtune import run_lock; "
         "from dtune.run_dir import RunDir; run_lock.hold(RunDir(sys.argv[1])); "
         "print('held', flush=True); time.sleep(600)", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from dtune import run_lock

    with pytest.raises(DtuneError, match=f"PID {holder.pid}"):
        run_lock.hold(RunDir(tmp_path))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    run_lock.hold(RunDir(tmp_path))
    run_lock.release(RunDir(tmp_path))


# --- 3. a fresh run in a used directory, and whose checkpoints are whose -----------------------

@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """A finished in-process run with checkpoints at steps 2 and 3."""
    path = tmp_path_factory.mktemp("run-a")
    run_in(path, *FULL, "train.max_steps=3", "train.save_every=1")
    return path


def copy_of(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


def test_a_fresh_run_in_a_used_directory_is_refused_and_changes_nothing(run_a, tmp_path):
    run = copy_of(run_a, tmp_path / "run")
    before = tree(run)
    with pytest.raises(DtuneError) as caught:
        run_in(run, *FULL, "train.max_steps=2", "train.lr=2e-3", "train.seed=7")
    message = str(caught.value)
    assert "already holds another run" in message and "train.resume=true" in message
    assert "train.overwrite=true" in message and "nothing is deleted" in message
    assert tree(run) == before


def test_overwrite_moves_the_old_run_aside_and_pruning_and_resume_keep_to_their_run(
        run_a, tmp_path):
    run = copy_of(run_a, tmp_path / "run")
    old_id, old_files = run_id(run), tree(run)
    run_in(run, *FULL, "train.max_steps=4", "train.lr=2e-3", "train.save_every=1",
           "train.overwrite=true")
    [aside] = (run / "previous_runs").iterdir()
    assert aside.name.endswith(old_id) and tree(aside) == {
        k: v for k, v in old_files.items() if k != "dtune.log"}
    new_id = run_id(run)
    assert new_id != old_id
    assert [c.name for c in valid_checkpoints(run)] == ["step-4", "step-3"]  # kept 2, its own
    # Another run's checkpoint copied in is neither resumed nor pruned.
    foreign = run / "checkpoints" / "step-9"
    shutil.copytree(aside / "checkpoints" / "step-3", foreign)
    seal(foreign, 9)
    result = run_in(run, *FULL, "train.max_steps=6", "train.lr=2e-3", "train.save_every=1",
                    "train.resume=true")
    assert result.summary["resumed_from"].endswith("step-4")
    assert foreign.is_dir() and (run / "checkpoints" / "latest").read_text() == "step-6"
    assert [c.name for c in valid_checkpoints(run, run_id=new_id)] == ["step-6", "step-5"]


def test_a_resume_with_every_checkpoint_damaged_is_refused_with_the_list(run_a, tmp_path):
    run = copy_of(run_a, tmp_path / "run")
    for step in (2, 3):
        (run / "checkpoints" / f"step-{step}" / "manifest.json").unlink()
    before = tree(run)
    with pytest.raises(DtuneError) as caught:
        run_in(run, *FULL, "train.max_steps=4", "train.save_every=1", "train.resume=true")
    message = str(caught.value)
    assert "none of this run's checkpoints" in message
    assert "step-3: it has no manifest.json" in message and "step-2:" in message
    assert "does not start over silently" in message
    assert tree(run) == before  # the metrics history stays


def test_a_resume_of_a_directory_without_a_run_record_is_refused(run_a, tmp_path):
    run = copy_of(run_a, tmp_path / "run")
    RunDir(run).run_file.unlink()  # as an older dtune, or a hand-made folder, leaves it
    with pytest.raises(DtuneError, match="has no run record"):
        run_in(run, *FULL, "train.max_steps=4", "train.resume=true")


# --- 8. secrets in every override form -------------------------------------------------------

def test_secrets_in_env_set_mappings_and_forced_adds_reach_no_file(tmp_path, wandb_env):
    run = tmp_path / "run"
    env = {k: v for k, v in wandb_env.items() if k != "HF_TOKEN"}
    result = run_dtune(*TINY, "train.max_steps=1", "tracker=wandb",
                       f"+hydra.job.env_set={{HF_TOKEN: {SECRET}, DTUNE_PLAIN: kept}}",
                       f"++hydra.job.env_set.WANDB_API_KEY={SECRET[::-1]}",
                       f"hydra.run.dir={run}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "moved it into this run's environment" in one_line(result.stderr)
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and SECRET[::-1].encode() not in data, path
    assert SECRET not in result.stdout + result.stderr
    assert "DTUNE_PLAIN: kept" in (run / ".hydra" / "hydra.yaml").read_text()


@pytest.mark.parametrize("override", [
    f"parallelism.deepspeed_overrides={{api_key: {SECRET}}}",
    f"parallelism.deepspeed_overrides={{monitor: {{comet: {{api_key: {SECRET}}}}}}}",
    f"+data.columns={{instruction: q, hf_token: {SECRET}}}"])
def test_a_secret_nested_in_a_mapping_value_is_refused_masked(override):
    with pytest.raises(DtuneError) as caught:
        compose(*TINY, override)
    assert SECRET not in str(caught.value) and "looks like a secret" in str(caught.value)


def test_a_secret_in_a_saved_config_is_refused_when_read_back(tiny_lora_run, tmp_path):
    import yaml

    from dtune.load_run import load_run_config

    run = copy_of(tiny_lora_run, tmp_path / "run")
    config = yaml.safe_load(RunDir(run).config_file.read_text())
    config["parallelism"]["deepspeed_overrides"] = {"wandb": {"api_key": SECRET}}
    RunDir(run).config_file.write_text(yaml.safe_dump(config))
    with pytest.raises(DtuneError) as caught:
        load_run_config(run)
    assert "deepspeed_overrides.wandb.api_key" in str(caught.value)
    assert SECRET not in str(caught.value)


# --- 10. DPO's stored reference is sealed ----------------------------------------------------

def test_altered_reference_logps_are_not_used_on_resume(tmp_path, monkeypatch, caplog):
    from safetensors.torch import load, save

    from test_objectives import PREF, use_pair_data

    use_pair_data(monkeypatch)
    common = [*PREF, "+method=full", "objective=dpo", "objective.reference=precomputed",
              "train.lr=3e-3", "train.micro_batch_size=2", "train.save_every=2",
              "train.lr_schedule=constant"]
    run_in(tmp_path / "kept", *common, "train.max_steps=2")
    run = copy_of(tmp_path / "kept", tmp_path / "altered")
    stored = RunDir(run).reference_logps
    data = stored.read_bytes()
    size = int.from_bytes(data[:8], "little")
    fingerprint = json.loads(data[8:8 + size])["__metadata__"]["fingerprint"]
    table = load(data)["logps"].clone()
    table[:, 0] += 5.0  # every chosen response "likelier" under the reference
    stored.write_bytes(save({"logps": table}, metadata={"fingerprint": fingerprint}))
    for path in (tmp_path / "kept", run):
        run_in(path, *common, "train.max_steps=4", "train.resume=true")
    assert "does not match the SHA-256 this run recorded" in caplog.text
    assert load(stored.read_bytes())["logps"].equal(load(data)["logps"])  # recomputed
    kept, altered = (RunDir(path).step_records() for path in (tmp_path / "kept", run))
    assert [r["loss"] for r in altered] == [r["loss"] for r in kept]
    assert len(altered) == 4


# --- 11. a resume names what changed, and never calls a good checkpoint damaged --------------

def test_a_resume_under_changed_settings_names_each_and_changes_nothing(run_a, tmp_path):
    run = copy_of(run_a, tmp_path / "run")
    before = tree(run)
    with pytest.raises(DtuneError) as caught:
        run_in(run, *FULL, "train.max_steps=5", "train.resume=true",
               "train.micro_batch_size=2", "data.builtin.train_size=200")
    message = str(caught.value)
    assert "the global batch (train.micro_batch_size x train.grad_accum_steps x processes): " \
        "4 in the checkpoint, 2 now" in message
    assert "data.builtin.train_size: 256 in the checkpoint, 200 now" in message
    assert "left as it is" in message and "delete" not in message.lower()
    assert tree(run) == before
    # What may change does: more steps, another eval and save cadence.
    result = run_in(run, *FULL, "train.max_steps=4", "train.resume=true", "train.save_every=2",
                    "train.eval_every=1", "eval.batch_size=3")
    assert result.summary["resumed_from"].endswith("step-3")


def test_a_lora_rank_change_is_named_not_called_damage(tmp_path):
    lora = [*TINY, "+method=lora", "eval.exact_match_samples=0", "train.save_every=1"]
    run_in(tmp_path, *lora, "train.max_steps=1")
    with pytest.raises(DtuneError) as caught:
        run_in(tmp_path, *lora, "train.max_steps=2", "method.r=4", "train.resume=true")
    assert "method.r: 16 in the checkpoint, 4 now" in str(caught.value)
    assert "damaged" not in str(caught.value)


# A ZeRO-2 checkpoint resumed in one process: tests/test_reliability.py
# test_deepspeed_skips_a_nonfinite_step_as_one_process_does reuses its ZeRO-2 run.


def test_a_refused_resume_leaves_the_config_that_trained(tiny_lora_run, tmp_path):
    """The README's short resume line after the tiny-model example: without model=tiny-llama
    it composes SmolLM2, and must not rewrite the run's config on its way out."""
    run = copy_of(tiny_lora_run, tmp_path / "run")
    before = tree(run)
    result = run_dtune(f"hydra.run.dir={run}", "train.resume=true")
    assert result.returncode != 0
    assert "model.name_or_path" in one_line(result.stderr) and "Traceback" not in result.stderr
    assert tree(run) == before


# --- 12. a full disk during a checkpoint -----------------------------------------------------

def test_a_full_disk_in_torch_save_names_the_path_and_the_bytes(tmp_path, monkeypatch):
    import torch

    real_save = torch.save

    def short_write(obj, path, *args, **kwargs):
        if "step-2" in str(path):  # what torch raises when the disk fills mid-file
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos "
                               "64 vs 0: PytorchStreamWriter failed writing file data/0: "
                               "file write failed")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(DtuneError) as caught:
        run_in(tmp_path, *FULL, "train.max_steps=2", "train.save_every=1")
    message = str(caught.value)
    assert "is full" in message and str(tmp_path / "checkpoints") in message
    assert "MiB" in message and "train.resume=true" in message
    assert [c.name for c in valid_checkpoints(tmp_path)] == ["step-1"]
    assert not list((tmp_path / "checkpoints").glob(".step-*"))
