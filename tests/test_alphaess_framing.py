"""AlphaESS framing: any segmentation, garbage, bad CRCs and absurd lengths give exactly the right
frames, and the framer's memory stays bounded."""

from __future__ import annotations

import random
import tracemalloc
from datetime import UTC, datetime

from pvtap.decode import alphaess as A
from pvtap.decode.alphaess.framing import _header
from pvtap.records import DOWN, UP, Origin
from tests.alphaess_support import BY_NAME, VECTORS

RECEIVED = datetime(2024, 3, 3, 22, 5, 21, tzinfo=UTC)
SESSION = [BY_NAME[n].frame for n in ("login 1-1-2", "ack 1-2-2", "empty 1-1-0", "Resume 1-1-8", "realtime 1-1-16",
                                      "ack 1-2-16 (TV test_checksum_is_valid)", "event log 1-1-9")]


def run(framer: A.Framer, chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    """Frames (re-encoded) and all garbage bytes, feeding chunk by chunk."""
    frames, garbage = [], bytearray()
    for chunk in chunks:
        for item in framer.feed(chunk):
            if isinstance(item, A.AlphaFrame):
                frames.append(item.encode())
            else:
                garbage += item.data
        assert framer.buffered <= A.MAX_FRAME
    return frames, bytes(garbage)


def test_a_stream_split_at_every_byte_offset():
    stream = b"".join(SESSION)
    for offset in range(len(stream) + 1):
        framer = A.Framer()
        frames, garbage = run(framer, [stream[:offset], stream[offset:]])
        assert (frames, garbage, framer.buffered) == (SESSION, b"", 0), offset


def test_byte_by_byte_and_every_vector_split_anywhere():
    stream = b"".join(v.frame for v in VECTORS)
    framer = A.Framer()
    assert run(framer, [stream[i:i + 1] for i in range(len(stream))]) == ([v.frame for v in VECTORS], b"")
    for vector in VECTORS:
        for offset in range(1, len(vector.frame)):
            assert run(A.Framer(), [vector.frame[:offset], vector.frame[offset:]]) == ([vector.frame], b"")


def test_many_frames_in_one_segment():
    frames = [v.frame for v in VECTORS] * 10
    framer = A.Framer()
    assert run(framer, [b"".join(frames)]) == (frames, b"")
    assert framer.buffered == 0


def test_length_zero_and_a_brace_inside_a_string():
    tricky = A.encode_frame(1, 9, b'{"MsgType":"x","MsgContent":"a}b{c}}","Description":"OK"}')
    stream = BY_NAME["empty 1-1-0"].frame + tricky + BY_NAME["empty 1-1-0"].frame
    assert run(A.Framer(), [stream]) == ([BY_NAME["empty 1-1-0"].frame, tricky, BY_NAME["empty 1-1-0"].frame], b"")


GARBAGE = [b"\x00\xff junk \xfe", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x01", b"\x01\x03\x01", b"xx\x01",
           b"\x01\x01", b"\x01\x02\x10\x00\x00", b"\x02\x01\x01"]


def test_garbage_before_and_between_frames():
    for junk in GARBAGE:
        stream = junk + SESSION[0] + junk + SESSION[4] + junk + SESSION[6]
        for chunks in ([stream], [stream[i:i + 7] for i in range(0, len(stream), 7)]):
            framer = A.Framer()
            frames, garbage = run(framer, chunks)
            assert frames == [SESSION[0], SESSION[4], SESSION[6]], junk
            assert garbage + framer.flush() == junk * 3, junk


def test_a_bad_crc_followed_by_a_good_frame():
    """Every vector with its CRC broken, then a good frame: exactly the good frame comes out, the
    bad one is garbage, in one segment, split between them, or byte by byte."""
    good = BY_NAME["realtime 1-1-16"].frame
    for vector in VECTORS:
        bad = vector.frame[:-1] + bytes([vector.frame[-1] ^ 0xFF])
        stream = bad + good
        for chunks in ([stream], [bad, good], [stream[i:i + 1] for i in range(len(stream))]):
            framer = A.Framer()
            assert run(framer, chunks) == ([good], bad), vector.name
            assert framer.buffered == 0


def test_a_false_start_with_a_plausible_length_does_not_hold_up_later_frames():
    """A bad-CRC 1-1-2 leaves `01 02 00 00 00 4A 7B` at its offset 1, a length field of 19067:
    the frames behind it come out at once, not after 19 KB more."""
    login = BY_NAME["login 1-1-2"].frame
    bad = login[:-2] + b"\x00\x00"
    framer = A.Framer()
    frames, garbage = run(framer, [bad])
    assert frames == [] and garbage == b"\x01" and framer.buffered == len(bad) - 1
    frames, garbage = run(framer, [SESSION[4]])
    assert frames == [SESSION[4]] and garbage == bad[1:] and framer.buffered == 0


def test_a_connection_that_starts_mid_frame():
    stream = b"".join(SESSION)
    start = 40  # inside the login's JSON
    frames, garbage = run(A.Framer(), [stream[start:]])
    assert frames == SESSION[1:] and garbage == SESSION[0][start:]


def test_a_length_field_of_2_31_keeps_memory_bounded():
    absurd = bytes.fromhex("0101108000000000")  # LEN = 2^31
    filler = (b'{"Ppv1":"1250","Pbat":"-300.5"}' * 2200)[:65536]  # text, no frame start inside
    good = BY_NAME["realtime 1-1-16"].frame
    framer = A.Framer()
    tracemalloc.start()
    try:
        garbage_bytes = 0
        before, _ = tracemalloc.get_traced_memory()
        for chunk in [absurd] + [filler] * 128:  # 8 MiB after the header
            for item in framer.feed(chunk):
                assert isinstance(item, A.Garbage)
                garbage_bytes += len(item.data)
            assert framer.buffered <= A.MAX_FRAME
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert garbage_bytes == len(absurd) + 128 * len(filler)
    assert peak - before < 1_000_000, peak - before  # a few chunks' worth, not the 8 MiB
    assert run(framer, [good]) == ([good], b"")


def test_the_length_bound_is_exact_and_a_waiting_false_start_is_bounded():
    assert (A.MAX_BODY, A.MAX_FRAME) == (65_536, 65_545)
    largest = A.encode_frame(1, 4, b"{" + b"x" * (A.MAX_BODY - 2) + b"}")
    framer = A.Framer()
    assert run(framer, [largest[i:i + 4096] for i in range(0, len(largest), 4096)]) == ([largest], b"")
    too_long = _header(1, 4, A.MAX_BODY + 1)
    assert run(A.Framer(), [too_long]) == ([], too_long[:-1])  # all but a trailing 01: a maybe-start
    # a false start claiming the largest body is held at most max_body + 9 bytes, then resynced
    framer = A.Framer(max_body=4096)
    false_start = _header(1, 16, 4096)
    text = b"no frame start in here " * 400
    held = []
    for chunk in [false_start] + [text[i:i + 100] for i in range(0, len(text), 100)]:
        framer.feed(chunk)
        held.append(framer.buffered)
    assert 4096 + A.HEADER_LEN + A.CRC_LEN - 100 <= max(held) < 4096 + A.HEADER_LEN + A.CRC_LEN  # it waited, no more
    assert framer.buffered < 100
    framer = A.Framer(max_body=4096)
    frames, garbage = run(framer, [false_start, text, BY_NAME["ack 1-2-2"].frame])
    assert frames == [BY_NAME["ack 1-2-2"].frame] and garbage == false_start + text


def test_random_segmentation_of_frames_and_garbage():
    rng = random.Random(7777)
    pieces, expected_frames, expected_garbage = [], [], bytearray()
    for _ in range(300):
        if rng.random() < 0.2:
            junk = bytes(rng.choice(b"\x00\x01\x02\x10{}\"ab") for _ in range(rng.randint(1, 40)))
            pieces.append(junk)
            expected_garbage += junk
        else:
            body = b'{"Ppv1":"%d","Pbat":"%.4f"}' % (rng.randint(0, 5000), rng.uniform(-3000, 3000))
            frame = A.encode_frame(rng.choice((1, 2)), rng.choice((0, 5, 9, 16)), body)
            pieces.append(frame)
            expected_frames.append(frame)
    stream = b"".join(pieces)
    chunks, at = [], 0
    while at < len(stream):
        size = rng.choice((1, 2, 7, 64, 300, 1500, 9000))
        chunks.append(stream[at:at + size])
        at += size
    framer = A.Framer()
    frames, garbage = run(framer, chunks)
    assert frames == expected_frames
    assert garbage + framer.flush() == bytes(expected_garbage)


def test_tap_keeps_directions_apart():
    tap = A.Tap(Origin("alphaess", "", "c1"))
    up, down = BY_NAME["realtime 1-1-16"].frame, BY_NAME["ack 1-2-16 (TV test_checksum_is_valid)"].frame
    out = tap.feed(UP, up[:100], RECEIVED) + tap.feed(DOWN, down[:5], RECEIVED) + tap.feed(UP, up[100:], RECEIVED)
    out += tap.feed(DOWN, down[5:], RECEIVED)
    assert [(p.origin.direction, p.payload) for p in out] == [(UP, up), (DOWN, down)]
    assert (tap.frames, tap.rejected, tap.finish(RECEIVED)) == (2, 0, [])
