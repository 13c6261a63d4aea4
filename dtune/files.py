"""Writes that are all-or-nothing and stay inside what dtune made.

A reader sees the old file or the new one, never half. Run directories travel between people,
so a link planted in one must not redirect a write, and a folder dtune did not write is never
replaced without the user asking.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

from dtune.errors import DtuneError

log = logging.getLogger("dtune")

OUTPUT_MARKER = ".dtune-output.json"  # in every folder dtune writes whole (final/, merged, report)
# In every temporary folder dtune makes beside what it builds: which host and process made it,
# so that a later start removes the leftovers of a killed process, and only those.
TEMP_MARKER = ".dtune-temp.json"


def refuse_symlink(path: Path) -> None:
    if Path(path).is_symlink():
        raise link_refused(path)


def link_refused(path: Path, what: str = "") -> DtuneError:
    path = Path(path)
    target = os.readlink(path) if path.is_symlink() else "?"
    return DtuneError(
        f"{what or path} is a symbolic link (to {target}), and dtune neither writes nor reads "
        "through links in a run, sweep or cache directory: a link planted there could make it "
        "overwrite or read anything it points at. Remove the link, or use a directory of your "
        f"own. The link: {path}")


def check_own_directory(path: Path, what: str = "") -> None:
    """Refuse `path` unless it is a real directory (not a link to one) owned by this user:
    then nobody else can plant a link in it between a check and a write."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise DtuneError(f"{what or path} does not exist: {path}") from None
    if stat.S_ISLNK(info.st_mode):
        raise link_refused(path, what)
    if not stat.S_ISDIR(info.st_mode):
        raise DtuneError(f"{what or path} is not a folder: {path}. Name a folder, or remove "
                         "the file that stands in its place.")
    if info.st_uid != os.getuid():
        raise DtuneError(
            f"{what or path} belongs to another user (uid {info.st_uid}), and dtune writes "
            "only into folders of your own: their owner could change what is in it while "
            f"dtune works. Copy what you need into a folder of your own. The folder: {path}")


def own_directory(path: Path, what: str = "", parents: bool = False) -> Path:
    """`path` as a real directory of this user's, made if missing (`parents`: with the
    folders above it; else only the last, inside a folder already checked)."""
    path = Path(path)
    try:
        if parents:
            path.mkdir(parents=True, exist_ok=True)
        else:
            os.mkdir(path, 0o777)
    except FileExistsError:
        pass
    check_own_directory(path, what)
    return path


def open_no_follow(path: Path, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """os.open that refuses a link at the last component of `path` (a DtuneError)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and Path(path).is_symlink()):
            raise link_refused(path) from None
        raise


def read_text(path: Path, errors: str = "strict") -> str:
    """A file's text, refusing a link planted in its place."""
    with os.fdopen(open_no_follow(path), encoding="utf-8", errors=errors) as handle:
        return handle.read()


def read_bytes(path: Path) -> bytes:
    with os.fdopen(open_no_follow(path), "rb") as handle:
        return handle.read()


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
    return os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a",
                     encoding="utf-8")


class NoFollowFileHandler(logging.FileHandler):
    """Hydra's job log (RUN_DIR/dtune.log, conf/config.yaml) opened without following a link,
    and only inside a folder of this user's. Opened on the first record (`delay`), after
    dtune has checked the run directory; where the check fails, records are dropped, since the
    run is refused with its own message."""

    def __init__(self, filename, mode: str = "a", encoding=None, delay: bool = True,
                 errors=None):
        super().__init__(filename, mode, encoding or "utf-8", delay=True, errors=errors)

    def _open(self):
        try:
            check_own_directory(Path(self.baseFilename).parent)
            return open_for_append(Path(self.baseFilename))
        except (DtuneError, OSError):
            return open(os.devnull, "a", encoding="utf-8")


def make_temp_dir(beside: Path, name: str, token: str | None = None) -> Path:
    """An empty folder beside `beside/name`, with an unguessable name (`.NAME.tmp-XXXX`, mode
    0700; `token` when processes must agree on it) and a marker naming this host and process.
    Take the marker out with `clear_temp_marker` before the folder becomes what it builds."""
    if token is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=beside))
    else:
        tmp = Path(beside) / f".{name}.tmp-{token}"
        os.mkdir(tmp, 0o700)  # fails rather than reuse anything already there
    (tmp / TEMP_MARKER).write_text(json.dumps({"written_by": "dtune", "host": socket.gethostname(),
                                               "pid": os.getpid(), "started": time.time()}))
    return tmp


def clear_temp_marker(tmp: Path) -> None:
    (Path(tmp) / TEMP_MARKER).unlink(missing_ok=True)


