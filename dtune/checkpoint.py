"""Checkpoints that are never half-written, what they hold, and the run's final artifact.

A checkpoint is written into a temporary folder, its files fsynced, a manifest (files, sizes,
step) written last, and the folder renamed into place; only then does `latest` move and do old
checkpoints go. Resume trusts only folders whose manifest matches what is on disk.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dtune.distributed import all_reduce_max, barrier
from dtune.errors import DtuneError
from dtune.files import (clear_temp_marker, current_umask, disk_full, disk_full_error, fsync_dir,
                         fsync_file, make_temp_dir, output_folder, put_in_place, read_text,
                         refuse_symlink, write_atomically)

log = logging.getLogger("dtune")

MANIFEST = "manifest.json"
# A save of more than this many bytes (seconds to minutes of writing) is announced first.
ANNOUNCE_BYTES = 1 << 30


@dataclass
class TrainState:
    """Everything the loop carries from step to step, and what a checkpoint restores."""

    data: dict  # the batch stream's position (epoch, cursor)
    run_id: str = ""  # the run that wrote it (RunDir.run_file): a run resumes only its own
    # what training computes (dtune/run_start.py training_settings): a resume compares them
    settings: dict = field(default_factory=dict)
    data_fingerprint: Optional[str] = None  # the training rows and tokenizer (non-streaming)
    step: int = 0
    total_steps: int = 0  # what the run planned when it saved: a resume names a change
    trained_tokens: int = 0
    loss_tokens: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0  # fp16 overflows
    nonfinite_steps: int = 0  # NaN/inf steps skipped
    exact_match_before: Optional[float] = None
    preference_accuracy_before: Optional[float] = None  # preference objectives
    # the tokenizer's chat template: a resume refuses to go on with another one
    chat_template: Optional[str] = None
    engine: dict = field(default_factory=dict)  # the engine's own (loss scaler, ZeRO ranks)

    def to_json(self) -> str:
        """One flat object: the engine's keys sit beside the loop's, as they always have."""
        flat = asdict(self)
        flat.update(flat.pop("engine"))
        return json.dumps(flat, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        flat = json.loads(text)
        known = {f.name for f in fields(cls)} - {"engine"}
        return cls(**{k: v for k, v in flat.items() if k in known},
                   engine={k: v for k, v in flat.items() if k not in known})


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, state: TrainState, engine, keep: int) -> Path:
    """Every rank takes part (ZeRO shards live on each); rank 0 seals the folder. It is
    built in a temporary folder of its own (marked, mode 0700, a name nobody can plant links
    in beforehand) and renamed into place whole."""
    ranks, step = engine.ranks, state.step
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step}"
    # rank 0 draws the temporary folder's name; a tensor collective hands it to every rank
    token = f"{int(all_reduce_max(float(secrets.randbits(48) if ranks.is_main else 0))):012x}"
    tmp = root / f".{final.name}.tmp-{token}"
    try:
        if ranks.is_main:
            announce_save(f"the step-{step} checkpoint", checkpoint_bytes(engine.module), final)
            refuse_symlink(root)
            root.mkdir(parents=True, exist_ok=True)
            make_temp_dir(root, final.name, token)
        barrier()
        saved = TrainState.from_json(state.to_json())  # a copy the engine adds its keys to
        engine.save_state(tmp, saved.engine)
        pause_inside_save()
        torch.save(rng_state(), tmp / f"rng-rank{ranks.rank}.pt")
        barrier()
        if ranks.is_main:
            (tmp / "trainer_state.json").write_text(saved.to_json())
            pause_inside_save()
            clear_temp_marker(tmp)
            os.chmod(tmp, 0o777 & ~current_umask())  # private while written, then as usual
            seal(tmp, step)
            put_in_place(tmp, final)  # a resumed run saving a step again replaces it whole
            fsync_dir(root)
            write_atomically(root / "latest", final.name)
            _prune(root, keep, state.run_id)
        barrier()
    except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError on a short write
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):
            raise disk_full_error(
                final, 3 * weight_bytes(engine.module), f"the checkpoint for step {step} (the "
                "trained weights and two optimizer moments)", exc, "Free disk space or point "
                "hydra.run.dir at a disk with room, then resume with train.resume=true; earlier "
                "checkpoints are intact.") from None
        raise DtuneError(
            f"could not write the checkpoint for step {step} under {root} "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}). Earlier checkpoints "
            "are intact.") from None
    return final


def pause_inside_save() -> None:
    """bench/kill_fuzz.py --in-save sets DTUNE_CHECKPOINT_PAUSE_S to widen the moments between
    a checkpoint's files (milliseconds otherwise), so that its kills land inside a save."""
    pause = float(os.environ.get("DTUNE_CHECKPOINT_PAUSE_S", "0") or 0)
    if pause > 0:
        time.sleep(pause)


