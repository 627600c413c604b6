"""The delivery backlog (`pvtap status`, /readyz, the web view) is counted on an ids-only index,
not by walking the records table. A version 2 store made before the index still opens, read-only
as it is, and gets the index at its next writable open without a new schema version."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from pvtap.records import Origin, Record
from pvtap.store import schema
from pvtap.store.delivery import BACKLOG_SQL, DeliveryLog, read_status
from pvtap.store.local import LocalStore
from pvtap.store.rows import RECORD_COLUMNS

T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)
ORIGIN = Origin("alphaess", "ALSIM0000000001", "c-1", "up")
PENDING_SQL = f"SELECT id, {RECORD_COLUMNS} FROM records WHERE id > ? ORDER BY id LIMIT ?"


def records(n: int) -> list[Record]:
    return [Record("alphaess_power", T0 + timedelta(seconds=i), {"serial": "ALSIM0000000001"}, {"w": i}, ORIGIN)
            for i in range(n)]


def plan(path, sql: str, *args: object) -> str:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return " / ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args))
    finally:
        db.close()


def indexes(path) -> set[str]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    finally:
        db.close()


def test_a_new_store_counts_its_backlog_on_the_index(data_dir):
    with LocalStore.for_process(data_dir, "relay") as store:
        store.append(records(5))
        path = store.path
    assert plan(path, BACKLOG_SQL, 0) == "SEARCH records USING COVERING INDEX records_undelivered (id>?)"
    # the forwarder's read of the next batch stays on the table's own b-tree (one lookup per row, not two)
    assert plan(path, PENDING_SQL, 0, 10) == "SEARCH records USING INTEGER PRIMARY KEY (rowid>?)"
    assert read_status(path).backlog == 5


@pytest.fixture
def todays_v2_store(data_dir, monkeypatch):
    """A store as pvtap wrote it before the index: schema version 2, 7 records, 3 of them delivered."""
    with monkeypatch.context() as m:
        m.setattr(schema, "_INDEXES", [])
        with LocalStore.for_process(data_dir, "relay") as store:
            store.append(records(7))
            path = store.path
        log = DeliveryLog(path)
        log.commit_records(log.pending(3), [], "http://influx.test:8086")
        log.close()
    assert "records_undelivered" not in indexes(path)
    return path


def test_a_v2_store_from_before_the_index_opens_and_gets_it(todays_v2_store, caplog):
    path = todays_v2_store
    # read-only, as pvtap status finds it: the old plan, the same answer
    assert plan(path, BACKLOG_SQL, 3) == "SEARCH records USING INTEGER PRIMARY KEY (rowid>?)"
    before = read_status(path)
    assert (before.cursor, before.backlog, before.oldest_id) == (3, 4, 4)
    caplog.set_level("INFO", logger="pvtap.store.schema")
    with LocalStore(path) as store:  # the ingest worker's open
        assert store.decode_backlog() == 0
    assert "relay.sqlite: adding index records_undelivered (once" in caplog.text
    assert "records_undelivered" in indexes(path)
    assert plan(path, BACKLOG_SQL, 3) == "SEARCH records USING COVERING INDEX records_undelivered (id>?)"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 2  # an older pvtap reads it
    db.close()
    after = read_status(path)
    assert (after.cursor, after.backlog, after.oldest_id) == (3, 4, 4)
    caplog.clear()
    LocalStore(path).close()
    assert "adding index" not in caplog.text  # once