def remove_stale_temp_dirs(parent: Path, name: str = "*", ours: bool = False) -> list[Path]:
    """Remove the `.NAME.tmp-*` folders under `parent` that dtune made (their marker) and
    whose maker is gone: a process of this host that no longer runs, or any maker when
    `ours` (the caller holds the lock under which they were made). Nothing else is touched."""
    removed = []
    for tmp in Path(parent).glob(f".{name}.tmp-*"):
        try:
            if tmp.is_symlink() or not tmp.is_dir():
                continue
            marker = json.loads(read_text(tmp / TEMP_MARKER))
        except (OSError, ValueError, DtuneError):
            continue  # not one of dtune's
        if not isinstance(marker, dict) or marker.get("written_by") != "dtune":
            continue
        if ours or (marker.get("host") == socket.gethostname()
                    and not process_alive(marker.get("pid"))):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def process_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What each kind of output folder holds, in a message's words. `final` is a run's trained
# model: it is replaced only by the run that trained it, never through --out.
OUTPUT_KINDS = {"final": "a run's trained model (its final/ folder)",
                "merged": "a merged model (dtune merge)", "report": "a report (dtune report)",
                "gguf": "a GGUF model file (dtune export)"}
SET_ASIDE = "previous"  # an output being replaced waits here, inside a marked temporary folder
# A write that failed because the disk (or the user's quota, or a file size limit) is full:
# the errno of an OSError, or the words torch's and safetensors' writers put in their errors.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_TEXT = re.compile(r"no space left|disk quota|file too large|os error (?:27|28|122)\b|"
                            r"file write failed|unexpected pos \d+ vs \d+", re.IGNORECASE)


