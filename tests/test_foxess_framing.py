"""FoxESS stream reassembly: every split offset, merged frames, garbage, bad CRCs and tails,
absurd lengths, oversized-but-legal firmware chunks, partial frames, and the Tap's per-direction
handling (including a TLS start that makes the stream opaque)."""

from __future__ import annotations

from datetime import UTC, datetime

from pvtap.decode import foxess
from pvtap.decode.foxess import FrameSplitter, Tap, build_frame, parse_frame
from pvtap.records import DOWN, UP, Origin
from pvtap.simulate.foxess_m1 import M1Telemetry, registration_payload, telemetry_payload

T0 = datetime(2026, 4, 2, 14, 21, 37, tzinfo=UTC)

REGISTRATION = bytes.fromhex("7e7e2a6a20e88f001c010001310f544553544d3153455249414c3030310576312e33310000b512e7e7")
STEP2 = bytes.fromhex("7e7e2c6a20e79100" "04e1080500a222e7e7")
STEP3 = bytes.fromhex("7e7e2b6a20e791000100d7bce7e7")
MODBUS_READ = bytes.fromhex("7f7f11112233440006" "0103ca5a0001ad97f7f7")
TELEMETRY = build_frame(0x02, telemetry_payload(M1Telemetry(
    ac_power_w=412, export_power_w=400, ac_voltage_v=231.5, ac_current_a=1.78, frequency_hz=50.0,
    pv=[(35.5, 6.1, 217), (34.0, 6.0, 204)], temperature_c=38.25, sequence=7,
    generation_total_kwh=1234.5, export_total_kwh=1190.25)), stamp=0x6A20E900)
STREAM = [REGISTRATION, STEP2, STEP3, TELEMETRY, MODBUS_READ]


def split_all(splitter: FrameSplitter, chunks: list[bytes]) -> list[tuple[str, bytes]]:
    out = []
    for chunk in chunks:
        out.extend(splitter.feed(chunk))
    return out + splitter.finish()


def frames_of(items: list[tuple[str, bytes]]) -> list[bytes]:
    return [data for kind, data in items if kind == "frame"]


def test_every_split_offset_of_a_stream_yields_the_same_frames_and_nothing_else():
    data = b"".join(STREAM)
    for offset in range(len(data) + 1):
        items = split_all(FrameSplitter(), [data[:offset], data[offset:]])
        assert items == [("frame", f) for f in STREAM], f"split at {offset}"


def test_byte_by_byte_feeding():
    data = b"".join(STREAM)
    items = split_all(FrameSplitter(), [data[i:i + 1] for i in range(len(data))])
    assert items == [("frame", f) for f in STREAM]


def test_two_splits_inside_the_header_and_the_crc():
    data = REGISTRATION + TELEMETRY
    cuts = [1, 2, len(REGISTRATION) - 3, len(REGISTRATION) + 1, len(data) - 1]
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    assert frames_of(split_all(FrameSplitter(), chunks)) == [REGISTRATION, TELEMETRY]


def test_merged_frames_in_one_chunk():
    assert FrameSplitter().feed(b"".join(STREAM)) == [("frame", f) for f in STREAM]


def test_garbage_before_between_and_after_frames_is_handed_out_in_order():
    junk1, junk2, junk3 = b"\x00\x01hello", b"\x7e\x16\x03garbage\x7e", b"tail"
    items = split_all(FrameSplitter(), [junk1 + REGISTRATION + junk2 + STEP2 + junk3])
    assert items == [("garbage", junk1), ("frame", REGISTRATION), ("garbage", junk2), ("frame", STEP2),
                     ("garbage", junk3)]


def test_a_false_header_right_before_a_real_one_costs_one_byte_only():
    # 7e 7e 7e 2a …: the first 7e7e reads as a frame with function 0x7e and fails; dropping two
    # bytes (as some parsers do) would lose the real frame starting one byte later.
    items = split_all(FrameSplitter(), [b"\x7e" + REGISTRATION])
    assert items == [("garbage", b"\x7e"), ("frame", REGISTRATION)]


def test_bad_crc_then_a_good_frame():
    bad = bytearray(STEP2)
    bad[-4] ^= 0xFF  # CRC low byte
    items = split_all(FrameSplitter(), [bytes(bad) + STEP3])
    assert items == [("garbage", bytes(bad)), ("frame", STEP3)]


def test_bad_tail_then_a_good_frame():
    bad = STEP3[:-2] + b"\xf7\xf7"  # 7E family with a 7F tail
    assert split_all(FrameSplitter(), [bad + STEP2]) == [("garbage", bad), ("frame", STEP2)]


def test_absurd_length_is_rejected_without_waiting_for_it():
    absurd = b"\x7e\x7e\x02\x00\x00\x00\x00\x10\x00"  # 4096 payload bytes: frame > 4096
    items = FrameSplitter().feed(absurd + STEP3)
    assert items == [("garbage", absurd), ("frame", STEP3)]


def test_firmware_chunk_larger_than_one_kib_is_a_frame():
    chunk = build_frame(foxess.FIRMWARE_CHUNK, bytes.fromhex("fa6b7c7a4d0003") + bytes(range(256)) * 4, family=0x7E)
    assert len(chunk) == 1044
    assert split_all(FrameSplitter(), [chunk[:500], chunk[500:]]) == [("frame", chunk)]


