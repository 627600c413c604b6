"""Redaction fails closed (issue 9, item 1): known secrets pushed through every path — a good
frame, a bad CRC, cut off at the end of the connection, an oversized length, undecodable — of
every payload kind of every protocol, into a real store in a temporary data dir. Then every file
in the data dir (WAL included, while the store is open, and again after it closed) and the log
are searched for every secret in every form an attacker would try: as is, hex, base64 at all
three alignments, UTF-16, URL-encoded, and inflated from any zlib stream found in the bytes.

Serials are secrets only with pseudonymisation on (by default they are the device's tag), and
network identity (IP, MAC, SSID, location) only while it is not kept: the tests run with
pseudonyms on and network identity off, so every placeholder below must be absent.
"""

from __future__ import annotations

import base64
import binascii
import logging
import urllib.parse
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pvtap.decode import alphaess, foxess
from pvtap.privacy import Privacy
from pvtap.records import DOWN, UP, Origin, RawPayload
from pvtap.simulate.enphase import encode_body
from tests.ingest_support import ingested

PASSWORD = "PVTAP-SECRET-PW-1"
LICENSE = "PVTAP-LICENSE-0042"
SERIAL = "PVTAPFAKESN0001"
SSID = "PVTAP-HOME-WIFI"
IP = "192.0.2.77"
MAC = "02:00:5E:10:00:77"
LATITUDE, LONGITUDE = "52.1234567", "13.7654321"
PEER = "192.0.2.78:51234"  # the device's address as the relay would label it
PRIVACY = Privacy(pseudonym_key=b"fail-closed-test-key-32-bytes!!!")
RECEIVED = datetime(2024, 6, 21, 12, 0, tzinfo=UTC)
ORIGINS = {name: Origin(name, PEER, "c-test") for name in ("alphaess", "foxess", "enphase")}


# -- what an attacker would try ----------------------------------------------------------------

