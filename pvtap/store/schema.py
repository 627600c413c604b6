"""The local store's tables, their version (`PRAGMA user_version`) and the migrations.

Version 1: `raw` (the redacted payloads) and `records`, committed together.
Version 2: raw first. Payloads are archived as soon as they are framed and redacted; decoding
follows the archive with its own cursor (`decoding`), as the forwarder follows the records with
its cursor. `ingest_status` holds what the ingest worker last said about itself (dropped copies,
decode backlog, forwarder state) for `pvtap status`. A version 1 file is migrated in place: its
payloads were all decoded when they were stored, so the cursor starts after the last of them.

Indexes that leave the format as it is (an older pvtap reads and writes the file unchanged) are
not a new version: they are created at every writable open, IF NOT EXISTS, so a store made before
them gets them the first time a pvtap that knows them opens it (`_INDEXES`).

A store from a newer pvtap is refused (StoreVersionError says which versions and what to do)
rather than written with a schema this version does not know.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

_TABLES = """
CREATE TABLE IF NOT EXISTS raw (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ns  INTEGER NOT NULL,
    protocol     TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    device       TEXT    NOT NULL DEFAULT '',
    connection   TEXT    NOT NULL DEFAULT '',
    direction    TEXT    NOT NULL DEFAULT '',
    meta         TEXT    NOT NULL DEFAULT '{}',
    payload      BLOB    NOT NULL,
    decode_error TEXT
);
CREATE TABLE IF NOT EXISTS records (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    raw_id      INTEGER REFERENCES raw(id) ON DELETE SET NULL,
    time_ns     INTEGER NOT NULL,
    measurement TEXT    NOT NULL,
    tags        TEXT    NOT NULL,
    fields      TEXT    NOT NULL,
    protocol    TEXT    NOT NULL,
    device      TEXT    NOT NULL DEFAULT '',
    connection  TEXT    NOT NULL DEFAULT '',
    direction   TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS records_time ON records(time_ns);
CREATE INDEX IF NOT EXISTS records_raw ON records(raw_id);
CREATE INDEX IF NOT EXISTS records_measurement ON records(measurement, time_ns);
CREATE INDEX IF NOT EXISTS raw_device ON raw(protocol, device);
"""

_V2 = """
CREATE TABLE IF NOT EXISTS decoding (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    cursor INTEGER NOT NULL  -- every raw id up to here is decoded: its records or its decode_error are stored
);
CREATE TABLE IF NOT EXISTS ingest_status (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    updated_ns      INTEGER NOT NULL,
    running         INTEGER NOT NULL,  -- 0 once the worker stopped cleanly
    pid             INTEGER,
    dropped_copies  INTEGER NOT NULL DEFAULT 0,  -- since the worker started: not archived, never forwarded-affecting
    decode_backlog  INTEGER NOT NULL DEFAULT 0,  -- raw payloads archived but not decoded yet
    forwarder       TEXT    NOT NULL DEFAULT 'off',  -- off, idle, delivering, failing, stuck, restarting
    forwarder_error TEXT,
    counts          TEXT    NOT NULL DEFAULT '{}'  -- the stats snapshot, JSON
);
"""

#: (name, statement) of indexes added without a version: created at every writable open
_INDEXES = [
    # `pvtap status`, /readyz and the web view count the records after the forwarder's cursor (all of
    # them when no forwarder runs). The rowid range walks the table's pages, tags and fields and all
    # (some 340 bytes a record); this index holds the ids alone, about 12 MB per million records.
    ("records_undelivered", "CREATE INDEX IF NOT EXISTS records_undelivered ON records(id)"),
]


class StoreVersionError(RuntimeError):
    """A store written by a newer pvtap: its message names the file, both versions and the fix."""

    def __init__(self, path: Path, found: int) -> None:
        self.path, self.found = path, found
        super().__init__(
            f"{path} was written by a newer pvtap (store schema {found}; this pvtap knows up to {SCHEMA_VERSION}). "
            f"Fix: run the newer pvtap, or move {path.name} out of {path.parent} to start a new store "
            "(the file itself is untouched)")


def version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def check_readable(db: sqlite3.Connection, path: Path) -> int:
    """The file's schema version; StoreVersionError when it is newer than this pvtap."""
    found = version(db)
    if found > SCHEMA_VERSION:
        raise StoreVersionError(path, found)
    return found


def create_or_migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring a writable store to SCHEMA_VERSION in one transaction (a reader sees the old or the
    new schema, never half of it)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        found = check_readable(db, path)
        if found < SCHEMA_VERSION:
            for statement in (_TABLES + _V2).split(";"):  # not executescript: it would COMMIT first
                if statement.strip():
                    db.execute(statement)
            # version 1 stored every payload decoded; a new file has none
            db.execute("INSERT OR IGNORE INTO decoding (id, cursor) SELECT 1, COALESCE(MAX(id), 0) FROM raw")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        _add_indexes(db, path)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _add_indexes(db: sqlite3.Connection, path: Path) -> None:
    for name, statement in _INDEXES:
        if db.execute("SELECT 1 FROM sqlite_master WHERE type='index' AND name=?", (name,)).fetchone():
            continue
        if db.execute("SELECT 1 FROM records LIMIT 1").fetchone():  # a store from before the index: say why we wait
            log.info("%s: adding index %s (once; about a second per million records)", path.name, name)
        db.execute(statement)


def has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None
