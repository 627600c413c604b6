"""The Enphase decoder against the reference vectors (shared/reference/enphase.md §5), its wire
forms, hostile input, and redaction."""

from __future__ import annotations

import hashlib
import random
import urllib.parse
import zlib
from datetime import timedelta

import pytest

from pvtap.decode.enphase import (
    MAX_INFLATED,
    PayloadTooLarge,
    ReportError,
    build_response,
    decode_raw,
    event_ids,
    inflate,
    parse_xml,
    redact_raw,
    report_kind,
    report_xml,
)
from pvtap.ingest import Ingest
from pvtap.privacy import Privacy, pseudonym
from pvtap.records import DOWN, UP, Origin, RawPayload, Record, utc_from_unix
from pvtap.simulate.enphase import Simulator, encode_body
from pvtap.store.lineprotocol import to_line
from pvtap.store.local import LocalStore
from tests.enphase_support import (
    DEFLATE,
    RECEIVED,
    VECTOR_1,
    VECTOR_1_RESPONSE,
    VECTOR_1_SERIALS,
    VECTOR_2,
    assert_records,
    request_raw,
    response_raw,
    wire_body,
)

KEY = b"k" * 32
KEEP_ALL = Privacy(keep_network_identity=True)
PSEUDONYMS = Privacy(pseudonym_key=KEY)
NOON = 1718971200  # 2024-06-21 12:00 UTC


def at(seconds: int, microseconds: int = 0):
    return utc_from_unix(seconds) + timedelta(microseconds=microseconds)


def origin(device: str = "123456115374") -> Origin:
    return Origin("enphase", device, "flow-1", UP)


def vector_1_records(device: str = "123456115374") -> list[Record]:
    """Every value of vector 1, as the decoder must give it."""
    o, envoy = origin(device), {"envoy": device}
    return [
        Record("enphase_envoy", at(1329134202), envoy, {
            "report_timestamp": 1329134202, "ip_addr": "192.168.1.166", "mac_addr": "00:11:22:33:44:55",
            "timezone": "US/Eastern", "part_num": "800-00024-r04", "sw_version": "R3.0.0 (9720d7)",
            "event_count": 2, "device_count": 1, "channel_count": 1, "interval_count": 0, "reading_count": 0}, o),
        Record("enphase_event", at(1329134118, 221), {**envoy, "eqid": "123456102635", "code": "10009"}, {
            "id": 221, "event_code": 10009, "state": "set", "state_code": 1, "correlation_id": 161,
            "serial_num": "123456102635", "description": "Microinverter sleeping"}, o),
        Record("enphase_event", at(1329134152, 227), {**envoy, "eqid": "123456104335", "code": "509"}, {
            "id": 227, "event_code": 509, "state": "one-shot", "state_code": 0, "serial_num": "123456104335",
            "description": "Power on reset"}, o),
        Record("enphase_device", at(1329134202), {**envoy, "eqid": "123456105321"}, {
            "admin_state": 1, "condition_flags": 2097152, "control_bits": 0, "device_type": 1,
            "image_bits": 131072, "observed_flags": 0, "part_num": "800-00103-r05"}, o),
        Record("enphase_channel", at(1329134202), {**envoy, "eqid": "123456105321.1"}, {
            "channel_type": 1, "condition_flags": 0, "control_bits": 0, "observed_flags": 0}, o),
    ]


VECTOR_2_INTERVAL = {"id": 1000001, "interval_duration_s": 300, "stat_duration_s": 295, "energy_j": 60000,
                     "energy_wh": 60000 / 3600, "avg_power_w": 200.0}
VECTOR_2_READING = {"id": 2000001, "duration_s": 300, "ac_voltage_v": 240.0, "ac_frequency_hz": 50.0,
                    "dc_voltage_v": 32.0, "dc_current_a": 6.5, "temperature_c": 40.0, "flags": 0,
                    "stats_5": 0, "stats_6": 0, "energy_j": 60000, "avg_power_w": 200.0}


