"""The embedded local store: one SQLite file per ingest worker.

Raw first: what the relay and the addon capture is archived here (redacted) as soon as it is
framed, in group commits; decoding follows the archive with its own cursor and commits the
records, their payload's decode error and the cursor together (pvtap/store/schema.py). So an
overload or a stop costs decode latency, never data, and `pvtap replay` can decode every payload
again with newer decoders. Everything decoded is committed here before anything else happens to
it (invariant 3). WAL mode lets `pvtap tail` and the InfluxDB forwarder read while the worker
writes. Ids only ever grow (AUTOINCREMENT), so a reader can follow a table with a cursor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import orjson

from pvtap.files import private_dir, private_file
from pvtap.records import Origin, RawPayload, Record, from_ns, to_ns
from pvtap.store.rows import RECORD_COLUMNS, record_from_row, record_row
from pvtap.store.schema import SCHEMA_VERSION, check_readable, create_or_migrate, has_table

__all__ = ["SCHEMA_VERSION", "SUFFIX", "Decoded", "IngestStatus", "LocalStore", "StoredRaw", "StoredRecord",
           "open_stores", "store_paths"]

SUFFIX = ".sqlite"


@dataclass(frozen=True, slots=True)
class StoredRecord:
    id: int
    raw_id: int | None
    record: Record


class StoredRaw(NamedTuple):
    """An archived payload as read back (a tuple: the decoder reads thousands a second)."""

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


@dataclass(frozen=True, slots=True)
class Decoded:
    """The outcome of decoding one archived payload: its records, or the decoder's error."""

    raw_id: int
    records: Sequence[Record]
    error: str | None = None