def seal(folder: Path, step: int) -> None:
    """fsync every file, then write the manifest last: a folder with a matching manifest is
    complete. The manifest holds each file's size and SHA-256, checked before a resume."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(folder))] = {"size": path.stat().st_size,
                                                "sha256": sha256_of(path)}
        fsync_file(path)
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    fsync_file(folder / MANIFEST)
    for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(sub)


def folder_fingerprint(folder: Path) -> Optional[str]:
    """One SHA-256 over a folder's files (their paths and contents, in sorted order), or None
    where there is no such folder: what a run that starts from another run's final/ records
    (model.init_from), so it is known to start, and resume, from those very weights."""
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_of(path)}\0".encode())
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoints/step-N` folder (not a link), newest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir() or root.is_symlink():
        return []
    found = []
    for folder in root.glob("step-*"):
        try:
            step = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        if folder.is_dir() and not folder.is_symlink():
            found.append((step, folder))
    return sorted(found, reverse=True)


def run_id_of(folder: Path) -> str | None:
    """The run that wrote a checkpoint (its trainer_state.json), None where unreadable."""
    try:
        return str(json.loads(read_text(folder / "trainer_state.json")).get("run_id") or "")
    except (OSError, ValueError, AttributeError, DtuneError):
        return None


def valid_checkpoints(run_dir: Path, verify: bool = True, run_id: str | None = None
                      ) -> list[Path]:
    """Complete checkpoints, newest first; incomplete or altered ones are reported and skipped.
    `verify` also checks every file's SHA-256 (a resume does; pruning checks sizes only).
    With `run_id`, only that run's: another run's are neither resumed nor pruned."""
    found = []
    for step, folder in checkpoint_folders(run_dir):
        if run_id is not None and run_id_of(folder) not in (run_id, None):
            continue  # another run's: not ours to judge
        problem = checkpoint_problem(folder, step, verify)
        if problem is None:
            found.append(folder)
        else:
            log.warning("Skipping %s: %s.", folder, problem)
    return found


def load_checkpoint(folder: Path, engine) -> TrainState:
    """Restore the engine's state and this rank's RNG; return the loop's state. The caller
    has compared the checkpoint's settings with this run's (dtune/run_start.py)."""
    try:
        state = TrainState.from_json(read_text(folder / "trainer_state.json"))
        engine.load_state(folder, state.engine)
        rng_file = folder / f"rng-rank{engine.ranks.rank}.pt"
        refuse_symlink(rng_file)
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    except DtuneError:
        raise
    except Exception as exc:  # torch, safetensors and DeepSpeed raise many kinds
        raise DtuneError(
            f"the checkpoint {folder} could not be loaded into this run ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}). Its files match the SHA-256 its manifest "
            "recorded when it was saved, so it is most likely intact, and written under other "
            "settings than this run's in a way dtune does not compare. It is left as it is: "
            "resume with the settings that wrote it, or start a new run in another directory "
            "(hydra.run.dir=...)."
        ) from None
    if rng is not None:
        set_rng_state(rng)
    else:  # resumed on more ranks than saved: the new ranks start from their seed
        log.warning("%s has no RNG state for rank %d; it continues from its seed.",
                    folder, engine.ranks.rank)
    return state


def check_same_parameters(folder: Path, weights: dict, model,
                          fix: str = "Resume with the settings that wrote it, or start a new "
                                     "run in another directory (hydra.run.dir=...); the "
                                     "checkpoint is left as it is.") -> None:
    expected = set(trainable_state(model))
    if set(weights) != expected:
        raise DtuneError(
            f"the checkpoint {folder} holds weights for other parameters than this run trains "
            f"({len(set(weights) ^ expected)} names differ): it was written by another model or "
            f"method. {fix}"
        )


def save_final(model, tokenizer, out_dir: Path, state_dict: dict | None = None,
               provenance: dict | None = None, force: bool = True, kind: str = "final",
               fix: str = "Free space there and resume the run (train.resume=true): its last "
                          "checkpoint is saved, and the resumed run writes final/ from it."
               ) -> None:
    """Write the Hugging Face artifact: a PEFT adapter folder or a full model folder
    (`state_dict`: the weights, where the model's own are partitioned), marked as an output of
    `kind`. It appears whole or not at all; `force=False` refuses to replace a folder dtune did
    not write. A full disk is one paragraph with the bytes needed and `fix`."""
    what = "the adapter's weights" if hasattr(model, "peft_config") else "the model's weights"
    announce_save(what, weight_bytes(model, state_dict), out_dir)
    try:
        with output_folder(out_dir, kind, provenance, force=force,
                           option="the model folder") as tmp:
            model.save_pretrained(tmp, safe_serialization=True,
                                  **({"state_dict": state_dict} if state_dict is not None
                                     else {}))
            tokenizer.save_pretrained(tmp)
    except Exception as exc:  # torch, safetensors and the OS each report a full disk their way
        if not disk_full(exc):
            raise
        raise disk_full_error(out_dir, weight_bytes(model, state_dict), what, exc, fix) from None


def announce_save(what: str, size: int, where: Path) -> None:
    """A large save takes a while and shows nothing else: say what, how big and where."""
    if size > ANNOUNCE_BYTES:
        log.info("Saving %s (about %.1f GiB) to %s", what, size / 2**30, where)


def checkpoint_bytes(model) -> int:
    """About what a checkpoint writes: 12 bytes per trainable parameter (its fp32 weight or
    master copy and Adam's two fp32 moments; a ZeRO-3 parameter counted whole)."""
    return 12 * sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()
                    if p.requires_grad)


def weight_bytes(model, state_dict: dict | None = None) -> int:
    """About the bytes save_pretrained writes: `state_dict`, an adapter's trainable weights,
    or all of a model's weights (tied ones once)."""
    if state_dict is not None:
        tensors = [t for t in state_dict.values() if isinstance(t, torch.Tensor)]
    elif hasattr(model, "peft_config"):
        tensors = [p for p in model.parameters() if p.requires_grad]
    else:
        tensors = list(model.parameters())
    return sum(t.numel() * t.element_size() for t in tensors)


def checkpoint_problem(folder: Path, step: int, verify: bool = True) -> str | None:
    """What keeps a checkpoint folder from being complete and unaltered, in words; None when
    its manifest matches its files (sizes, and with `verify` their SHA-256)."""
    try:
        manifest = json.loads(read_text(folder / MANIFEST))
        if manifest.get("step") != step:
            return f"its manifest is for step {manifest.get('step')!r}"
        for name, entry in manifest["files"].items():
            path = folder / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                return f"its manifest names a file outside it ({name[:100]!r})"
            if path.is_symlink():
                return f"{name} is a symbolic link"
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != entry["size"]:
                return f"{name} has {path.stat().st_size} bytes, its manifest says {entry['size']}"
            if verify and sha256_of(path) != entry["sha256"]:
                return f"{name} does not match the SHA-256 its manifest recorded"
    except FileNotFoundError:
        return f"it has no {MANIFEST} (a save that did not finish)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DtuneError) as exc:
        return f"its {MANIFEST} cannot be read ({type(exc).__name__})"
    return None


def _prune(root: Path, keep: int, run_id: str) -> None:
    """This run's complete checkpoints beyond the newest `keep`; no other run's, ever. Each
    is renamed into a marked temporary folder before it is deleted, so a kill while deleting
    leaves no half-deleted `step-N` (the next start removes the marked folder)."""
    complete = valid_checkpoints(root.parent, verify=False, run_id=run_id)
    for folder in complete[keep:]:
        aside = make_temp_dir(root, folder.name)
        os.rename(folder, aside / folder.name)
        shutil.rmtree(aside, ignore_errors=True)
