"""Following one local store for MQTT: its own cursor over the records, and the devices' folded
state, both kept in the store file itself (as the InfluxDB forwarder keeps its delivery state),
committed together in one transaction. So a restart, even after kill -9, resumes after the last
record it folded, with the counters' guards and Enphase's running totals intact, and never
publishes history again.

The publisher reads only what the ingest worker committed. One publisher at a time follows a
store (an flock on `<store>.mqtt.lock`, released by the kernel even on kill -9).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pvtap.files import open_private
from pvtap.mqtt.catalog import EXTRACTORS, DeviceRef, Facts, Reading, extract
from pvtap.mqtt.state import DeviceState
from pvtap.store.local import LocalStore
from pvtap.store.rows import RECORD_COLUMNS, record_from_row

log = logging.getLogger("pvtap.mqtt")

#: record ids read per step (a step is one short read; the loop stays responsive)
WINDOW = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mqtt_progress (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    cursor INTEGER NOT NULL  -- every record id up to here is folded into mqtt_devices
);
INSERT OR IGNORE INTO mqtt_progress (id, cursor) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS mqtt_devices (
    vendor TEXT NOT NULL,
    serial TEXT NOT NULL,
    state  TEXT NOT NULL,  -- DeviceState.to_json()
    PRIMARY KEY (vendor, serial)
);
CREATE TABLE IF NOT EXISTS mqtt_forget (
    serial       TEXT PRIMARY KEY,  -- `pvtap mqtt --forget`: the running publisher drops it
    requested_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mqtt_status (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    updated_ns   INTEGER NOT NULL,
    running      INTEGER NOT NULL,
    pid          INTEGER,
    publisher    TEXT NOT NULL,
    broker       TEXT NOT NULL,
    connected    INTEGER NOT NULL,
    published    INTEGER NOT NULL,  -- messages since the publisher started
    devices      INTEGER NOT NULL,
    last_error   TEXT,
    last_error_ns INTEGER
);
"""
_PROTOCOLS = tuple(EXTRACTORS)


class StoreTaken(RuntimeError):
    """Another process publishes this store."""


@dataclass(slots=True)
class Seen:
    """What a step saw of one device besides readings."""

    facts: list[Facts] = field(default_factory=list)
    heard_ns: int = 0  # the newest receive time of a payload it came in


@dataclass(frozen=True, slots=True)
class Step:
    readings: list[Reading]
    devices: dict[DeviceRef, Seen]
    cursor: int
    records: int  # records read (all of them, curated or not)


@dataclass(frozen=True, slots=True)
class MqttStatus:
    updated_ns: int
    running: bool
    pid: int | None
    publisher: str
    broker: str
    connected: bool
    published: int
    devices: int
    last_error: str | None
    last_error_ns: int | None
    cursor: int
    backlog: int  # records not read yet


