"""Taking a run directory before anything loads: whose it is, and whether this run may start
or resume there.

Run directories are shared, reused and handed between people, so before any weight or row
loads, the process that answers for a run (`claim`):
- checks the directory is a real folder of this user's, and takes its lock (dtune/run_lock.py);
- removes the temporary folders a killed run of its own left (only those, by their marker);
- knows the run by its id (RunDir.run_file). A fresh run into a directory that holds another
  run's checkpoints or metrics is refused, unless `train.overwrite=true` moves them aside
  (into `previous_runs/`; nothing is deleted). A resume continues only checkpoints its own
  run wrote, refuses when every one of them is damaged, and refuses a change of any setting
  that changes what training computes, naming each (`changed_settings`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import asdict
from pathlib import Path

from dtune import run_lock
from dtune.checkpoint import checkpoint_folders, checkpoint_problem, run_id_of
from dtune.config import Config, check_no_control_characters
from dtune.distributed import wanted_processes
from dtune.engines import engine_spec
from dtune.errors import DtuneError
from dtune.files import own_directory, read_text, remove_stale_temp_dirs, write_atomically
from dtune.run_dir import RunDir, resume_overrides
from dtune.signals import slurm_restarted

log = logging.getLogger("dtune")

# Settings a resume may change: they decide what is measured, logged and kept, or how fast,
# not what the next step computes. Everything else is compared with the checkpoint's.
SAFE_TO_CHANGE = (
    "eval.", "tracker.", "launcher.", "parallelism.", "train.max_steps", "train.epochs",
    "train.micro_batch_size", "train.grad_accum_steps",  # compared as the global batch
    "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
    "train.save_final",
    "train.resume", "train.overwrite", "train.on_nonfinite", "train.deterministic",
    "train.gradient_checkpointing", "train.loss_chunk_size", "train.compile", "data.num_proc",
    "train.mlp_tiles", "train.offload_activations",  # memory switches: the same gradients
    "model.trust_remote_code", "model.attn_implementation", "model.gguf",
    "precision.init_loss_scale", "precision.growth_interval",
    "settled.",  # the machine it was settled for, and the loss plan: a speed switch
)
# What a fresh run would lose or mix with its own in a directory another run trained in.
TRAINING_STATE = ("checkpoints", "metrics.jsonl", "summary.json", "final")
GLOBAL_BATCH = "the global batch (train.micro_batch_size x train.grad_accum_steps x processes)"
INIT_FROM_WEIGHTS = "model.init_from's final/ (the SHA-256 of its files)"
PREVIOUS_RUNS = "previous_runs"  # where train.overwrite=true moves another run's files
_CLAIMED: dict[str, str] = {}  # run dirs this process answers for -> their run id


def answers_for_run(cfg: Config) -> bool:
    """Whether this process answers for the run directory: not a worker that dtune started
    and handed the run's id (DTUNE_RUN_ID), and the first process of the first node."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return "DTUNE_RUN_ID" not in os.environ and rank == "0" and cfg.parallelism.node_rank == 0


@contextlib.contextmanager
def claimed(cfg: Config, run_dir: RunDir, expected_id: str | None = None,
            world_size: int | None = None):
    """`claim` for the block, yielding the run's id; released after it unless an outer block
    of this process holds the claim (a CLI run claims once, before it launches)."""
    outer = claimed_id(run_dir)
    run_id = outer or claim(cfg, run_dir, expected_id, world_size)
    try:
        yield run_id
    finally:
        if outer is None:
            release(run_dir)


def claimed_id(run_dir: RunDir) -> str | None:
    return _CLAIMED.get(str(Path(run_dir.path).resolve()))


def release(run_dir: RunDir) -> None:
    _CLAIMED.pop(str(Path(run_dir.path).resolve()), None)
    run_lock.release(run_dir)


