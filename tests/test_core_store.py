"""The record model and the local SQLite store: exact round trips, WAL, monotonic ids, atomic
batches seen by a reader in another process, filters, replay idempotence, device summaries."""

from __future__ import annotations

import math
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from pvtap.records import FieldValue, Origin, RawPayload, Record, from_ns, to_ns, utc_from_unix
from pvtap.store.local import SCHEMA_VERSION, Decoded, IngestStatus, LocalStore, StoredRecord, open_stores, store_paths
from pvtap.store.schema import StoreVersionError

T0 = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
ENVOY = Origin("enphase", "SIM-ENVOY-0001", "flow-1", "up")


def rec(measurement: str = "m", minutes: float = 0, tags=None, fields=None, origin: Origin = ENVOY) -> Record:
    return Record(measurement, T0 + timedelta(minutes=minutes), tags if tags is not None else {"serial": "SIM-1"},
                  fields if fields is not None else {"v": 1}, origin)


def raw(payload: bytes = b"<report/>", minutes: float = 0, origin: Origin = ENVOY, kind: str = "performance_report",
        meta=None) -> RawPayload:
    return RawPayload(origin, kind, payload, T0 + timedelta(minutes=minutes), meta or {})


@pytest.fixture
def store(data_dir):
    with LocalStore.for_process(data_dir, "enphase") as s:
        yield s


# -- the record model -----------------------------------------------------------------------