class Follower:
    """One store: its records after the cursor, and the persisted device states."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd = _take_lock(self.path)
        try:
            LocalStore(self.path).close()  # the records schema exists
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.cursor = self._db.execute("SELECT cursor FROM mqtt_progress WHERE id=1").fetchone()[0]
        self.newest_seen = self.newest()  # the newest record id when last looked (for the backlog)

    def close(self) -> None:
        self._db.close()
        os.close(self._lock_fd)  # releases the flock

    def newest(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()[0]

    def step(self, window: int = WINDOW) -> Step | None:
        """The readings and facts of the next records (at most `window` ids); None when there are none."""
        newest = self.newest_seen = self.newest()
        if newest <= self.cursor:
            return None
        upto = min(newest, self.cursor + window)
        rows = self._db.execute(
            f"SELECT {_COLUMNS}, raw.received_ns FROM records r LEFT JOIN raw ON raw.id = r.raw_id"
            f" WHERE r.id > ? AND r.id <= ? AND r.protocol IN ({','.join('?' * len(_PROTOCOLS))}) ORDER BY r.id",
            (self.cursor, upto, *_PROTOCOLS)).fetchall()
        readings: list[Reading] = []
        devices: dict[DeviceRef, Seen] = {}
        for row in rows:
            try:
                found = extract(record_from_row(row[:8]))
            except (ValueError, TypeError, KeyError) as exc:  # a row this version cannot read: skip it
                log.warning("mqtt: %s: record skipped (%s: %s)", self.path.name, type(exc).__name__, exc)
                continue
            readings += found.readings
            for ref in {r.device for r in found.readings} | {f.device for f in found.facts}:
                seen = devices.setdefault(ref, Seen())
                seen.heard_ns = max(seen.heard_ns, row[8] or 0)
            for facts in found.facts:
                devices[facts.device].facts.append(facts)
        return Step(readings, devices, upto, len(rows))

    def load(self) -> list[DeviceState]:
        out = []
        for vendor, serial, doc in self._db.execute("SELECT vendor, serial, state FROM mqtt_devices"):
            try:
                out.append(DeviceState.from_json(DeviceRef(vendor, serial), json.loads(doc)))
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                log.warning("mqtt: %s: the saved state of %s %s is unreadable (%s); starting it anew",
                            self.path.name, vendor, serial, exc)
        return out

    def save(self, cursor: int, states: Sequence[DeviceState], forget: Sequence[DeviceRef] = ()) -> None:
        """The cursor and the states it led to, in one transaction."""
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO mqtt_devices (vendor, serial, state) VALUES (?,?,?)",
                                 [(s.device.vendor, s.device.serial, json.dumps(s.to_json())) for s in states])
            self._db.executemany("DELETE FROM mqtt_devices WHERE vendor=? AND serial=?",
                                 [(d.vendor, d.serial) for d in forget])
            self._db.execute("UPDATE mqtt_progress SET cursor=? WHERE id=1", (cursor,))
        self.cursor = cursor

    def forget_requests(self) -> list[str]:
        """Serials `pvtap mqtt --forget` asked to drop, taken (each is answered once)."""
        with self._transaction():
            serials = [s for (s,) in self._db.execute("SELECT serial FROM mqtt_forget")]
            self._db.execute("DELETE FROM mqtt_forget")
        return serials

    def write_status(self, publisher: str, broker: str, *, running: bool, connected: bool, published: int,
                     devices: int, last_error: str | None, last_error_ns: int | None) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO mqtt_status (id, updated_ns, running, pid, publisher, broker, connected,"
                " published, devices, last_error, last_error_ns) VALUES (1,?,?,?,?,?,?,?,?,?,?)",
                (time.time_ns(), int(running), os.getpid(), publisher, broker, int(connected), published, devices,
                 last_error, last_error_ns))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


_COLUMNS = ", ".join(f"r.{c.strip()}" for c in RECORD_COLUMNS.split(","))


def _take_lock(path: Path) -> int:
    lock = path.with_name(path.name + ".mqtt.lock")
    fd = open_private(lock)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreTaken(f"{path.name} is published to MQTT by another pvtap process (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def read_status(path: str | Path) -> MqttStatus | None:
    """The publisher's last status row of a store, read-only; None if none ever ran on it."""
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA busy_timeout=10000")
        names = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "mqtt_status" not in names:
            return None
        row = db.execute("SELECT updated_ns, running, pid, publisher, broker, connected, published, devices,"
                         " last_error, last_error_ns FROM mqtt_status WHERE id=1").fetchone()
        if row is None:
            return None
        cursor = db.execute("SELECT cursor FROM mqtt_progress WHERE id=1").fetchone()[0]
        newest = db.execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()[0]
        return MqttStatus(row[0], bool(row[1]), row[2], row[3], row[4], bool(row[5]), row[6], row[7], row[8], row[9],
                          cursor, max(0, newest - cursor))
    finally:
        db.close()


def request_forget(path: str | Path, serial: str) -> dict[DeviceRef, set[str]]:
    """For `pvtap mqtt --forget`: drop a device's saved state from a store and ask a running
    publisher to drop it too; returns the devices (by vendor) known there, with their sensors."""
    db = sqlite3.connect(Path(path), isolation_level=None, timeout=30.0)
    try:
        db.execute("PRAGMA busy_timeout=30000")
        db.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
        db.execute("BEGIN IMMEDIATE")
        known = {DeviceRef(v, s): set(json.loads(doc).get("sensors", {})) for v, s, doc in db.execute(
            "SELECT vendor, serial, state FROM mqtt_devices WHERE serial=?", (serial,))}
        db.execute("DELETE FROM mqtt_devices WHERE serial=?", (serial,))
        db.execute("INSERT OR REPLACE INTO mqtt_forget (serial, requested_ns) VALUES (?,?)", (serial, time.time_ns()))
        db.execute("COMMIT")
        return known
    finally:
        db.close()