# -- envelope ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path, kind", [
    ("/emu_reports/performance_report", "performance_report"),
    ("/emu_reports/performance_report/", "performance_report"),
    ("/emu_reports/task_complete", "task_complete"),
    ("/emu_reports/device_status", "emu_report"),
    ("/emu_reports/", "emu_report"),
    ("/performance_report", None),
    ("/api/v1/production", None),
    ("/emu_reportsX/performance_report", None),
])
def test_report_kind_matches_the_path_only(path: str, kind: str | None) -> None:
    assert report_kind(path) == kind
    assert report_kind(f"{path}?webcomm_version=9.9.9") == kind


# -- vector 1: events and device state --------------------------------------------------------

def test_vector_1_decodes_every_value() -> None:
    assert_records(decode_raw(request_raw(wire_body(VECTOR_1))), vector_1_records())


def test_vector_1_response_decodes() -> None:
    records = decode_raw(response_raw(zlib.compress(VECTOR_1_RESPONSE)))
    assert_records(records, [Record("enphase_report_response", RECEIVED, {}, {
        "status": "success", "events_acknowledged": 8, "event_ids": "221,222,223,224,225,226,227,228",
        "http_status": 200}, Origin("enphase", "", "flow-1", DOWN))])


def test_event_ids_and_build_response_round_trip() -> None:
    body = wire_body(VECTOR_1)
    assert event_ids(body, DEFLATE) == ["221", "227"]
    answer = build_response([str(i) for i in range(221, 229)])
    assert zlib.decompress(answer) == (
        b'<?xml version="1.0" encoding="UTF-8"?><perf_report_response status="success"><events_processed>'
        + b"".join(b'<event id="%d"/>' % i for i in range(221, 229))
        + b"</events_processed></perf_report_response>")
    (record,) = decode_raw(response_raw(answer))
    assert record.fields["event_ids"] == "221,222,223,224,225,226,227,228"
    odd = build_response(['1"<&>'])
    assert event_ids(odd, DEFLATE) == ['1"<&>']
    assert zlib.decompress(build_response([])).endswith(b"<events_processed></events_processed></perf_report_response>")


# -- vector 2: interval and reading -----------------------------------------------------------

def test_vector_2_interval_and_reading() -> None:
    records = decode_raw(request_raw(wire_body(VECTOR_2)))
    o = Origin("enphase", "", "flow-1", UP)
    channel = {"eqid": "999900000001.1"}
    assert_records(records[1:], [
        Record("enphase_interval", at(1700000100), channel, VECTOR_2_INTERVAL, o),
        Record("enphase_reading", at(1700000100), channel, VECTOR_2_READING, o),
    ])
    assert records[1].fields["energy_wh"] == pytest.approx(16.6666666667)
    assert records[0].measurement == "enphase_envoy" and records[0].fields["interval_count"] == 1


def test_seven_value_reading_has_no_energy() -> None:
    xml = VECTOR_2.replace(b"40,0,0,60000", b"40,0,0")
    reading = decode_raw(request_raw(xml, None))[2]
    assert "energy_j" not in reading.fields and "avg_power_w" not in reading.fields
    assert reading.fields["temperature_c"] == 40.0


# -- vector 4: wire forms ---------------------------------------------------------------------

def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


WIRE_FORMS = {
    "zlib form": (wire_body(VECTOR_1), DEFLATE, {}),
    "zlib bare xml": (zlib.compress(VECTOR_1), DEFLATE, {}),
    "extra form fields": (zlib.compress(b"version=2&body=" + urllib.parse.quote(VECTOR_1).encode() + b"&x=a%20b+c"),
                          DEFLATE, {"version": "2", "x": "a b c"}),
    "plus for space": (zlib.compress(b"body=" + urllib.parse.quote_plus(VECTOR_1).encode()), DEFLATE, {}),
    "raw deflate": (_raw_deflate(b"body=" + urllib.parse.quote(VECTOR_1).encode()), DEFLATE, {}),
    "uncompressed form": (b"body=" + urllib.parse.quote(VECTOR_1).encode(), "application/x-www-form-urlencoded", {}),
    "uncompressed xml": (VECTOR_1, None, {}),
    "content type with charset": (wire_body(VECTOR_1), "Application/X-Deflate; charset=utf-8", {}),
}


