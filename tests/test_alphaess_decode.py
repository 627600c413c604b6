"""AlphaESS decoder: reference vectors, CRC, records and their values, timestamps, redaction."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from pvtap.decode import alphaess as A
from pvtap.ingest import Ingest
from pvtap.privacy import REDACTED, Privacy, pseudonym
from pvtap.records import DOWN, UP, Origin, RawPayload
from pvtap.simulate.alphaess import PLACEHOLDER_PASSWORD, PLACEHOLDER_PERSONAL, config_body
from pvtap.store.local import LocalStore
from tests.alphaess_support import BY_NAME, EVENT_BODY, VECTORS, Vector

SERIAL = "AL0123456789012"  # the reference's placeholder serial
RECEIVED = datetime(2024, 3, 3, 22, 5, 21, 400_000, tzinfo=UTC)
PSEUDO = Privacy(pseudonym_key=b"test-key")


def frame(b1: int, type_: int, body: dict | bytes) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    return A.encode_frame(b1, type_, raw)


def tap_payloads(*chunks: tuple[str, bytes], received: datetime = RECEIVED, device: str = "") -> list[RawPayload]:
    tap = A.Tap(Origin("alphaess", device, "c1"))
    return [p for direction, data in chunks for p in tap.feed(direction, data, received)]


def decode(*chunks: tuple[str, bytes], received: datetime = RECEIVED, privacy: Privacy = Privacy()):
    """What the ingest worker does: Tap → redact_raw → decode_raw."""
    return [r for p in tap_payloads(*chunks, received=received) for r in A.decode_raw(A.redact_raw(p, privacy))]


# -- vectors and CRC ------------------------------------------------------------------------------

def test_crc_is_modbus_with_its_check_value():
    assert A.crc16(b"123456789") == 0x4B37
    assert A.crc16(bytes.fromhex("01010000000000")) == 0x110A  # TV: "should be 11 0A"


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v.name)
def test_every_reference_vector_frames_and_encodes(vector: Vector):
    parsed = A.parse_frame(vector.frame)
    assert (parsed.b1, parsed.type, parsed.body, parsed.crc) == (vector.b1, vector.type, vector.body, vector.crc)
    assert vector.frame[-2:] == vector.crc.to_bytes(2, "big")  # CRC high byte first
    assert A.encode_frame(vector.b1, vector.type, vector.body) == vector.frame
    assert parsed.encode() == vector.frame
    items = A.Framer().feed(vector.frame)
    assert items == [parsed]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v.name)
def test_crc_mismatch_is_detected(vector: Vector):
    for position in (len(vector.frame) - 1, len(vector.frame) - 2, 2, A.HEADER_LEN if vector.body else 0):
        bad = bytearray(vector.frame)
        bad[position] ^= 0x01 if position == 0 else 0xFF
        with pytest.raises(ValueError):
            A.parse_frame(bytes(bad))
    corrupt = vector.frame[:-1] + bytes([vector.frame[-1] ^ 0xFF])
    framer = A.Framer()
    items = framer.feed(corrupt) + framer.feed(BY_NAME["empty 1-1-0"].frame)
    garbage = [i for i in items[:-1] if isinstance(i, A.Garbage)]
    assert garbage == items[:-1]
    assert items[-1] == A.parse_frame(BY_NAME["empty 1-1-0"].frame)
    assert b"".join(i.data for i in garbage) == corrupt and framer.buffered == 0
    assert garbage[0].reason.startswith(f"CRC mismatch in 1-{vector.b1}-{vector.type}")


# -- records ----------------------------------------------------------------------------------

def test_realtime_vector_decodes_to_the_stated_values():
    [record] = decode((UP, BY_NAME["realtime 1-1-16"].frame))
    assert record.measurement == "alphaess_realtime"
    assert record.tags == {"serial": SERIAL}
    assert record.fields == {
        "Ppv1": 0.0, "Ppv2": 0.0, "PrealL1": 420.0, "PrealL2": 0.0, "PrealL3": 0.0, "PmeterL1": -4.0,
        "PmeterL2": 0.0, "PmeterL3": 0.0, "PmeterDC": 0.0, "Pbat": 539.44, "Sva": 405.0, "VarAC": -669.0,
        "VarDC": 96.0, "SOC": 38.0, "device_time": "2024-03-03T22:05:21",
    }
    assert all(type(v) is float for k, v in record.fields.items() if k != "device_time")
    assert record.origin == Origin("alphaess", SERIAL, "c1", UP)
    # received 0.4 s after the device's second: the learned offset is 0, the time the device's
    assert record.time == datetime(2024, 3, 3, 22, 5, 21, tzinfo=UTC)


def test_field_types_are_fixed_per_field_not_per_value():
    body = {"Time": "2021/03/24 09:40:59", "SN": SERIAL, "Ppv1": "1029", "Upv1": "278.2", "Fac": "50.02",
            "FlagBms": "257", "VcellLow": "17042704", "InvWorkMode": "2.0", "ErrInv": "1.5",
            "ErrEms": "99999999999999999999", "EmsStatus": "Normal",
            "CSQ": "99,99", "Eirp": "-63", "Pbat": "-2187.8480", "Tinv": "", "BatV": "n/a",
            "NewFirmwareKey": "12", "NewFirmwareText": "abc", "GCPower": 0}
    [record] = decode((UP, frame(1, 5, body)))
    assert record.measurement == "alphaess_extended"
    f = record.fields
    assert f["Ppv1"] == 1029.0 and type(f["Ppv1"]) is float
    assert f["Upv1"] == 278.2 and f["Fac"] == 50.02 and f["Pbat"] == -2187.848 and f["Eirp"] == -63.0
    assert f["FlagBms"] == 257 and type(f["FlagBms"]) is int
    assert f["VcellLow"] == 17042704 and type(f["VcellLow"]) is int  # packed (1, 4, 3344)
    assert f["InvWorkMode"] == 2 and type(f["InvWorkMode"]) is int
    assert f["ErrInv_text"] == "1.5" and "ErrInv" not in f  # an int field never turns float
    assert f["ErrEms_text"] == "99999999999999999999" and "ErrEms" not in f  # nor overflows int64
    assert f["EmsStatus"] == "Normal" and f["CSQ"] == "99,99"
    assert "Tinv" not in f and "Tinv_text" not in f  # empty: no value
    assert f["BatV_text"] == "n/a" and "BatV" not in f
    assert f["NewFirmwareKey"] == 12.0 and type(f["NewFirmwareKey"]) is float  # unknown keys: float
    assert f["NewFirmwareText_text"] == "abc"
    assert f["GCPower"] == 0.0 and type(f["GCPower"]) is float  # a real JSON number too
    assert "SN" not in f and "Time" not in f and f["device_time"] == "2021-03-24T09:40:59"


CSV_HEADER = "Date,Time,SN,Ppv1,Ppv2,Vpv1,Vpv2,Pbat,SOC,BatC,FlagBms,VcellLow,EmsStatus"


def csv_body(*rows: str) -> bytes:
    return ("\n".join([CSV_HEADER, *rows]) + "\n").encode()


def test_backfill_gives_one_record_per_row_at_the_rows_own_time():
    body = csv_body(f"2021/03/24,09:40:59,{SERIAL},1029,981,278.2,288.8,-1500.5,61.0,-28.7,257,17042704,Normal",
                    f"2021/03/24,09:41:59,{SERIAL},1030,982,278.3,288.9,-1490.0,61.2,-28.5,257,17042704,Normal",
                    "",
                    CSV_HEADER,  # a header repeated inside one body
                    f"2021/03/24,09:42:59,{SERIAL},1031,983,278.4,289.0,-1480.0,61.4,-28.3,257,17042704,Normal")
    raw = RawPayload(Origin("alphaess", SERIAL, "c1", UP), "frame", A.encode_frame(1, 12, body), RECEIVED,
                     {"clock_offset_s": -3600})
    records = A.decode_raw(raw)
    assert [r.measurement for r in records] == ["alphaess_backfill"] * 3
    assert [r.time for r in records] == [datetime(2021, 3, 24, 8, m, 59, tzinfo=UTC) for m in (40, 41, 42)]
    first = records[0]
    assert first.tags == {"serial": SERIAL}
    assert first.fields == {"Ppv1": 1029.0, "Ppv2": 981.0, "Upv1": 278.2, "Upv2": 288.8, "Pbat": -1500.5,
                            "SOC": 61.0, "BatC": -28.7, "FlagBms": 257, "VcellLow": 17042704,
                            "EmsStatus": "Normal", "device_time": "2021-03-24T09:40:59"}


def test_event_log_gives_one_record_per_code_and_time():
    raw = RawPayload(Origin("alphaess", SERIAL, "c1", UP), "frame", BY_NAME["event log 1-1-9"].frame, RECEIVED,
                     {"clock_offset_s": 0})
    records = A.decode_raw(raw)
    assert [(r.measurement, r.time, dict(r.tags), dict(r.fields)) for r in records] == [
        ("alphaess_event", datetime(2021, 3, 24, 10, 1, 40, tzinfo=UTC),
         {"serial": SERIAL, "msg_type": "EventLog", "code": "41"}, {"device_time": "2021-03-24T10:01:40"}),
        ("alphaess_event", datetime(2021, 3, 24, 10, 0, 46, tzinfo=UTC),
         {"serial": SERIAL, "msg_type": "EventLog", "code": "42"}, {"device_time": "2021-03-24T10:00:46"}),
    ]


def test_other_messages_and_the_mac_they_may_carry():
    body = {"MsgType": "System", "MsgContent": "System is restart, reason:7 !MAC:02 00 5e 10 00 01!",
            "Description": "OK"}
    [record] = decode((UP, frame(1, 9, body)))
    assert record.tags == {"msg_type": "System"} and record.time == RECEIVED
    assert record.fields == {"content": "System is restart, reason:7 !MAC:REDACTED!", "description": "OK"}
    [kept] = decode((UP, frame(1, 9, body)), privacy=Privacy(keep_network_identity=True))
    assert kept.fields["content"] == body["MsgContent"]


def test_commands_and_their_acks_take_direction_from_the_socket():
    records = decode((DOWN, BY_NAME["Resume 1-1-8"].frame), (UP, BY_NAME["Resume ack 1-2-8"].frame))
    command, ack = records
    assert command.measurement == ack.measurement == "alphaess_command"
    assert command.tags == {"kind": "request"} and command.origin.direction == DOWN
    assert command.fields == {"cmd_index": "35967905", "command": "Resume", "parameter1": "2021/03/24 10:17:43",
                              "parameter2": "641"}
    assert ack.tags == {"kind": "ack"} and ack.origin.direction == UP
    assert ack.fields == {"command": "Resume", "cmd_index": "35967905", "status": "Success"}
    # B1 is request/response, not direction: a 1-1-8 arriving from the device side stays "up"
    [odd] = decode((UP, BY_NAME["SetConfig 1-1-8 (D)"].frame))
    assert odd.origin.direction == UP and odd.tags == {"kind": "request"}


def test_config_both_ways_is_a_device_info_record_without_personal_data():
    cloud = {"Status": "Success", **config_body(SERIAL), "GridCharge": False, "EmsLanguage": 0}
    device = config_body(SERIAL)
    records = decode((UP, frame(1, 3, {"SN": SERIAL})), (DOWN, frame(2, 3, cloud)), (UP, frame(1, 4, device)),
                     (DOWN, BY_NAME["ack 1-2-4"].frame))
    assert [(r.measurement, r.tags["source"], r.origin.direction) for r in records] == [
        ("alphaess_device", "cloud", DOWN), ("alphaess_device", "device", UP)]
    from_cloud, from_device = records
    assert from_cloud.tags["serial"] == SERIAL
    assert from_cloud.fields["GridCharge"] == "false" and from_cloud.fields["EmsLanguage"] == "0"
    assert from_device.fields["Popv"] == "5.0" and from_device.fields["InvSN"] == "ISIM00000000001"
    for record in records:
        assert not {"License", "Address", "ZipCode", "PhoneNumber", "Country", "Status", "SN"} & set(record.fields)
        assert not set(PLACEHOLDER_PERSONAL.values()) & set(map(str, record.fields.values()))


def test_login_record_and_frames_without_records():
    records = decode((UP, BY_NAME["login 1-1-2"].frame), (DOWN, BY_NAME["ack 1-2-2"].frame),
                     (UP, BY_NAME["empty 1-1-0"].frame), (DOWN, BY_NAME["ack 1-2-0"].frame),
                     (UP, BY_NAME["SDK system info 0x43"].frame))
    [login] = records
    assert login.measurement == "alphaess_login"
    assert login.tags == {"serial": "serialnumber"} and login.fields == {"CompanyName": "AlphaESS"}


def test_unknown_types_are_kept_raw_and_counted():
    tap = A.Tap(Origin("alphaess", "", "c1"))
    payloads = tap.feed(UP, BY_NAME["SDK running info 0x44"].frame + BY_NAME["realtime 1-1-16"].frame, RECEIVED)
    assert [(p.kind, p.meta["frame"]) for p in payloads] == [("frame", "1-1-68"), ("frame", "1-1-16")]
    assert (tap.frames, tap.unknown, tap.rejected) == (2, 1, 0)
    assert A.decode_raw(payloads[0]) == []


def test_decode_raw_kinds():
    origin = Origin("alphaess", SERIAL, "c1", UP)
    for kind in ("garbage", "partial", "opaque"):
        assert A.decode_raw(RawPayload(origin, kind, b"\x01\x01\x10\x00", RECEIVED)) == []
    with pytest.raises(ValueError, match="unknown AlphaESS payload kind"):
        A.decode_raw(RawPayload(origin, "performance_report", b"", RECEIVED))
    with pytest.raises(ValueError, match="CRC mismatch"):
        A.decode_raw(RawPayload(origin, "frame", BY_NAME["ack 1-2-2"].frame[:-1] + b"\x00", RECEIVED))


# -- the Tap: serial, direction, clock -----------------------------------------------------------

def test_tap_learns_the_serial_without_a_login_and_tags_both_directions():
    """After a reconnect the battery streams without logging in: the serial comes from its data."""
    tap = A.Tap(Origin("alphaess", "192.0.2.10:50123", "c7"))
    first = tap.feed(UP, BY_NAME["realtime 1-1-16"].frame, RECEIVED)
    ack = tap.feed(DOWN, BY_NAME["ack 1-2-16 (TV test_checksum_is_valid)"].frame, RECEIVED)
    assert tap.origin.device == SERIAL
    assert [(p.origin.device, p.origin.direction, p.origin.connection) for p in first + ack] == [
        (SERIAL, UP, "c7"), (SERIAL, DOWN, "c7")]
    assert ack[0].meta == {"frame": "1-2-16", "length": 20}


def test_tap_turns_opaque_on_tls():
    tap = A.Tap(Origin("alphaess", "", "c1"))
    hello = bytes.fromhex("160301") + b"\x02\x00" + b"\x01" * 200
    [payload] = tap.feed(UP, hello[:1], RECEIVED) + tap.feed(UP, hello[1:], RECEIVED)
    assert tap.opaque and payload.kind == "opaque" and payload.payload == hello[:5]
    assert payload.meta == {"reason": "TLS handshake"}
    assert tap.feed(UP, b"more", RECEIVED) == [] and tap.feed(DOWN, b"\x16\x03\x03", RECEIVED) == []
    assert tap.frames == 0 and tap.finish(RECEIVED) == []


def test_tap_reports_garbage_and_the_partial_frame_left_at_the_end():
    tap = A.Tap(Origin("alphaess", SERIAL, "c1"))
    realtime = BY_NAME["realtime 1-1-16"].frame
    out = tap.feed(UP, realtime + b"\x00junk\xff" + realtime[:50], RECEIVED)
    assert [p.kind for p in out] == ["frame", "garbage"] and out[1].payload == b"\x00junk\xff"
    assert out[1].meta == {"reason": "no frame header"}
    [partial] = tap.finish(RECEIVED)
    assert (partial.kind, partial.payload, partial.origin.direction) == ("partial", realtime[:50], UP)
    assert tap.rejected == 6 + 50


def realtime(t: datetime, serial: str = SERIAL, pv: str = "100") -> bytes:
    return frame(1, 16, {"Time": t.strftime("%Y/%m/%d %H:%M:%S"), "SN": serial, "Ppv1": pv})


def test_record_time_is_the_device_clock_corrected_by_the_connection_offset():
    """Device clock an hour ahead and 80 s slow: the first frame sets the offset, a late frame
    keeps its own 10-s slot, a duplicate lands on the same time, a batch keeps its spacing."""
    tap = A.Tap(Origin("alphaess", "", "c1"))
    t0 = datetime(2024, 3, 3, 22, 0, 0)  # device clock
    true0 = datetime(2024, 3, 3, 21, 1, 20, tzinfo=UTC)  # what it really was
    feeds = [
        (t0, true0 + timedelta(seconds=0.3)),
        (t0 + timedelta(seconds=10), true0 + timedelta(seconds=14.9)),  # delivered late
        (t0 + timedelta(seconds=10), true0 + timedelta(seconds=15.0)),  # sent twice
        (t0 + timedelta(seconds=20), true0 + timedelta(seconds=40.5)),  # batch of three
        (t0 + timedelta(seconds=30), true0 + timedelta(seconds=40.5)),
        (t0 + timedelta(seconds=40), true0 + timedelta(seconds=40.5)),
    ]
    payloads = [p for device, received in feeds for p in tap.feed(UP, realtime(device), received)]
    assert {p.meta["clock_offset_s"] for p in payloads} == {-3520}
    assert {p.meta["clock"] for p in payloads} == {"learned"}
    times = [A.decode_raw(p)[0].time for p in payloads]
    assert times == [true0 + timedelta(seconds=s) for s in (0, 10, 10, 20, 30, 40)]


def test_backfill_before_any_realtime_assumes_the_host_time_zone(monkeypatch):
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
    time.tzset()
    try:
        tap = A.Tap(Origin("alphaess", "", "c1"))
        [payload] = tap.feed(UP, A.encode_frame(1, 12, csv_body(
            f"2021/03/24,09:40:59,{SERIAL},1029,981,278.2,288.8,-1500.5,61.0,-28.7,257,17042704,Normal")), RECEIVED)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert payload.meta["clock"] == "host-timezone" and payload.meta["clock_offset_s"] == -3600
    [record] = A.decode_raw(payload)  # decoding needs no time zone: the offset is in the meta
    assert record.time == datetime(2021, 3, 24, 8, 40, 59, tzinfo=UTC)
    assert tap.origin.device == SERIAL


def test_without_clock_meta_realtime_uses_its_own_lag():
    raw = RawPayload(Origin("alphaess", "", "c1", UP), "frame", BY_NAME["realtime 1-1-16"].frame,
                     RECEIVED + timedelta(hours=2), {})
    [record] = A.decode_raw(raw)
    assert record.time == datetime(2024, 3, 4, 0, 5, 21, tzinfo=UTC)


# -- redaction --------------------------------------------------------------------------------

SECRETS = [PLACEHOLDER_PASSWORD.encode(), *(v.encode() for v in PLACEHOLDER_PERSONAL.values())]


def login_frame(serial: str = SERIAL) -> bytes:
    return frame(1, 2, {"UserName": serial, "Password": PLACEHOLDER_PASSWORD, "CompanyName": "AlphaESS"})


def test_login_is_redacted_and_the_stored_frame_stays_valid():
    [raw] = tap_payloads((UP, login_frame()))
    safe = A.redact_raw(raw, Privacy())
    assert PLACEHOLDER_PASSWORD.encode() not in safe.payload
    stored = A.parse_frame(safe.payload)  # a valid frame with a fresh CRC
    assert json.loads(stored.body) == {"UserName": SERIAL, "Password": REDACTED, "CompanyName": "AlphaESS"}
    assert safe.meta == {"frame": "1-1-2", "length": len(A.parse_frame(raw.payload).body), "redacted": "Password"}
    assert A.redact_raw(safe, Privacy()).payload == safe.payload  # idempotent


def test_config_personal_data_redacted_location_kept_only_when_asked():
    body = {"Status": "Success", **config_body(SERIAL)}
    [raw] = tap_payloads((DOWN, frame(2, 3, body)))
    safe = A.redact_raw(raw, Privacy())
    assert not [s for s in SECRETS if s in safe.payload]
    assert safe.meta["redacted"] == "Address,Country,License,PhoneNumber,ZipCode"
    kept = A.redact_raw(raw, Privacy(keep_network_identity=True))
    assert json.loads(A.parse_frame(kept.payload).body)["Country"] == "Testland"
    assert kept.meta["redacted"] == "Address,License,PhoneNumber,ZipCode"


def test_unchanged_frames_are_stored_byte_for_byte():
    for vector in VECTORS:
        if vector.type != 2:
            raw = RawPayload(Origin("alphaess", SERIAL, "c1", UP), "frame", vector.frame, RECEIVED, {"frame": "x"})
            safe = A.redact_raw(raw, Privacy())
            assert safe.payload == vector.frame and safe.meta == {"frame": "x"}, vector.name


def test_garbage_and_partial_frames_are_withheld():
    login = login_frame()
    bad_crc = login[:-1] + bytes([login[-1] ^ 0xFF])
    cut = login[:login.index(b"pvtap-test") + 8]  # the connection ended inside the password
    tap = A.Tap(Origin("alphaess", "", "c1"))
    payloads = tap.feed(UP, bad_crc + BY_NAME["empty 1-1-0"].frame + cut, RECEIVED) + tap.finish(RECEIVED)
    assert [p.kind for p in payloads] == ["garbage", "frame", "partial"]
    for p, reason in ((payloads[0], "bytes in no frame"), (payloads[2], "a frame cut off at the end")):
        safe = A.redact_raw(p, Privacy())
        assert safe.payload == b"" and reason in str(safe.meta["withheld"])
        assert (safe.meta["withheld_size"], safe.meta["withheld_sha256"]) == \
            (len(p.payload), hashlib.sha256(p.payload).hexdigest())
        assert safe.meta["reason"] == p.meta["reason"]  # the framer's reason is kept
        assert A.redact_raw(p, Privacy(keep_unredacted=True)).payload == p.payload  # only when asked


def test_a_network_address_as_device_label_is_not_stored():
    raw = RawPayload(Origin("alphaess", "192.0.2.10:50123", "c1", UP), "garbage", b"\x00", RECEIVED)
    assert A.redact_raw(raw, Privacy()).origin.device == ""
    v6 = RawPayload(Origin("alphaess", "[2001:db8::10]:50123", "c1", UP), "garbage", b"\x00", RECEIVED)
    assert A.redact_raw(v6, Privacy()).origin.device == ""
    assert A.redact_raw(raw, Privacy(keep_network_identity=True)).origin.device == "192.0.2.10:50123"
    named = RawPayload(Origin("alphaess", SERIAL, "c1", UP), "garbage", b"\x00", RECEIVED)
    assert A.redact_raw(named, Privacy()).origin.device == SERIAL


def test_pseudonyms_replace_every_serial_consistently():
    alias = pseudonym(SERIAL, b"test-key")
    csv = A.encode_frame(1, 12, csv_body(
        f"2021/03/24,09:40:59,{SERIAL},1029,981,278.2,288.8,-1500.5,61.0,-28.7,257,17042704,Normal"))
    payloads = tap_payloads((UP, login_frame()), (DOWN, BY_NAME["ack 1-2-2"].frame),
                            (UP, BY_NAME["realtime 1-1-16"].frame), (UP, csv),
                            (UP, frame(1, 4, config_body(SERIAL))), (UP, EVENT_FRAME))
    safe = [A.redact_raw(p, PSEUDO) for p in payloads]
    for p in safe:
        assert SERIAL.encode() not in p.payload and p.origin.device == alias
        for hw in (b"BSIM00000000001", b"ISIM00000000001"):
            assert hw not in p.payload
    assert [p.meta.get("pseudonymised") for p in safe] == [
        "UserName", None, "SN", "SN", "BatterySN1,InvSN,SN", None]
    records = [r for p in safe for r in A.decode_raw(p)]
    assert {r.tags["serial"] for r in records} == {alias} and {r.origin.device for r in records} == {alias}
    assert {r.measurement for r in records} == {"alphaess_login", "alphaess_realtime", "alphaess_backfill",
                                                "alphaess_device", "alphaess_event"}
    # by default the serial stays the device tag
    assert {r.tags["serial"] for r in decode((UP, BY_NAME["realtime 1-1-16"].frame))} == {SERIAL}


EVENT_FRAME = A.encode_frame(1, 9, EVENT_BODY)


def test_ingest_stores_no_secret_anywhere(data_dir):
    """The real path: Tap → Ingest (redact, SQLite, decode). No placeholder secret or serial ends
    up in a stored payload, its meta, or a record."""
    tap = A.Tap(Origin("alphaess", "192.0.2.10:50123", "c1"))
    stream = [(UP, login_frame()), (DOWN, BY_NAME["ack 1-2-2"].frame), (UP, frame(1, 3, {"SN": SERIAL})),
              (DOWN, frame(2, 3, {"Status": "Success", **config_body(SERIAL)})),
              (UP, frame(1, 4, config_body(SERIAL))), (UP, BY_NAME["realtime 1-1-16"].frame)]
    store = LocalStore.for_process(data_dir, "relay")
    ingest = Ingest(store, PSEUDO)
    for direction, data in stream:
        for payload in tap.feed(direction, data[:20], RECEIVED) + tap.feed(direction, data[20:], RECEIVED):
            ingest.process(payload)
    stored = list(store.raw_payloads())
    assert len(stored) == len(stream) and not any(s.decode_error for s in stored)
    records = [s.record for s in store.records()]
    assert [r.measurement for r in records] == ["alphaess_login", "alphaess_device", "alphaess_device",
                                                "alphaess_realtime"]
    dump = b"".join(s.raw.payload + json.dumps(dict(s.raw.meta)).encode() + s.raw.origin.device.encode()
                    for s in stored)
    dump += json.dumps([[r.measurement, dict(r.tags), dict(r.fields), r.origin.device] for r in records]).encode()
    for secret in [*SECRETS, SERIAL.encode(), b"192.0.2.10"]:
        assert secret not in dump, secret
    store.close()


def test_garbage_that_starts_inside_a_secret_is_withheld():
    """A run of rejected bytes may begin inside a value or inside the key before it, where no
    key shows it is a secret: rejected bytes are never stored, whatever they look like."""
    origin = Origin("alphaess", "", "c1", UP)
    for junk in (b'st-password","CompanyName":"AlphaESS"}', b'word":"pvtap-test-password","CompanyName":"AlphaESS"}',
                 b"pvtap-test-passw", b"\x00\xff\x10\x7f\x80"):
        safe = A.redact_raw(RawPayload(origin, "garbage", junk, RECEIVED), Privacy())
        assert safe.payload == b"" and safe.meta["withheld_size"] == len(junk), junk


def test_crc_is_safe_to_compute_in_several_threads_at_once():
    """The relay runs Taps in worker threads while simulators and stand-in clouds encode frames."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [json.dumps({"n": str(i), "pad": "x" * (i % 300)}).encode() for i in range(120)]
    expected = [A.encode_frame(1, 16, b) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda b: A.encode_frame(1, 16, b), bodies)) == expected
    assert all(A.parse_frame(f).body == b for f, b in zip(expected, bodies))


