"""The ingest engine and its channel: raw first (archived, then decoded by a cursor that survives
a restart), a decoder exception keeps the raw payload with its error, a payload that could not
be redacted is withheld (size and hash only) unless privacy.keep_unredacted, and the channel never
blocks (it drops and counts)."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

import pvtap.ingest.engine
from pvtap.config import InfluxConfig
from pvtap.decode.withhold import WITHHELD, is_withheld
from pvtap.ingest import Ingest
from pvtap.ingest.channel import Channel
from pvtap.ingest.settings import WorkerSettings
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
    monkeypatch.setattr(pvtap.ingest.engine, "codec_for", lambda protocol: fake)
    return fake


@pytest.fixture
def store(data_dir):
    with LocalStore.for_process(data_dir, "relay") as s:
        yield s


def test_process_archives_the_redacted_payload_then_its_records(store, codec):
    ingest = Ingest(store)
    assert ingest.process(payload(b"n=5")) == 1
    assert ingest.process(payload(SECRET)) == 2
    raws = list(store.raw_payloads())
    assert [(r.raw.kind, r.raw.payload, r.decode_error) for r in raws] == [
        ("frame", b"n=5", None),
        ("login", b"Password=REDACTED", "ValueError: not a number frame: 17 bytes")]
    (stored,) = list(store.records())
    assert stored.raw_id == raws[0].id
    assert stored.record == Record("sample", T0, {"serial": "SIM-ALPHA-0001"}, {"n": 5}, ORIGIN)
    c = ingest.counts
    assert (c.stored_raw, c.decoded, c.records, c.decode_errors) == (2, 2, 1, 1)
    assert c.by_kind == {"frame": 1, "login": 1}
    assert store.decode_backlog() == 0


def test_raw_first_a_backlog_is_decoded_later_even_by_another_engine(data_dir, codec):
    """Archiving does not wait for decoding; what is archived and not decoded when a process
    stops is decoded by the next one (the cursor is in the store file)."""
    with LocalStore.for_process(data_dir, "relay") as store:
        first = Ingest(store)
        first.archive([first.redact(payload(f"n={i}".encode())) for i in range(700)])
        assert first.decode_pending(limit=300, budget_s=60) == 300  # then it stopped (no budget cut)
        assert store.decode_backlog() == 400 and store.count_records() == 300
    with LocalStore.for_process(data_dir, "relay") as store:
        second = Ingest(store)
        while second.decode_pending():
            pass
        assert store.decode_backlog() == 0
        assert [s.record.fields["n"] for s in store.records()] == list(range(700))  # each once, in order


def test_decoder_exception_keeps_raw_with_error_and_goes_on(store, codec, caplog):
    def broken(raw):
        if raw.payload == b"n=2":
            raise KeyError("register 0x1234")
        return decode_numbers(raw)

    codec.decode_raw = broken
    ingest = Ingest(store)
    with caplog.at_level(logging.WARNING, logger="pvtap.ingest"):
        ingest.archive([payload(body) for body in (b"n=1", b"n=2", b"n=3")])
        assert ingest.decode_pending() == 3
    raws = list(store.raw_payloads())
    assert [(r.raw.payload, r.decode_error) for r in raws] == [
        (b"n=1", None), (b"n=2", "KeyError: 'register 0x1234'"), (b"n=3", None)]
    assert [s.record.fields["n"] for s in store.records()] == [1, 3]
    assert ingest.counts.decode_errors == 1 and ingest.counts.records == 2
    assert (f"decode failed: alphaess frame from SIM-ALPHA-0001 (connection conn-1, raw #{raws[1].id} kept): "
            "KeyError: 'register 0x1234'") in caplog.text


def test_redaction_failure_is_withheld_as_size_and_hash(store, codec, caplog, data_dir):
    def broken_redact(raw, privacy):  # a message quoting the input, as int() or a parser would
        raise ValueError(f"invalid literal: {raw.payload!r}")

    codec.redact_raw = broken_redact
    ingest = Ingest(store)
    with caplog.at_level(logging.DEBUG):
        ingest.process(RawPayload(ORIGIN, "login", SECRET, T0, {"query": "token=PLACEHOLDER-SECRET-42"}))
    (stored,) = list(store.raw_payloads())
    assert stored.raw.payload == b""
    # withheld as every codec withholds (decode/withhold.py); meta and the device may quote what could not be
    # redacted: neither is kept
    assert is_withheld(stored.raw)
    assert stored.raw.meta == {WITHHELD: "redaction failed (ValueError)", "withheld_size": len(SECRET),
                               "withheld_sha256": hashlib.sha256(SECRET).hexdigest()}
    assert stored.raw.kind == "login" and stored.raw.origin == replace(ORIGIN, device="")
    assert stored.decode_error == "ValueError: not a number frame: 0 bytes"  # decoded what was stored
    assert "could not redact a alphaess login payload (ValueError); storing only its size and SHA-256" in caplog.text
    assert "PLACEHOLDER-SECRET" not in caplog.text and ingest.counts.redact_errors == 1
    store.close()
    for path in data_dir.iterdir():  # the database and its WAL
        assert b"PLACEHOLDER-SECRET" not in path.read_bytes(), path.name


def test_redaction_failure_is_kept_in_clear_only_when_opted_in(store, codec, caplog):
    def broken_redact(raw, privacy):
        raise ValueError("layout not known")

    codec.redact_raw = broken_redact
    ingest = Ingest(store, Privacy(keep_unredacted=True))
    with caplog.at_level(logging.ERROR):
        ingest.process(payload(SECRET, kind="login"))
    (stored,) = list(store.raw_payloads())
    assert stored.raw.payload == SECRET and stored.raw.meta == {"peer": "test", "unredacted": "redaction failed "
                                                                "(ValueError)"}
    assert stored.raw.origin == replace(ORIGIN, device="")
    assert "could not redact a alphaess login payload (ValueError); keeping it in clear (privacy.keep_unredacted)" \
        in caplog.text


def test_a_withheld_payload_replayed_through_a_failing_redaction_stays_withheld(store, codec):
    codec.redact_raw = lambda raw, privacy: (_ for _ in ()).throw(ValueError("boom"))
    ingest = Ingest(store)
    ingest.process(payload(SECRET))
    (first,) = list(store.raw_payloads())
    ingest.process(first.raw)  # what pvtap replay does with a stored payload
    second = list(store.raw_payloads())[1]
    assert second.raw.payload == b"" and second.raw.meta == first.raw.meta  # size and hash of the original bytes


def test_decode_runs_on_the_redacted_bytes(store, codec):
    seen: list[bytes] = []

    def decode_raw(raw: RawPayload) -> list[Record]:
        seen.append(raw.payload)
        return []

    codec.decode_raw = decode_raw
    Ingest(store).process(payload(SECRET))
    assert seen == [b"Password=REDACTED"]


def test_an_unknown_protocol_is_kept_as_size_and_hash_with_a_decode_error(store, codec, monkeypatch):
    def only_known(protocol):
        if protocol != "alphaess":
            raise ValueError(f"no decoder for protocol {protocol!r}")
        return codec

    ingest = Ingest(store, codecs=only_known)
    ingest.process(RawPayload(Origin("nonesuch"), "frame", b"n=1", T0))
    ingest.process(payload(b"n=2"))
    first, _ = list(store.raw_payloads())
    assert first.raw.payload == b"" and first.decode_error == "ValueError: no decoder for protocol 'nonesuch'"
    assert [s.record.fields["n"] for s in store.records()] == [2]


# -- the channel to a worker (a thread here; the same code as the process) ----------------------

def settings(store: LocalStore, queue_bytes: int = 1 << 20) -> WorkerSettings:
    return WorkerSettings.of(store.path, Privacy(), InfluxConfig(), queue_bytes)


async def test_through_the_channel_payloads_are_archived_and_decoded(store, codec):
    channel = Channel.thread(settings(store), codecs=lambda _p: codec).start(wait_ready=30)
    try:
        for i in range(50):
            assert channel.payload(payload(f"n={i}".encode()))
        assert channel.payload(payload(SECRET))
        await channel.idle()
        stats = channel.stats()
    finally:
        assert channel.close(10)
    assert [s.record.fields["n"] for s in store.records()] == list(range(50))
    assert list(store.raw_payloads())[-1].raw.payload == b"Password=REDACTED"
    assert (stats["copies_sent"], stats["copies_dropped"], stats["raw_archived"], stats["records"],
            stats["decode_errors"], stats["decode_backlog"]) == (51, 0, 51, 50, 1, 0)


async def test_records_made_by_the_forwarding_side_are_stored_as_they_are(store, codec):
    """An alert: the relay makes the record (it has no store), its worker stores it, exactly."""
    tags = {"alert": "upstream_pin_mismatch", "listener": "0.0.0.0:14431", "protocol": "foxess"}
    sent = [Record("pvtap_alert", T0, tags, {"active": True, "message": "cloud gets NO data \u2013 re-pin",
                                             "connections": 3, "share": 0.5}, Origin(protocol="foxess")),
            Record("pvtap_alert", T0.replace(minute=10), tags, {"active": False, "message": "over"},
                   Origin(protocol="foxess"))]
    channel = Channel.thread(settings(store), codecs=lambda _p: codec).start(wait_ready=30)
    try:
        for record in sent:
            channel.record(record)
        await channel.idle()
    finally:
        assert channel.close(10)
    assert [s.record for s in store.records()] == sent
    assert store.count_raw() == 0


def test_a_stuck_worker_costs_dropped_counted_copies_and_never_blocks(store, codec):
    entered, release = threading.Event(), threading.Event()

    def stuck_redact(raw, privacy):  # a stuck disk or decoder: the worker stops reading
        entered.set()
        release.wait(30)
        return raw

    codec.redact_raw = stuck_redact
    channel = Channel.thread(settings(store, queue_bytes=64 * 1024), codecs=lambda _p: codec).start(wait_ready=30)
    try:
        assert channel.payload(payload(b"n=0"))
        assert entered.wait(10)
        results = [channel.payload(payload(b"n=1" + b" " * 4000)) for _ in range(200)]  # 800 kB: over the budget
        assert results[0] and not results[-1]
        dropped = results.count(False)
        assert channel.stats()["copies_dropped"] == dropped > 0
        release.set()
        assert channel.sync(30)
        assert channel.stats()["dropped_copies"] == 0  # the worker drops nothing: it waits, the channel drops
    finally:
        release.set()
        channel.close(10)
    assert store.count_raw() == 201 - dropped  # everything that was taken, nothing else


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