@pytest.mark.parametrize("name", WIRE_FORMS)
def test_wire_forms_give_the_same_xml_and_records(name: str) -> None:
    body, content_type, fields = WIRE_FORMS[name]
    assert report_xml(body, content_type) == (VECTOR_1, fields)
    raw = request_raw(body, content_type)
    assert_records(decode_raw(raw), vector_1_records())
    redacted = redact_raw(raw, KEEP_ALL)
    assert redacted.meta["encoding"] == "xml"
    assert_records(decode_raw(redacted), vector_1_records())


def test_plus_and_percent_20_both_decode_to_space() -> None:
    assert "%20" in urllib.parse.quote(VECTOR_1) and "+" in urllib.parse.quote_plus(VECTOR_1)
    assert report_xml(WIRE_FORMS["plus for space"][0], DEFLATE)[0] == VECTOR_1
    assert report_xml(zlib.compress(b"body=a%2Bb+c%20d%25e"), DEFLATE)[0] == b"a+b c d%e"


def test_unknown_webcomm_version_decodes() -> None:
    raw = request_raw(wire_body(VECTOR_1), query="webcomm_version=99.1.0")
    assert report_kind(str(raw.meta["path"])) == "performance_report"
    assert_records(decode_raw(raw), vector_1_records())


def test_4_6_0_report_with_location_and_message_params() -> None:
    xml = (b'<?xml version="1.0" encoding="UTF-8"?><perf_report report_timestamp="1700000107" webcomm_version="4.6.0">'
           b'<envoy serial_num="999900000000" latitude="12.345678" longitude="-98.765432" emu_region="NA"/>'
           b'<event correlation_id="8" event_state="1" id="7" event_code="10031" eqid="999900000000" '
           b'event_date="1700000000" message_key="4"><message_params>{"value":"true"}</message_params></event>'
           b"</perf_report>")
    envoy, event = decode_raw(request_raw(wire_body(xml)))
    assert envoy.fields["latitude"] == 12.345678 and envoy.fields["longitude"] == -98.765432
    assert envoy.fields["webcomm_version"] == "4.6.0" and envoy.fields["emu_region"] == "NA"
    assert event.fields == {"id": 7, "event_code": 10031, "state": "set", "state_code": 1, "correlation_id": 8,
                            "message_key": 4, "message_params": '{"value":"true"}'}
    assert event.tags == {"envoy": "999900000000", "eqid": "999900000000", "code": "10031"}


# -- unknown content, collisions, types -------------------------------------------------------

UNKNOWN = (b"<perf_report report_timestamp='1700000107' novelty='1'>"
           b"<envoy serial_num='999900000000' colour='blue'/>"
           b"<widget a='1' b='2'>hello</widget><widget a='3'/>"
           b"<intervals><interval interval_duration='300' stat_duration='295' end_date='1700000100' stats='5' "
           b"id='9' eqid='999900000001.1' phase='L2'/></intervals>"
           b"<interval interval_duration='300' end_date='1700000100' stats='abc' id='10' eqid='999900000002.1'/>"
           b"<interval interval_duration='300' end_date='1700000100' stats='1,2,3' id='11' eqid='999900000003.1'/>"
           b"</perf_report>")


