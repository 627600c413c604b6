"""The embedded local store: one SQLite file per producing process.

Everything decoded is committed here before anything else happens to it (invariant 3), next to
the redacted raw payload it came from, so `pvtap replay` can decode it again with newer
decoders. WAL mode lets `pvtap tail` and the InfluxDB forwarder read while the producer writes.
Record ids only ever grow (AUTOINCREMENT), so a reader can follow the table with a cursor.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    def for_process(cls, data_dir: str | Path, name: str) -> LocalStore:
        """The store a producing process (`enphase`, `relay`, …) writes to."""
        return cls(Path(data_dir) / f"{name}{SUFFIX}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One atomic write. With isolation_level=None sqlite3 never opens a transaction itself,
        so `with connection:` alone would commit (and fsync) every statement on its own and let a
        reader see half a batch."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add_raw(self, raw: RawPayload, decode_error: str | None = None, records: Iterable[Record] = ()) -> int:
        """Commit a redacted raw payload and the records decoded from it, in one transaction (a
        reader or a replay never sees the payload without its records); returns its id."""
        o = raw.origin
        with self._transaction():
            cur = self._db.execute(
                "INSERT INTO raw (received_ns, protocol, kind, device, connection, direction, meta, payload,"
                " decode_error) VALUES (?,?,?,?,?,?,?,?,?)",
                (to_ns(raw.received), o.protocol, raw.kind, o.device, o.connection, o.direction,
                 json.dumps(dict(raw.meta), sort_keys=True), bytes(raw.payload), decode_error),
            )
            raw_id = cur.lastrowid
            assert raw_id is not None  # set by every INSERT
            self._db.executemany(_INSERT_RECORD, [_record_row(r, raw_id) for r in records])
            return raw_id

    def set_decode_error(self, raw_id: int, decode_error: str | None) -> None:
        with self._transaction():
            self._db.execute("UPDATE raw SET decode_error=? WHERE id=?", (decode_error, raw_id))

    def append(self, records: Iterable[Record], raw_id: int | None = None) -> int:
        """Commit records in one transaction; returns how many were written."""
        rows = [_record_row(r, raw_id) for r in records]
        if not rows:
            return 0
        with self._transaction():
            self._db.executemany(_INSERT_RECORD, rows)
        return len(rows)

    def replace_records(self, raw_id: int, records: Sequence[Record], decode_error: str | None) -> bool:
        """Make `records` the ones decoded from `raw_id`. Returns False when nothing changed,
        so replaying the same payload with the same decoders leaves the store untouched."""
        new_rows = [_record_row(r, raw_id) for r in records]  # inserted in the decoder's order
        with self._transaction():
            old_rows = sorted(tuple(row) for row in self._db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM records WHERE raw_id=?", (raw_id,)))
            old_error = self._db.execute("SELECT decode_error FROM raw WHERE id=?", (raw_id,)).fetchone()
            if old_rows == sorted(new_rows) and old_error is not None and old_error[0] == decode_error:
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
        devices: Sequence[str] = (),
        vendors: Sequence[str] = (),
        limit: int | None = None,
        newest_first: bool = False,
        by_time: bool = False,
    ) -> Iterator[StoredRecord]:
        """Stored records in id order (`by_time`: record-time order), streamed from the database;
        `devices` as `devices()` names them (a record of a connection counts for the device the
        connection revealed), `vendors` by protocol."""
        where, args = _filters(since_ns, until_ns, measurements, devices, vendors)
        where.append("id > ?")
        args.append(after_id)
        order = "time_ns, id" if by_time else "id"
        if newest_first:
            order = ", ".join(f"{column} DESC" for column in order.split(", "))
        sql = f"SELECT id, {_RECORD_COLUMNS} FROM records WHERE {' AND '.join(where)} ORDER BY {order}"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        for row in self._db.execute(sql, args):
            yield StoredRecord(id=row[0], raw_id=row[1], record=_record_from_row(row[1:]))

    def count_records(self, *, since_ns: int | None = None, until_ns: int | None = None,
                      measurements: Sequence[str] = (), devices: Sequence[str] = (),
                      vendors: Sequence[str] = ()) -> int:
        where, args = _filters(since_ns, until_ns, measurements, devices, vendors)
        return self._db.execute(f"SELECT COUNT(*) FROM records WHERE {' AND '.join(where)}", args).fetchone()[0]

    def keys(self, *, since_ns: int | None = None, until_ns: int | None = None,
             measurements: Sequence[str] = (), devices: Sequence[str] = (),
             vendors: Sequence[str] = ()) -> tuple[list[str], list[str]]:
        """(tag keys, field keys) used by the matching records, sorted: the columns of a CSV
        export, found by SQLite without loading the records."""
        where, args = _filters(since_ns, until_ns, measurements, devices, vendors)
        found = []
        for column in ("tags", "fields"):
            found.append([key for (key,) in self._db.execute(
                f"SELECT DISTINCT j.key FROM records, json_each(records.{column}) AS j"
                f" WHERE {' AND '.join(where)} ORDER BY j.key", args)])
        return found[0], found[1]

    def raw_payloads(self, *, after_id: int = 0) -> Iterator[StoredRaw]:
        """Raw payloads in id order, read in batches: a large store is never held in memory and
        the caller may write (`replace_records`) between items."""
        while True:
            rows = self._db.execute(
                "SELECT id, received_ns, protocol, kind, device, connection, direction, meta, payload, decode_error"
                " FROM raw WHERE id > ? ORDER BY id LIMIT ?", (after_id, _RAW_BATCH)
            ).fetchall()
            if not rows:
                return
            for row in rows:
                origin = Origin(protocol=row[2], device=row[4], connection=row[5], direction=row[6])
                raw = RawPayload(origin=origin, kind=row[3], payload=bytes(row[8]), received=from_ns(row[1]),
                                 meta=json.loads(row[7]))
                yield StoredRaw(id=row[0], raw=raw, decode_error=row[9])
            after_id = rows[-1][0]

    def count_raw(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM raw").fetchone()[0]

    def devices(self) -> list[DeviceSummary]:
        """One summary per device. Payloads and records of a connection sent before its device
        was known (an H1's version frame precedes its serial) count for the device the
        connection revealed; only those of connections that never revealed one stay under ''."""
        def grouped(table: str, columns: str) -> str:
            return (f"WITH revealed AS ({_REVEALED}) SELECT t.protocol, COALESCE(NULLIF(t.device, ''), rv.device, '')"
                    f" AS dev, {columns} FROM {table} AS t LEFT JOIN revealed AS rv ON t.device = ''"
                    " AND rv.protocol = t.protocol AND rv.connection = t.connection GROUP BY t.protocol, dev")

        records = {(p, d): (n, last) for p, d, n, last in self._db.execute(
            grouped("records", "COUNT(*), MAX(t.time_ns)"))}
        out = []
        for protocol, name, last, n_raw in self._db.execute(grouped("raw", "MAX(t.received_ns), COUNT(*)")):
            n, _ = records.pop((protocol, name), (0, None))
            out.append(DeviceSummary(protocol, name, last, n, n_raw))
        for (protocol, name), (n, last) in records.items():  # records stored without a raw payload
            out.append(DeviceSummary(protocol, name, last, n, 0))
        return out

    def measurements(self) -> list[str]:
        """Every measurement that has records, sorted."""
        return [name for (name,) in self._db.execute("SELECT DISTINCT measurement FROM records ORDER BY 1")]


def store_paths(data_dir: str | Path) -> list[Path]:
    """Every local store file in a data directory, in name order."""
    return sorted(Path(data_dir).glob(f"*{SUFFIX}"))


def open_stores(data_dir: str | Path) -> list[LocalStore]:
    """Read-only handles on every store in `data_dir`, for the CLI."""
    return [LocalStore(p, readonly=True) for p in store_paths(data_dir)]


_RAW_BATCH = 256

_RECORD_COLUMNS = "raw_id, time_ns, measurement, tags, fields, protocol, device, connection, direction"
_INSERT_RECORD = f"INSERT INTO records ({_RECORD_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)"


#: the device each connection revealed (for its rows stored before it did)
_REVEALED = ("SELECT protocol, connection, MAX(device) AS device FROM raw WHERE device != '' AND connection != ''"
             " GROUP BY protocol, connection")


def _filters(since_ns: int | None, until_ns: int | None, measurements: Sequence[str],
             devices: Sequence[str] = (), vendors: Sequence[str] = ()) -> tuple[list[str], list[int | str]]:
    where: list[str] = ["1"]
    args: list[int | str] = []
    if since_ns is not None:
        where.append("time_ns >= ?")
        args.append(since_ns)
    if until_ns is not None:
        where.append("time_ns < ?")
        args.append(until_ns)
    if measurements:
        where.append(f"measurement IN ({','.join('?' * len(measurements))})")
        args.extend(measurements)
    if vendors:
        where.append(f"protocol IN ({','.join('?' * len(vendors))})")
        args.extend(vendors)
    if devices:
        marks = ",".join("?" * len(devices))
        where.append(f"(device IN ({marks}) OR (device = '' AND connection != '' AND connection IN"
                     f" (SELECT connection FROM raw WHERE device IN ({marks}))))")
        args.extend([*devices, *devices])
    return where, args


def _record_row(r: Record, raw_id: int | None) -> tuple:
    o = r.origin
    return (raw_id, r.time_ns, r.measurement, json.dumps(dict(r.tags), sort_keys=True),
            json.dumps(dict(r.fields)), o.protocol, o.device, o.connection, o.direction)


def _record_from_row(row: Sequence) -> Record:
    _raw_id, time_ns, measurement, tags, fields, protocol, device, connection, direction = row
    return Record(measurement=measurement, time=from_ns(time_ns), tags=json.loads(tags), fields=json.loads(fields),
                  origin=Origin(protocol=protocol, device=device, connection=connection, direction=direction))