class LocalStore:
    """A SQLite store file. Writes are serialised by a lock; one writing process per file (the
    ingest worker that owns it), any number of readers."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()  # reads that decide what to write take it too
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no local store at {self.path}")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout=10000")
            try:
                check_readable(self._db, self.path)
            except BaseException:
                self._db.close()
                raise
            return
        if not self.path.exists():
            _create(self.path)
        private_file(self.path)  # 0600 before SQLite makes the -wal and -shm files with the same mode
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            create_or_migrate(self._db, self.path)
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def for_process(cls, data_dir: str | Path, name: str) -> LocalStore:
        """The store a producing process (`enphase`, `relay`, …) writes to."""
        return cls(private_dir(data_dir) / f"{name}{SUFFIX}")

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
                if self._db.in_transaction:  # SQLite may have rolled back by itself (e.g. SQLITE_FULL)
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def archive(self, raws: Sequence[RawPayload], records: Iterable[Record] = ()) -> list[int]:
        """Commit redacted payloads to the raw archive (and `records` that need no decoding, such
        as connection records) in one transaction; returns the payloads' ids. Decoding follows
        later (`pending`, `commit_decoded`)."""
        rows = [_raw_row(raw) for raw in raws]
        record_rows = [(None, *record_row(r)) for r in records]
        with self._transaction():
            ids = _insert(self._db, _RAW, rows, returning=True)
            _insert(self._db, _RECORDS, record_rows)
        return ids

    def decode_cursor(self) -> int:
        """Every raw payload id up to this one has been decoded."""
        with self._lock:
            return self._decode_cursor()

    def _decode_cursor(self) -> int:
        if not has_table(self._db, "decoding"):  # a version 1 file opened read-only: all decoded
            return self._db.execute("SELECT COALESCE(MAX(id), 0) FROM raw").fetchone()[0]
        return self._db.execute("SELECT cursor FROM decoding WHERE id=1").fetchone()[0]

    def newest_raw_id(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(id), 0) FROM raw").fetchone()[0]

    def decode_backlog(self) -> int:
        """Archived payloads waiting to be decoded."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM raw WHERE id > ?", (self._decode_cursor(),)).fetchone()[0]

    def pending(self, limit: int) -> list[StoredRaw]:
        """The next payloads to decode, oldest first."""
        with self._lock:  # never inside another thread's open transaction on this connection
            rows = self._db.execute(f"SELECT {_RAW_COLUMNS} FROM raw WHERE id > ? ORDER BY id LIMIT ?",
                                    (self._decode_cursor(), limit)).fetchall()
        return [_stored_raw(row) for row in rows]

    def commit_decoded(self, decoded: Sequence[Decoded], cursor: int) -> int:
        """Store what decoding the payloads up to `cursor` gave (records, decode errors) and move
        the decode cursor there, in one transaction: a crash leaves all of it or none, so nothing
        is decoded twice or skipped. Returns the records written."""
        rows = [(d.raw_id, *record_row(r)) for d in decoded for r in d.records]
        errors = [(d.error, d.raw_id) for d in decoded if d.error is not None]
        with self._transaction():
            _insert(self._db, _RECORDS, rows)
            if errors:
                self._db.executemany("UPDATE raw SET decode_error=? WHERE id=?", errors)
            self._db.execute("UPDATE decoding SET cursor=MAX(cursor, ?) WHERE id=1", (cursor,))
        return len(rows)

    def add_raw(self, raw: RawPayload, decode_error: str | None = None, records: Iterable[Record] = ()) -> int:
        """Commit a payload decoded elsewhere together with its records (or its error), as
        decoded, in one transaction; returns its id. Only while no archived payload waits to be
        decoded (else the decoder's order would break): ValueError then."""
        record_rows = [tuple(record_row(r)) for r in records]
        with self._transaction():
            cursor = self._db.execute("SELECT cursor FROM decoding WHERE id=1").fetchone()[0]
            newest = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM raw").fetchone()[0]
            if cursor < newest:
                raise ValueError(f"{newest - cursor} archived payloads wait to be decoded; archive() this one too")
            row = _raw_row(raw)
            (raw_id,) = _insert(self._db, _RAW, [(*row[:-1], decode_error)], returning=True)
            _insert(self._db, _RECORDS, [(raw_id, *r) for r in record_rows])
            self._db.execute("UPDATE decoding SET cursor=? WHERE id=1", (raw_id,))
        return raw_id

    def set_decode_error(self, raw_id: int, decode_error: str | None) -> None:
        with self._transaction():
            self._db.execute("UPDATE raw SET decode_error=? WHERE id=?", (decode_error, raw_id))

    def append(self, records: Iterable[Record], raw_id: int | None = None) -> int:
        """Commit records in one transaction; returns how many were written."""
        rows = [(raw_id, *record_row(r)) for r in records]
        if not rows:
            return 0
        with self._transaction():
            _insert(self._db, _RECORDS, rows)
        return len(rows)

    def replace_records(self, raw_id: int, records: Sequence[Record], decode_error: str | None) -> bool:
        """Make `records` the ones decoded from `raw_id`. Returns False when nothing changed,
        so replaying the same payload with the same decoders leaves the store untouched."""
        new_rows = [(raw_id, *record_row(r)) for r in records]  # inserted in the decoder's order
        with self._transaction():
            old_rows = sorted(tuple(row) for row in self._db.execute(
                f"SELECT raw_id, {RECORD_COLUMNS} FROM records WHERE raw_id=?", (raw_id,)))
            old_error = self._db.execute("SELECT decode_error FROM raw WHERE id=?", (raw_id,)).fetchone()
            if old_rows == sorted(new_rows) and old_error is not None and old_error[0] == decode_error:
                return False
            self._db.execute("DELETE FROM records WHERE raw_id=?", (raw_id,))
            _insert(self._db, _RECORDS, new_rows)
            self._db.execute("UPDATE raw SET decode_error=? WHERE id=?", (decode_error, raw_id))
        return True

    def write_status(self, status: IngestStatus) -> None:
        """Replace the ingest worker's status row (read by `pvtap status`)."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO ingest_status (id, updated_ns, running, pid, dropped_copies, decode_backlog,"
                " forwarder, forwarder_error, counts) VALUES (1,?,?,?,?,?,?,?,?)",
                (time.time_ns(), int(status.running), status.pid, status.dropped_copies, status.decode_backlog,
                 status.forwarder, status.forwarder_error, json.dumps(status.counts, sort_keys=True)))

    def note_lost(self, at_stop: int, total: int) -> None:
        """The forwarding process, after its worker ended: `at_stop` copies the worker got were
        not archived (it had to be killed), `total` with those lost before (crashes). Noted in
        the worker's last status row, which now says it is not running (pvtap status)."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO ingest_status (id, updated_ns, running, counts) VALUES (1, ?, 0,"
                " json_object('lost_at_stop', ?, 'parent_copies_lost', ?)) ON CONFLICT (id) DO UPDATE SET running=0,"
                " updated_ns=excluded.updated_ns,"
                " counts=json_set(counts, '$.lost_at_stop', ?, '$.parent_copies_lost', ?)",
                (time.time_ns(), at_stop, total, at_stop, total))

    def status(self) -> IngestStatus | None:
        """The ingest worker's last status row; None if no worker has written one."""
        if not has_table(self._db, "ingest_status"):
            return None
        row = self._db.execute("SELECT updated_ns, running, pid, dropped_copies, decode_backlog, forwarder,"
                               " forwarder_error, counts FROM ingest_status WHERE id=1").fetchone()
        if row is None:
            return None
        return IngestStatus(updated_ns=row[0], running=bool(row[1]), pid=row[2], dropped_copies=row[3],
                            decode_backlog=row[4], forwarder=row[5], forwarder_error=row[6], counts=json.loads(row[7]))

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
        sql = (f"SELECT id, raw_id, {RECORD_COLUMNS} FROM records WHERE {' AND '.join(where)} ORDER BY {order}")
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        for row in self._db.execute(sql, args):
            yield StoredRecord(id=row[0], raw_id=row[1], record=record_from_row(row[2:]))

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

    def raw_payloads(self, *, after_id: int = 0, upto_id: int | None = None) -> Iterator[StoredRaw]:
        """Raw payloads in id order (up to `upto_id`), read in batches: a large store is never
        held in memory and the caller may write (`replace_records`) between items."""
        upto = upto_id if upto_id is not None else 2**63 - 1
        while True:
            rows = self._db.execute(f"SELECT {_RAW_COLUMNS} FROM raw WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                                    (after_id, upto, _RAW_BATCH)).fetchall()
            if not rows:
                return
            yield from (_stored_raw(row) for row in rows)
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


@dataclass(frozen=True, slots=True)
class IngestStatus:
    """What the ingest worker last said about itself (written every few seconds and at stop)."""

    running: bool
    pid: int | None
    dropped_copies: int
    decode_backlog: int
    forwarder: str = "off"
    forwarder_error: str | None = None
    counts: dict = dataclasses.field(default_factory=dict)
    updated_ns: int = 0


def _create(path: Path) -> None:
    """A new store appears whole: made under another name (0600, WAL, the schema) and linked
    into place, so a reader never opens a file without tables. If another process got there
    first, its file stays."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    private_file(tmp)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        create_or_migrate(db, tmp)
    finally:
        db.close()
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def store_paths(data_dir: str | Path) -> list[Path]:
    """Every local store file in a data directory, in name order."""
    return sorted(Path(data_dir).glob(f"*{SUFFIX}"))


def open_stores(data_dir: str | Path) -> list[LocalStore]:
    """Read-only handles on every store in `data_dir`, for the CLI."""
    return [LocalStore(p, readonly=True) for p in store_paths(data_dir)]


_RAW_BATCH = 256

_RECORDS = f"records (raw_id, {RECORD_COLUMNS})"
_RAW = "raw (received_ns, protocol, kind, device, connection, direction, meta, payload, decode_error)"

#: rows per INSERT statement. One multi-row INSERT per chunk rather than one execution per row
#: (executemany): SQLite then reads and writes the AUTOINCREMENT counter and sets the statement
#: up once per chunk, which took about a third of a record's append. 256 rows of 10 values
#: stay far below SQLite's 32,766 bound variables.
_CHUNK = 256


def _insert(db: sqlite3.Connection, into: str, rows: Sequence[tuple], *, returning: bool = False) -> list[int]:
    """Insert `rows` (all of one width) in their order, in multi-row statements: full chunks,
    then the rest in power-of-two parts, so a connection compiles a handful of statements
    (sqlite3 caches them) whatever the batch size. With `returning`, the new ids in row order."""
    ids: list[int] = []
    start = 0
    while start < len(rows):
        left = len(rows) - start
        n = _CHUNK if left >= _CHUNK else 1 << (left.bit_length() - 1)
        values = list(itertools.chain.from_iterable(rows[start:start + n]))
        cursor = db.execute(_insert_sql(into, len(rows[start]), n, returning), values)
        if returning:  # ids grow in the order SQLite inserts the VALUES rows; RETURNING's order is unspecified
            ids += sorted(row[0] for row in cursor)
        start += n
    return ids


@functools.cache
def _insert_sql(into: str, width: int, n: int, returning: bool) -> str:
    row = f"({','.join('?' * width)})"
    return f"INSERT INTO {into} VALUES {','.join([row] * n)}{' RETURNING id' if returning else ''}"


_RAW_COLUMNS = "id, received_ns, protocol, kind, device, connection, direction, meta, payload, decode_error"


def _raw_row(raw: RawPayload) -> tuple:
    o = raw.origin
    return (to_ns(raw.received), o.protocol, raw.kind, o.device, o.connection, o.direction, _meta_json(raw.meta),
            bytes(raw.payload), None)


def _meta_json(meta: Mapping) -> str:
    """A payload's meta as JSON with sorted keys. orjson takes a tenth of the standard library's
    time (which was most of a payload's archive row); the standard library encodes what orjson
    would not keep: an integer beyond 64 bits (orjson refuses it) and NaN or ±inf (orjson writes
    them as null, so any null sends the meta the slow way)."""
    meta = meta if type(meta) is dict else dict(meta)
    try:
        text = orjson.dumps(meta, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        text = b"null"
    if b"null" not in text:
        return text.decode()
    return json.dumps(meta, sort_keys=True)


#: meta values orjson reads as the standard library does (it makes a float of an integer beyond
#: 64 bits, and refuses NaN, ±Infinity and lone surrogates)
_ORJSON_EXACT = (str, int, bool, type(None))


def _meta_from_json(text: str) -> dict:
    """A payload's meta as `_meta_json` wrote it: orjson's reading when it holds only strings,
    integers, booleans and nulls (a third of the standard library's time, which was a fifth of
    reading a payload back to decode it), else the standard library's."""
    try:
        meta = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
    if type(meta) is not dict or any(type(value) not in _ORJSON_EXACT for value in meta.values()):
        return json.loads(text)
    return meta


@functools.lru_cache(maxsize=4096)
def _origin(protocol: str, device: str, connection: str, direction: str) -> Origin:
    """Origins are immutable: the payloads read back of one connection and direction share one."""
    return Origin(protocol, device, connection, direction)


def _stored_raw(row: Sequence) -> StoredRaw:
    origin = _origin(row[2], row[4], row[5], row[6])
    raw = RawPayload(origin=origin, kind=row[3], payload=bytes(row[8]), received=from_ns(row[1]),
                     meta=_meta_from_json(row[7]))
    return StoredRaw(id=row[0], raw=raw, decode_error=row[9])


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
