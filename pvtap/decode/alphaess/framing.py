"""AlphaESS frames: layout, CRC, and the stream framer.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

import fastcrc

PROTOCOL = "alphaess"

HEADER_LEN = 7
CRC_LEN = 2
#: Largest body accepted. The biggest documented bodies (1-2-3 full config, ~150 keys; CSV
#: back-fill, 3 rows) are a few KiB; the newest independent decoder (H) rejects LEN > 65536 too.
#: A longer length field marks a false frame start, so the framer never buffers more than
#: HEADER_LEN + MAX_BODY + CRC_LEN bytes waiting for one frame.
MAX_BODY = 65_536
MAX_FRAME = HEADER_LEN + MAX_BODY + CRC_LEN

REQUEST, RESPONSE = 1, 2
#: B2 values documented for the cloud link (reference §2); others are kept raw and counted.
KNOWN_TYPES = {0: "empty", 2: "login", 3: "config", 4: "config", 5: "extended", 8: "command",
               9: "event", 12: "backfill", 16: "realtime"}
ACK_BODY = b'{"Status":"Success"}'

SYNC = re.compile(rb"\x01[\x01\x02]")


_modbus = fastcrc.crc16.modbus
_HEAD = struct.Struct(">BBBI")  # 01, B1, B2, LEN


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS (init 0xFFFF, reflected poly 0x8005, no final XOR)."""
    return fastcrc.crc16.modbus(data)


# -- frames -----------------------------------------------------------------------------------

class AlphaFrame(NamedTuple):
    """One frame. B0 is always 1 and so not kept. (A NamedTuple: made for every frame, and a
    tuple is made in a third of a frozen dataclass's time.)"""

    b1: int  # 1 request / push, 2 response / ack
    type: int  # B2
    body: bytes
    crc: int  # as carried on the wire

    @property
    def name(self) -> str:
        """The reference's notation, e.g. `1-1-16`."""
        return frame_name(self.b1, self.type)

    def encode(self) -> bytes:
        return _header(self.b1, self.type, len(self.body)) + self.body + self.crc.to_bytes(2, "big")


#: `1-<B1>-<B2>` for every header a framer accepts (B1 1 or 2, B2 a byte), made once.
_NAMES = {(b1, type_): f"1-{b1}-{type_}" for b1 in (REQUEST, RESPONSE) for type_ in range(256)}


def frame_name(b1: int, type_: int) -> str:
    """The reference's notation, e.g. `1-1-16`."""
    return _NAMES.get((b1, type_)) or f"1-{b1}-{type_}"


#: `new_frame(AlphaFrame, (b1, type, body, crc))` makes a frame in half the time of
#: `AlphaFrame(...)` (whose generated `__new__` is a Python function): for the per-frame paths.
new_frame = tuple.__new__


@dataclass(frozen=True, slots=True)
class Garbage:
    """A run of bytes that are not part of any frame, and why the first of them was rejected."""

    data: bytes
    reason: str


def _header(b1: int, type_: int, length: int) -> bytes:
    return bytes((1, b1, type_)) + length.to_bytes(4, "big")


def encode_frame(b1: int, type_: int, body: bytes) -> bytes:
    """A complete frame with its CRC."""
    head = _HEAD.pack(1, b1, type_, len(body)) + body
    return head + _modbus(head).to_bytes(2, "big")


def ack_frame(type_: int) -> bytes:
    """The cloud's acknowledgement of a device request of this type."""
    return encode_frame(RESPONSE, type_, ACK_BODY)


def parse_frame(data: bytes) -> AlphaFrame:
    """Exactly one frame; ValueError if the bytes are not one (length, header or CRC)."""
    if len(data) < HEADER_LEN + CRC_LEN or data[0] != 1 or data[1] not in (REQUEST, RESPONSE):
        raise ValueError(f"not an AlphaESS frame: starts {data[:HEADER_LEN].hex(' ')}")
    length = int.from_bytes(data[3:7], "big")
    if len(data) != HEADER_LEN + length + CRC_LEN:
        raise ValueError(f"frame length field says {length} body bytes, frame has {len(data) - HEADER_LEN - CRC_LEN}")
    carried = int.from_bytes(data[-2:], "big")
    computed = crc16(data[:-2])
    if carried != computed:
        raise ValueError(f"CRC mismatch: frame carries {carried:04X}, computed {computed:04X}")
    return AlphaFrame(data[1], data[2], bytes(data[HEADER_LEN:-2]), carried)


