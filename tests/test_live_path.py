"""The live path (Tap → redact_raw → decode_raw, each handing on what it read in
`RawPayload.parsed`) stores and decodes exactly what the bytes path does (a payload read back
from the store, a replay): same redacted payload, meta and origin, same records in the same field
order, the same error. And every record a decoder makes passes Record's full check, also those
made with `Record.typed` (whose per-field check the decoders vouch for).

Property-based (hypothesis, the profile tests/test_fuzz_decoders.py registers), on valid frames,
damaged ones and noise, in any segmentation, under every privacy setting.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pvtap.decode import alphaess, enphase, foxess
from pvtap.privacy import Privacy
from pvtap.records import UP, Origin, RawPayload, Record, from_ns, to_ns
from pvtap.simulate.enphase import Simulator, encode_body
from pvtap.store.rows import record_row
from tests.test_fuzz_decoders import (
    ALPHA_FRAMES,
    FOX_FRAMES,
    PRIVACIES,
    REPORT,
    both_directions,
    mutated,
    run_tap,
)

RECEIVED = datetime(2024, 6, 21, 12, 0, 7, 250_000, tzinfo=UTC)
ALL_PRIVACIES = [Privacy(), Privacy(pseudonym_key=b"live-key"), Privacy(keep_network_identity=True),
                 Privacy(keep_unredacted=True)]


def as_stored(raw: RawPayload) -> RawPayload:
    """The payload as the store gives it back: fresh bytes, meta through JSON, no reading."""
    return RawPayload(raw.origin, raw.kind, bytes(bytearray(raw.payload)), from_ns(to_ns(raw.received)),
                      json.loads(json.dumps(dict(raw.meta), sort_keys=True)))


def outcome(decode: Callable[[RawPayload], list[Record]], raw: RawPayload) -> object:
    """The rows a decode stores (field order included), or the error it raises."""
    try:
        records = decode(raw)
    except Exception as exc:
        return (type(exc), str(exc))
    for r in records:  # the full check, whatever way the decoder made the record
        Record(r.measurement, r.time, r.tags, r.fields, r.origin)
    return [record_row(r) for r in records]


def assert_live_equals_bytes(codec, raw: RawPayload, privacy: Privacy) -> RawPayload:
    """Redact and decode `raw` both ways; returns the live path's redacted payload."""
    live = codec.redact_raw(raw, privacy)
    from_bytes = codec.redact_raw(as_stored(raw), privacy)
    assert live == from_bytes  # payload, meta, origin, kind, time (the reading is not compared)
    assert outcome(codec.decode_raw, live) == outcome(codec.decode_raw, as_stored(from_bytes))
    return live


# -- AlphaESS and FoxESS: every payload a Tap hands out -------------------------------------------

@pytest.mark.parametrize("codec, frames, bound", [(alphaess, ALPHA_FRAMES, 2 * alphaess.MAX_FRAME),
                                                 (foxess, FOX_FRAMES, 2 * (foxess.MAX_FRAME + foxess.MAX_GARBAGE_RUN))])
@pytest.mark.parametrize("privacy", ALL_PRIVACIES, ids=["default", "pseudonyms", "keep-network", "keep-unredacted"])
def test_every_known_frame_decodes_the_same_live_and_from_bytes(codec, frames, bound, privacy):
    payloads = run_tap(codec.Tap(Origin(codec.PROTOCOL)), [(UP, f) for f in frames], bound)
    assert [p.kind for p in payloads] == ["frame"] * len(frames)
    for raw in payloads:
        assert raw.parsed is not None and raw.parsed_as(type(raw.parsed)) is raw.parsed  # the Tap's reading
        live = assert_live_equals_bytes(codec, raw, privacy)
        assert live.parsed_as(type(raw.parsed)) is not None  # redaction handed a reading on


@given(st.data())
def test_alphaess_live_path_equals_the_bytes_path(data):
    stream = data.draw(st.one_of(st.binary(max_size=2000), mutated(ALPHA_FRAMES)))
    privacy = data.draw(PRIVACIES)
    for raw in run_tap(alphaess.Tap(Origin("alphaess")), both_directions(data.draw, stream), 2 * alphaess.MAX_FRAME):
        assert_live_equals_bytes(alphaess, raw, privacy)


@given(st.data())
def test_foxess_live_path_equals_the_bytes_path(data):
    stream = data.draw(st.one_of(st.binary(max_size=2000), mutated(FOX_FRAMES)))
    privacy = data.draw(PRIVACIES)
    bound = 2 * (foxess.MAX_FRAME + foxess.MAX_GARBAGE_RUN)
    for raw in run_tap(foxess.Tap(Origin("foxess")), both_directions(data.draw, stream), bound):
        assert_live_equals_bytes(foxess, raw, privacy)