def test_unknown_elements_and_attributes_are_kept_deterministically() -> None:
    records = decode_raw(request_raw(UNKNOWN, None))
    assert_records(decode_raw(request_raw(UNKNOWN, None)), records)
    by = [(r.measurement, dict(r.tags), dict(r.fields)) for r in records]
    envoy = {"envoy": "999900000000"}
    assert by[0][2]["novelty"] == "1" and by[0][2]["colour"] == "blue"
    assert by[1] == ("enphase_interval", {**envoy, "eqid": "999900000001.1"}, {
        "id": 9, "interval_duration_s": 300, "stat_duration_s": 295, "energy_j": 5, "energy_wh": 5 / 3600,
        "avg_power_w": 5 / 300, "phase": "L2"})
    assert by[2] == ("enphase_interval", {**envoy, "eqid": "999900000003.1"}, {
        "id": 11, "interval_duration_s": 300, "stats": "1,2,3"})
    assert by[3:] == [
        ("enphase_element", {**envoy, "element": "widget", "n": "0"},
         {"a": "1", "b": "2", "text": "hello", "parent": "perf_report"}),
        ("enphase_element", {**envoy, "element": "widget", "n": "1"}, {"a": "3", "parent": "perf_report"}),
        ("enphase_element", {**envoy, "element": "interval", "n": "0"}, {
            "interval_duration": "300", "end_date": "1700000100", "stats": "abc", "id": "10",
            "eqid": "999900000002.1", "parent": "perf_report",
            "decode_error": "ValueError: invalid literal for int() with base 10: 'abc'"}),
    ]
    assert all(r.time == at(1700000107) for r in records if r.measurement == "enphase_element")


def test_unreadable_known_elements_are_kept_with_their_error() -> None:
    xml = (b"<perf_report report_timestamp='1700000107'>"
           b"<interval interval_duration='300' end_date='1700000100' stats='9223372036854775808' id='1' eqid='e.1'/>"
           b"<event event_state='1' id='2' event_code='x' eqid='e' event_date='1700000000'>"
           b"<message_params>{\"value\":\"true\"}</message_params></event>"
           b"<reading duration='300' stats='1,2,3' date='1700000100' id='3' eqid='e.1'/></perf_report>")
    envoy, *elements = decode_raw(request_raw(xml, None))
    assert envoy.fields["interval_count"] == envoy.fields["event_count"] == envoy.fields["reading_count"] == 0
    assert [(r.tags["element"], r.fields.get("decode_error")) for r in elements] == [
        ("interval", "ValueError: '9223372036854775808' is out of the 64-bit range"),
        ("event", "ValueError: <event> event_code: invalid literal for int() with base 10: 'x'"),
        ("message_params", None),
        ("reading", "ValueError: reading stats has 3 values, expected at least 5"),
    ]
    assert elements[2].fields == {"text": '{"value":"true"}', "parent": "event"}


def test_events_in_the_same_second_stay_distinct_points() -> None:
    xml = (b"<perf_report report_timestamp='1700000107'><envoy serial_num='999900000000'/>"
           b"<event correlation_id='302' event_state='1' id='301' event_code='512' eqid='999900000001' "
           b"event_date='1700000000'/>"
           b"<event correlation_id='301' event_state='2' id='302' event_code='512' eqid='999900000001' "
           b"event_date='1700000000'/></perf_report>")
    _, set_, clear = decode_raw(request_raw(xml, None))
    assert (set_.tags, clear.tags) == (dict(set_.tags), dict(set_.tags))
    assert set_.time == at(1700000000, 301) and clear.time == at(1700000000, 302)
    series = {to_line(r).rsplit(" ", 1)[1] for r in (set_, clear)}
    assert len(series) == 2  # different timestamps: InfluxDB keeps both
    assert (set_.fields["state"], clear.fields["state"]) == ("set", "clear")


def test_field_types_are_stable_across_reports() -> None:
    simulator = Simulator(micros=3, start=NOON - 13 * 3600)
    payloads = [VECTOR_1, VECTOR_2, UNKNOWN] + [simulator.next_report(120).xml for _ in range(4)]
    types: dict[tuple[str, str], set[str]] = {}
    for xml in payloads:
        for record in decode_raw(request_raw(xml, None)):
            for name, value in record.fields.items():
                types.setdefault((record.measurement, name), set()).add(type(value).__name__)
            to_line(record)
    flipping = {key: kinds for key, kinds in types.items() if len(kinds) > 1}
    assert not flipping
    assert types[("enphase_interval", "energy_j")] == {"int"}
    assert types[("enphase_reading", "temperature_c")] == {"float"}
    assert types[("enphase_interval", "avg_power_w")] == {"float"}