class Framer:
    """Reassembles the frames of one direction of a TCP stream, whatever the segmentation.

    A frame starts with `01 01` or `01 02`; its length field must be ≤ `max_body` and its CRC
    must match, otherwise the first byte is rejected and the scan resumes at the next `01 01` /
    `01 02`. Between calls at most one incomplete frame (≤ MAX_FRAME bytes) is kept. After a
    `feed`, `wire` holds the exact bytes of each frame it returned, in order.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self.wire: list[bytes] = []  # the exact bytes of each frame of the last feed, in order

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[AlphaFrame | Garbage]:
        if not self._buf:  # a device writes one frame at a time: usually `data` is exactly one
            frame = self._exactly_one(data)
            if frame is not None:
                self.wire = [data]
                return [frame]
        self.wire = []
        buf = self._buf
        buf += data
        out: list[AlphaFrame | Garbage] = []
        run_start: int | None = None  # the current run of rejected bytes
        run_end = 0
        reason = ""
        pos = 0

        def reject(start: int, end: int, why: str) -> None:
            nonlocal run_start, run_end, reason
            if run_start is None or run_end != start:
                flush_garbage()
                run_start, reason = start, why
            run_end = end

        def flush_garbage() -> None:
            nonlocal run_start
            if run_start is not None:
                out.append(Garbage(bytes(buf[run_start:run_end]), reason))
                run_start = None

        while pos < len(buf):
            left = len(buf) - pos
            if buf[pos] != 1 or (left >= 2 and buf[pos + 1] not in (REQUEST, RESPONSE)):
                match = SYNC.search(buf, pos + 1)
                end = match.start() if match else (len(buf) - 1 if buf[-1] == 1 else len(buf))
                reject(pos, end, "no frame header")
                pos = end
                continue
            if left < HEADER_LEN:
                break
            length = int.from_bytes(buf[pos + 3:pos + 7], "big")
            if length > self.max_body:
                reject(pos, pos + 1, f"length field {length} exceeds {self.max_body}")
                pos += 1
                continue
            total = HEADER_LEN + length + CRC_LEN
            if left < total:
                following = self._next_frame(buf, pos + 1)
                if following is None:
                    break
                reject(pos, following, f"false frame start 1-{buf[pos + 1]}-{buf[pos + 2]} (length field "
                                       f"{length}, a complete frame follows)")
                pos = following
                continue
            carried = int.from_bytes(buf[pos + total - 2:pos + total], "big")
            computed = crc16(bytes(buf[pos:pos + total - 2]))
            if carried != computed:
                reject(pos, pos + 1, f"CRC mismatch in 1-{buf[pos + 1]}-{buf[pos + 2]}: "
                                     f"carried {carried:04X}, computed {computed:04X}")
                pos += 1
                continue
            flush_garbage()
            wire = bytes(buf[pos:pos + total])
            out.append(AlphaFrame(wire[1], wire[2], wire[HEADER_LEN:-2], carried))
            self.wire.append(wire)
            pos += total
        flush_garbage()
        del buf[:pos]
        return out

    def _exactly_one(self, data: bytes) -> AlphaFrame | None:
        """`data` as one frame, if it is exactly one valid frame (else the general path decides)."""
        if type(data) is not bytes or len(data) < HEADER_LEN + CRC_LEN:
            return None
        sync, b1, type_, length = _HEAD.unpack_from(data)
        if sync != 1 or (b1 != REQUEST and b1 != RESPONSE) or length > self.max_body or \
                len(data) != HEADER_LEN + length + CRC_LEN:
            return None
        carried = data[-2] << 8 | data[-1]
        if _modbus(data[:-2]) != carried:
            return None
        return new_frame(AlphaFrame, (b1, type_, data[HEADER_LEN:-2], carried))

    def _next_frame(self, buf: bytearray, start: int) -> int | None:
        """Where the first complete, CRC-valid frame after `start` begins, if one is buffered: a
        false start (e.g. the `01 02` inside a 1-1-2 header after its CRC failed) must not hold
        up the frames behind it until its length field is satisfied."""
        for match in SYNC.finditer(buf, start):
            at = match.start()
            if len(buf) - at < HEADER_LEN:
                return None
            length = int.from_bytes(buf[at + 3:at + 7], "big")
            end = at + HEADER_LEN + length + CRC_LEN
            if length <= self.max_body and end <= len(buf) and \
                    crc16(bytes(buf[at:end - 2])) == int.from_bytes(buf[end - 2:end], "big"):
                return at
        return None

    def flush(self) -> bytes:
        """The bytes still waiting (an incomplete frame at the end of the stream)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