def forms(secret: str) -> set[bytes]:
    """The secret as bytes in the encodings a reader of the store would try."""
    raw = secret.encode()
    out = {raw, raw.hex().encode(), raw.hex().upper().encode(), secret.encode("utf-16-le"),
           urllib.parse.quote(secret).encode(), urllib.parse.quote_plus(secret).encode()}
    for shift in range(3):  # base64 of the secret inside a longer text: any of three alignments
        encoded = base64.b64encode(b"\0" * shift + raw)[4 * ((shift + 2) // 3):]
        out.add(encoded[: (len(raw) * 4) // 3 - 4])
    return {f for f in out if len(f) >= 6}


def inflated_streams(blob: bytes, limit: int = 4000) -> Iterable[bytes]:
    """What zlib (and raw deflate) make of the bytes from every place a stream could start."""
    start = 0
    for _ in range(limit):
        at = blob.find(b"\x78", start)
        if at < 0:
            break
        start = at + 1
        for wbits in (zlib.MAX_WBITS, -zlib.MAX_WBITS):
            try:
                yield zlib.decompressobj(wbits).decompress(blob[at:], 1 << 20)
            except zlib.error:
                pass


def leaks(blob: bytes, secrets: Iterable[str]) -> list[str]:
    found = []
    candidates = [blob, *inflated_streams(blob)]
    for secret in secrets:
        variants = forms(secret) | {v.lower() for v in forms(secret)}
        if any(v in c for c in candidates for v in variants):
            found.append(secret)
    return found


def assert_nothing_leaks(data_dir: Path, log: str, secrets: Iterable[str]) -> None:
    secrets = list(secrets)
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith("-wal") for p in files) or files, "the store wrote its files"
    for path in files:
        assert leaks(path.read_bytes(), secrets) == [], path
    assert leaks(log.encode(), secrets) == [], "the log"


def store_and_check(data_dir: Path, caplog: pytest.LogCaptureFixture, payloads: list[RawPayload],
                    secrets: Iterable[str]) -> list:
    """Everything through the in-process ingest into a real store; no secret anywhere, while the
    store is open (WAL on disk) and after it closed. Returns the stored rows."""
    secrets = list(secrets)
    with caplog.at_level(logging.DEBUG):
        with ingested(data_dir, PRIVACY, payloads) as store:
            assert_nothing_leaks(data_dir, caplog.text, secrets)
            rows = list(store.raw_payloads())
        assert_nothing_leaks(data_dir, caplog.text, secrets)
    return rows


def test_the_leak_finder_finds_each_form():
    """The search itself can fail: each form of a secret, planted in noise, is found."""
    noise = bytes(range(256))
    for blob in (PASSWORD.encode(), PASSWORD.encode().hex().encode(), base64.b64encode(b"xy" + PASSWORD.encode()),
                 zlib.compress(b"abc" + PASSWORD.encode()), PASSWORD.encode("utf-16-le"),
                 urllib.parse.quote(f"pw={PASSWORD}&x=1").encode()):
        assert leaks(noise + blob + noise, [PASSWORD]) == [PASSWORD], blob
    assert leaks(noise, [PASSWORD]) == []


# -- FoxESS -------------------------------------------------------------------------------------

def wifi_setup(ssid: str = SSID, password: str = PASSWORD) -> bytes:
    payload = b"\x02" + bytes([len(ssid)]) + ssid.encode() + bytes([len(password)]) + password.encode()
    return foxess.build_frame(foxess.BLE_SET_WIFI, payload, stamp=0x11223344, family=0x7F)


def registration(serial: str = SERIAL) -> bytes:
    payload = b"\x01\x00\x01\x31" + bytes([len(serial)]) + serial.encode() + b"\x05v1.31" + bytes(2)
    return foxess.build_frame(foxess.REGISTRATION, payload, stamp=0x6A20E88F)


def bad_crc(frame: bytes) -> bytes:
    return frame[:-3] + bytes([frame[-3] ^ 0xFF]) + frame[-2:]


def foxess_stream(*chunks: bytes, direction: str = UP) -> list[RawPayload]:
    tap = foxess.Tap(ORIGINS["foxess"])
    return [p for c in chunks for p in tap.feed(direction, c, RECEIVED)] + tap.finish(RECEIVED)


FOXESS_PATHS = {
    "good frames": (registration(), wifi_setup()),
    "bad CRC": (registration(), bad_crc(wifi_setup()), bad_crc(registration())),
    "cut off": (registration(), wifi_setup()[:-6]),
    "cut off inside the serial": (registration()[:20],),
    "oversized length": (b"\x7e\x7e\x3b\x00\x00\x00\x00\xff\xff" + wifi_setup()[9:],),
    "undecodable WiFi layout": (foxess.build_frame(
        foxess.BLE_SET_WIFI, b"\x02\x40" + SSID.encode() + bytes([len(PASSWORD)]) + PASSWORD.encode()),),
    "undocumented function": (registration(), foxess.build_frame(0x45, f"{SERIAL}:{PASSWORD}".encode())),
    "serial outside the known fields": (registration(), foxess.build_frame(foxess.BLE_STATUS, b"\x04\x01\x01\x04"),
                                        foxess.build_frame(foxess.MODBUS_READ | foxess.REPLY,
                                                           b"\x01\x03\x10" + SERIAL.encode().ljust(16, b"\0"))),
    "opaque (TLS)": (b"\x16\x03\x01\x00\x40" + f"{SERIAL}{PASSWORD}".encode(),),
}


@pytest.mark.parametrize("path", FOXESS_PATHS)
def test_foxess_frames_leak_nothing(data_dir, caplog, path):
    payloads = foxess_stream(*FOXESS_PATHS[path])
    rows = store_and_check(data_dir, caplog, payloads, [PASSWORD, SSID, SERIAL, PEER.partition(":")[0]])
    assert len(rows) == len(payloads)  # nothing lost: every payload has a row
    for row in rows:
        if row.raw.kind != "frame" or not row.raw.payload:  # withheld: its size and hash instead
            assert row.raw.payload == b"" and row.raw.meta["withheld"]
            assert len(str(row.raw.meta["withheld_sha256"])) == 64


def test_foxess_garbage_and_cut_off_bytes_are_kept_in_full_only_when_asked(data_dir):
    payloads = foxess_stream(bad_crc(wifi_setup()), wifi_setup()[:-6])
    with ingested(data_dir, Privacy(keep_unredacted=True), payloads) as store:
        rows = list(store.raw_payloads())
    assert [(r.raw.kind, r.raw.payload) for r in rows] == [("garbage", bad_crc(wifi_setup())),
                                                          ("partial", wifi_setup()[:-6])]
    assert all(r.raw.meta["unredacted"] for r in rows)


FOXESS_DATAGRAMS = {
    "ESP-MESH JSON": f'{{"type":"join_me_req","payload":{{"mac":"{MAC}","router":-71}}}}'.encode(),
    "bad JSON": f'{{"type":"join_me_req","payload":{{"mac":"{MAC}"'.encode(),
    "neither JSON nor a frame": f"wifi={SSID};pw={PASSWORD}".encode(),
    "frame of an undocumented function": foxess.build_frame(0x44, PASSWORD.encode()),
}


@pytest.mark.parametrize("kind", FOXESS_DATAGRAMS)
def test_foxess_datagrams_leak_nothing(data_dir, caplog, kind):
    raw = RawPayload(Origin("foxess", PEER, "udp", UP), "datagram", FOXESS_DATAGRAMS[kind], RECEIVED, {"port": 6364})
    store_and_check(data_dir, caplog, [raw], [PASSWORD, SSID, MAC, MAC.replace(":", ""), PEER.partition(":")[0]])


# -- AlphaESS -----------------------------------------------------------------------------------

def alpha(b1: int, type_: int, body: str) -> bytes:
    return alphaess.encode_frame(b1, type_, body.encode())


LOGIN = alpha(1, 2, f'{{"UserName":"{SERIAL}","Password":"{PASSWORD}","CompanyName":"AlphaESS"}}')
CONFIG = alpha(2, 3, f'{{"SN":"{SERIAL}","License":"{LICENSE}","Address":"Placeholder Street 1",'
                     f'"Generator":"0","Generator":"1","Country":"Placeholderland"}}')
SYSTEM_EVENT = alpha(1, 9, f'{{"SN":"{SERIAL}","MsgType":"System","MsgContent":"MAC: {MAC} IP: up"}}')


def alphaess_stream(*chunks: tuple[str, bytes]) -> list[RawPayload]:
    tap = alphaess.Tap(ORIGINS["alphaess"])
    return [p for direction, c in chunks for p in tap.feed(direction, c, RECEIVED)] + tap.finish(RECEIVED)


ALPHAESS_PATHS = {
    "good frames": ((UP, LOGIN), (DOWN, CONFIG), (UP, SYSTEM_EVENT)),
    "bad CRC": ((UP, LOGIN[:-1] + bytes([LOGIN[-1] ^ 1])), (DOWN, CONFIG[:-1] + bytes([CONFIG[-1] ^ 1]))),
    "cut off": ((UP, LOGIN[: LOGIN.index(PASSWORD.encode()) + 6]),),
    "cut off config": ((UP, LOGIN), (DOWN, CONFIG[:-10])),
    "oversized length": ((UP, b"\x01\x01\x02\x7f\xff\xff\xff" + LOGIN[7:]),),
    "undecodable body": ((UP, alpha(1, 2, f"UserName={SERIAL}&Password={PASSWORD}")),),
    "escaped key": ((UP, alpha(1, 2, f'{{"UserName":"{SERIAL}","Pass\\u0077ord":"{PASSWORD}"}}')),),
    "not AlphaESS at all": ((UP, f"GET /?pw={PASSWORD}&sn={SERIAL} HTTP/1.1\r\n".encode()),),
}


@pytest.mark.parametrize("path", ALPHAESS_PATHS)
def test_alphaess_frames_leak_nothing(data_dir, caplog, path):
    payloads = alphaess_stream(*ALPHAESS_PATHS[path])
    rows = store_and_check(data_dir, caplog, payloads,
                           [PASSWORD, LICENSE, SERIAL, "Placeholder Street", "Placeholderland", MAC,
                            PEER.partition(":")[0]])
    assert len(rows) == len(payloads)


def test_alphaess_repeated_keys_survive_redaction_into_the_store(data_dir):
    with ingested(data_dir, PRIVACY, alphaess_stream((DOWN, CONFIG))) as store:
        (record,) = [r.record for r in store.records()]
    assert (record.fields["Generator"], record.fields["Generator_2"]) == ("0", "1")


# -- Enphase ------------------------------------------------------------------------------------

REPORT = (f'<?xml version="1.0" encoding="UTF-8"?><perf_report report_timestamp="1718971200">'
          f'<envoy serial_num="{SERIAL}" ip_addr="{IP}" mac_addr="{MAC}" latitude="{LATITUDE}" '
          f'longitude="{LONGITUDE}" part_num="800-00555-r03"/>'
          f'<event id="1" event_code="509" event_state="0" eqid="{SERIAL}" event_date="1718971100">'
          f'<message_params>seen at {IP}</message_params></event></perf_report>').encode()
ENPHASE_SECRETS = [SERIAL, IP, MAC, MAC.replace(":", ""), LATITUDE, LONGITUDE, PEER.partition(":")[0]]


def bomb_with_secrets() -> bytes:
    compressor = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    return compressor.compress(encode_form(REPORT)) + b"".join(compressor.compress(zeros) for _ in range(65)) + \
        compressor.flush()


def encode_form(xml: bytes) -> bytes:
    return b"body=" + urllib.parse.quote_plus(xml).encode()


ENPHASE_PATHS = {
    "good report": lambda: encode_body(REPORT),
    "corrupt zlib": lambda: (lambda b: b[:12] + bytes(x ^ 0x5A for x in b[12:30]) + b[30:])(encode_body(REPORT)),
    "cut off": lambda: encode_body(REPORT)[: len(encode_body(REPORT)) * 2 // 3],
    "oversized (inflates past the bound)": bomb_with_secrets,
    "undecodable XML": lambda: encode_body(REPORT.replace(b"<event ", b"<event <")),
    "not a report form": lambda: zlib.compress(f"serial={SERIAL}&ip={IP}&mac={MAC}".encode()),
}


@pytest.mark.parametrize("path", ENPHASE_PATHS)
def test_enphase_reports_leak_nothing(data_dir, caplog, path):
    body = ENPHASE_PATHS[path]()
    meta = {"method": "POST", "path": "/emu_reports/performance_report", "content_type": "application/x-deflate"}
    raw = RawPayload(Origin("enphase", PEER, "flow-1", UP), "performance_report", body, RECEIVED, meta)
    answer = RawPayload(Origin("enphase", PEER, "flow-1", DOWN), "performance_report_response",
                        zlib.compress(f"<error>unknown envoy {SERIAL} at {IP}</error>".encode()), RECEIVED,
                        {"status_code": 400, "content_type": "application/x-deflate"})
    rows = store_and_check(data_dir, caplog, [raw, answer], ENPHASE_SECRETS)
    assert len(rows) == 2
    assert rows[0].raw.meta["original_size"] == len(body)


def test_base64_forms_cover_every_alignment():
    for prefix in (b"", b"a", b"ab"):
        assert leaks(base64.b64encode(prefix + PASSWORD.encode()), [PASSWORD]) == [PASSWORD], prefix
    assert binascii.hexlify(b"x")  # (hex forms: covered by test_the_leak_finder_finds_each_form)