_DECIMAL = st.one_of(st.integers(-99999, 99999).map(str), st.floats(-1e6, 1e6).map(lambda f: f"{f:.4f}"))
_VALUE = st.one_of(_DECIMAL, _DECIMAL, st.text(max_size=12), st.integers(-10**20, 10**20), st.floats(), st.booleans(),
                   st.none(),
                   st.sampled_from(["12.5", "-0", "1e3", "1_0", "nan", "inf", "", "REDACTED", " 7 ", "0x10"]))
_KEYS = st.sampled_from(["Time", "SN", "Ppv1", "Pbat", "SOC", "InvWorkMode", "EmsStatus", "Password", "Country",
                         "UserName", "MsgContent", "", "Sn", "BatterySN1"])


@st.composite
def realtime_bodies(draw) -> bytes:
    """Realtime-like JSON bodies: known, secret, serial, odd and repeated keys; values of every
    JSON type as the device might (mis)spell them; compact or spaced."""
    members = draw(st.lists(st.tuples(_KEYS, _VALUE), max_size=10))
    if draw(st.booleans()):
        members.insert(0, ("Time", draw(st.sampled_from(["2024/06/21 06:00:00", "2024/6/1 6:00:00", "2024/02/30 "
                                                         "00:00:00", "٢٠٢٤/06/21 06:00:00", "x"]))))
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (",", " : ")]))
    text = "{" + sep[0].join(json.dumps(k) + sep[1] + json.dumps(v) for k, v in members) + "}"
    return text.encode()


@example(b'{"Time":"2024/06/21 06:00:00","":"1","Ppv1":"2"}', 16, Privacy())  # an empty field name
@example(b'{"Ppv1":"1e308","Ppv2":"1e308"}', 16, Privacy())  # finite, though their sum is not
@given(realtime_bodies(), st.sampled_from([5, 16, 9, 4, 8]), st.sampled_from(ALL_PRIVACIES))
def test_alphaess_bodies_of_every_shape_decode_the_same_live_and_from_bytes(body, frame_type, privacy):
    tap = alphaess.Tap(Origin("alphaess", connection="c1"))
    tap.feed(UP, alphaess.encode_frame(1, 2, b'{"UserName":"AL0000000000009"}'), RECEIVED)
    (raw,) = tap.feed(UP, alphaess.encode_frame(1, frame_type, body), RECEIVED)
    assert_live_equals_bytes(alphaess, raw, privacy)


# -- Enphase: a report redacted once, its tree handed to decode ------------------------------------

@settings(max_examples=max(20, settings().max_examples // 3))
@given(st.data())
def test_enphase_live_path_equals_the_bytes_path(data):
    body = encode_body(data.draw(st.sampled_from([REPORT, Simulator(micros=3, start=1718928000).next_report(4).xml])))
    if data.draw(st.booleans()):
        body = data.draw(mutated([body]))
    raw = RawPayload(Origin("enphase", "", "f", UP), "performance_report", body, RECEIVED,
                     {"content_type": "application/x-deflate", "path": "/emu_reports/performance_report"})
    assert_live_equals_bytes(enphase, raw, data.draw(st.sampled_from(ALL_PRIVACIES)))


@pytest.mark.parametrize("privacy", ALL_PRIVACIES, ids=["default", "pseudonyms", "keep-network", "keep-unredacted"])
def test_an_enphase_report_hands_its_redacted_tree_to_decode(privacy):
    xml = Simulator(micros=5, start=1718928000).next_report(12).xml
    raw = RawPayload(Origin("enphase", "", "f", UP), "performance_report", encode_body(xml), RECEIVED,
                     {"content_type": "application/x-deflate"})
    live = assert_live_equals_bytes(enphase, raw, privacy)
    assert live.parsed is not None and live.parsed_as(type(live.parsed)) is live.parsed
    assert len(enphase.decode_raw(live)) > 30


# -- a reading is used only for its own bytes -------------------------------------------------------

@pytest.mark.parametrize("codec, first, second", [
    (alphaess, ALPHA_FRAMES[16], ALPHA_FRAMES[3]), (foxess, FOX_FRAMES[2], FOX_FRAMES[3])])
def test_a_reading_of_other_bytes_is_ignored(codec, first, second):
    (raw,) = codec.Tap(Origin(codec.PROTOCOL)).feed(UP, first, RECEIVED)
    swapped = dataclasses.replace(raw, payload=second)  # the first frame's reading, the second's bytes
    assert swapped.parsed is raw.parsed and swapped.parsed_as(type(raw.parsed)) is None
    assert outcome(codec.decode_raw, codec.redact_raw(swapped, Privacy())) == \
        outcome(codec.decode_raw, codec.redact_raw(as_stored(swapped), Privacy()))
    assert outcome(codec.decode_raw, swapped) != outcome(codec.decode_raw, raw)
