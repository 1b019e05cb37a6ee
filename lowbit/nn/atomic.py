"""Atomic writes: a file or a whole folder appears complete or not at all, and one overwrite policy.

Every output of lowbit (checkpoints, exports, work-area files, reports) is written under a temporary
name beside its destination and renamed into place, so a crash or a kill never leaves half a file or
half a folder behind. `check_output` is the single rule for an existing destination: refused without
`overwrite`; with it, replaced only when it is a folder that lowbit wrote (a checkpoint with its
manifest, an export with its marker, a work area with its job file) or an empty folder, so a mistyped
`--out` never deletes a user's files. `hold_lock` keeps two jobs from writing one folder at once.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# files whose presence says "lowbit wrote this folder": a checkpoint's manifest, an export's marker,
# a work-area job's description
OWNED_MARKERS = ("lowbit_config.json", "lowbit_export.json", "job.json")
REPORT_FILES = ("report.json", "pareto.png")  # beside the checkpoints of a multi-budget run
LOCK_GRACE_SECONDS = 10  # a lock file still without a pid is being written by its owner


class LockedError(ValueError):
    """Another live process holds the lock of a folder this job would write."""


class OutputExistsError(FileExistsError):
    """The destination exists and may not be replaced (no overwrite, or not a folder lowbit wrote)."""

    def __str__(self) -> str:  # FileExistsError would print "[Errno None] ..." for a bare message
        return str(self.args[0]) if self.args else ""


def is_owned(path: Path) -> bool:
    """Whether `path` is a folder lowbit wrote (or an empty one), which overwrite may replace: a folder
    with one of OWNED_MARKERS, or one holding only such folders and the files of a multi-budget report."""
    if path.is_symlink() or not path.is_dir():
        return False
    if any((path / m).exists() for m in OWNED_MARKERS):
        return True
    children = list(path.iterdir())
    return all(is_owned(c) if c.is_dir() else c.name in REPORT_FILES for c in children)


def check_output(path: str | Path, overwrite: bool) -> Path:
    """The destination `path` after checking it may be written (see the module docstring)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return path
    if not overwrite:
        raise OutputExistsError(f"output folder {path} exists; pass --overwrite to replace it")
    if not is_owned(path):
        raise OutputExistsError(
            f"{path} exists and is not a lowbit checkpoint, export or work area; refusing to replace it"
        )
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing an existing `out` (already checked) only once `tmp` is whole."""
    if not (out.exists() or out.is_symlink()):
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success it becomes `out`, on failure it is removed.

    `out` is checked with `check_output` before anything is written and again before the rename.
    """
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        check_output(out, overwrite)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _lock_owner(lock: Path) -> int | None:
    """The pid written in a lock file, or None while it is empty or unreadable."""
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def hold_lock(path: str | Path) -> Iterator[Path]:
    """Hold the lock of the folder `path` (the file `.<name>.lock` beside it, holding this process's pid)
    while the block runs. A lock held by a live process refuses the job; one left by a dead process is
    taken over. Yields the lock file."""
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _lock_owner(lock)
            fresh = time.time() - lock.stat().st_mtime < LOCK_GRACE_SECONDS if lock.exists() else False
            if (pid is not None and _alive(pid)) or (pid is None and fresh):
                who = f"pid {pid}" if pid is not None else "a starting job"
                raise LockedError(
                    f"{path} is in use by another lowbit job ({who}); wait for it to finish"
                ) from None
            if _lock_owner(lock) == pid:  # stale (its process is gone) and not taken over meanwhile
                lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise LockedError(f"{path} is in use by another lowbit job; its lock {lock} keeps changing")
    try:
        yield lock
    finally:
        if _lock_owner(lock) == os.getpid():
            lock.unlink(missing_ok=True)
