"""FoxESS frames: layout, CRC, the stream splitter and the function codes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import fastcrc

PROTOCOL = "foxess"

TAILS = {0x7E: 0xE7, 0x7F: 0xF7}
HEADERS = (b"\x7e\x7e", b"\x7f\x7f")
OVERHEAD = 13  # header 2 + function 1 + stamp 4 + length 2 + CRC 2 + tail 2
#: Largest frame accepted (as foxess_local_gateway); firmware chunks (1024 B + 7) fit well below.
MAX_FRAME = 4096
#: Rejected bytes are handed out in runs of at most this size, so buffers stay bounded.
MAX_GARBAGE_RUN = 4096
#: Bytes of an opaque (e.g. TLS) stream kept as a sample; the rest is only forwarded.
OPAQUE_SAMPLE = 512

class FrameError(ValueError):
    """Bytes that are not one well-formed FoxESS frame."""


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS (reflected 0xA001, init 0xFFFF): frames carry it low byte first.
    fastcrc, as the AlphaESS decoder: stateless, so safe from the Tap, ingest and answerer
    threads at once (a shared `crc.Calculator` is not), and ~1000× faster per frame."""
    return fastcrc.crc16.modbus(data if type(data) is bytes else bytes(data))


class Frame(NamedTuple):
    """One frame (a NamedTuple: made for every frame, in a third of a frozen dataclass's time)."""

    family: int  # 0x7E or 0x7F: the header byte
    function: int
    stamp: int  # bytes 3–6: device clock / sequence; echoed in Modbus replies
    payload: bytes

    def encode(self) -> bytes:
        return build_frame(self.function, self.payload, stamp=self.stamp, family=self.family)


class FrameReading(NamedTuple):
    """A frame as the live path reads it, once: the splitter checks and parses it, `redact_raw`
    and `decode_raw` take it from the payload (`RawPayload.parsed`) instead of checking and
    parsing the bytes again. `source` is the frame's exact bytes."""

    source: bytes
    frame: Frame


def read_frame(data: bytes) -> FrameReading:
    """Exactly one frame, checked (`parse_frame`: FrameError if the bytes are not one)."""
    return FrameReading(data, parse_frame(data))


def build_frame(function: int, payload: bytes = b"", *, stamp: int = 0, family: int = 0x7E) -> bytes:
    """One frame, CRC and tail included."""
    if family not in TAILS:
        raise ValueError(f"family must be 0x7E or 0x7F, not {family:#x}")
    body = bytes([function]) + stamp.to_bytes(4, "big") + len(payload).to_bytes(2, "big") + payload
    return bytes([family, family]) + body + crc16(body).to_bytes(2, "little") + bytes([TAILS[family]] * 2)


def parse_frame(data: bytes) -> Frame:
    """Exactly one frame; FrameError names what is wrong (header, length, tail or CRC)."""
    if len(data) < OVERHEAD:
        raise FrameError(f"{len(data)} bytes is shorter than the {OVERHEAD}-byte minimum frame")
    family, second, function, stamp, length = _HEAD.unpack_from(data)
    if family not in TAILS or second != family:
        raise FrameError(f"header {data[:2].hex()} is neither 7e7e nor 7f7f")
    if len(data) != length + OVERHEAD:
        raise FrameError(f"length field says {length} payload bytes, frame has {len(data) - OVERHEAD}")
    if data[-2] != TAILS[family] or data[-1] != TAILS[family]:
        raise FrameError(f"tail {data[-2:].hex()} does not match header {data[:2].hex()}")
    computed, sent = crc16(data[2:-4]), int.from_bytes(data[-4:-2], "little")
    if computed != sent:
        raise FrameError(f"CRC {sent:04x} does not match the computed {computed:04x}")
    return Frame(family, function, stamp, bytes(data[9:-4]))


_HEAD = struct.Struct(">BBBIH")  # family, family again, function, stamp, length