def test_a_valid_frame_whose_body_is_not_json_is_withheld():
    broken = A.encode_frame(1, 2, b'{"UserName":"AL0123456789012","Password":"pvtap-test-password"')  # no }
    safe = A.redact_raw(RawPayload(Origin("alphaess", "", "c1", UP), "frame", broken, RECEIVED), Privacy())
    assert safe.payload == b"" and safe.meta["withheld"] == "1-1-2 body is neither a JSON object nor the back-fill CSV"
    assert A.decode_raw(safe) == []


# -- redaction changes only the secret values ---------------------------------------------------

DUMP_WITH_REPEATS = (
    b'{"SN":"AL0123456789012", "Generator":"0","License":"PVTAP-LICENSE-1","Fan":"1",'
    b'"Generator":"1","Address":{"Street":"Placeholder 1"},"Pass\\u0077ord":"PVTAP-SECRET-PW-1",'
    b'"BatterySN1":["BSIM00000000001","BSIM00000000002"],"Generator_2":"7"}')


def test_redaction_keeps_repeated_keys_and_every_byte_outside_the_secret_values():
    raw = RawPayload(Origin("alphaess", SERIAL, "c1", UP), "frame", A.encode_frame(1, 4, DUMP_WITH_REPEATS), RECEIVED)
    safe = A.redact_raw(raw, Privacy())
    body = A.parse_frame(safe.payload).body  # a valid frame again: fresh CRC
    assert body == (b'{"SN":"AL0123456789012", "Generator":"0","License":"REDACTED","Fan":"1",'
                    b'"Generator":"1","Address":"REDACTED","Pass\\u0077ord":"REDACTED",'
                    b'"BatterySN1":["BSIM00000000001","BSIM00000000002"],"Generator_2":"7"}')
    assert safe.meta["redacted"] == "Address,License,Password"
    (record,) = A.decode_raw(safe)
    # the first Generator keeps its name, the second is numbered past the real Generator_2
    assert {k: v for k, v in record.fields.items() if k.startswith("Generator")} == \
        {"Generator": "0", "Generator_3": "1", "Generator_2": "7"}
    assert "License" not in record.fields and "Password" not in record.fields


def test_pseudonyms_change_only_the_serial_values():
    raw = RawPayload(Origin("alphaess", SERIAL, "c1", UP), "frame", A.encode_frame(1, 4, DUMP_WITH_REPEATS), RECEIVED)
    body = A.parse_frame(A.redact_raw(raw, PSEUDO).payload).body
    alias = pseudonym(SERIAL, b"test-key").encode()
    assert body.startswith(b'{"SN":"' + alias + b'", "Generator":"0"')
    assert b"BSIM00000000001" not in body and pseudonym("BSIM00000000002", b"test-key").encode() in body


def test_a_cut_off_wifi_style_login_frame_never_stores_the_password(data_dir):
    """The issue's finding, for AlphaESS: a login cut off at the end of a connection."""
    login = login_frame()
    cut = login[:login.index(b"pvtap-test") + 8]
    store = LocalStore.for_process(data_dir, "relay")
    ingest = Ingest(store, Privacy())
    tap = A.Tap(Origin("alphaess", "", "c1"))
    for payload in tap.feed(UP, cut, RECEIVED) + tap.finish(RECEIVED):
        ingest.process(payload)
    store.close()
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert b"pvtap-test" not in path.read_bytes(), path
