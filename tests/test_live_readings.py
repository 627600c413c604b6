"""The ingest engine keeps what the live path read of each payload (`RawPayload.parsed`) from
archiving until decoding, so the decoder that follows the archive does not parse the bytes again:
through `Ingest.process` and through a worker's channel (its archive and decode threads), with
the same records as a decode from the bytes; bounded, and gone after a restart (the bytes then)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pvtap.config import InfluxConfig
from pvtap.decode import alphaess
from pvtap.decode.alphaess import FrameReading
from pvtap.ingest import Ingest, LiveReadings
from pvtap.ingest.channel import Channel
from pvtap.ingest.framing import ConnectionRecord
from pvtap.ingest.settings import WorkerSettings
from pvtap.privacy import Privacy
from pvtap.records import UP, Origin, RawPayload
from pvtap.store.local import LocalStore
from pvtap.store.rows import record_row
from tests.alphaess_support import REALTIME_BODY

T0 = datetime(2024, 3, 3, 22, 6, tzinfo=UTC)
PRIVACY = Privacy(pseudonym_key=b"live-readings-key")


def realtime_frames(n: int) -> list[bytes]:
    return [alphaess.encode_frame(1, 16, REALTIME_BODY.replace(b"22:05:21", f"22:05:{i:02d}".encode()))
            for i in range(n)]


class Spy:
    """The AlphaESS codec, counting the payloads decode_raw got with the live reading and without."""

    Tap = staticmethod(alphaess.Tap)
    LocalAnswerer = staticmethod(alphaess.LocalAnswerer)

    def __init__(self) -> None:
        self.with_reading = self.from_bytes = 0

    def redact_raw(self, raw: RawPayload, privacy: Privacy) -> RawPayload:
        return alphaess.redact_raw(raw, privacy)

    def decode_raw(self, raw: RawPayload) -> list:
        if raw.parsed_as(FrameReading) is not None:
            self.with_reading += 1
        else:
            self.from_bytes += 1
        return alphaess.decode_raw(raw)


def tapped(frames: list[bytes]) -> list[RawPayload]:
    tap = alphaess.Tap(Origin("alphaess", "", "conn-1"))
    return [raw for f in frames for raw in tap.feed(UP, f, T0)]


def rows(store: LocalStore) -> list[tuple]:
    return [record_row(s.record) for s in store.records()]


def decoded_from_bytes(store: LocalStore) -> list[tuple]:
    """What decoding the archive's bytes gives (a replay)."""
    return [record_row(r) for s in store.raw_payloads() for r in alphaess.decode_raw(s.raw)]


@pytest.fixture
def store(tmp_path):
    with LocalStore(tmp_path / "relay.sqlite") as store:
        yield store


def test_process_decodes_from_the_live_reading_and_stores_what_the_bytes_give(store):
    spy = Spy()
    ingest = Ingest(store, PRIVACY, codecs=lambda _p: spy)
    for raw in tapped(realtime_frames(5)):
        ingest.process(raw)
    assert (spy.with_reading, spy.from_bytes) == (5, 0)
    assert len(ingest.readings) == 0 and ingest.readings.bytes == 0  # taken as decoded
    assert len(rows(store)) == 5 and rows(store) == decoded_from_bytes(store)
    assert {s.record.tags["serial"] for s in store.records()} == {PRIVACY.serial("AL0123456789012")}


def test_after_a_restart_the_archive_is_decoded_from_its_bytes(store):
    first = Ingest(store, PRIVACY)
    first.archive([first.redact(raw) for raw in tapped(realtime_frames(4))])  # stopped before decoding
    assert len(first.readings) == 4
    spy = Spy()
    second = Ingest(store, PRIVACY, codecs=lambda _p: spy)
    assert second.decode_pending() == 4
    assert (spy.with_reading, spy.from_bytes) == (0, 4)
    assert len(rows(store)) == 4 and rows(store) == decoded_from_bytes(store)


def test_readings_are_bounded_in_count_and_bytes_oldest_first():
    raws = tapped(realtime_frames(6))
    size = len(raws[0].payload)
    readings = LiveReadings(limit=4, limit_bytes=3 * size)
    readings.keep([1, 2, 3, 4, 5, 6], raws)
    assert len(readings) == 3 and readings.bytes == 3 * size  # 1, 2 and 3 went
    stored = [RawPayload(r.origin, r.kind, bytes(bytearray(r.payload)), r.received, dict(r.meta)) for r in raws]
    assert readings.take(stored[0], 1) is stored[0]  # not kept: decoded from its bytes
    taken = readings.take(stored[3], 4)
    assert taken.parsed is raws[3].parsed and taken.parsed_as(FrameReading) is raws[3].parsed
    readings.forget(5)
    assert len(readings) == 1 and readings.bytes == size
    assert readings.take(stored[5], 6).parsed is raws[5].parsed and readings.bytes == 0


def test_a_reading_that_is_not_of_the_payload_is_not_kept():
    (raw,) = tapped(realtime_frames(1))
    other = RawPayload(raw.origin, raw.kind, realtime_frames(2)[1], raw.received, raw.meta, raw.parsed)
    readings = LiveReadings()
    readings.keep([1, 2], [other, RawPayload(raw.origin, raw.kind, raw.payload, raw.received, raw.meta)])
    assert len(readings) == 0


async def test_the_worker_decodes_relayed_frames_from_their_live_readings(store):
    """Copies of a relayed connection through the channel: the worker's reader frames and redacts
    them, its archiver archives them and its decoder (another thread) decodes them from the readings."""
    spy = Spy()
    settings = WorkerSettings.of(store.path, PRIVACY, InfluxConfig(), 1 << 20)
    channel = Channel.thread(settings, codecs=lambda _p: spy, privacy=PRIVACY).start(wait_ready=30)
    try:
        record = ConnectionRecord(id="c-1", protocol="alphaess", listener="alphaess", policy="forward",
                                  started=T0, peer="192.0.2.9:40000", action="forward")
        stream = channel.open(record)
        for frame in realtime_frames(20):
            stream.chunk(UP, frame)
        stream.close(record)
        assert channel.sync(30)
        stats = channel.stats()
    finally:
        assert channel.close(10)
    assert (spy.with_reading, spy.from_bytes) == (20, 0)
    assert stats["records"] == 20 and stats["decode_errors"] == 0
    realtime = [r for r in rows(store) if r[1] == "alphaess_realtime"]
    assert realtime == decoded_from_bytes(store) and len(realtime) == 20
    assert [json.loads(r[3])["device_time"] for r in realtime] == [f"2024-03-03T22:05:{i:02d}" for i in range(20)]
