"""dtune's cache folder and the lock that lets processes started together build into it once.

Converted GGUF models, random-init models, tokenized datasets and compiled DeepSpeed kernels
live here. Ranks and nodes on one machine start at the same moment: the first to take a
folder's build lock builds it, the others wait and then find it ready.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from dtune.files import refuse_symlink


def cache_dir() -> Path:
    """Where dtune keeps what it builds once (DTUNE_CACHE_DIR overrides)."""
    return Path(os.environ.get("DTUNE_CACHE_DIR", Path.home() / ".cache" / "dtune"))


def safe_name(name: str) -> str:
    """A hub id or model name as one folder name: `org/model` -> `org--model`."""
    return name.replace("/", "--")


def build_lock(folder: Path) -> FileLock:
    """An exclusive lock on `folder`'s build, released by the kernel if its holder dies
    (filelock's flock on Unix), so a killed build never blocks the next run."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f".{folder.name}.lock"
    refuse_symlink(lock)  # filelock truncates its file, wherever a link would point
    return FileLock(lock)


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside `final`, renamed to `final` once the block completes;
    on an error it is removed. Callers hold `build_lock(final)`, so it is built once."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, final)
