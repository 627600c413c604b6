"""The ingest worker: submit never blocks (a full queue drops and counts), a decoder exception
keeps the raw payload with its error, and a payload that could not be redacted is never stored
or logged with its bytes."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

import pvtap.ingest
from pvtap.ingest import Ingest
from pvtap.privacy import REDACTED, Privacy
from pvtap.records import Origin, RawPayload, Record
from pvtap.store.local import LocalStore

T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)
ORIGIN = Origin("alphaess", "SIM-ALPHA-0001", "conn-1", "up")
SECRET = b"Password=PLACEHOLDER-SECRET-42"


def payload(body: bytes, kind: str = "frame") -> RawPayload:
    return RawPayload(ORIGIN, kind, body, T0, {"peer": "test"})


def decode_numbers(raw: RawPayload) -> list[Record]:
    """A stand-in decoder: `n=<int>` → one record; anything else raises."""
    text = raw.payload.decode()
    if not text.startswith("n="):
        raise ValueError(f"not a number frame: {len(raw.payload)} bytes")
    return [Record("sample", raw.received, {"serial": raw.origin.device}, {"n": int(text[2:])}, raw.origin)]


def redact_secret(raw: RawPayload, privacy: Privacy) -> RawPayload:
    if raw.payload.startswith(b"Password="):
        return RawPayload(raw.origin, "login", f"Password={REDACTED}".encode(), raw.received, dict(raw.meta))
    return raw


@pytest.fixture
def codec(monkeypatch):
    """The codec ingest uses, replaced by a stand-in whose functions tests may swap."""
    fake = SimpleNamespace(redact_raw=redact_secret, decode_raw=decode_numbers)
    monkeypatch.setattr(pvtap.ingest, "codec_for", lambda protocol: fake)
    return fake


@pytest.fixture
def store(data_dir):
    with LocalStore.for_process(data_dir, "relay") as s:
        yield s


def test_stores_redacted_raw_then_records(store, codec):
    ingest = Ingest(store).start()
    try:
        assert ingest.submit(payload(b"n=5"))
        assert ingest.submit(payload(SECRET))
        ingest.join()
    finally:
        ingest.stop()
    raws = list(store.raw_payloads())
    assert [(r.raw.kind, r.raw.payload, r.decode_error) for r in raws] == [
        ("frame", b"n=5", None),
        ("login", b"Password=REDACTED", "ValueError: not a number frame: 17 bytes")]
    (stored,) = list(store.records())
    assert stored.raw_id == raws[0].id
    assert stored.record == Record("sample", T0, {"serial": "SIM-ALPHA-0001"}, {"n": 5}, ORIGIN)
    c = ingest.counts
    assert (c.submitted, c.dropped, c.stored_raw, c.records, c.decode_errors) == (2, 0, 2, 1, 1)
    assert c.by_kind == {"frame": 1, "login": 1}


def test_submit_never_blocks_and_drops_when_full(store, codec):
    entered, release = threading.Event(), threading.Event()

    def slow_redact(raw, privacy):  # a stuck disk or decoder: the worker stops taking items
        entered.set()
        release.wait(30)
        return raw

    codec.redact_raw = slow_redact
    ingest = Ingest(store, max_queue=3).start()
    try:
        assert ingest.submit(payload(b"n=0"))
        assert entered.wait(10)  # the worker holds item 0; the queue is empty
        results, slowest = [], 0.0
        for i in range(1, 9):
            started = time.perf_counter()
            results.append(ingest.submit(payload(f"n={i}".encode())))
            slowest = max(slowest, time.perf_counter() - started)
        assert results == [True, True, True, False, False, False, False, False]
        assert slowest < 0.05, f"submit took {slowest * 1000:.1f} ms while the worker was stuck"
        assert (ingest.counts.submitted, ingest.counts.dropped) == (9, 5)
        release.set()
        ingest.join()
    finally:
        release.set()
        ingest.stop()
    assert [s.record.fields["n"] for s in store.records()] == [0, 1, 2, 3]  # the queued ones, in order
    assert store.count_raw() == 4


def test_full_queue_is_logged_without_the_payload_and_without_flooding(store, codec, caplog):
    ingest = Ingest(store, max_queue=1)  # not started: nothing drains the queue
    assert ingest.submit(payload(b"n=1"))
    with caplog.at_level(logging.ERROR, logger="pvtap.ingest"):
        assert ingest.submit(payload(SECRET)) is False
        for _ in range(1999):
            assert ingest.submit(payload(b"n=2")) is False
    assert ingest.counts.dropped == 2000
    assert "ingest queue full (1): 1 copies dropped so far (latest: alphaess frame); forwarding is unaffected" \
        in caplog.text
    counts = [re.search(r"(\d+) copies dropped", r.getMessage()) for r in caplog.records]
    logged = [int(m.group(1)) if m else None for m in counts]
    assert logged == [1, 10, 1000, 2000]  # a line now and then, not one per copy
    assert b"PLACEHOLDER-SECRET" not in caplog.text.encode()


def test_decoder_exception_keeps_raw_with_error_and_worker_goes_on(store, codec, caplog):
    def broken(raw):
        if raw.payload == b"n=2":
            raise KeyError("register 0x1234")
        return decode_numbers(raw)

    codec.decode_raw = broken
    ingest = Ingest(store).start()
    try:
        with caplog.at_level(logging.WARNING, logger="pvtap.ingest"):
            for body in (b"n=1", b"n=2", b"n=3"):
                ingest.submit(payload(body))
            ingest.join()
    finally:
        ingest.stop()
    raws = list(store.raw_payloads())
    assert [(r.raw.payload, r.decode_error) for r in raws] == [
        (b"n=1", None), (b"n=2", "KeyError: 'register 0x1234'"), (b"n=3", None)]
    assert [s.record.fields["n"] for s in store.records()] == [1, 3]
    assert ingest.counts.decode_errors == 1 and ingest.counts.records == 2
    assert (f"decode failed: alphaess frame from SIM-ALPHA-0001 (connection conn-1, raw #{raws[1].id} kept): "
            "KeyError: 'register 0x1234'") in caplog.text


def test_redaction_failure_never_stores_or_logs_the_bytes(store, codec, caplog, data_dir):
    def broken_redact(raw, privacy):  # a message quoting the input, as int() or a parser would
        raise ValueError(f"invalid literal: {raw.payload!r}")

    codec.redact_raw = broken_redact
    ingest = Ingest(store).start()
    try:
        with caplog.at_level(logging.DEBUG):
            ingest.submit(payload(SECRET, kind="login"))
            ingest.join()
    finally:
        ingest.stop()
    (stored,) = list(store.raw_payloads())
    assert stored.raw.payload == b""
    # meta and the device may quote what could not be redacted: neither is kept
    assert stored.raw.meta == {"payload": REDACTED}
    assert stored.raw.kind == "login" and stored.raw.origin == replace(ORIGIN, device="")
    assert stored.decode_error == "ValueError: not a number frame: 0 bytes"  # decoded what was stored
    assert "could not redact a alphaess login payload (ValueError); storing it without its bytes" in caplog.text
    assert "PLACEHOLDER-SECRET" not in caplog.text
    store.close()
    for path in data_dir.iterdir():  # the database and its WAL
        assert b"PLACEHOLDER-SECRET" not in path.read_bytes(), path.name


def test_decode_runs_on_the_redacted_bytes(store, codec):
    seen: list[bytes] = []

    def decode_raw(raw: RawPayload) -> list[Record]:
        seen.append(raw.payload)
        return []

    codec.decode_raw = decode_raw
    Ingest(store).process(payload(SECRET))
    assert seen == [b"Password=REDACTED"]


def test_a_failing_payload_does_not_stop_the_worker(store, codec, monkeypatch, caplog):
    real = pvtap.ingest.codec_for

    def only_known(protocol):
        if protocol != "alphaess":
            raise ValueError(f"no decoder for protocol {protocol!r}")
        return real(protocol)

    monkeypatch.setattr(pvtap.ingest, "codec_for", only_known)
    ingest = Ingest(store).start()
    try:
        with caplog.at_level(logging.ERROR, logger="pvtap.ingest"):
            ingest.submit(RawPayload(Origin("nonesuch"), "frame", b"n=1", T0))
            ingest.submit(payload(b"n=2"))
            ingest.join()
    finally:
        ingest.stop()
    assert "ingest failed on a payload" in caplog.text
    assert [s.record.fields["n"] for s in store.records()] == [2]


def test_stop_stores_what_is_queued(store, codec):
    ingest = Ingest(store)
    for i in range(50):
        ingest.submit(payload(f"n={i}".encode()))
    ingest.start().stop()
    assert [s.record.fields["n"] for s in store.records()] == list(range(50))
    ingest.stop()  # a second stop is harmless


def test_a_real_enphase_report_reaches_the_store_redacted(data_dir):
    """Through the real codec: the simulator's placeholder IP, MAC and serials never reach the
    store file when serials are pseudonymised; the records carry the pseudonyms."""
    from pvtap.decode.enphase import DEFLATE_CONTENT_TYPE
    from pvtap.privacy import pseudonym
    from pvtap.simulate.enphase import PLACEHOLDER_ENVOY, build_report_xml, encode_body

    key = b"k" * 32
    body = encode_body(build_report_xml(micros=2, start=1717243200))
    report = RawPayload(Origin("enphase", "", "flow-1", "up"), "performance_report", body, T0,
                        {"content_type": DEFLATE_CONTENT_TYPE, "path": "/emu_reports/performance_report"})
    with LocalStore.for_process(data_dir, "enphase") as store:
        ingest = Ingest(store, Privacy(pseudonym_key=key))
        ingest.process(report)
        records = [s.record for s in store.records()]
        (stored,) = list(store.raw_payloads())
    assert ingest.counts.decode_errors == 0 and len(records) > 5
    assert {r.tags["envoy"] for r in records} == {pseudonym(PLACEHOLDER_ENVOY, key)}
    assert stored.raw.origin.device == pseudonym(PLACEHOLDER_ENVOY, key)
    for path in data_dir.iterdir():
        content = path.read_bytes()
        for identity in (b"192.0.2.10", b"00:00:5e:00:53:01", PLACEHOLDER_ENVOY.encode(), b"999900000001"):
            assert identity not in content, (path.name, identity)
