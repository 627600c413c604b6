"""The data directory holds all of pvtap's state: the local stores, the pseudonym key, the relay's
certificates and mitmproxy's CA. Every process that writes there checks it before it starts
anything, so a directory pvtap may not write to is one clear line, not a traceback per thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import sqlite3
import tempfile
from pathlib import Path

from pvtap.config import ConfigError

KEY = "data_dir"
FIX = ("make it writable for user {user}, or point data_dir at a directory pvtap may write to: "
       "--data-dir, PVTAP_DATA_DIR or data_dir in the config file")
#: files pvtap writes into an existing data directory
STATE_FILES = ("*.sqlite", "*.sqlite-wal", "*.sqlite-shm", "pseudonym.key")


def problem(path: str | Path) -> str | None:
    """Why pvtap could not write to `path`, without touching anything; None when it can (it
    exists as a writable directory, or its nearest existing ancestor is one it may create it in)."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return ("it is not writable" if existing == path
                else f"cannot create it: {existing} is not writable")
    if existing == path:
        for pattern in STATE_FILES:
            for state in sorted(path.glob(pattern)):
                if not os.access(state, os.W_OK):
                    return f"{state.name} in it is not writable"
    return None


def prepare(path: str | Path) -> Path:
    """Create the data directory (mode 0700) if it is missing and prove it writable by writing a
    file into it. Raises ConfigError (key data_dir, the directory, the reason and the fix)."""
    path = Path(path).absolute()
    reason = problem(path)
    if reason is None:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".pvtap-write-test-", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:  # what access() cannot know: a read-only mount, a full disk, quotas
            reason = f"cannot write there ({_strerror(exc)})"
    if reason is not None:
        raise ConfigError(KEY, str(path), reason, _fix())
    return path


def check_stores(path: str | Path, name: str) -> None:
    """Every existing store `<name>*.sqlite` in the data directory is a SQLite database. Read only
    (the ingest workers open and write them): a stray file is this one line before anything starts,
    not a worker that fails after the listeners opened. Raises ConfigError (see store_error)."""
    for store in sorted(Path(path).glob(f"{name}*.sqlite")):
        try:
            with contextlib.closing(sqlite3.connect(f"{store.absolute().as_uri()}?mode=ro", uri=True)) as db:
                db.execute("PRAGMA schema_version").fetchone()
        except sqlite3.Error as exc:
            raise store_error(store, exc) from None


def store_error(path: str | Path, exc: Exception) -> ConfigError:
    """A store file in the data directory that SQLite cannot open or write, as a ConfigError."""
    path = Path(path)
    reason = _strerror(exc) if isinstance(exc, OSError) else str(exc)
    fix = _fix()
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in reason:
        fix = f"move {path.name} out of the way (it is not a pvtap store), or " + fix
    return ConfigError(KEY, str(path.parent), f"{path.name} in it cannot be opened ({reason})", fix)


def _fix() -> str:
    try:
        user = f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
    except KeyError:  # a uid without a passwd entry (containers)
        user = f"uid {os.getuid()}"
    return FIX.format(user=user)


def _strerror(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
        return os.strerror(exc.errno).lower()
    return exc.strerror or str(exc)
