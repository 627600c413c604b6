"""Property-based fuzzing (hypothesis) of every framer and decoder (issue 9, "the suite").

- arbitrary bytes, and mutated valid frames, in any segmentation and both directions, never
  raise out of a Tap, and its buffers stay within their bound;
- every valid frame embedded in noise, split anywhere, is still found, unchanged;
- whatever a Tap hands out, `redact_raw` never raises and never returns a payload (inflated
  too) or meta holding a planted secret; `decode_raw` on it raises only ValueError (which the
  ingest worker counts) or returns records.

Volumes: the `pvtap-ci` profile below runs 300 examples per property (the flood test an eighth,
the Enphase one two thirds of that), derandomised so CI is repeatable; `HYPOTHESIS_PROFILE=
pvtap-deep` runs ten times as many with fresh randomness.
"""

from __future__ import annotations

import itertools
import json
import os
import urllib.parse
import zlib
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvtap.decode import alphaess, enphase, foxess
from pvtap.decode.enphase import envelope
from pvtap.privacy import Privacy
from pvtap.records import DOWN, UP, Origin, RawPayload
from pvtap.simulate.enphase import encode_body
from tests.alphaess_support import VECTORS as ALPHA_VECTORS

settings.register_profile("pvtap-ci", max_examples=300, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("pvtap-deep", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pvtap-ci"))

RECEIVED = datetime(2024, 6, 21, 12, 0, tzinfo=UTC)
PASSWORD = "PVTAP-SECRET-PW-1"
SERIAL = "PVTAPFAKESN0001"
PRIVACIES = st.sampled_from([Privacy(), Privacy(pseudonym_key=b"fuzz-key"), Privacy(keep_network_identity=True)])

# -- what the streams are made of -----------------------------------------------------------

ALPHA_FRAMES = [v.frame for v in ALPHA_VECTORS] + [
    alphaess.encode_frame(1, 2, json.dumps({"UserName": SERIAL, "Password": PASSWORD}).encode()),
    alphaess.encode_frame(2, 3, json.dumps({"SN": SERIAL, "License": PASSWORD, "Generator": "1"}).encode()),
]


def wifi_setup(ssid: bytes, password: bytes) -> bytes:
    payload = b"\x02" + bytes([len(ssid)]) + ssid + bytes([len(password)]) + password
    return foxess.build_frame(foxess.BLE_SET_WIFI, payload, family=0x7F)


FOX_FRAMES = [
    wifi_setup(b"PVTAP-HOME", PASSWORD.encode()),
    foxess.build_frame(foxess.REGISTRATION,
                       b"\x01\x00\x01\x31" + bytes([len(SERIAL)]) + SERIAL.encode() + b"\x05v1.31"),
    foxess.build_frame(foxess.REALTIME, bytes(238)),
    foxess.build_frame(foxess.REALTIME, bytes(152)),
    foxess.build_frame(foxess.MODBUS_READ, bytes.fromhex("0103ca5a0001"), stamp=7, family=0x7F),
    foxess.build_frame(foxess.MODBUS_READ | foxess.REPLY, bytes.fromhex("0103020064"), stamp=7, family=0x7F),
    foxess.build_frame(foxess.HEARTBEAT, b"\x01"),
]


@st.composite
def chunked(draw, data: bytes) -> list[bytes]:
    """`data` cut at arbitrary points."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


@st.composite
def mutated(draw, frames: list[bytes]) -> bytes:
    """Valid frames, some damaged: bits flipped, bytes inserted, deleted or cut off."""
    out = bytearray()
    for frame in draw(st.lists(st.sampled_from(frames), min_size=1, max_size=5)):
        b = bytearray(frame)
        for _ in range(draw(st.integers(0, 3))):
            action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
            at = draw(st.integers(0, max(len(b) - 1, 0)))
            if action == "flip" and b:
                b[at] ^= 1 << draw(st.integers(0, 7))
            elif action == "insert":
                b[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif action == "delete" and b:
                del b[at]
            elif action == "cut":
                del b[at:]
        out += b
    return bytes(out)


def run_tap(tap, chunks: list[tuple[str, bytes]], bound: int) -> list[RawPayload]:
    payloads = []
    for direction, chunk in chunks:
        payloads += tap.feed(direction, chunk, RECEIVED)
        assert tap.buffered <= bound, f"{tap.buffered} bytes held, bound {bound}"
    return payloads + tap.finish(RECEIVED)


ALPHA_BOUND = 2 * alphaess.MAX_FRAME
FOX_BOUND = 2 * (foxess.MAX_FRAME + foxess.MAX_GARBAGE_RUN)


def both_directions(draw, data: bytes) -> list[tuple[str, bytes]]:
    return [(draw(st.sampled_from([UP, DOWN])), c) for c in draw(chunked(data))]


# -- Taps never raise and stay bounded --------------------------------------------------------

@given(st.data())
def test_alphaess_tap_survives_arbitrary_and_mutated_bytes(data):
    stream = data.draw(st.one_of(st.binary(max_size=3000), mutated(ALPHA_FRAMES)))
    payloads = run_tap(alphaess.Tap(Origin("alphaess")), both_directions(data.draw, stream), ALPHA_BOUND)
    privacy = data.draw(PRIVACIES)
    for raw in payloads:
        check_redact_and_decode(alphaess, raw, privacy)


@given(st.data())
def test_foxess_tap_survives_arbitrary_and_mutated_bytes(data):
    stream = data.draw(st.one_of(st.binary(max_size=3000), mutated(FOX_FRAMES)))
    payloads = run_tap(foxess.Tap(Origin("foxess")), both_directions(data.draw, stream), FOX_BOUND)
    privacy = data.draw(PRIVACIES)
    for raw in payloads:
        check_redact_and_decode(foxess, raw, privacy)


@settings(max_examples=max(10, settings().max_examples // 8))
@given(st.binary(min_size=1, max_size=64), st.integers(1, 8))
def test_a_flood_of_rejected_bytes_stays_bounded_in_memory_and_in_payloads(noise, rounds):
    """A peer that sends nothing but noise: held bytes bounded, garbage payloads sampled."""
    for module, bound in ((alphaess, ALPHA_BOUND), (foxess, FOX_BOUND)):
        tap = module.Tap(Origin(module.PROTOCOL))
        out = tap.feed(UP, (ALPHA_FRAMES if module is alphaess else FOX_FRAMES)[0], RECEIVED)  # it is the protocol
        filler = bytes(b if b not in (0x01, 0x7E, 0x7F, 0x16) else 0 for b in noise)  # no header byte
        for _ in range(rounds * 50):
            out += tap.feed(UP, filler * (8192 // len(filler) + 1), RECEIVED)
            assert tap.buffered <= bound
        out += tap.finish(RECEIVED)
        assert len([p for p in out if p.kind == "garbage"]) <= 16
        assert tap.rejected >= rounds * 50 * 8192


def check_redact_and_decode(module, raw: RawPayload, privacy: Privacy) -> None:
    safe = module.redact_raw(raw, privacy)  # never raises
    for secret in (PASSWORD.encode(), *([SERIAL.encode()] if privacy.pseudonym_key else [])):
        assert secret not in safe.payload, (raw.kind, raw.payload)
        assert secret.decode() not in str(dict(safe.meta)) and secret.decode() not in safe.origin.device
    try:
        module.decode_raw(safe)
    except ValueError:
        pass  # counted by the ingest worker; the payload stays stored


# -- valid frames are found in any noise, at any split ------------------------------------------

@given(st.data())
def test_alphaess_frames_in_noise_are_all_found(data):
    frames = data.draw(st.lists(st.sampled_from(ALPHA_FRAMES), min_size=1, max_size=4))
    noise = [data.draw(st.binary(max_size=40)) for _ in range(len(frames) + 1)]
    stream = noise[0] + b"".join(f + n for f, n in zip(frames, noise[1:]))
    tap = alphaess.Tap(Origin("alphaess"))
    tap.feed(UP, bytes(ALPHA_FRAMES[0]), RECEIVED)  # a device that starts like AlphaESS
    found = [p.payload for p in run_tap(tap, [(UP, c) for c in data.draw(chunked(stream))], ALPHA_BOUND)
             if p.kind == "frame"]
    assert_subsequence(frames, found)


@given(st.data())
def test_foxess_frames_in_noise_are_all_found(data):
    frames = data.draw(st.lists(st.sampled_from(FOX_FRAMES), min_size=1, max_size=4))
    noise = [data.draw(st.binary(max_size=40)) for _ in range(len(frames) + 1)]
    stream = noise[0] + b"".join(f + n for f, n in zip(frames, noise[1:]))
    found = [p.payload for p in run_tap(foxess.Tap(Origin("foxess")), [(UP, c) for c in data.draw(chunked(stream))],
                                        FOX_BOUND) if p.kind == "frame"]
    assert_subsequence(frames, found)


def assert_subsequence(frames: list[bytes], found: list[bytes]) -> None:
    """Every planted frame was found, in order (noise may by chance hold a valid frame too)."""
    it = iter(found)
    for frame in frames:
        assert any(f == frame for f in it), (frames, found)


# -- Enphase: redaction of any body ----------------------------------------------------------------

REPORT = (f'<?xml version="1.0"?><perf_report report_timestamp="1718971200"><envoy serial_num="{SERIAL}" '
          f'ip_addr="192.0.2.77" mac_addr="02:00:5e:10:00:77" latitude="52.1" longitude="13.7"/>'
          f'<interval id="1" eqid="{SERIAL}.1" end_date="1718971200" interval_duration="300" stats="9000"/>'
          f'</perf_report>').encode()
ENPHASE_SECRETS = (b"192.0.2.77", b"02:00:5e:10:00:77")


@settings(max_examples=max(20, settings().max_examples * 2 // 3))
@given(st.data())
def test_enphase_redaction_never_keeps_network_identity(data):
    body = encode_body(REPORT)
    if data.draw(st.booleans()):
        body = data.draw(mutated([body]))
    raw = RawPayload(Origin("enphase", "", "f", UP), "performance_report", body, RECEIVED,
                     {"content_type": "application/x-deflate"})
    safe = enphase.redact_raw(raw, Privacy(pseudonym_key=b"fuzz-key"))
    blobs = [safe.payload, str(dict(safe.meta)).encode()]
    for at in range(len(safe.payload)):  # what zlib makes of the stored bytes, from anywhere
        if safe.payload[at] == 0x78:
            try:
                blobs.append(zlib.decompressobj().decompress(safe.payload[at:], 1 << 20))
            except zlib.error:
                pass
    for secret in (*ENPHASE_SECRETS, SERIAL.encode()):
        assert not any(secret in b for b in blobs), secret
    try:
        enphase.decode_raw(safe)
    except ValueError:
        pass


@given(st.binary(max_size=200).map(lambda b: bytes(c if c % 3 else 0x25 for c in b)))
def test_the_fast_form_unquote_equals_the_stdlib(value):
    """Enphase's form decoding (unicode_escape trick) against urllib, on %-dense input."""
    assert envelope._form_unquote(value) == urllib.parse.unquote_to_bytes(value.replace(b"+", b" "))
