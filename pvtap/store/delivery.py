"""Delivery state of a local store, kept in the store's own SQLite file.

The forwarder's progress lives next to the records it is about, so a crash can never separate
them: a `delivery` row holds the cursor (every record id up to it has been accepted by InfluxDB
or moved to `deadletters`), the totals and the last success and error; `delivery_batches` keeps
an hour of accepted batch sizes for the delivery rate; `deadletters` holds rejected records (a
copy, so pruning the records table never loses one) with the server's message; `field_types`
remembers the first type written for each (measurement, field), so a field never flips between
integer and float. Record ids only grow (AUTOINCREMENT), which is what makes a cursor enough.

`DeliveryLog` opens its own connection, so a forwarder thread never shares the producer's.
`read_status` works on a read-only handle and on stores no forwarder has touched yet.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pvtap.records import Record, from_ns
from pvtap.store.rows import RECORD_COLUMNS, record_from_row, record_row
from pvtap.store.schema import has_table

log = logging.getLogger("pvtap.forward")

TARGET = "influx"
RATE_WINDOW_NS = 3600 * 1_000_000_000
#: the records after the cursor; counted on the ids-only index records_undelivered (store/schema.py)
BACKLOG_SQL = "SELECT COUNT(*) FROM records WHERE id > ?"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS delivery (
    target          TEXT PRIMARY KEY,
    cursor          INTEGER NOT NULL DEFAULT 0,
    delivered       INTEGER NOT NULL DEFAULT 0,
    dropped         INTEGER NOT NULL DEFAULT 0,
    destination     TEXT    NOT NULL DEFAULT '',
    last_success_ns INTEGER,
    last_error_ns   INTEGER,
    last_error      TEXT
);
CREATE TABLE IF NOT EXISTS delivery_batches (
    time_ns INTEGER NOT NULL,
    records INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS delivery_batches_time ON delivery_batches(time_ns);
CREATE TABLE IF NOT EXISTS deadletters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id   INTEGER NOT NULL,
    rejected_ns INTEGER NOT NULL,
    status      INTEGER,
    message     TEXT    NOT NULL,
    line        TEXT,
    requeued    INTEGER NOT NULL DEFAULT 0,
    time_ns     INTEGER NOT NULL,
    measurement TEXT    NOT NULL,
    tags        TEXT    NOT NULL,
    fields      TEXT    NOT NULL,
    protocol    TEXT    NOT NULL,
    device      TEXT    NOT NULL DEFAULT '',
    connection  TEXT    NOT NULL DEFAULT '',
    direction   TEXT    NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS field_types (
    measurement TEXT NOT NULL,
    field       TEXT NOT NULL,
    type        TEXT NOT NULL,
    PRIMARY KEY (measurement, field)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Item:
    """One record on its way: `key` is its records.id, or its deadletters.id when requeued.
    `row` holds its stored columns (_COLUMNS); the forwarder builds lines straight from them."""

    key: int
    row: tuple

    @property
    def record(self) -> Record:
        return record_from_row(self.row)

    @classmethod
    def of(cls, key: int, record: Record) -> Item:
        return cls(key, record_row(record))


@dataclass(frozen=True, slots=True)
class Rejection:
    item: Item
    status: int | None  # HTTP status; None when pvtap refused the record itself
    message: str
    line: str | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    record_id: int
    rejected_ns: int
    status: int | None
    message: str
    line: str | None
    requeued: bool
    record: Record


@dataclass(frozen=True, slots=True)
class DeliveryStatus:
    store: str
    forwarded: bool  # False when no forwarder ever ran on this store
    destination: str
    cursor: int
    backlog: int
    oldest_id: int | None
    oldest_time_ns: int | None
    delivered: int
    dropped: int
    deadletters: int
    requeued: int
    last_success_ns: int | None
    last_error_ns: int | None
    last_error: str | None
    rate_1m: float
    rate_10m: float
    size_bytes: int


class DeliveryLog:
    """Read-write access to one store's delivery state, on a connection of its own."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        ensure_schema(self._db)
        self._db.execute("INSERT OR IGNORE INTO delivery (target) VALUES (?)", (TARGET,))

    def close(self) -> None:
        self._db.close()

    # -- reading work ----------------------------------------------------------------------

    def cursor(self) -> int:
        return self._db.execute("SELECT cursor FROM delivery WHERE target=?", (TARGET,)).fetchone()[0]

    def pending(self, limit: int) -> list[Item]:
        """The next undelivered records, oldest id first."""
        rows = self._db.execute(
            f"SELECT id, {_COLUMNS} FROM records WHERE id > ? ORDER BY id LIMIT ?", (self.cursor(), limit))
        return [Item(row[0], row[1:]) for row in rows]

    def backlog(self) -> int:
        return self._db.execute(BACKLOG_SQL, (self.cursor(),)).fetchone()[0]

    def requeued(self, limit: int) -> list[Item]:
        rows = self._db.execute(
            f"SELECT id, {_COLUMNS} FROM deadletters WHERE requeued=1 ORDER BY id LIMIT ?", (limit,))
        return [Item(row[0], row[1:]) for row in rows]

    def field_types(self) -> dict[tuple[str, str], str]:
        return {(m, f): t for m, f, t in self._db.execute("SELECT measurement, field, type FROM field_types")}

    def remember_types(self, types: dict[tuple[str, str], str]) -> None:
        """Persist first-seen field types before a line using them is sent."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR IGNORE INTO field_types (measurement, field, type) VALUES (?,?,?)",
                                 [(m, f, t) for (m, f), t in types.items()])

    # -- recording outcomes ------------------------------------------------------------------

    def commit_records(self, items: Sequence[Item], rejected: Sequence[Rejection], destination: str) -> None:
        """Items (a run of pending records starting right after the cursor) were accepted by the
        server, except `rejected`, which go to the dead letters. One transaction: the cursor, the
        dead letters and the counters move together or not at all."""
        now = time.time_ns()
        accepted = len(items) - len(rejected)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(_INSERT_DEADLETTER, [_deadletter_row(r, r.item.key, now) for r in rejected])
            self._db.execute(
                "UPDATE delivery SET cursor=MAX(cursor, ?), delivered=delivered+?, destination=?,"
                " last_success_ns=CASE WHEN ? > 0 THEN ? ELSE last_success_ns END WHERE target=?",
                (items[-1].key, accepted, destination, accepted, now, TARGET))
            if accepted:
                self._db.execute("INSERT INTO delivery_batches (time_ns, records) VALUES (?,?)", (now, accepted))

    def commit_requeued(self, items: Sequence[Item], rejected: Sequence[Rejection], destination: str) -> None:
        """Requeued dead letters were accepted (deleted here) or rejected again (kept, with the new
        message, no longer queued)."""
        now = time.time_ns()
        again = {r.item.key for r in rejected}
        accepted = [i.key for i in items if i.key not in again]
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM deadletters WHERE id=?", [(k,) for k in accepted])
            self._db.executemany(
                "UPDATE deadletters SET requeued=0, rejected_ns=?, status=?, message=?, line=? WHERE id=?",
                [(now, r.status, r.message, r.line, r.item.key) for r in rejected])
            self._db.execute(
                "UPDATE delivery SET delivered=delivered+?, destination=?,"
                " last_success_ns=CASE WHEN ? > 0 THEN ? ELSE last_success_ns END WHERE target=?",
                (len(accepted), destination, len(accepted), now, TARGET))
            if accepted:
                self._db.execute("INSERT INTO delivery_batches (time_ns, records) VALUES (?,?)", (now, len(accepted)))

    def note_error(self, message: str, destination: str) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE delivery SET last_error_ns=?, last_error=?, destination=? WHERE target=?",
                             (time.time_ns(), message, destination, TARGET))

    def forget_old_batches(self) -> None:
        with self._db:
            self._db.execute("DELETE FROM delivery_batches WHERE time_ns < ?", (time.time_ns() - RATE_WINDOW_NS,))

    # -- the disk bound -------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes of the database holding data (free pages are reused, so the file stops there)."""
        return used_bytes(self._db)

    def prune(self, max_bytes: int, undelivered: str = "drop", chunk: int = 2000) -> tuple[int, int]:
        """Bring the store under `max_bytes`: delivered records (and raw payloads none of whose
        records is still waiting) go first, oldest first. If that is not enough, `undelivered`
        says what happens to the oldest undelivered records: "drop" them (an error with the
        count), "keep" them (an error: the store grows past its bound) or leave them for "later"
        (delivery is working, so they become delivered, then prunable, soon). Returns
        (delivered, undelivered) records pruned."""
        if not max_bytes or self.used_bytes() <= max_bytes:
            return 0, 0
        goal = int(max_bytes * 0.9)  # a little headroom, so pruning is not needed on every append
        delivered = dropped = 0
        while self.used_bytes() > goal:
            n = self._delete_chunk(delivered_only=True, chunk=chunk)
            if n == 0:
                break
            delivered += n
        if delivered:
            log.info("%s: pruned %d delivered records to stay under %.1f MiB", self.path.name, delivered,
                     max_bytes / 2**20)
        if self.used_bytes() > goal and undelivered == "drop":
            while self.used_bytes() > goal:
                n = self._delete_chunk(delivered_only=False, chunk=chunk)
                if n == 0:
                    break
                dropped += n
            if dropped:
                oldest = self._db.execute("SELECT MIN(time_ns) FROM records").fetchone()[0]
                log.error("%s: over its bound of %.1f MiB even without delivered rows: DROPPED %d undelivered "
                          "records that never reached InfluxDB (oldest record kept is from %s); raise "
                          "influx.max_store_mb or fix the delivery (pvtap status)", self.path.name,
                          max_bytes / 2**20, dropped, _iso(oldest))
        elif self.used_bytes() > max_bytes and undelivered == "keep":
            log.error("%s: %.1f MiB is over its bound of %.1f MiB and %d undelivered records are kept "
                      "(influx.prune_undelivered = false); the store keeps growing until InfluxDB accepts them",
                      self.path.name, self.used_bytes() / 2**20, max_bytes / 2**20, self.backlog())
        return delivered, dropped

    def _delete_chunk(self, *, delivered_only: bool, chunk: int) -> int:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cursor = self.cursor()
            where = "id <= ?" if delivered_only else "id > ?"
            row = self._db.execute(
                f"SELECT COUNT(*), MAX(id), MAX(raw_id) FROM (SELECT id, raw_id FROM records WHERE {where}"
                f" ORDER BY id LIMIT ?)", (cursor, chunk)).fetchone()
            count, last_id, last_raw = row
            if not count:
                # no records left on this side: raw payloads older than every remaining record can go
                return self._delete_old_raw(chunk) if delivered_only else 0
            lo = 0 if delivered_only else cursor
            self._db.execute("DELETE FROM records WHERE id > ? AND id <= ?", (lo, last_id))
            if not delivered_only:
                self._db.execute("UPDATE delivery SET cursor=?, dropped=dropped+? WHERE target=?",
                                 (last_id, count, TARGET))
            if last_raw is not None:
                self._db.execute("DELETE FROM raw WHERE id <= ? AND NOT EXISTS "
                                 "(SELECT 1 FROM records WHERE records.raw_id = raw.id)", (last_raw,))
            return count

    def _delete_old_raw(self, chunk: int) -> int:
        """Raw payloads older than the oldest remaining record (or all, if none remain), oldest first."""
        oldest_ref = self._db.execute("SELECT MIN(raw_id) FROM records").fetchone()[0]
        upto = self._db.execute(
            "SELECT MAX(id) FROM (SELECT id FROM raw WHERE id < COALESCE(?, 9223372036854775807)"
            " ORDER BY id LIMIT ?)", (oldest_ref, chunk)).fetchone()[0]
        if upto is None:
            return 0
        return self._db.execute("DELETE FROM raw WHERE id <= ?", (upto,)).rowcount

    # -- dead letters ------------------------------------------------------------------------

    def requeue(self, ids: Iterable[int] = (), *, all_: bool = False) -> int:
        """Mark dead letters for another delivery attempt; returns how many were marked."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if all_:
                return self._db.execute("UPDATE deadletters SET requeued=1 WHERE requeued=0").rowcount
            return sum(self._db.execute("UPDATE deadletters SET requeued=1 WHERE id=? AND requeued=0",
                                        (i,)).rowcount for i in ids)


def ensure_schema(db: sqlite3.Connection) -> None:
    """Create the delivery tables in one transaction, so a reader sees all of them or none."""
    db.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")


def used_bytes(db: sqlite3.Connection) -> int:
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    return (pages - free) * page_size


def read_status(path: str | Path) -> DeliveryStatus:
    """The delivery state of a store, read-only; works before any forwarder has run."""
    path = Path(path)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA busy_timeout=10000")
        forwarded = has_table(db, "delivery")
        state = db.execute("SELECT cursor, delivered, dropped, destination, last_success_ns, last_error_ns,"
                           " last_error FROM delivery WHERE target=?", (TARGET,)).fetchone() if forwarded else None
        if state is None:
            state = (0, 0, 0, "", None, None, None)
        cursor = state[0]
        backlog = db.execute(BACKLOG_SQL, (cursor,)).fetchone()[0]
        # the oldest undelivered record is the one waiting longest: the lowest id after the cursor
        oldest = db.execute("SELECT id, time_ns FROM records WHERE id > ? ORDER BY id LIMIT 1", (cursor,)).fetchone()
        dead = requeued = 0
        rate_1m = rate_10m = 0.0
        if forwarded:
            dead, requeued = db.execute("SELECT COUNT(*), COALESCE(SUM(requeued), 0) FROM deadletters").fetchone()
            now = time.time_ns()
            for window, attr in ((60, "1m"), (600, "10m")):
                n = db.execute("SELECT COALESCE(SUM(records), 0) FROM delivery_batches WHERE time_ns >= ?",
                               (now - window * 1_000_000_000,)).fetchone()[0]
                if attr == "1m":
                    rate_1m = n / window
                else:
                    rate_10m = n / window
        return DeliveryStatus(
            store=path.name, forwarded=forwarded, destination=state[3], cursor=cursor, backlog=backlog,
            oldest_id=oldest[0] if oldest else None, oldest_time_ns=oldest[1] if oldest else None, delivered=state[1],
            dropped=state[2], deadletters=dead, requeued=requeued, last_success_ns=state[4],
            last_error_ns=state[5], last_error=state[6], rate_1m=rate_1m, rate_10m=rate_10m,
            size_bytes=used_bytes(db))
    finally:
        db.close()


def read_deadletters(path: str | Path, limit: int | None = None) -> list[DeadLetter]:
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        if not has_table(db, "deadletters"):
            return []
        sql = (f"SELECT id, record_id, rejected_ns, status, message, line, requeued, {_COLUMNS} FROM deadletters"
               " ORDER BY id" + (" LIMIT ?" if limit is not None else ""))
        rows = db.execute(sql, (limit,) if limit is not None else ())
        return [DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), record_from_row(r[7:])) for r in rows]
    finally:
        db.close()


_COLUMNS = RECORD_COLUMNS
_INSERT_DEADLETTER = (f"INSERT INTO deadletters (record_id, rejected_ns, status, message, line, {_COLUMNS})"
                      " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)")


def _deadletter_row(r: Rejection, record_id: int, now: int) -> tuple:
    return (record_id, now, r.status, r.message, r.line, *r.item.row)


def _iso(ns: int | None) -> str:
    if ns is None:
        return "-"
    return from_ns(ns).isoformat().replace("+00:00", "Z")