# -- bad input --------------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
""" + b"".join(b' <!ENTITY lol%d "%s">\n' % (i, (b"&lol%s;" % (b"" if i == 1 else b"%d" % (i - 1))) * 10)
               for i in range(1, 10)) + b"""]>
<perf_report report_timestamp="&lol9;"><envoy serial_num="&lol9;"/></perf_report>"""


@pytest.mark.timeout(10)
def test_billion_laughs_is_refused_without_expansion() -> None:
    assert BILLION_LAUGHS.count(b"<!ENTITY") == 10
    for xml in (BILLION_LAUGHS, BILLION_LAUGHS.decode().encode("utf-16"),
                b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/hostname">]>'
                b'<perf_report report_timestamp="1">&x;</perf_report>'):
        with pytest.raises(ReportError, match=r"DOCTYPE|parse"):
            parse_xml(xml)
    with pytest.raises(ReportError, match="DOCTYPE"):
        decode_raw(request_raw(wire_body(BILLION_LAUGHS)))
    assert_withheld(redact_raw(request_raw(wire_body(BILLION_LAUGHS)), Privacy()), wire_body(BILLION_LAUGHS),
                    "DOCTYPE")


def assert_withheld(redacted: RawPayload, body: bytes, reason: str) -> None:
    assert redacted.payload == b"" and reason in str(redacted.meta["withheld"])
    assert redacted.meta["withheld_size"] == len(body) == redacted.meta["original_size"]
    assert redacted.meta["withheld_sha256"] == hashlib.sha256(body).hexdigest()


def test_utf16_doctype_is_refused_after_parsing() -> None:
    xml = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE perf_report><perf_report report_timestamp="1"/>'
    with pytest.raises(ReportError, match="DOCTYPE"):
        parse_xml(xml.encode("utf-16"))


def test_corrupt_zlib() -> None:
    damaged = bytearray(wire_body(VECTOR_1))
    damaged[20:40] = bytes(20)
    body = bytes(damaged)
    with pytest.raises(ReportError, match="neither zlib nor raw deflate"):
        inflate(body, DEFLATE)
    with pytest.raises(ReportError):
        decode_raw(request_raw(body))
    redacted = redact_raw(request_raw(body), Privacy())
    assert_withheld(redacted, body, "neither zlib nor raw deflate")
    with pytest.raises(ReportError, match=r"withheld: does not decode: .*neither zlib nor raw deflate"):
        decode_raw(redacted)
    kept = redact_raw(request_raw(body), Privacy(keep_unredacted=True))  # opted in: as received
    assert (kept.payload, kept.meta["encoding"], kept.meta["original_size"]) == (body, "original", len(body))
    assert "neither zlib" in str(kept.meta["unredacted"])


def test_truncated_xml() -> None:
    cut = VECTOR_1[:VECTOR_1.index(b"<device")]
    raw = request_raw(wire_body(cut))
    with pytest.raises(ReportError, match="does not parse"):
        decode_raw(raw)
    redacted = redact_raw(raw, PSEUDONYMS)
    assert_withheld(redacted, raw.payload, "does not parse")
    with pytest.raises(ReportError, match="does not parse"):
        decode_raw(redacted)


def test_truncated_zlib_stream_is_withheld() -> None:
    body = wire_body(VECTOR_1)
    cut = body[: len(body) * 2 // 3]
    with pytest.raises(ReportError):
        inflate(cut, DEFLATE)
    assert b"192.168.1.166" in zlib.decompressobj().decompress(cut)  # what storing it as sent would give away
    redacted = redact_raw(request_raw(cut), Privacy())
    assert_withheld(redacted, cut, "neither zlib nor raw deflate")
    with pytest.raises(ReportError):
        decode_raw(redacted)


def test_truncated_mid_attribute_leaks_nothing() -> None:
    cut = VECTOR_1[:VECTOR_1.index(b"192.168.1.1") + 9]
    assert_withheld(redact_raw(request_raw(wire_body(cut)), Privacy()), wire_body(cut), "does not parse")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A zlib stream inflating to MAX_INFLATED + 1 MiB of zeros (about 65 KiB compressed)."""
    compressor, chunk = zlib.compressobj(9), bytes(1 << 20)
    return b"".join(compressor.compress(chunk) for _ in range(MAX_INFLATED // len(chunk) + 1)) + compressor.flush()


def test_decompression_bomb_is_refused(bomb: bytes) -> None:
    assert len(bomb) < 1 << 20
    with pytest.raises(PayloadTooLarge):
        inflate(bomb, DEFLATE)
    with pytest.raises(PayloadTooLarge):
        inflate(zlib.compress(bytes(4097)), DEFLATE, max_size=4096)
    assert inflate(zlib.compress(bytes(4096)), DEFLATE, max_size=4096) == bytes(4096)
    with pytest.raises(PayloadTooLarge):
        decode_raw(request_raw(bomb))
    assert_withheld(redact_raw(request_raw(bomb), Privacy()), bomb, "too large: body inflates beyond")


def test_empty_body() -> None:
    assert inflate(b"", DEFLATE) == b""
    with pytest.raises(ReportError, match="empty"):
        report_xml(b"", DEFLATE)
    with pytest.raises(ReportError, match="empty"):
        decode_raw(request_raw(b""))
    with pytest.raises(ReportError, match="empty"):
        decode_raw(response_raw(b""))
    assert_withheld(redact_raw(request_raw(b""), Privacy()), b"", "empty body")
    assert decode_raw(request_raw(b"", None, kind="task_complete")) == []


def test_form_without_body_and_unexpected_root() -> None:
    with pytest.raises(ReportError, match="'body' field"):
        report_xml(zlib.compress(b"a=1&b=2"), DEFLATE)
    with pytest.raises(ReportError, match="unexpected root"):
        decode_raw(request_raw(b"<html><body>502</body></html>", "text/html"))
    with pytest.raises(ReportError, match="report_timestamp"):
        decode_raw(request_raw(b"<perf_report><envoy serial_num='1'/></perf_report>", None))


def test_other_emu_reports_are_stored_raw_only() -> None:
    task = request_raw(b"task=42&status=done", "application/x-www-form-urlencoded", kind="task_complete")
    assert decode_raw(task) == []
    assert decode_raw(response_raw(b"OK", "text/plain", kind="task_complete")) == []
    assert len(decode_raw(request_raw(wire_body(VECTOR_1), kind="emu_report"))) == 5
    # an undocumented body is not positively redacted (the serial here would be stored in clear)
    body = b"task=42&serial=123456115374"
    redacted = redact_raw(request_raw(body, "text/plain", kind="task_complete"), Privacy())
    assert_withheld(redacted, body, "body is neither XML nor a form with a 'body' field")
    assert decode_raw(redacted) == []


def test_hostile_payloads_never_break_redaction_and_fail_cleanly() -> None:
    rng = random.Random(7)
    report = Simulator(micros=2, start=NOON).next_report().xml
    payloads = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))) for _ in range(100)]
    payloads += [zlib.compress(bytes(rng.getrandbits(8) for _ in range(200))) for _ in range(30)]
    for _ in range(150):
        mutated = bytearray(report)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.choice(b"<>\"'=&%0123456789abcdef \x00\xff")
        payloads.append(bytes(mutated))
        payloads.append(encode_body(bytes(mutated)))
    outcomes = {"decoded": 0, "refused": 0}
    for payload in payloads:
        for privacy in (Privacy(), PSEUDONYMS):
            for raw in (request_raw(payload), request_raw(payload, None), response_raw(payload)):
                redacted = redact_raw(raw, privacy)
                try:
                    records = decode_raw(redacted)
                except ReportError:
                    outcomes["refused"] += 1
                else:
                    outcomes["decoded"] += 1
                    for record in records:
                        to_line(record)
    assert outcomes["decoded"] > 100 and outcomes["refused"] > 100