class FrameSplitter:
    """Reassembles frames from one direction of a byte stream: any segmentation, several frames
    per chunk, garbage between them, bad tails or CRCs and absurd lengths. A rejected candidate
    costs one byte (not two), so a real header right behind a false one is never skipped, and a
    false start whose length is not yet satisfied is dropped as soon as a complete frame follows
    it (found by the fuzzing: a stray 7F before a frame hid it until the connection ended)."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._junk = bytearray()
        self.parsed: list[Frame] = []  # the Frames of the last feed's "frame" items

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete frame, and rejected bytes not handed out yet."""
        return len(self._buffer) + len(self._junk)

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """("frame", bytes) and ("garbage", bytes) items in stream order. The Frame each "frame"
        item parses to is left, in the same order, in `parsed` (so a caller need not parse it
        again)."""
        if not self._buffer and not self._junk and type(data) is bytes and len(data) <= self.max_frame:
            try:  # a device writes one frame at a time: usually `data` is exactly one
                self.parsed = [parse_frame(data)]
                return [("frame", data)]
            except FrameError:
                pass  # not exactly one frame: the general path below decides
        out: list[tuple[str, bytes]] = []
        self.parsed = []
        buf = self._buffer
        buf += data
        while buf:
            start = _find_header(buf)
            if start < 0:  # keep a last byte that may start a header
                keep = 1 if buf[-1] in TAILS else 0
                self._junk += buf[:len(buf) - keep]
                del buf[:len(buf) - keep]
                break
            if start:
                self._junk += buf[:start]
                del buf[:start]
            if len(buf) < 9:
                break
            total = int.from_bytes(buf[7:9], "big") + OVERHEAD
            if total > self.max_frame:
                self._reject_one()
                continue
            if len(buf) < total:
                following = _next_frame(buf, 1, self.max_frame)
                if following is None:
                    break
                self._reject(following)  # a false start: a complete frame follows inside it
                continue
            candidate = bytes(buf[:total])
            try:
                frame = parse_frame(candidate)
            except FrameError:
                self._reject_one()
                continue
            self._flush_junk(out)
            out.append(("frame", candidate))
            self.parsed.append(frame)
            del buf[:total]
        if len(self._junk) >= MAX_GARBAGE_RUN:
            self._flush_junk(out)
        return out

    def finish(self) -> list[tuple[str, bytes]]:
        """Pending garbage, then an incomplete frame ("partial"), at the end of the stream."""
        out: list[tuple[str, bytes]] = []
        self._flush_junk(out)
        if self._buffer:
            out.append(("partial", bytes(self._buffer)))
            self._buffer.clear()
        return out

    def _reject_one(self) -> None:
        self._reject(1)

    def _reject(self, count: int) -> None:
        self._junk += self._buffer[:count]
        del self._buffer[:count]

    def _flush_junk(self, out: list[tuple[str, bytes]]) -> None:
        if self._junk:
            out.append(("garbage", bytes(self._junk)))
            self._junk.clear()


def _next_frame(buf: bytearray, start: int, max_frame: int) -> int | None:
    """Where the first complete, valid frame at or after `start` begins, if one is buffered: a
    false start (a stray 7E/7F before a real header) must not hold up the frames behind it until
    its length field is satisfied, or until the connection ends."""
    at = start
    while True:
        found = [i for i in (buf.find(h, at) for h in HEADERS) if i >= 0]
        if not found:
            return None
        at = min(found)
        if len(buf) - at < 9:
            return None
        total = int.from_bytes(buf[at + 7:at + 9], "big") + OVERHEAD
        if total <= max_frame and at + total <= len(buf):
            try:
                parse_frame(bytes(buf[at:at + total]))
            except FrameError:
                pass
            else:
                return at
        at += 1


def _find_header(buf: bytearray) -> int:
    found = [i for i in (buf.find(h) for h in HEADERS) if i >= 0]
    return min(found) if found else -1


# -- function codes ---------------------------------------------------------------------------

PRODUCT_INFO = 0x01
REALTIME = 0x02
BATTERY_SERIALS = 0x03
MODULE_INFO = 0x06
MODBUS_READ = 0x11
MODBUS_WRITE = 0x12
FIRMWARE_METADATA = 0x21
FIRMWARE_CHUNK = 0x22
REGISTRATION = 0x2A
BOOTSTRAP_STEP3 = 0x2B
BOOTSTRAP_STEP2 = 0x2C
BLE_STATUS = 0x3A
BLE_SET_WIFI = 0x3B
FIRMWARE_PROGRESS = 0xAF
HEARTBEAT = 0xFF
REPLY = 0x80

#: The cloud's acknowledgements of the M1 bootstrap (foxess_local_gateway `BootstrapResponder`).
BOOTSTRAP_ACKS = {REGISTRATION: bytes.fromhex("0101010000"), BOOTSTRAP_STEP2: b"", BOOTSTRAP_STEP3: b"\x01"}
BOOTSTRAP_STEPS = {REGISTRATION: "registration", BOOTSTRAP_STEP2: "step2", BOOTSTRAP_STEP3: "step3"}

M1_TELEMETRY_LENGTH = 238
H1_REALTIME_LENGTH = 226
H1_PRODUCT_INFO_LENGTH = 40
BATTERY_SERIAL_SLOT = 15

# The TCP 6666 hub channel (forum write-up): function 0xFF, stamp = channel marker (3 bytes) + op.
HUB_CHANNELS = {0xFFFFFF: "A", 0xFEFEFE: "B"}
HUB_LOGIN = 0x02
HUB_HEARTBEAT = 0x03  # also the op of the server's login acknowledgement
HUB_LOGIN_ACK = bytes.fromhex("050000")



def hub_channel(frame: Frame) -> str | None:
    """"A" or "B" for a hub-channel frame (function 0xFF, marker ffffff/fefefe), else None."""
    return HUB_CHANNELS.get(frame.stamp >> 8) if frame.function == HEARTBEAT else None