def output_kind(folder: Path) -> str | None:
    """The kind of output dtune wrote into `folder`, from its marker (None: no readable
    marker). A marker without a kind is a run's final/ from before kinds were recorded."""
    try:
        marker = json.loads(read_text(Path(folder) / OUTPUT_MARKER))
    except (OSError, ValueError, DtuneError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") not in (None, "dtune"):
        return None
    kind = marker.get("kind", "final")
    return kind if isinstance(kind, str) else None


def check_replaceable(final: Path, kind: str, force: bool = False,
                      option: str = "the output folder") -> None:
    """Refuse to replace `final` unless it is missing or empty, or dtune wrote it as an output
    of the same `kind`, or `force` (which never replaces a run's trained model: only the run
    that trained it does, as kind `final`)."""
    final = Path(final)
    refuse_symlink(final)
    if final.exists() and not final.is_dir():
        raise DtuneError(f"{option} {final} is a file, not a folder; name a new folder.")
    if not final.is_dir() or not any(final.iterdir()):
        return
    found = output_kind(final)
    if found == kind:
        return
    if found == "final":
        raise DtuneError(
            f"{option} {final} holds {OUTPUT_KINDS['final']}, and dtune never replaces a "
            f"trained model with {OUTPUT_KINDS[kind]}, --force or not. Name another folder "
            "for the output, one that does not exist yet.")
    if force:
        return
    if found is not None:
        raise DtuneError(
            f"{option} {final} holds {OUTPUT_KINDS.get(found, f'an output of kind {found!r}')}"
            f", and this command writes {OUTPUT_KINDS[kind]}: dtune replaces an output only with "
            f"one of its own kind. Name another folder, or pass --force to replace that one.")
    raise DtuneError(
        f"{option} {final} already exists and holds files dtune did not write (it has no "
        f"{OUTPUT_MARKER}), so dtune will not replace it. Name a new or empty folder, or "
        "pass --force to replace that folder and everything in it."
    )


def refuse_enclosing(out: Path, keep=(), option: str = "--out") -> None:
    """Refuse an output folder whose replacement would delete far more than an output: the
    root folder, the home folder, the current directory or a folder above it, or a folder
    holding one of `keep` (what the command reads). --force does not change this."""
    target = Path(os.path.realpath(out))
    guarded = [(Path("/"), "the root folder")]
    with contextlib.suppress(RuntimeError, KeyError, OSError):
        guarded.append((Path.home(), "your home folder"))
    with contextlib.suppress(OSError):
        guarded.append((Path.cwd(), "the current directory"))
    guarded += [(Path(path), "a folder this command reads") for path in keep]
    for path, what in guarded:
        path = Path(os.path.realpath(path))
        if target == path or target in path.parents:
            where = what if target == path else f"a folder that holds {what} ({path})"
            raise DtuneError(
                f"{option} {out} is {where}: replacing it with the output would delete "
                "everything in it, so dtune refuses it, --force or not. Name a new folder for "
                "the output, one that does not exist yet.")


@contextlib.contextmanager
def output_folder(final: Path, kind: str, provenance: dict | None = None, force: bool = False,
                  option: str = "the output folder"):
    """Yield an empty temporary folder beside `final` (an unguessable name, mode 0700, dtune's
    temporary marker); once the block completes it becomes `final`, with a marker saying
    dtune wrote it and its `kind`. An existing `final` is replaced only as check_replaceable
    allows, refused before any work. Leftovers of an earlier attempt that was killed (dtune's
    marked temporary folders of this name whose process is gone) are removed first."""
    final = Path(final)
    check_replaceable(final, kind, force, option)
    final.parent.mkdir(parents=True, exist_ok=True)
    restore_set_aside(final)
    remove_stale_temp_dirs(final.parent, glob.escape(final.name))
    tmp = make_temp_dir(final.parent, final.name)
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps(
            {"written_by": "dtune", **(provenance or {}), "kind": kind}, indent=1))
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_file(path)
        os.chmod(tmp, 0o777 & ~current_umask())  # readable as any folder the user makes
        put_in_place(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable_file(final: Path, kind: str, kind_of, force: bool = False,
                           option: str = "the output file") -> None:
    """Refuse to replace the file `final` unless it is missing, or dtune wrote it as an output
    of the same `kind` (`kind_of(path)` reads the marker the file carries in its own format;
    None: no marker), or `force`. A folder or a link in its place is refused, --force or not."""
    final = Path(final)
    refuse_symlink(final)
    if final.is_dir():
        raise DtuneError(
            f"{option} {final} is a folder, and this command writes one file; name the file, "
            f"e.g. {option} {final / 'model.gguf'}.")
    if not final.exists() or kind_of(final) == kind or force:
        return
    raise DtuneError(
        f"{option} {final} already exists and dtune did not write it as {OUTPUT_KINDS[kind]} "
        "(it carries no dtune marker of that kind), so dtune will not replace it. Name a new "
        "file, or pass --force to replace that one.")


@contextlib.contextmanager
def output_file(final: Path, kind: str, kind_of, force: bool = False,
                option: str = "the output file"):
    """Yield a path inside a fresh temporary folder beside `final` (an unguessable name, mode
    0700, dtune's temporary marker, so a later start removes what a killed export left); once
    the block has written the file there, it is renamed onto `final` in one step. An existing
    `final` is replaced only as check_replaceable_file allows, refused before any work. The
    file must carry its own marker of `kind` (what `kind_of` reads)."""
    final = Path(final)
    check_replaceable_file(final, kind, kind_of, force, option)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(final.parent, glob.escape(final.name))
    tmp = make_temp_dir(final.parent, final.name)
    try:
        building = tmp / final.name
        yield building
        fsync_file(building)
        os.chmod(building, 0o666 & ~current_umask())  # readable as any file the user makes
        refuse_symlink(final)  # a link planted while the file was written
        os.replace(building, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`. An existing `final` first moves into a marked
    temporary folder and is deleted once the new one is in place: a kill between the renames
    loses nothing (the next start puts it back), and one while deleting leaves only a marked
    folder, which the next start removes."""
    if not final.exists():
        clear_temp_marker(tmp)
        os.rename(tmp, final)
        return
    aside = make_temp_dir(final.parent, final.name)
    os.rename(final, aside / SET_ASIDE)
    try:
        clear_temp_marker(tmp)
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside / SET_ASIDE, final)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def restore_set_aside(final: Path) -> None:
    """Put back an output that a killed process had moved aside (put_in_place) before its
    replacement took its place: `final` is missing and the maker of the folder is gone."""
    if os.path.lexists(final):
        return
    for aside in final.parent.glob(f".{glob.escape(final.name)}.tmp-*/{SET_ASIDE}"):
        if aside.is_dir() and not aside.is_symlink() and maker_gone(aside.parent) \
                and output_kind(aside) is not None:
            os.rename(aside, final)
            log.warning("%s was being replaced when its writer stopped; the previous one is "
                        "back in place.", final)
            return


def maker_gone(tmp: Path) -> bool:
    """Whether the dtune process that made the temporary folder `tmp` no longer runs."""
    try:
        marker = json.loads(read_text(Path(tmp) / TEMP_MARKER))
    except (OSError, ValueError, DtuneError):
        return False
    return isinstance(marker, dict) and marker.get("written_by") == "dtune" \
        and marker.get("host") == socket.gethostname() and not process_alive(marker.get("pid"))


def disk_full(exc: BaseException) -> bool:
    """Whether a failed write failed for want of space (OSError, or torch's RuntimeError and
    safetensors' error, which carry no errno)."""
    return getattr(exc, "errno", None) in DISK_FULL_ERRNOS or \
        bool(DISK_FULL_TEXT.search(str(exc)))


def disk_full_error(path: Path, needed: int, what: str, exc: BaseException,
                    fix: str) -> DtuneError:
    """The one paragraph for a write to `path` that ran out of space: the bytes needed, the
    bytes free, and `fix`."""
    path = Path(path)
    try:
        free = f", and {human_bytes(shutil.disk_usage(path.parent).free)} are free now"
    except OSError:
        free = ""
    return DtuneError(
        f"the disk is full: writing {what} to {path} failed "
        f"({' '.join(str(exc).split())[:200]}). It needs about {human_bytes(needed)} "
        f"({needed:,} bytes) on the disk of {path.parent}{free}. Nothing was left half-written: "
        f"{path} is as it was before. {fix}")


def human_bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