# -- redaction --------------------------------------------------------------------------------

def test_network_identity_is_removed_by_default_and_kept_on_request() -> None:
    raw = request_raw(wire_body(VECTOR_1))
    redacted = redact_raw(raw, Privacy())
    assert redacted.meta["encoding"] == "xml" and redacted.meta["original_size"] == len(raw.payload)
    for secret in (b"192.168.1.166", b"00:11:22:33:44:55", b"ip_addr", b"mac_addr"):
        assert secret not in redacted.payload
    envoy = decode_raw(redacted)[0]
    assert not {"ip_addr", "mac_addr", "latitude", "longitude"} & set(envoy.fields)
    assert redacted.origin.device == "123456115374"  # no pseudonym key: serials stay
    kept = redact_raw(raw, KEEP_ALL)
    assert b"192.168.1.166" in kept.payload and b"00:11:22:33:44:55" in kept.payload
    assert_records(decode_raw(kept), vector_1_records())


def test_location_is_network_identity() -> None:
    report = Simulator(micros=1, start=NOON).next_report()
    raw = request_raw(encode_body(report.xml))
    assert b"latitude" not in redact_raw(raw, Privacy()).payload
    envoy = decode_raw(redact_raw(raw, KEEP_ALL))[0]
    assert (envoy.fields["latitude"], envoy.fields["longitude"]) == (0.0, 0.0)


