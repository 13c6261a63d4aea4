"""One run per directory: an exclusive lock on RUN_DIR/.dtune.lock, held for the run's life.

`flock` is released by the kernel when its holder dies, so a `kill -9`, an OOM kill or a
preempted SLURM job never leaves a stale lock; the requeued job takes it again. The lock file
names its holder (host, PID), so a second run is told who holds the directory. Workers that
dtune or torchrun start for a run share their launcher's lock and take none of their own.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

from dtune.errors import DtuneError
from dtune.files import open_no_follow
from dtune.run_dir import RunDir

log = logging.getLogger("dtune")

_HELD: dict[str, int] = {}  # run dir (resolved) -> the locked file descriptor of this process


def hold(run_dir: RunDir) -> None:
    """Take the run directory's lock for this process (again: nothing), or refuse in words
    naming the host and PID that hold it. The directory must already be checked as ours."""
    key = str(run_dir.path.resolve())
    if key in _HELD:
        return
    fd = open_no_follow(run_dir.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise DtuneError(
            f"another run is using {run_dir.path} ({holder}), and two runs in one directory "
            "would overwrite each other's metrics and checkpoints. Wait for it to end, stop "
            "it, or give this run its own directory (hydra.run.dir=...).") from None
    except OSError as exc:  # a filesystem without flock (some Lustre or NFS mounts)
        if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            os.close(fd)
            raise
        log.warning("%s cannot be locked on this filesystem (%s): nothing stops a second run "
                    "from using the same directory at the same time.", run_dir.lock_file,
                    os.strerror(exc.errno))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    _HELD[key] = fd


def release(run_dir: RunDir) -> None:
    """Give the lock back early: a SLURM submission hands the directory to its job."""
    fd = _HELD.pop(str(run_dir.path.resolve()), None)
    if fd is not None:
        os.close(fd)


def held(run_dir: RunDir) -> bool:
    return str(run_dir.path.resolve()) in _HELD


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"PID {int(info['pid'])} on host {str(info['host'])[:100]}, since " \
               f"{str(info.get('since', '?'))[:40]}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process whose details are unreadable"
