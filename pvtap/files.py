"""Files that hold what pvtap captured or its secrets: private to the user pvtap runs as.

The data directory is created 0700 and every store, key and lock file in it 0600, whatever the
umask says; a store file made elsewhere with wider permissions is narrowed when it is opened.
Secrets are written whole or not at all (a temporary file, fsync, rename), so a crash never
leaves a half-written key behind; lock files serialise processes that start together.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | Path) -> Path:
    """Create the directory (and missing parents) with mode 0700; an existing one is left as it
    is (the user may have shared it on purpose)."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def private_file(path: str | Path) -> Path:
    """Create the file empty with mode 0600 if it does not exist; narrow an existing one to the
    owner. SQLite gives its -wal and -shm files the database file's mode."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            with contextlib.suppress(PermissionError):  # not ours: leave it, SQLite will say if it cannot write
                os.fchmod(fd, mode & 0o700)
    finally:
        os.close(fd)
    return path


def open_private(path: str | Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """os.open with mode 0600 (lock files)."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, flags, FILE_MODE)
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, FILE_MODE)
    return fd


def replace_atomically(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` (mode 0600) atomically: readers see the old file or the whole new
    one, never a part (a temporary file, fsync, rename, fsync of the directory)."""
    path = Path(path)
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on a lock file (0600) for the block; the kernel releases it if
    the process dies."""
    fd = open_private(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