def test_pseudonyms_are_stable_and_applied_everywhere() -> None:
    raw = request_raw(wire_body(VECTOR_1))
    redacted = redact_raw(raw, PSEUDONYMS)
    for serial in VECTOR_1_SERIALS:
        assert serial.encode() not in redacted.payload
        assert serial not in repr(redacted.meta) and serial not in redacted.origin.device
    records = decode_raw(redacted)
    assert records[1].tags["eqid"] == records[1].fields["serial_num"] == pseudonym("123456102635", KEY)
    assert records[4].tags["eqid"] == pseudonym("123456105321", KEY) + ".1"
    assert records[3].tags["eqid"] == pseudonym("123456105321", KEY)
    assert {r.tags["envoy"] for r in records} == {pseudonym("123456115374", KEY)}
    assert redact_raw(raw, PSEUDONYMS) == redacted  # stable
    assert redact_raw(redacted, PSEUDONYMS).payload == redacted.payload  # idempotent on replay
    assert redact_raw(raw, Privacy(pseudonym_key=b"other" * 8)).payload != redacted.payload



def test_serials_spelt_otherwise_are_pseudonymised_on_the_tree() -> None:
    """Redaction rewrites plainly written serial attributes in the text before parsing; one
    spelt with an entity, single quotes or spaces around `=` is not matched there, and the check
    on the parsed tree finds and pseudonymises it, as every other one."""
    xml = (b'<perf_report report_timestamp="1700000107"><envoy serial_num="999900000000"/>'
           b'<interval interval_duration="300" end_date="1700000100" stats="1" id="5" eqid="999900000001.1"/>'
           b'<interval interval_duration="300" end_date="1700000100" stats="2" id="6" eqid="99990000000&#50;.1"/>'
           b"<interval interval_duration='300' end_date='1700000100' stats='3' id='7' eqid='999900000003.1'/>"
           b'<reading duration="300" stats="1,2,3,4,5" date="1700000100" id="8" eqid = "999900000004.1"/>'
           b"</perf_report>")
    redacted = redact_raw(request_raw(wire_body(xml)), PSEUDONYMS)
    for serial in ("999900000000", "999900000001", "999900000002", "999900000003", "999900000004"):
        assert serial.encode() not in redacted.payload
    records = decode_raw(redacted)
    assert [r.tags["eqid"] for r in records[1:]] == [pseudonym(f"99990000000{n}", KEY) + ".1" for n in (1, 2, 3, 4)]
    assert {r.tags["envoy"] for r in records} == {pseudonym("999900000000", KEY)}


