"""The embedded local store: one SQLite file per producing process.

Everything decoded is committed here before anything else happens to it (invariant 3), next to
the redacted raw payload it came from, so `pvtap replay` can decode it again with newer
decoders. WAL mode lets `pvtap tail` and the InfluxDB forwarder read while the producer writes.
Record ids only ever grow (AUTOINCREMENT), so a reader can follow the table with a cursor.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pvtap.records import Origin, RawPayload, Record, from_ns, to_ns

SUFFIX = ".sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
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


@dataclass(frozen=True, slots=True)
class StoredRecord:
    id: int
    raw_id: int | None
    record: Record


@dataclass(frozen=True, slots=True)
class StoredRaw:
    id: int
    raw: RawPayload
    decode_error: str | None


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    protocol: str
    device: str
    last_contact_ns: int
    records: int
    raw_payloads: int


class LocalStore:
    """A SQLite store file. Writes are serialised by a lock; use one writer per file."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no local store at {self.path}")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db.execute("PRAGMA busy_timeout=10000")

    @classmethod
    def for_process(cls, data_dir: str | Path, name: str) -> "LocalStore":
        """The store a producing process (`enphase`, `relay`, …) writes to."""
        return cls(Path(data_dir) / f"{name}{SUFFIX}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "LocalStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------

    def add_raw(self, raw: RawPayload, decode_error: str | None = None) -> int:
        """Commit a redacted raw payload; returns its id."""
        o = raw.origin
        with self._lock, self._db:
            cur = self._db.execute(
                "INSERT INTO raw (received_ns, protocol, kind, device, connection, direction, meta, payload,"
                " decode_error) VALUES (?,?,?,?,?,?,?,?,?)",
                (to_ns(raw.received), o.protocol, raw.kind, o.device, o.connection, o.direction,
                 json.dumps(dict(raw.meta), sort_keys=True), bytes(raw.payload), decode_error),
            )
            return int(cur.lastrowid)

    def set_decode_error(self, raw_id: int, decode_error: str | None) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE raw SET decode_error=? WHERE id=?", (decode_error, raw_id))

    def append(self, records: Iterable[Record], raw_id: int | None = None) -> int:
        """Commit records in one transaction; returns how many were written."""
        rows = [_record_row(r, raw_id) for r in records]
        if not rows:
            return 0
        with self._lock, self._db:
            self._db.executemany(_INSERT_RECORD, rows)
        return len(rows)

    def replace_records(self, raw_id: int, records: Sequence[Record], decode_error: str | None) -> bool:
        """Make `records` the ones decoded from `raw_id`. Returns False when nothing changed,
        so replaying the same payload with the same decoders leaves the store untouched."""
        new_rows = sorted(_record_row(r, raw_id) for r in records)
        with self._lock, self._db:
            old_rows = sorted(tuple(row) for row in self._db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM records WHERE raw_id=?", (raw_id,)))
            old_error = self._db.execute("SELECT decode_error FROM raw WHERE id=?", (raw_id,)).fetchone()
            if old_rows == new_rows and old_error is not None and old_error[0] == decode_error:
                return False
            self._db.execute("DELETE FROM records WHERE raw_id=?", (raw_id,))
            self._db.executemany(_INSERT_RECORD, new_rows)
            self._db.execute("UPDATE raw SET decode_error=? WHERE id=?", (decode_error, raw_id))
        return True

    # -- reading ---------------------------------------------------------------------------

    def records(
        self,
        *,
        after_id: int = 0,
        since_ns: int | None = None,
        until_ns: int | None = None,
        measurements: Sequence[str] = (),
        limit: int | None = None,
        newest_first: bool = False,
    ) -> Iterator[StoredRecord]:
        where, args = ["id > ?"], [after_id]
        if since_ns is not None:
            where.append("time_ns >= ?")
            args.append(since_ns)
        if until_ns is not None:
            where.append("time_ns < ?")
            args.append(until_ns)
        if measurements:
            where.append(f"measurement IN ({','.join('?' * len(measurements))})")
            args.extend(measurements)
        sql = f"SELECT id, {_RECORD_COLUMNS} FROM records WHERE {' AND '.join(where)}"
        sql += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        for row in self._db.execute(sql, args):
            yield StoredRecord(id=row[0], raw_id=row[1], record=_record_from_row(row[1:]))

    def count_records(self, *, since_ns: int | None = None, until_ns: int | None = None,
                      measurements: Sequence[str] = ()) -> int:
        where, args = ["1"], []
        if since_ns is not None:
            where.append("time_ns >= ?")
            args.append(since_ns)
        if until_ns is not None:
            where.append("time_ns < ?")
            args.append(until_ns)
        if measurements:
            where.append(f"measurement IN ({','.join('?' * len(measurements))})")
            args.extend(measurements)
        return self._db.execute(f"SELECT COUNT(*) FROM records WHERE {' AND '.join(where)}", args).fetchone()[0]

    def raw_payloads(self, *, after_id: int = 0) -> Iterator[StoredRaw]:
        for row in self._db.execute(
            "SELECT id, received_ns, protocol, kind, device, connection, direction, meta, payload, decode_error"
            " FROM raw WHERE id > ? ORDER BY id", (after_id,)
        ).fetchall():
            origin = Origin(protocol=row[2], device=row[4], connection=row[5], direction=row[6])
            raw = RawPayload(origin=origin, kind=row[3], payload=bytes(row[8]), received=from_ns(row[1]),
                             meta=json.loads(row[7]))
            yield StoredRaw(id=row[0], raw=raw, decode_error=row[9])

    def count_raw(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM raw").fetchone()[0]

    def devices(self) -> list[DeviceSummary]:
        counts = {(p, d): n for p, d, n in self._db.execute(
            "SELECT protocol, device, COUNT(*) FROM records GROUP BY protocol, device")}
        out = []
        for protocol, device, last, n_raw in self._db.execute(
            "SELECT protocol, device, MAX(received_ns), COUNT(*) FROM raw GROUP BY protocol, device"
        ):
            out.append(DeviceSummary(protocol, device, last, counts.pop((protocol, device), 0), n_raw))
        for (protocol, device), n in counts.items():  # records stored without a raw payload
            last = self._db.execute(
                "SELECT MAX(time_ns) FROM records WHERE protocol=? AND device=?", (protocol, device)).fetchone()[0]
            out.append(DeviceSummary(protocol, device, last, n, 0))
        return out


def store_paths(data_dir: str | Path) -> list[Path]:
    """Every local store file in a data directory, in name order."""
    return sorted(Path(data_dir).glob(f"*{SUFFIX}"))


def open_stores(data_dir: str | Path) -> list[LocalStore]:
    """Read-only handles on every store in `data_dir`, for the CLI."""
    return [LocalStore(p, readonly=True) for p in store_paths(data_dir)]


_RECORD_COLUMNS = "raw_id, time_ns, measurement, tags, fields, protocol, device, connection, direction"
_INSERT_RECORD = f"INSERT INTO records ({_RECORD_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)"


def _record_row(r: Record, raw_id: int | None) -> tuple:
    o = r.origin
    return (raw_id, r.time_ns, r.measurement, json.dumps(dict(r.tags), sort_keys=True),
            json.dumps(dict(r.fields)), o.protocol, o.device, o.connection, o.direction)


def _record_from_row(row: Sequence) -> Record:
    _raw_id, time_ns, measurement, tags, fields, protocol, device, connection, direction = row
    return Record(measurement=measurement, time=from_ns(time_ns), tags=json.loads(tags), fields=json.loads(fields),
                  origin=Origin(protocol=protocol, device=device, connection=connection, direction=direction))