def claim(cfg: Config, run_dir: RunDir, expected_id: str | None = None,
          world_size: int | None = None) -> str:
    """Take `run_dir` for this run and return the run's id. `expected_id`: the id a launcher
    claimed the directory under (a SLURM job continues its submission); `world_size`: the
    processes the run trains with, where known (the batch is compared as its global size)."""
    key = str(Path(run_dir.path).resolve())
    # a line break in the path would split the lines of logs and SLURM batch scripts
    check_no_control_characters("hydra.run.dir", run_dir.path)
    own_directory(run_dir.path, "the run directory (hydra.run.dir)", parents=True)
    run_lock.hold(run_dir)
    if run_dir.checkpoints.exists():
        own_directory(run_dir.checkpoints, "the run's checkpoints folder")
        # Under the lock, any marked temporary folder there is a killed save of this directory.
        remove_stale_temp_dirs(run_dir.checkpoints, "step-*", ours=True)
    record = read_run_file(run_dir)
    known = record["run_id"] if record else None
    if cfg.train.resume or slurm_restarted():
        run_id = known or new_run_id_for_resume(run_dir)
        check_resumable(cfg, run_dir, run_id, world_size)
    elif known is not None and known == expected_id:
        run_id = known
    else:
        if holds_training_state(run_dir):
            if not cfg.train.overwrite:
                raise used_directory(run_dir)
            move_aside(run_dir, known)
        run_id = secrets.token_hex(6)
    if run_id != known:
        write_run_file(run_dir, {"run_id": run_id, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    _CLAIMED[key] = run_id
    return run_id


def planned_world_size(cfg: Config) -> int | None:
    """The processes a run will train with, where that is known before it launches: here,
    or on SLURM with parallelism.nproc_per_node set (else each node's GPUs decide)."""
    per_node = cfg.parallelism.nproc_per_node
    if cfg.launcher.name != "local":
        return cfg.launcher.nodes * per_node if per_node > 0 else None
    return 1 if cfg.parallelism.name == "single" else wanted_processes(cfg.parallelism)


def read_run_file(run_dir: RunDir) -> dict | None:
    if not run_dir.run_file.exists() and not run_dir.run_file.is_symlink():
        return None
    try:
        record = json.loads(read_text(run_dir.run_file))
        if isinstance(record, dict) and isinstance(record.get("run_id"), str) \
                and re.fullmatch(r"[0-9a-f]{12}", record["run_id"]):
            return record
    except ValueError:
        pass
    raise DtuneError(
        f"{run_dir.run_file} is not a run record dtune wrote (it should hold a JSON object with "
        "the run's id), so dtune cannot tell which run owns this directory. Restore the file, "
        "or start this run in another directory (hydra.run.dir=...).")


def write_run_file(run_dir: RunDir, record: dict) -> None:
    write_atomically(run_dir.run_file, json.dumps(record, indent=1))


def update_run_file(run_dir: RunDir, **fields) -> None:
    """Add to this run's record (rank 0; the run holds the directory's lock)."""
    write_run_file(run_dir, {**(read_run_file(run_dir) or {}), **fields})


def holds_training_state(run_dir: RunDir) -> bool:
    if any(True for _ in checkpoint_folders(run_dir.path)):
        return True
    return any((run_dir.path / name).exists() or (run_dir.path / name).is_symlink()
               for name in TRAINING_STATE[1:])


def used_directory(run_dir: RunDir) -> DtuneError:
    held = [name for name in TRAINING_STATE if (run_dir.path / name).exists()]
    return DtuneError(
        f"{run_dir.path} already holds another run ({', '.join(held)}), and a fresh run there "
        "would mix its files with that run's, or lose them. Choose one: continue that run "
        f"with `{resume_overrides(run_dir.path)}`; start this one in a new directory "
        "(hydra.run.dir=...); or add train.overwrite=true, which moves that run's files into "
        f"{PREVIOUS_RUNS}/ inside the directory (nothing is deleted).")


def move_aside(run_dir: RunDir, run_id: str | None) -> Path:
    """Move another run's files into RUN_DIR/previous_runs/<time>-<its id>/; the log, which
    this process may already be appending to, stays."""
    aside = own_directory(run_dir.path / PREVIOUS_RUNS, "the previous_runs folder")
    target = aside / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id or 'no-run-id'}"
    os.mkdir(target, 0o700)
    keep = {PREVIOUS_RUNS, run_dir.lock_file.name, run_dir.log_file.name}
    for entry in sorted(run_dir.path.iterdir()):
        if entry.name not in keep:
            os.rename(entry, target / entry.name)
    log.warning("train.overwrite=true: the files of the run that was in %s moved into %s",
                run_dir.path, target)
    return target


def new_run_id_for_resume(run_dir: RunDir) -> str:
    """A resume into a directory without a run record: only where nothing was trained yet
    (a SLURM job requeued before its start, say), else it is not dtune's to continue."""
    if holds_training_state(run_dir):
        raise DtuneError(
            f"train.resume=true, but {run_dir.path} has no run record ({run_dir.run_file.name}), "
            "so its checkpoints were written by an older dtune or put there by hand, and dtune "
            "resumes only checkpoints its own run wrote. Start a new run in another directory "
            "(hydra.run.dir=...), or from that run's final/ model.")
    return secrets.token_hex(6)


def check_resumable(cfg: Config, run_dir: RunDir, run_id: str, world_size: int | None) -> None:
    """Refuse, before anything loads, a resume whose checkpoints are all damaged, or whose
    settings differ from the newest complete checkpoint's (sizes checked here; the SHA-256
    when it loads)."""
    mine = [(step, folder) for step, folder in checkpoint_folders(run_dir.path)
            if run_id_of(folder) in (run_id, None)]
    problems = [(folder, checkpoint_problem(folder, step, verify=False))
                for step, folder in mine]
    complete = [folder for folder, problem in problems if problem is None]
    if mine and not complete:
        raise all_damaged(run_dir, problems)
    if complete:
        saved = json.loads(read_text(complete[0] / "trainer_state.json"))
        changed = changed_settings(saved.get("settings") or {},
                                   training_settings(cfg, world_size))
        if changed:
            raise settings_changed(complete[0], changed)


def all_damaged(run_dir: RunDir, problems: list) -> DtuneError:
    listed = "; ".join(f"{folder.name}: {problem}" for folder, problem in problems[:8])
    return DtuneError(
        f"train.resume=true, but none of this run's checkpoints in {run_dir.checkpoints} is "
        f"complete: {listed}. dtune does not start over silently, which would discard the "
        "run's metrics. Restore a checkpoint from a backup; or, to train from the start, use a "
        "new directory (hydra.run.dir=...) or train.resume=false with train.overwrite=true "
        f"(which keeps these files in {PREVIOUS_RUNS}/).")


def training_settings(cfg: Config, world_size: int | None) -> dict:
    """The settings that change what training computes, flat (`method.r`: 16). `world_size`
    counts where the engine's checkpoints are one file per rank that only that rank reads
    (ZeRO; FSDP2's reshard onto any number); None: not known yet."""
    flat = {key: value for key, value in flatten(asdict(cfg)).items()
            if not key.startswith(SAFE_TO_CHANGE)}
    flat["parallelism.zero_stage"] = cfg.parallelism.zero_stage  # what the engine computes
    if cfg.model.init_from:  # settled.* is not compared, but the starting weights are
        flat[INIT_FROM_WEIGHTS] = cfg.settled.init_from
    flat["parallelism.engine"] = cfg.parallelism.engine
    if world_size is not None:
        # The batch is its global size: 2 ranks of 1 micro-batch continue as 1 process of 2.
        # The ranks of a sequence-parallel group share their rows.
        flat[GLOBAL_BATCH] = cfg.train.micro_batch_size * cfg.train.grad_accum_steps \
            * world_size // cfg.parallelism.sequence_parallel
        if engine_spec(cfg.parallelism).fixed_world_size:
            flat["processes (ZeRO shards its state by rank)"] = world_size
    return json.loads(json.dumps(flat, default=str))  # as a checkpoint stores them


def changed_settings(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, the checkpoint's value, this run's) for each compared setting that differs.
    Keys only one side knows are left out (an older checkpoint, a world size not known yet),
    and so is `precision.name=auto` before it settles on the training machine."""
    changed = []
    for key in sorted(saved.keys() & current.keys()):
        if key == "precision.name" and "auto" in (saved[key], current[key]):
            continue
        if saved[key] != current[key]:
            changed.append((key, saved[key], current[key]))
    return changed


def settings_changed(folder: Path, changed: list) -> DtuneError:
    listed = "; ".join(f"{key}: {short(old)} in the checkpoint, {short(new)} now"
                       for key, old, new in changed)
    return DtuneError(
        f"train.resume=true, but this run's settings differ from those that wrote "
        f"{folder}: {listed}. These change what training computes, so the resumed run would "
        "not continue the same training. Resume with the checkpoint's values, or start a new "
        "run in another directory (hydra.run.dir=...); the checkpoint is left as it is. (A "
        "resume may change eval.*, tracker.*, launcher.*, the process layout, train.max_steps "
        "and epochs, the log, eval and save cadence, and the speed switches: the README's "
        "Reliability section lists them.)")


def short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