def _as_redacted(record: Record, privacy: Privacy) -> Record:
    """What redaction should turn a record decoded from the original into."""
    def serial(value: str) -> str:
        head, dot, rest = value.partition(".")
        return privacy.serial(head) + dot + rest
    tags = {k: serial(v) if k in ("envoy", "eqid") else v for k, v in record.tags.items()}
    fields = {k: serial(v) if k == "serial_num" and isinstance(v, str) else v for k, v in record.fields.items()
              if privacy.keep_network_identity or k not in ("ip_addr", "mac_addr", "latitude", "longitude")}
    o = record.origin
    return Record(record.measurement, record.time, tags, fields, Origin(o.protocol, serial(o.device), o.connection,
                                                                       o.direction))


@pytest.mark.parametrize("privacy", [Privacy(), PSEUDONYMS, Privacy(keep_network_identity=True, pseudonym_key=KEY)])
def test_decode_of_redacted_equals_decode_apart_from_redacted_fields(privacy: Privacy) -> None:
    simulator = Simulator(micros=5, start=NOON - 12 * 3600 - 600)
    for xml in (VECTOR_1, VECTOR_2, simulator.next_report().xml, simulator.next_report(200).xml):
        raw = request_raw(wire_body(xml))
        expected = [_as_redacted(r, privacy) for r in decode_raw(raw)]
        assert_records(decode_raw(redact_raw(raw, privacy)), expected)


def test_identities_in_free_text_and_form_fields_are_scrubbed() -> None:
    xml = (b"<perf_report report_timestamp='1700000107'>"
           b"<envoy serial_num='999900000000' ip_addr='192.0.2.10' note='gateway 999900000000 at 192.0.2.10'/>"
           b"<event event_state='0' id='1' event_code='10006' eqid='999900000000' event_date='1700000000'>"
           b"<message_params>{\"eqid\":\"999900000001.1\",\"host\":\"192.0.2.10\"}</message_params></event>"
           b"<interval interval_duration='300' end_date='1700000100' stats='1' id='5' eqid='999900000001.1'/>"
           b"</perf_report>")
    body = zlib.compress(b"sn=999900000000&body=" + urllib.parse.quote(xml).encode())
    redacted = redact_raw(request_raw(body), PSEUDONYMS)
    envoy_p, micro_p = pseudonym("999900000000", KEY), pseudonym("999900000001", KEY)
    assert b"999900000000" not in redacted.payload and b"999900000001" not in redacted.payload
    assert b"192.0.2.10" not in redacted.payload
    assert redacted.meta["form_fields"] == f"sn={envoy_p}"
    envoy, event, interval = decode_raw(redacted)
    assert envoy.fields["note"] == f"gateway {envoy_p} at REDACTED"
    assert event.fields["message_params"] == f'{{"eqid":"{micro_p}.1","host":"REDACTED"}}'
    assert interval.tags["eqid"] == f"{micro_p}.1"


# -- the store path ---------------------------------------------------------------------------

def test_ingest_stores_redacted_raw_and_typed_records(data_dir) -> None:
    report = Simulator(micros=2, start=NOON).next_report()
    raw = request_raw(encode_body(report.xml))
    with LocalStore.for_process(data_dir, "enphase") as store:
        ingest = Ingest(store, PSEUDONYMS)
        raw_id = ingest.process(raw)
        bad_id = ingest.process(request_raw(b"\x78\x9c garbage"))
        stored = {s.id: s for s in store.raw_payloads()}
        assert stored[raw_id].raw.meta["encoding"] == "xml" and stored[raw_id].decode_error is None
        assert b"999900000001" not in stored[raw_id].raw.payload
        assert stored[raw_id].raw.origin.device == pseudonym("999900000000", KEY)
        assert (stored[bad_id].decode_error or "").startswith("ReportError")
        records = [s.record for s in store.records()]
    assert_records(records, decode_raw(redact_raw(raw, PSEUDONYMS)))
    assert [r.measurement for r in records].count("enphase_interval") == 2
