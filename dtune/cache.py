"""dtune's cache folder and the lock that lets processes started together build into it once.

Converted GGUF models, random-init models, tokenized datasets and compiled DeepSpeed kernels
live here. Ranks and nodes on one machine start at the same moment: the first to take a
folder's build lock builds it, the others wait and then find it ready.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

from dtune.errors import DtuneError
from dtune.files import read_text, refuse_symlink, write_atomically

log = logging.getLogger("dtune")


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


def build_once(outputs: list[Path], build, local_rank: int, what: str,
               poll_s: float = 1.0, report_s: float = 30.0) -> None:
    """Make sure every file of `outputs` exists: local rank 0 of each machine runs `build`
    under the build lock (on a shared filesystem the first machine to take it builds, the
    others then find the files); every other rank polls for the files.

    Nobody waits inside a collective: a build of an hour is not a gloo/NCCL timeout, and the
    waiting ranks say every `report_s` seconds what they wait for. A failed build leaves a
    `.failed` note beside the first output, and the waiting ranks raise its message.
    """
    outputs = [Path(p) for p in outputs]
    failed = outputs[0].with_name(outputs[0].name + ".failed")
    started = time.time()
    if local_rank != 0:
        _wait_for(outputs, failed, what, started, poll_s, report_s)
        return
    lock = build_lock(outputs[0])
    while True:
        try:
            lock.acquire(timeout=report_s)
            break
        except Timeout:
            log.info("waiting for another machine to finish %s (%.0f s)", what,
                     time.time() - started)
    try:
        if all(p.exists() for p in outputs):
            return
        failed.unlink(missing_ok=True)
        try:
            build()
        except BaseException as exc:
            write_atomically(failed, str(exc) if isinstance(exc, DtuneError) else
                             f"local rank 0 failed while {what} ({type(exc).__name__}: "
                             f"{exc}); its log has the details.")
            raise
    finally:
        lock.release()


def _wait_for(outputs: list[Path], failed: Path, what: str, started: float, poll_s: float,
              report_s: float) -> None:
    reported = started
    while not all(p.exists() for p in outputs):
        # A note older than this wait is a previous run's, which rank 0 is replacing.
        if failed.is_file() and failed.stat().st_mtime >= started - 1:
            raise DtuneError(read_text(failed))
        now = time.time()
        if now - reported >= report_s:
            log.warning("waiting for rank 0 to finish %s (%.0f s)", what, now - started)
            reported = now
        time.sleep(poll_s)