def test_largest_legal_frame_passes_and_one_more_byte_does_not():
    biggest = build_frame(0x02, bytes(foxess.MAX_FRAME - foxess.OVERHEAD))
    assert FrameSplitter().feed(biggest) == [("frame", biggest)]
    too_big = build_frame(0x02, bytes(foxess.MAX_FRAME - foxess.OVERHEAD + 1))
    assert frames_of(split_all(FrameSplitter(), [too_big])) == []


def test_both_families_and_the_tail_follows_the_header():
    f7e = build_frame(0x01, b"x", family=0x7E)
    f7f = build_frame(0x01, b"x", family=0x7F)
    assert f7e.endswith(b"\xe7\xe7") and f7f.endswith(b"\xf7\xf7")
    assert FrameSplitter().feed(f7e + f7f) == [("frame", f7e), ("frame", f7f)]
    assert parse_frame(f7f).family == 0x7F


def test_a_frame_cut_short_by_the_end_of_the_stream_is_partial():
    splitter = FrameSplitter()
    assert splitter.feed(TELEMETRY[:100]) == []
    assert splitter.finish() == [("partial", TELEMETRY[:100])]


def test_pure_garbage_is_handed_out_and_not_hoarded():
    splitter = FrameSplitter()
    handed = 0
    for _ in range(10):
        handed += sum(len(d) for k, d in splitter.feed(bytes(10_000)) if k == "garbage")
    rest = splitter.finish()
    assert handed >= 100_000 - foxess.MAX_GARBAGE_RUN
    assert handed + sum(len(d) for _, d in rest) == 100_000


def test_tap_reassembles_each_direction_on_its_own():
    tap = Tap(Origin("foxess", connection="c1"))
    up, down = REGISTRATION + TELEMETRY, MODBUS_READ + STEP3
    out = []
    for i in range(0, max(len(up), len(down)), 7):  # interleaved 7-byte pieces of both sides
        out += tap.feed(UP, up[i:i + 7], T0)
        out += tap.feed(DOWN, down[i:i + 7], T0)
    out += tap.finish(T0)
    got = {(p.origin.direction, p.payload) for p in out}
    assert got == {(UP, REGISTRATION), (UP, TELEMETRY), (DOWN, MODBUS_READ), (DOWN, STEP3)}
    assert all(p.kind == "frame" for p in out)
    assert (tap.frames, tap.rejected, tap.opaque) == (4, 0, False)


def test_tap_counts_rejected_bytes_and_keeps_garbage_and_partial_payloads():
    tap = Tap(Origin("foxess"))
    out = tap.feed(UP, b"junk" + REGISTRATION + TELEMETRY[:50], T0) + tap.finish(T0)
    assert [(p.kind, p.payload) for p in out] == [("garbage", b"junk"), ("frame", REGISTRATION),
                                                  ("partial", TELEMETRY[:50])]
    assert tap.rejected == 4 + 50
    assert tap.frames == 1


def test_tap_learns_the_serial_and_puts_it_on_every_later_payload():
    tap = Tap(Origin("foxess", device="", connection="c2"))
    first = tap.feed(UP, build_frame(0x02, bytes(238)), T0)
    assert first[0].origin.device == "" and "serial" not in first[0].meta
    out = tap.feed(UP, build_frame(0x2A, registration_payload("60MPLACEHOLDER1")) + TELEMETRY, T0)
    assert [p.origin.device for p in out] == ["60MPLACEHOLDER1"] * 2
    assert [p.meta["serial"] for p in out] == ["60MPLACEHOLDER1"] * 2
    assert tap.origin.device == "60MPLACEHOLDER1"


def test_tls_at_the_start_makes_the_stream_opaque():
    client_hello = bytes.fromhex("160301020001") + bytes(300)
    tap = Tap(Origin("foxess"))
    out = tap.feed(UP, client_hello, T0)
    assert tap.opaque
    assert [(p.kind, p.meta["reason"]) for p in out] == [("opaque", "TLS handshake")]
    assert out[0].payload == client_hello[:foxess.OPAQUE_SAMPLE]
    assert tap.feed(DOWN, REGISTRATION, T0) == [] and tap.feed(UP, REGISTRATION, T0) == []


def test_a_later_0x16_byte_is_not_taken_for_tls():
    tap = Tap(Origin("foxess"))
    assert [p.kind for p in tap.feed(UP, REGISTRATION, T0)] == ["frame"]
    assert [p.kind for p in tap.feed(UP, b"\x16\x03\x01", T0) + tap.finish(T0)] == ["garbage"]
    assert not tap.opaque


def test_unknown_function_codes_are_counted_per_code():
    tap = Tap(Origin("foxess"))
    tap.feed(UP, build_frame(0x44, b"\x01") + build_frame(0x44, b"") + build_frame(0x08, b"") + STEP3, T0)
    assert tap.unknown == 3
    assert tap.unknown_functions == {0x44: 2, 0x08: 1}


def test_an_h_series_inverter_serial_wins_over_the_dongles_own():
    tap = Tap(Origin("foxess"))
    tap.feed(UP, build_frame(0x2A, registration_payload("DLPLACEHOLDER01")), T0)
    assert tap.origin.device == "DLPLACEHOLDER01"
    tap.feed(UP, build_frame(0x06, b"H10600H1PLACEHOLDER01"), T0)
    assert tap.origin.device == "H1PLACEHOLDER01"
    tap.feed(UP, build_frame(0x2A, registration_payload("DLPLACEHOLDER02")), T0)
    assert tap.origin.device == "H1PLACEHOLDER01"