def test_ns_conversions_are_exact():
    moment = datetime(2024, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert to_ns(moment) == 1_717_243_200_123_456_000
    assert from_ns(1_717_243_200_123_456_789) == moment  # below a microsecond is cut, not rounded
    before_epoch = datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert to_ns(before_epoch) == -1_000
    assert from_ns(-1_000) == before_epoch
    far = datetime(2200, 1, 1, tzinfo=UTC)
    assert from_ns(to_ns(far)) == far
    assert utc_from_unix(1_717_243_200) == T0


@pytest.mark.parametrize("kwargs, problem", [
    ({"measurement": ""}, "needs a measurement"),
    ({"time": datetime(2024, 6, 1, 12)}, "timezone-aware UTC"),
    ({"time": datetime(2024, 6, 1, 14, tzinfo=timezone(timedelta(hours=2)))}, "timezone-aware UTC"),
    ({"fields": {}}, "no fields"),
    ({"fields": {"v": float("nan")}}, "only finite floats"),
    ({"fields": {"v": float("inf")}}, "only finite floats"),
    ({"fields": {"v": None}}, "unsupported type NoneType"),
    ({"fields": {"v": b"bytes"}}, "unsupported type bytes"),
    ({"fields": {"": 1}}, "field name"),
    ({"tags": {"serial": 1}}, "must be a non-empty str key and a str value"),
    ({"tags": {"": "x"}}, "must be a non-empty str key and a str value"),
])
def test_record_rejects_what_a_store_could_not_keep(kwargs, problem):
    args = {"measurement": "m", "time": T0, "tags": {}, "fields": {"v": 1}, "origin": ENVOY, **kwargs}
    with pytest.raises(ValueError, match=problem):
        Record(**args)


# -- the store file -------------------------------------------------------------------------

def test_store_file_is_wal_with_schema_version(data_dir, store):
    assert store.path == data_dir / "enphase.sqlite"
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    db.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a commit survives power loss


FIELDS: dict[str, FieldValue] = {
    "true": True, "false": False,
    "zero": 0, "one": 1, "minus": -1,
    "int64_max": 2**63 - 1, "int64_min": -(2**63), "beyond_int64": 2**80,
    "float_one": 1.0, "float_zero": 0.0, "negative_zero": -0.0, "tenth": 0.1, "third": 1 / 3,
    "tiny": 5e-324, "huge": 1.7976931348623157e308, "big_whole": 1e16,
    "empty": "", "digits": "12", "word_true": "true",
    "unicode": "Überschuss ☀ 日本 🌞", "quotes": 'say "hi", it\'s', "escapes": "back\\slash\nnew\tline\x00nul",
}


def test_round_trip_keeps_every_value_and_type(store):
    origin = Origin("alphaess", "SIM-ALPHA-Ü1", "conn-7", "down")
    moment = datetime(2024, 6, 1, 12, 0, 0, 654321, tzinfo=UTC)
    original = Record("błąd ☀ m,easure", moment, {"serial": "SIM-1", "site": "dach süd", "k=v": "a,b c"},
                      FIELDS, origin)
    raw_id = store.add_raw(raw())
    assert store.append([original], raw_id=raw_id) == 1
    (stored,) = list(store.records())
    assert stored.raw_id == raw_id
    back = stored.record
    assert back == original
    for key, value in FIELDS.items():
        assert type(back.fields[key]) is type(value), key  # True stays bool, 1 stays int, 1.0 stays float
    assert math.copysign(1, back.fields["negative_zero"]) == -1
    assert list(back.fields) == list(FIELDS)  # field order as decoded
    assert back.origin == origin and back.time == moment


def test_raw_payload_round_trip(store):
    every_byte = bytes(range(256)) * 4
    meta = {"path": "/emu_reports/performance_report?webcomm_version=3.0", "status": 200, "ratio": 0.5,
            "gzip": False, "none": None, "ünï": "cödé"}
    original = raw(every_byte, origin=Origin("foxess", "SIM-FOX-1", "c1", "up"), kind="frame", meta=meta)
    raw_id = store.add_raw(original, decode_error="ValueError: bad CRC")
    (stored,) = list(store.raw_payloads())
    assert stored.id == raw_id
    assert stored.raw == original
    assert stored.raw.payload == every_byte
    assert stored.decode_error == "ValueError: bad CRC"
    store.set_decode_error(raw_id, None)
    assert next(store.raw_payloads()).decode_error is None
    assert store.count_raw() == 1


def test_raw_meta_keeps_values_a_fast_json_encoder_would_not(store):
    """orjson writes NaN and infinity as null and refuses integers beyond 64 bits: those metas
    must still come back as they went in."""
    metas: list[dict[str, object]] = [
             {"offset": math.nan}, {"offset": -math.inf, "none": None}, {"big": 2**70}, {"b": 1, "a": "null"},
             # orjson would read these back differently: integers beyond 64 bits as floats, and it
             # refuses a lone surrogate
             {"u64": 2**64 - 1, "past_u64": 2**64, "below_i64": -2**63 - 1}, {"s": "\ud800"},
             {"f": 0.1, "i": 2**63 - 1, "t": True, "n": None, "serial": "1234567890123456789012"}]
    store.archive([raw(meta=meta) for meta in metas])
    for back in ([stored.raw.meta for stored in store.raw_payloads()],
                 [stored.raw.meta for stored in store.pending(100)]):  # what the decoder reads
        assert math.isnan(back[0]["offset"]) and back[1:] == metas[1:]
        types = [{key: type(value) for key, value in m.items()} for m in back[1:]]
        assert types == [{key: type(value) for key, value in m.items()} for m in metas[1:]]  # 2**64 stays an int
        assert list(back[3]) == ["a", "b"]  # sorted keys


@pytest.mark.parametrize("n", [1, 255, 256, 257, 700])
def test_batches_across_insert_chunks_keep_their_order(store, n):
    """Rows go in multi-row INSERTs of up to 256: every batch size keeps ids and order."""
    ids = store.archive([raw(str(i).encode()) for i in range(n)])
    assert ids == list(range(ids[0], ids[0] + n))
    assert [stored.raw.payload for stored in store.raw_payloads()] == [str(i).encode() for i in range(n)]
    assert [stored.id for stored in store.raw_payloads()] == ids
    decoded = [Decoded(raw_id, [rec(minutes=i, fields={"i": i})]) for i, raw_id in enumerate(ids)]
    assert store.commit_decoded(decoded, cursor=ids[-1]) == n
    assert store.append([rec(minutes=n + i, fields={"i": n + i}) for i in range(n)]) == n
    stored = list(store.records())
    assert [s.record.fields["i"] for s in stored] == list(range(2 * n))
    assert [s.raw_id for s in stored] == [*ids, *[None] * n]
    assert [s.id for s in stored] == sorted(s.id for s in stored)


def test_ids_only_grow_and_are_never_reused(store):
    raw_id = store.add_raw(raw())
    store.append([rec(minutes=i) for i in range(3)], raw_id=raw_id)
    first = [s.id for s in store.records()]
    assert first == sorted(first) and len(set(first)) == 3
    # replacing the payload's records deletes the old rows; their ids must not come back
    assert store.replace_records(raw_id, [rec(minutes=9, fields={"v": 2})], None) is True
    (replaced,) = [s.id for s in store.records()]
    assert replaced > max(first)
    store.append([rec(minutes=10)])
    assert [s.id for s in store.records()][-1] > replaced
    # an aborted batch does not consume visible ids or leave rows behind
    with pytest.raises(sqlite3.IntegrityError):
        store.append([rec(minutes=11), rec(minutes=12)], raw_id=99_999)  # no such raw payload
    assert store.count_records() == 2


def test_append_empty_batch_writes_nothing(store):
    assert store.append([]) == 0
    assert store.count_records() == 0


def test_filters_and_orders(store):
    store.append([rec("a", 2), rec("b", 1), rec("a", 0), rec("c", 3)])  # stored out of time order
    ids = [s.id for s in store.records()]
    assert [s.record.measurement for s in store.records()] == ["a", "b", "a", "c"]
    assert [s.record.time for s in store.records(by_time=True)] == [T0 + timedelta(minutes=m) for m in range(4)]
    assert [s.id for s in store.records(newest_first=True)] == ids[::-1]
    assert [s.id for s in store.records(limit=2)] == ids[:2]
    assert [s.id for s in store.records(after_id=ids[1])] == ids[2:]
    since, until = to_ns(T0 + timedelta(minutes=1)), to_ns(T0 + timedelta(minutes=3))
    assert [s.record.measurement for s in store.records(since_ns=since, until_ns=until, by_time=True)] == ["b", "a"]
    assert [s.id for s in store.records(measurements=["a", "c"])] == [ids[0], ids[2], ids[3]]
    assert store.count_records() == 4
    assert store.count_records(since_ns=since) == 3  # since is inclusive
    assert store.count_records(until_ns=until) == 3  # until is exclusive
    assert store.count_records(measurements=["a"], since_ns=since) == 1


def test_keys_lists_tag_and_field_keys_of_matching_records(store):
    store.append([rec("a", 0, {"serial": "S", "phase": "1"}, {"p": 1.5, "q": 2}),
                  rec("b", 5, {"port": "1"}, {"soc": 50})])
    assert store.keys() == (["phase", "port", "serial"], ["p", "q", "soc"])
    assert store.keys(measurements=["b"]) == (["port"], ["soc"])
    assert store.keys(since_ns=to_ns(T0 + timedelta(minutes=10))) == ([], [])


def test_raw_payloads_streams_in_batches_and_tolerates_writes_in_between(store):
    ids = [store.add_raw(raw(f"payload {i}".encode(), minutes=i)) for i in range(300)]  # more than one batch of 256
    seen = []
    for stored in store.raw_payloads():
        seen.append(stored.id)
        # the replay pattern: write while iterating
        store.replace_records(stored.id, [rec(minutes=stored.id)], None)
    assert seen == ids
    assert store.count_records() == 300
    assert [s.id for s in store.raw_payloads(after_id=ids[-3])] == ids[-2:]


def test_replace_records_writes_only_on_change(store):
    raw_id = store.add_raw(raw())
    records = [rec("a", 0), rec("b", 1)]
    store.append(records, raw_id=raw_id)
    before = [s.id for s in store.records()]
    assert store.replace_records(raw_id, records[::-1], None) is False  # same set, any order
    assert [s.id for s in store.records()] == before
    assert store.replace_records(raw_id, [rec("a", 0), rec("b", 1, fields={"v": 2})], None) is True
    assert [s.record.fields for s in store.records()] == [{"v": 1}, {"v": 2}]
    assert store.replace_records(raw_id, [], "ValueError: now broken") is True
    assert store.count_records() == 0
    assert next(store.raw_payloads()).decode_error == "ValueError: now broken"
    assert store.replace_records(raw_id, [], "ValueError: now broken") is False
    assert store.replace_records(raw_id, [], "ValueError: other message") is True
    # records of other payloads are not touched
    other = store.add_raw(raw(b"other"))
    store.append([rec("c", 2)], raw_id=other)
    store.replace_records(raw_id, [rec("a", 0)], None)
    assert sorted(s.record.measurement for s in store.records()) == ["a", "c"]


def test_devices_summarises_per_protocol_and_device(store):
    envoy2 = Origin("enphase", "SIM-ENVOY-0002")
    r1 = store.add_raw(raw(minutes=0))
    store.add_raw(raw(minutes=5))
    store.append([rec(minutes=0), rec(minutes=1)], raw_id=r1)
    store.add_raw(raw(minutes=2, origin=envoy2))
    store.append([rec(minutes=30, origin=Origin("alphaess", "SIM-ALPHA-1"))])  # no raw payload at all
    by_key = {(d.protocol, d.device): d for d in store.devices()}
    assert set(by_key) == {("enphase", "SIM-ENVOY-0001"), ("enphase", "SIM-ENVOY-0002"), ("alphaess", "SIM-ALPHA-1")}
    envoy = by_key["enphase", "SIM-ENVOY-0001"]
    assert (envoy.last_contact_ns, envoy.records, envoy.raw_payloads) == (to_ns(T0 + timedelta(minutes=5)), 2, 2)
    two = by_key["enphase", "SIM-ENVOY-0002"]
    assert (two.last_contact_ns, two.records, two.raw_payloads) == (to_ns(T0 + timedelta(minutes=2)), 0, 1)
    alpha = by_key["alphaess", "SIM-ALPHA-1"]
    assert (alpha.last_contact_ns, alpha.records, alpha.raw_payloads) == (to_ns(T0 + timedelta(minutes=30)), 1, 0)


def test_readonly_handles(data_dir, store):
    store.append([rec()])
    LocalStore.for_process(data_dir, "relay").close()
    (data_dir / "notes.txt").write_text("not a store")
    assert store_paths(data_dir) == [data_dir / "enphase.sqlite", data_dir / "relay.sqlite"]
    readers = open_stores(data_dir)
    try:
        assert [r.readonly for r in readers] == [True, True]
        assert readers[0].count_records() == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            readers[0].append([rec()])
    finally:
        for r in readers:
            r.close()
    with pytest.raises(FileNotFoundError, match="no local store"):
        LocalStore(data_dir / "missing.sqlite", readonly=True)
    assert not (data_dir / "missing.sqlite").exists()


def test_readonly_open_after_the_writer_closed(data_dir):
    with LocalStore.for_process(data_dir, "enphase") as writer:
        writer.append([rec()])
    assert not (data_dir / "enphase.sqlite-wal").exists()  # the last close checkpointed it away
    with LocalStore(data_dir / "enphase.sqlite", readonly=True) as reader:
        assert [s.record for s in reader.records()] == [rec()]


WRITER = textwrap.dedent("""
    import sys, time
    from datetime import UTC, datetime, timedelta
    from pvtap.records import Origin, RawPayload, Record
    from pvtap.store.local import LocalStore
    path, batches, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    origin = Origin("enphase", "SIM-ENVOY-0001")
    t0 = datetime(2024, 6, 1, tzinfo=UTC)
    with LocalStore(path) as store:
        print("ready", flush=True)
        sys.stdin.readline()
        for b in range(batches):
            raw_id = store.add_raw(RawPayload(origin, "performance_report", b"x", t0))
            store.append([Record("m", t0 + timedelta(seconds=b), {"batch": str(b)}, {"i": i}, origin)
                          for i in range(size)], raw_id=raw_id)
            time.sleep(0.005)  # pace the batches so the reader's polls fall between and during them
""")


def test_reader_in_another_process_sees_whole_batches_in_id_order(data_dir):
    """A writer process appends batches while this process follows with an id cursor: every
    batch appears whole (one transaction), ids only grow, nothing is seen twice or missed."""
    path = data_dir / "enphase.sqlite"
    batches, size = 60, 25
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(batches), str(size)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdin is not None and writer.stdout is not None
    try:
        assert writer.stdout.readline().strip() == "ready"
        reader = LocalStore(path, readonly=True)
        writer.stdin.write("go\n")
        writer.stdin.flush()
        cursor, observed_counts = 0, set()
        seen: list[StoredRecord] = []
        deadline = time.monotonic() + 60
        while len(seen) < batches * size and time.monotonic() < deadline:
            new = list(reader.records(after_id=cursor))
            for s in new:
                seen.append(s)
            if new:
                cursor = new[-1].id
                observed_counts.add(len(seen))
                assert len(seen) % size == 0, f"saw half a batch: {len(seen)} records"
            time.sleep(0.002)  # the reader polls as `tail --follow` does: the polling is what is tested
        assert writer.wait(30) == 0
        reader.close()
    finally:
        writer.kill()
    ids = [s.id for s in seen]
    assert ids == sorted(set(ids)) and len(ids) == batches * size
    assert [(s.record.tags["batch"], s.record.fields["i"]) for s in seen] == [
        (str(b), i) for b in range(batches) for i in range(size)]
    assert len(observed_counts) > 3, "the reader never overlapped the writer"


# -- raw first: the archive, the decode cursor, group commits ---------------------------------

def test_archive_then_decode_follows_with_a_cursor(store):
    ids = store.archive([raw(b"a"), raw(b"b"), raw(b"c")], records=[rec("pvtap_connection")])
    assert ids == sorted(ids) and len(ids) == 3
    assert store.count_records() == 1  # the connection record needed no decoding
    assert (store.decode_cursor(), store.decode_backlog()) == (0, 3)
    first = store.pending(2)
    assert [p.id for p in first] == ids[:2] and [p.raw.payload for p in first] == [b"a", b"b"]
    written = store.commit_decoded([Decoded(ids[0], [rec("m", 1), rec("m", 2)]),
                                    Decoded(ids[1], [], "ValueError: bad CRC")], cursor=ids[1])
    assert written == 2
    assert (store.decode_cursor(), store.decode_backlog()) == (ids[1], 1)
    assert [p.id for p in store.pending(10)] == [ids[2]]
    assert [r.decode_error for r in store.raw_payloads()] == [None, "ValueError: bad CRC", None]
    assert [s.raw_id for s in store.records()] == [None, ids[0], ids[0]]


def test_a_failed_decode_commit_moves_nothing(store):
    (raw_id,) = store.archive([raw()])
    bad = Record.__new__(Record)  # a record the store cannot write: the transaction must roll back whole
    object.__setattr__(bad, "measurement", "m")
    object.__setattr__(bad, "time", T0)
    object.__setattr__(bad, "tags", {"k": object()})
    object.__setattr__(bad, "fields", {"v": 1})
    object.__setattr__(bad, "origin", ENVOY)
    with pytest.raises(TypeError):
        store.commit_decoded([Decoded(raw_id, [rec("m"), bad])], cursor=raw_id)
    assert (store.decode_cursor(), store.count_records()) == (0, 0)
    store.commit_decoded([Decoded(raw_id, [rec("m")])], cursor=raw_id)
    assert (store.decode_cursor(), store.count_records()) == (raw_id, 1)


def test_add_raw_counts_as_decoded_and_refuses_to_jump_a_backlog(store):
    raw_id = store.add_raw(raw(), None, [rec()])
    assert (store.decode_cursor(), store.decode_backlog(), store.count_records()) == (raw_id, 0, 1)
    store.archive([raw(b"waiting")])
    with pytest.raises(ValueError, match="1 archived payloads wait to be decoded"):
        store.add_raw(raw(b"late"))
    assert store.count_raw() == 2


def test_status_row_round_trip(store):
    assert store.status() is None
    store.write_status(IngestStatus(running=True, pid=42, dropped_copies=3, decode_backlog=7, forwarder="failing",
                                    forwarder_error="503 busy", counts={"frames": 9}))
    got = store.status()
    assert got is not None and got.updated_ns > 0
    assert (got.running, got.pid, got.dropped_copies, got.decode_backlog, got.forwarder, got.forwarder_error,
            got.counts) == (True, 42, 3, 7, "failing", "503 busy", {"frames": 9})


# -- schema versions ----------------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE raw (id INTEGER PRIMARY KEY AUTOINCREMENT, received_ns INTEGER NOT NULL, protocol TEXT NOT NULL,
    kind TEXT NOT NULL, device TEXT NOT NULL DEFAULT '', connection TEXT NOT NULL DEFAULT '',
    direction TEXT NOT NULL DEFAULT '', meta TEXT NOT NULL DEFAULT '{}', payload BLOB NOT NULL, decode_error TEXT);
CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, raw_id INTEGER REFERENCES raw(id) ON DELETE SET NULL,
    time_ns INTEGER NOT NULL, measurement TEXT NOT NULL, tags TEXT NOT NULL, fields TEXT NOT NULL,
    protocol TEXT NOT NULL, device TEXT NOT NULL DEFAULT '', connection TEXT NOT NULL DEFAULT '',
    direction TEXT NOT NULL DEFAULT '');
CREATE INDEX records_time ON records(time_ns);
CREATE INDEX records_raw ON records(raw_id);
CREATE INDEX records_measurement ON records(measurement, time_ns);
CREATE INDEX raw_device ON raw(protocol, device);
PRAGMA user_version=1;
INSERT INTO raw (received_ns, protocol, kind, payload)
    VALUES (1717243200000000000, 'enphase', 'performance_report', x'01');
INSERT INTO raw (received_ns, protocol, kind, payload)
    VALUES (1717243260000000000, 'enphase', 'performance_report', x'02');
INSERT INTO records (raw_id, time_ns, measurement, tags, fields, protocol)
    VALUES (2, 1717243200000000000, 'm', '{"serial": "SIM-1"}', '{"v": 1}', 'enphase');
"""


def test_a_version_1_store_is_migrated_and_every_old_payload_counts_as_decoded(data_dir):
    path = data_dir / "enphase.sqlite"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.close()
    with LocalStore(path, readonly=True) as reader:  # read-only: readable as it is, nothing pending
        assert (reader.decode_cursor(), reader.decode_backlog(), reader.count_records()) == (2, 0, 1)
    with LocalStore(path) as store:
        assert (store.decode_cursor(), store.decode_backlog()) == (2, 0)
        assert [s.record for s in store.records()] == [rec(origin=Origin("enphase"))]
        (new,) = store.archive([raw(b"new")])
        assert new == 3 and [p.id for p in store.pending(10)] == [3]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


@pytest.mark.parametrize("readonly", [False, True])
def test_a_store_from_a_newer_pvtap_is_refused_untouched(data_dir, readonly):
    path = data_dir / "enphase.sqlite"
    LocalStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreVersionError) as error:
        LocalStore(path, readonly=readonly)
    message = str(error.value)
    assert f"store schema {SCHEMA_VERSION + 1}; this pvtap knows up to {SCHEMA_VERSION}" in message
    assert str(path) in message and "Fix: run the newer pvtap, or move enphase.sqlite out of" in message
    assert path.read_bytes() == before


# -- files are private ---------------------------------------------------------------------------

def test_data_dir_is_0700_and_store_files_0600(tmp_path):
    old = os.umask(0o022)
    try:
        data_dir = tmp_path / "new" / "data"
        with LocalStore.for_process(data_dir, "relay") as store:
            store.archive([raw()])
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data_dir.iterdir()}
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert modes == {"relay.sqlite": 0o600, "relay.sqlite-wal": 0o600, "relay.sqlite-shm": 0o600}
        # a store made by someone else with a wide mode is narrowed when pvtap opens it
        os.chmod(data_dir / "relay.sqlite", 0o644)
        LocalStore.for_process(data_dir, "relay").close()
        assert stat.S_IMODE((data_dir / "relay.sqlite").stat().st_mode) == 0o600
    finally:
        os.umask(old)
