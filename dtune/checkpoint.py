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
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dtune.distributed import barrier
from dtune.errors import DtuneError
from dtune.files import (disk_full, disk_full_error, fsync_dir, fsync_file, output_folder,
                         refuse_symlink, write_atomically)

log = logging.getLogger("dtune")

MANIFEST = "manifest.json"


@dataclass
class TrainState:
    """Everything the loop carries from step to step, and what a checkpoint restores."""

    identity: dict  # model and method: a checkpoint resumes only the run that wrote it
    data: dict  # the batch stream's position (epoch, cursor)
    step: int = 0
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
    """Every rank takes part (ZeRO shards live on each); rank 0 seals the folder."""
    ranks, step = engine.ranks, state.step
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    try:
        if ranks.is_main:
            refuse_symlink(root)
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        saved = TrainState.from_json(state.to_json())  # a copy the engine adds its keys to
        engine.save_state(tmp, saved.engine)
        pause_inside_save()
        torch.save(rng_state(), tmp / f"rng-rank{ranks.rank}.pt")
        barrier()
        if ranks.is_main:
            (tmp / "trainer_state.json").write_text(saved.to_json())
            pause_inside_save()
            seal(tmp, step)
            if final.exists():  # a resumed run saving a step again: replace it whole
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(root)
            write_atomically(root / "latest", final.name)
            _prune(root, keep)
        barrier()
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DtuneError(
            f"could not write the checkpoint for step {step} under {root}: {exc}. Free disk "
            "space or point hydra.run.dir at a writable folder; earlier checkpoints are intact."
        ) from None
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def valid_checkpoints(run_dir: Path, verify: bool = True) -> list[Path]:
    """Complete checkpoints, newest first; incomplete or altered ones are reported and skipped.
    `verify` also checks every file's SHA-256 (a resume does; pruning checks sizes only)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in root.glob("step-*"):
        try:
            step = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        if _manifest_ok(folder, step, verify):
            found.append((step, folder))
        else:
            log.warning("Skipping %s: its manifest is missing or does not match its files "
                        "(sizes or SHA-256).", folder)
    return [folder for _, folder in sorted(found, reverse=True)]


def load_checkpoint(folder: Path, engine, identity: dict) -> TrainState:
    """Restore the engine's state and this rank's RNG; return the loop's state.

    `identity` (model, method) must match what wrote the checkpoint."""
    try:
        state = TrainState.from_json((folder / "trainer_state.json").read_text())
        if state.identity != identity:
            raise DtuneError(
                f"the checkpoint {folder} was written by a run of {state.identity}, and this "
                f"run is {identity}; resume with the settings that wrote it, or start a new run "
                "dir (or set train.resume=false)."
            )
        engine.load_state(folder, state.engine)
        rng_file = folder / f"rng-rank{engine.ranks.rank}.pt"
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    except DtuneError:
        raise
    except Exception as exc:  # torch, safetensors and DeepSpeed raise many kinds
        raise DtuneError(
            f"the checkpoint {folder} is damaged and cannot be read ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}). Delete that folder to resume from the "
            "previous checkpoint, or set train.resume=false to start over."
        ) from None
    if rng is not None:
        set_rng_state(rng)
    else:  # resumed on more ranks than saved: the new ranks start from their seed
        log.warning("%s has no RNG state for rank %d; it continues from its seed.",
                    folder, engine.ranks.rank)
    return state


def check_same_parameters(folder: Path, weights: dict, model) -> None:
    expected = set(trainable_state(model))
    if set(weights) != expected:
        raise DtuneError(
            f"the checkpoint {folder} holds weights for other parameters than this run trains "
            f"({len(set(weights) ^ expected)} names differ). It was written by another model or "
            "method; start a new run dir, or set train.resume=false."
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
        what = "the adapter's weights" if hasattr(model, "peft_config") else "the model's weights"
        raise disk_full_error(out_dir, weight_bytes(model, state_dict), what, exc, fix) from None


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


def _manifest_ok(folder: Path, step: int, verify: bool) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("step") != step:
            return False
        for name, entry in manifest["files"].items():
            path = folder / name
            if path.is_symlink() or not path.is_file() or path.stat().st_size != entry["size"]:
                return False
            if verify and sha256_of(path) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _prune(root: Path, keep: int) -> None:
    complete = valid_checkpoints(root.parent, verify=False)
    for folder in complete[keep:]:
        shutil.rmtree(folder, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left behind by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
