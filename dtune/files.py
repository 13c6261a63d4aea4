"""Writes that are all-or-nothing and stay inside what dtune made.

A reader sees the old file or the new one, never half. Run directories travel between people,
so a link planted in one must not redirect a write, and a folder dtune did not write is never
replaced without the user asking.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from dtune.errors import DtuneError

OUTPUT_MARKER = ".dtune-output.json"  # in every folder dtune writes whole (final/, merged, report)


def refuse_symlink(path: Path) -> None:
    path = Path(path)
    if path.is_symlink():
        raise DtuneError(
            f"{path} is a symbolic link (to {os.readlink(path)}), and dtune writes only files "
            "it creates itself: following a link from a run directory could overwrite anything "
            "it points at. Remove the link, or use a run directory of your own."
        )


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `data` to a fresh temporary file beside `path`, fsync it, and rename it into
    place (a planted link at `path` is refused, and the temporary name cannot be guessed)."""
    path = Path(path)
    refuse_symlink(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def open_for_append(path: Path):
    """An append handle that refuses to follow a link planted at `path`."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            refuse_symlink(path)
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable(final: Path, force: bool = False,
                      option: str = "the output folder") -> None:
    """Refuse to replace `final` unless dtune wrote it (its marker), it is empty, or `force`."""
    final = Path(final)
    refuse_symlink(final)
    if final.exists() and not final.is_dir():
        raise DtuneError(f"{option} {final} is a file, not a folder; name a new folder.")
    foreign = final.is_dir() and any(final.iterdir()) and not (final / OUTPUT_MARKER).is_file()
    if foreign and not force:
        raise DtuneError(
            f"{option} {final} already exists and holds files dtune did not write (it has no "
            f"{OUTPUT_MARKER}), so dtune will not replace it. Name a new or empty folder, or "
            "pass --force to replace that folder and everything in it."
        )


@contextlib.contextmanager
def output_folder(final: Path, provenance: dict, force: bool = False,
                  option: str = "the output folder"):
    """Yield an empty temporary folder beside `final`; once the block completes it becomes
    `final`, with a marker saying dtune wrote it. An existing `final` is replaced only if
    dtune wrote it (the marker) or `force`; otherwise it is refused before any work."""
    final = Path(final)
    check_replaceable(final, force, option)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()  # fails rather than reuse anything already there
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"written_by": "dtune", **provenance},
                                                    indent=1))
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_file(path)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
