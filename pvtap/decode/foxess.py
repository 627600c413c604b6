"""FoxESS 7E7E/7F7F frames: the M1/Q1 microinverter (TLS 14431, hub 6666, UDP 6364/3334) and
the H1/H3/KH WiFi dongle (cleartext 10001). Facts and sources: shared/reference/foxess.md.

Frame: `7E 7E | function | stamp u32 BE | length u16 BE | payload | CRC-16/MODBUS LE | E7 E7`
(or `7F 7F … F7 F7`; the tail follows the header). The CRC covers function … payload. Bytes 3–6
are the sender's clock or a sequence — never an identity and never trusted as UTC — so every record
is timed by the proxy's receive time and devices are named by the serial a 0x2A/0x06 frame (or
a hub login) reveals. A reply sets bit 7 of the request's function code; the family (7E/7F)
says nothing about direction, the socket side does.

One module serves every FoxESS channel: the frame format is the same on all of them, and the
cases the local answerer handles (M1 bootstrap, hub logins and heartbeats) never overlap. UDP
datagrams arrive as RawPayloads of kind "datagram" and become presence records.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import fastcrc

from pvtap.privacy import REDACTED, Privacy, pseudonym
from pvtap.records import DOWN, UP, FieldValue, Origin, RawPayload, Record

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
#: Undecodable datagrams are kept up to this size (the rest is counted in meta, not stored).
MAX_DATAGRAM_KEPT = 4096

class FrameError(ValueError):
    """Bytes that are not one well-formed FoxESS frame."""


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS (reflected 0xA001, init 0xFFFF): frames carry it low byte first.
    fastcrc, as the AlphaESS decoder: stateless, so safe from the Tap, ingest and answerer
    threads at once (a shared `crc.Calculator` is not), and ~1000× faster per frame."""
    return fastcrc.crc16.modbus(bytes(data))


@dataclass(frozen=True, slots=True)
class Frame:
    family: int  # 0x7E or 0x7F: the header byte
    function: int
    stamp: int  # bytes 3–6: device clock / sequence; echoed in Modbus replies
    payload: bytes

    def encode(self) -> bytes:
        return build_frame(self.function, self.payload, stamp=self.stamp, family=self.family)


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
    family = data[0]
    if family not in TAILS or data[1] != family:
        raise FrameError(f"header {data[:2].hex()} is neither 7e7e nor 7f7f")
    length = int.from_bytes(data[7:9], "big")
    if len(data) != length + OVERHEAD:
        raise FrameError(f"length field says {length} payload bytes, frame has {len(data) - OVERHEAD}")
    if data[-2] != TAILS[family] or data[-1] != TAILS[family]:
        raise FrameError(f"tail {data[-2:].hex()} does not match header {data[:2].hex()}")
    body, sent = data[2:9 + length], int.from_bytes(data[9 + length:11 + length], "little")
    if crc16(body) != sent:
        raise FrameError(f"CRC {sent:04x} does not match the computed {crc16(body):04x}")
    return Frame(family, data[2], int.from_bytes(data[3:7], "big"), bytes(data[9:9 + length]))


class FrameSplitter:
    """Reassembles frames from one direction of a byte stream: any segmentation, several frames
    per chunk, garbage between them, bad tails or CRCs and absurd lengths. A rejected candidate
    costs one byte (not two), so a real header right behind a false one is never skipped."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._junk = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """("frame", bytes) and ("garbage", bytes) items in stream order."""
        out: list[tuple[str, bytes]] = []
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
                break
            candidate = bytes(buf[:total])
            try:
                parse_frame(candidate)
            except FrameError:
                self._reject_one()
                continue
            self._flush_junk(out)
            out.append(("frame", candidate))
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
        self._junk.append(self._buffer[0])
        del self._buffer[:1]

    def _flush_junk(self, out: list[tuple[str, bytes]]) -> None:
        if self._junk:
            out.append(("garbage", bytes(self._junk)))
            self._junk.clear()


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

#: ESP-MESH `join_me_req` fields kept as presence fields: JSON key → (field, type).
_MESH_FIELDS: dict[str, tuple[str, type]] = {
    "router": ("rssi_dbm", int), "vendor_id": ("vendor_id", int), "mesh_id": ("mesh_id", str),
    "temp_mesh_id": ("temp_mesh_id", str), "fix_root": ("fix_root", bool),
    "node_number": ("node_number", int), "max_node_number": ("max_node_number", int),
}

_VERSION = re.compile(rb"^v?\d+(\.\d+)+$")
_PRINTABLE_RUN = re.compile(rb"[\x21-\x7e]{4,}")


def hub_channel(frame: Frame) -> str | None:
    """"A" or "B" for a hub-channel frame (function 0xFF, marker ffffff/fefefe), else None."""
    return HUB_CHANNELS.get(frame.stamp >> 8) if frame.function == HEARTBEAT else None


# -- payload parsers (pure; tested against the reference vectors) ------------------------------

def _cstr(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("ascii", "replace").strip()


def _u16(p: bytes, offset: int) -> int:
    return int.from_bytes(p[offset:offset + 2], "big")


def _s16(p: bytes, offset: int) -> int:
    return int.from_bytes(p[offset:offset + 2], "big", signed=True)


def _u32_word_swapped(p: bytes, offset: int) -> int:
    return _u16(p, offset) | _u16(p, offset + 2) << 16


def _length_prefixed(p: bytes, offset: int, what: str) -> tuple[bytes, int]:
    """(the string at `offset` preceded by its length byte, the offset after it)."""
    if offset >= len(p):
        raise FrameError(f"{what}: payload ends before its length byte")
    end = offset + 1 + p[offset]
    if end > len(p):
        raise FrameError(f"{what}: length {p[offset]} runs past the payload")
    return p[offset + 1:end], end


@dataclass(frozen=True, slots=True)
class Registration:
    prefix: bytes
    serial: str
    firmware: str
    serial_span: tuple[int, int]  # where the serial's length byte and text sit in the payload


def parse_registration(p: bytes) -> Registration:
    """0x2A: `01 00 01 31`, length-prefixed serial, length-prefixed datalogger firmware, padding."""
    serial, after = _length_prefixed(p, 4, "registration serial")
    firmware = b""
    if after < len(p) and p[after]:
        firmware, _ = _length_prefixed(p, after, "registration firmware")
    return Registration(p[:4], serial.decode("ascii", "replace"), firmware.decode("ascii", "replace"), (4, after))


def decode_m1_telemetry(p: bytes) -> dict[str, FieldValue]:
    """The 238-byte M1/Q1 telemetry block (foxess_local_gateway `telemetry.py` offsets).

    Temperature is read signed (an unsigned read turns −1 °C into 2047 °C); export power is
    negated as foxess_local_gateway does; PV3/PV4 appear only when the string count says so.
    """
    if len(p) != M1_TELEMETRY_LENGTH:
        raise FrameError(f"M1 telemetry is {M1_TELEMETRY_LENGTH} bytes, got {len(p)}")
    state = _u16(p, 154)
    pv_strings = _u16(p, 156)
    fields: dict[str, FieldValue] = {
        "ac_power_w": _s16(p, 6),
        "export_power_w": -_s16(p, 2),
        "ac_voltage_v": _u16(p, 12) / 32,
        "ac_current_a": _u16(p, 14) / 512,
        "frequency_hz": _u16(p, 16) / 128,
    }
    for n in range(1, 5 if pv_strings >= 4 else 3):
        base = 36 + (n - 1) * 6
        fields[f"pv{n}_voltage_v"] = _u16(p, base) / 256
        fields[f"pv{n}_current_a"] = _u16(p, base + 2) / 512
        fields[f"pv{n}_power_w"] = _u16(p, base + 4)
    fields.update({
        "temperature_c": _s16(p, 62) / 32,
        "sequence": _u16(p, 66),
        "generation_total_kwh": _u32_word_swapped(p, 70) / 128,
        "export_total_kwh": _u32_word_swapped(p, 74) / 128,
        **{f"fault_word_{i + 1}": _u16(p, 98 + 2 * i) for i in range(5)},
        "state": state,
        "state_text": {2: "standby", 4: "running"}.get(state, "unknown"),
        "pv_strings": pv_strings,
    })
    return fields


def decode_h1_realtime(p: bytes) -> dict[str, FieldValue]:
    """The first 13 words of the H1 dongle's 226-byte realtime block, read as FoxESS H1 input
    registers 11000–11011 (0.1 scaling) plus the grid frequency (0.01 Hz) — an inference from one
    published sample (foxess.md §3.6); the rest of the block stays in the raw frame."""
    if len(p) != H1_REALTIME_LENGTH:
        raise FrameError(f"H1 realtime is {H1_REALTIME_LENGTH} bytes, got {len(p)}")
    return {
        "pv1_voltage_v": _u16(p, 0) / 10, "pv1_current_a": _s16(p, 2) / 10, "pv1_power_w": _s16(p, 4),
        "pv2_voltage_v": _u16(p, 6) / 10, "pv2_current_a": _s16(p, 8) / 10, "pv2_power_w": _s16(p, 10),
        "battery_voltage_v": _u16(p, 12) / 10, "battery_current_a": _s16(p, 14) / 10,
        "grid_voltage_v": _u16(p, 18) / 10, "grid_current_a": _s16(p, 20) / 10, "grid_power_w": _s16(p, 22),
        "frequency_hz": _u16(p, 24) / 100,
    }


def decode_product_info(p: bytes) -> dict[str, FieldValue]:
    """0x01: the H1's fixed 40-byte layout, or the M1's NUL-separated strings at 0/32/42/76."""
    if len(p) == H1_PRODUCT_INFO_LENGTH:
        return {"master_version": _cstr(p[0:6]), "slave_version": _cstr(p[6:12]),
                "manager_version": _cstr(p[12:18]), "model": p[22:38].decode("ascii", "replace").strip(),
                "rated_power_w": _u16(p, 38)}
    if len(p) >= 80:
        return {"module_version": _cstr(p[0:32]), "product": _cstr(p[32:42]), "model": _cstr(p[42:76]),
                "firmware": _cstr(p[76:])}
    return {"strings": "|".join(run.decode() for run in _PRINTABLE_RUN.findall(p))}


def decode_module_info(p: bytes) -> tuple[dict[str, FieldValue], str]:
    """0x06 → (fields, serial or ""): the M1's NUL-terminated module id (`M10200`), or the H1's
    6-character protocol version followed by the inverter serial."""
    if b"\0" in p or len(p) <= 6:
        return {"module_id": _cstr(p)}, ""
    return {"protocol_version": p[:6].decode("ascii", "replace")}, p[6:].decode("ascii", "replace").strip()


def battery_serials(p: bytes, slot: int = BATTERY_SERIAL_SLOT) -> list[str]:
    """0x03: fixed-width serial slots, zero-filled when empty."""
    slots = (p[i:i + slot] for i in range(0, len(p), slot))
    return [s for s in (_cstr(s.replace(b" ", b"\0")) for s in slots) if s]


@dataclass(frozen=True, slots=True)
class ModbusMessage:
    operation: str  # "read" or "write"
    message: str  # "request", "reply" or "exception"
    unit: int
    function: int  # the Modbus function code (0x03, 0x04, 0x06, 0x10; | 0x80 for exceptions)
    register: int | None = None
    count: int | None = None
    values: tuple[int, ...] = ()
    exception: int | None = None


def parse_modbus(frame: Frame) -> ModbusMessage:
    """The Modbus PDU in 0x11/0x12 (requests) and 0x91/0x92 (replies): unit id, no Modbus CRC."""
    p, code = frame.payload, frame.function
    operation = "read" if code & 0x7F == MODBUS_READ else "write"
    if len(p) < 3:
        raise FrameError(f"Modbus payload of {len(p)} bytes is too short")
    unit, fn = p[0], p[1]
    if fn & 0x80:
        return ModbusMessage(operation, "exception", unit, fn, exception=p[2])
    if code == MODBUS_READ or (code == MODBUS_WRITE | REPLY and fn == 0x10):
        _need(p, 6, "request")
        return ModbusMessage(operation, "request" if code < REPLY else "reply", unit, fn, _u16(p, 2), _u16(p, 4))
    if code == MODBUS_READ | REPLY:
        data = p[3:3 + p[2]]
        if len(data) != p[2]:
            raise FrameError(f"Modbus reply announces {p[2]} data bytes, carries {len(data)}")
        return ModbusMessage(operation, "reply", unit, fn, count=len(data) // 2, values=_words(data))
    if fn == 0x06:  # write single: request and echoed reply look the same
        _need(p, 6, "write")
        return ModbusMessage(operation, "request" if code < REPLY else "reply", unit, fn, _u16(p, 2), 1,
                             (_u16(p, 4),))
    if fn == 0x10:
        _need(p, 7, "write multiple")
        return ModbusMessage(operation, "request", unit, fn, _u16(p, 2), _u16(p, 4), _words(p[7:7 + p[6]]))
    raise FrameError(f"Modbus function {fn:#04x} is not decoded")


def _words(data: bytes) -> tuple[int, ...]:
    return tuple(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data) - 1, 2))


def _need(p: bytes, n: int, what: str) -> None:
    if len(p) < n:
        raise FrameError(f"Modbus {what} needs {n} bytes, got {len(p)}")


@dataclass(frozen=True, slots=True)
class FirmwareMetadata:
    transfer_id: str
    image_size: int
    image_crc: int
    filename: str
    serial: str
    timeout_s: int
    serial_span: tuple[int, int]


def parse_firmware_metadata(p: bytes) -> FirmwareMetadata:
    """0x21: `<id:5> <size u32> <image CRC u16> <len> name 00 <len> serial <timeout u16>`."""
    if len(p) < 12:
        raise FrameError(f"firmware metadata of {len(p)} bytes is too short")
    name, after = _length_prefixed(p, 11, "firmware file name")
    start = after + 1  # a NUL follows the name
    serial, end = _length_prefixed(p, start, "firmware target serial")
    if end + 2 > len(p):
        raise FrameError("firmware metadata ends before its timeout")
    return FirmwareMetadata(p[:5].hex(), int.from_bytes(p[5:9], "big"), _u16(p, 9), name.decode("ascii", "replace"),
                            serial.decode("ascii", "replace"), _u16(p, end), (start, end))


def parse_wifi_setup(p: bytes) -> tuple[str, str, tuple[int, int]]:
    """BLE 0x3B set-WiFi: (ssid, password, span of both in the payload). Datalogger form `02 <len>
    ssid <len> pw`; M1 form `03 f3 ba 40 <len> ssid <len> pw`."""
    start = 4 if p[:1] == b"\x03" else 1
    ssid, after = _length_prefixed(p, start, "WiFi SSID")
    password, end = _length_prefixed(p, after, "WiFi password")
    return ssid.decode("utf-8", "replace"), password.decode("utf-8", "replace"), (start, end)


def hub_login(p: bytes) -> tuple[str, str]:
    """(serial, firmware) from a hub login. The write-up gives no byte layout, only that the
    payload holds the serial (`60M…`) and firmware (`v1.31`), so both are found by pattern."""
    runs = _PRINTABLE_RUN.findall(p)
    serial = next((r for r in runs if not _VERSION.match(r)), b"")
    firmware = next((r for r in runs if _VERSION.match(r)), b"")
    return serial.decode(), firmware.decode()


# -- the relay's decode side -------------------------------------------------------------------

def serial_in(frame: Frame) -> str:
    """The device serial a frame reveals ("" if none): 0x2A registration, H1 0x06, hub login."""
    try:
        if frame.function == REGISTRATION:
            return parse_registration(frame.payload).serial
        if frame.function == MODULE_INFO:
            return decode_module_info(frame.payload)[1]
        if hub_channel(frame) and frame.stamp & 0xFF == HUB_LOGIN:
            return hub_login(frame.payload)[0]
    except FrameError:
        pass
    return ""


class Tap:
    """The decode side of one relayed FoxESS connection (interface: pvtap.decode docstring).

    Counts: `frames`, `rejected` (bytes in no frame), `unknown` (frames of undocumented
    function codes; per code in `unknown_functions`).
    Modbus requests are remembered by their stamp so the reply that echoes it carries the
    register and count (meta), which the reply itself does not.
    """

    MAX_PENDING = 256

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.serial = ""
        self.frames = 0
        self.rejected = 0
        self.opaque = False
        self.unknown = 0
        self.unknown_functions: dict[int, int] = {}
        self._splitters = {UP: FrameSplitter(), DOWN: FrameSplitter()}
        self._started: set[str] = set()
        self._pending: OrderedDict[int, tuple[int, int | None, int | None]] = OrderedDict()

    def feed(self, direction: str, data: bytes, received: datetime) -> list[RawPayload]:
        if self.opaque or not data:
            return []
        if direction not in self._started:
            self._started.add(direction)
            if data[0] == 0x16 and data[1:2] in (b"", b"\x03"):  # a TLS record: not ours to read
                self.opaque = True
                return [RawPayload(dataclasses.replace(self.origin, direction=direction), "opaque",
                                   bytes(data[:OPAQUE_SAMPLE]), received, {"reason": "TLS handshake"})]
        return [self._payload(direction, kind, chunk, received)
                for kind, chunk in self._splitters[direction].feed(data)]

    def finish(self, received: datetime) -> list[RawPayload]:
        return [self._payload(direction, kind, chunk, received)
                for direction, splitter in self._splitters.items() for kind, chunk in splitter.finish()]

    def _payload(self, direction: str, kind: str, chunk: bytes, received: datetime) -> RawPayload:
        meta: dict[str, str | int | float | bool | None] = {}
        if kind == "frame":
            self.frames += 1
            meta.update(self._inspect(parse_frame(chunk)))
        else:
            self.rejected += len(chunk)
        if self.serial:
            meta["serial"] = self.serial
        return RawPayload(dataclasses.replace(self.origin, direction=direction), kind, chunk, received, meta)

    def _inspect(self, frame: Frame) -> dict[str, int]:
        if frame.function not in _DECODERS:
            self.unknown += 1
            self.unknown_functions[frame.function] = self.unknown_functions.get(frame.function, 0) + 1
        serial = serial_in(frame)
        # The first serial names the device, except that an H-series inverter serial (0x06)
        # wins over its dongle's own (0x2A).
        if serial and serial != self.serial and (not self.serial or frame.function == MODULE_INFO):
            self.serial = serial
            self.origin = dataclasses.replace(self.origin, device=serial)
        if frame.function in (MODBUS_READ, MODBUS_WRITE):
            try:
                request = parse_modbus(frame)
            except FrameError:
                return {}
            self._pending[frame.stamp] = (request.function, request.register, request.count)
            while len(self._pending) > self.MAX_PENDING:
                self._pending.popitem(last=False)
        elif frame.function in (MODBUS_READ | REPLY, MODBUS_WRITE | REPLY) and frame.stamp in self._pending:
            function, register, count = self._pending.pop(frame.stamp)
            if register is not None:
                return {"request_function": function, "request_register": register, "request_count": count or 0}
        return {}


class LocalAnswerer:
    """Answers a FoxESS device as its cloud or hub would, when there is none.

    - M1 bootstrap: 0x2A → 0xAA `01 01 01 00 00`, 0x2C → 0xAC (empty), 0x2B → 0xAB `01`, stamped
      with the answerer's clock as the cloud does. Nothing else is needed for telemetry to flow.
    - Hub channel (TCP 6666): both logins are acknowledged with op 0x03 `05 00 00` on the same
      channel marker; heartbeats are mirrored byte for byte (the write-up's server).
    - H1/H3/KH dongles: no acknowledgement is documented; nothing is sent (a registration frame,
      if one comes, is acknowledged like the M1's) and the connection simply stays open.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._splitter = FrameSplitter()
        self._clock = clock

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for kind, chunk in self._splitter.feed(data):
            if kind == "frame":
                out += self._answer(parse_frame(chunk), chunk)
        return bytes(out)

    def tick(self, now: float) -> bytes:
        return b""

    def _answer(self, frame: Frame, raw: bytes) -> bytes:
        channel = hub_channel(frame)
        if channel and frame.stamp & 0xFF == HUB_LOGIN:
            return build_frame(HEARTBEAT, HUB_LOGIN_ACK, stamp=frame.stamp & ~0xFF | HUB_HEARTBEAT, family=frame.family)
        if channel and frame.stamp & 0xFF == HUB_HEARTBEAT:
            return raw
        if frame.function in BOOTSTRAP_ACKS:
            return build_frame(frame.function | REPLY, BOOTSTRAP_ACKS[frame.function],
                               stamp=int(self._clock()) & 0xFFFFFFFF, family=frame.family)
        return b""


# -- redaction -------------------------------------------------------------------------------

def redact_raw(raw: RawPayload, privacy: Privacy) -> RawPayload:
    """Serials become pseudonyms (when enabled) in the bytes, the meta and the origin alike, so
    the stored frame and the records agree; WiFi passwords are always removed, SSIDs and MACs
    unless network identity is kept; firmware images are never stored (metadata only).
    Redacted frames are rebuilt with a correct CRC."""
    meta = dict(raw.meta)
    payload = raw.payload
    origin = dataclasses.replace(raw.origin, device=_device_label(raw.origin.device, privacy))
    if meta.get("serial"):
        meta["serial"] = privacy.serial(str(meta["serial"]))
    if raw.kind == "frame":
        frame = parse_frame(payload)
        redacted = _redact_frame(frame, privacy, meta)
        if redacted != frame.payload:
            payload = dataclasses.replace(frame, payload=redacted).encode()
            meta["redacted"] = True
    elif raw.kind == "datagram":
        payload = _redact_datagram(payload, privacy, meta)
    return RawPayload(origin, raw.kind, payload, raw.received, meta)


def _device_label(device: str, privacy: Privacy) -> str:
    """A serial becomes its pseudonym (when enabled); a peer address is dropped unless kept."""
    host = device.rpartition(":")[0].strip("[]") if device.count(":") == 1 or device.startswith("[") else device
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return privacy.serial(device)
    return device if privacy.keep_network_identity else ""


def _replace(p: bytes, span: tuple[int, int], new: bytes) -> bytes:
    """Replace the length-prefixed string at span[0] (length byte included) with `new`."""
    return p[:span[0]] + bytes([len(new)]) + new + p[span[1]:]


def _redact_frame(frame: Frame, privacy: Privacy, meta: dict) -> bytes:
    p, code = frame.payload, frame.function

    def pseudo(serial: str) -> bytes:
        return privacy.serial(serial).encode()

    if code == FIRMWARE_CHUNK:  # keep the transfer id and index, never the image
        meta["firmware_chunk_bytes"] = max(len(p) - 7, 0)
        return p[:7]
    if code == BLE_SET_WIFI and p:
        ssid, _, (start, end) = parse_wifi_setup(p)
        keep = ssid.encode() if privacy.keep_network_identity else REDACTED.encode()
        return p[:start] + bytes([len(keep)]) + keep + bytes([len(REDACTED)]) + REDACTED.encode() + p[end:]
    if not privacy.pseudonym_key:  # the rest only replaces serials by pseudonyms
        return p
    if code == REGISTRATION:
        reg = parse_registration(p)
        return _replace(p, reg.serial_span, pseudo(reg.serial))
    if code == MODULE_INFO:
        serial = decode_module_info(p)[1]
        return p[:6] + pseudo(serial) if serial else p
    if code == BATTERY_SERIALS:
        serials = [pseudo(s) for s in battery_serials(p)]
        slot = max([BATTERY_SERIAL_SLOT, *map(len, serials)])
        meta["serial_slot"] = slot
        return b"".join(s.ljust(slot, b"\0") for s in serials)
    if code == FIRMWARE_METADATA:
        md = parse_firmware_metadata(p)
        return _replace(p, md.serial_span, pseudo(md.serial))
    if hub_channel(frame) and frame.stamp & 0xFF == HUB_LOGIN:
        login = hub_login(p)[0].encode()
        if not login:
            return p
        at = p.index(login)
        if at and p[at - 1] == len(login):
            return _replace(p, (at - 1, at + len(login)), pseudo(login.decode()))
        return p[:at] + pseudo(login.decode()) + p[at + len(login):]
    return p


def _redact_datagram(p: bytes, privacy: Privacy, meta: dict) -> bytes:
    if p[:1] == b"{" and not privacy.keep_network_identity:
        try:
            message = json.loads(p)
        except ValueError:
            message = None
        if isinstance(message, dict) and isinstance(message.get("payload"), dict) and "mac" in message["payload"]:
            message["payload"]["mac"] = _mac(str(message["payload"]["mac"]), privacy)
            return json.dumps(message, separators=(",", ":")).encode()
    if p[:2] in HEADERS:
        return p
    if len(p) > MAX_DATAGRAM_KEPT:  # not ours: keep a sample and the size
        meta["datagram_bytes"] = len(p)
        return p[:MAX_DATAGRAM_KEPT]
    return p


def _mac(mac: str, privacy: Privacy) -> str:
    if privacy.keep_network_identity:
        return mac
    return pseudonym(mac.lower(), privacy.pseudonym_key) if privacy.pseudonym_key else REDACTED


# -- records ---------------------------------------------------------------------------------

def _meta_int(raw: RawPayload, key: str, default: int) -> int:
    """An integer that redact_raw or the relay noted in `meta` (None is refused, as int() refuses it)."""
    value = raw.meta.get(key, default)
    if value is None:
        raise TypeError(f"meta {key!r} is None, expected an integer")
    return int(value)


def decode_raw(raw: RawPayload) -> list[Record]:
    """Records from a (redacted) payload: a frame, a UDP datagram, or nothing for garbage."""
    if raw.kind == "frame":
        return decode_frame(parse_frame(raw.payload), raw)
    if raw.kind == "datagram":
        if "datagram_bytes" in raw.meta:  # cut by redact_raw: neither JSON nor a frame
            raise ValueError(f"UDP datagram of {raw.meta['datagram_bytes']} bytes is neither ESP-MESH JSON nor a "
                             f"FoxESS frame (its first {len(raw.payload)} bytes are kept)")
        return presence_records(raw.payload, _meta_int(raw, "port", 0), raw.origin, raw.received)
    if raw.kind in ("garbage", "partial", "opaque"):
        return []
    raise ValueError(f"unknown FoxESS payload kind {raw.kind!r}")


def decode_frame(frame: Frame, raw: RawPayload) -> list[Record]:
    decoder = _DECODERS.get(frame.function)
    if decoder is None:
        return [_record("foxess_unknown_frame", raw, {"family": f"{frame.family:02x}"},
                        {"function": frame.function, "payload_length": len(frame.payload)})]
    return decoder(frame, raw)


def _record(measurement: str, raw: RawPayload, tags: dict[str, str], fields: dict[str, FieldValue],
            serial: str = "") -> Record:
    serial = serial or str(raw.meta.get("serial", ""))
    return Record(measurement, raw.received, {**({"serial": serial} if serial else {}), **tags}, fields, raw.origin)


def _product_info(frame: Frame, raw: RawPayload) -> list[Record]:
    return [_record("foxess_product_info", raw, {}, decode_product_info(frame.payload))]


def _realtime(frame: Frame, raw: RawPayload) -> list[Record]:
    if len(frame.payload) == M1_TELEMETRY_LENGTH:
        return [_record("foxess_telemetry", raw, {"layout": "m1"}, decode_m1_telemetry(frame.payload))]
    if len(frame.payload) == H1_REALTIME_LENGTH:
        return [_record("foxess_h1_realtime", raw, {}, decode_h1_realtime(frame.payload))]
    return [_record("foxess_unknown_frame", raw, {"family": f"{frame.family:02x}"},
                    {"function": frame.function, "payload_length": len(frame.payload)})]


def _battery_serials(frame: Frame, raw: RawPayload) -> list[Record]:
    serials = battery_serials(frame.payload, _meta_int(raw, "serial_slot", BATTERY_SERIAL_SLOT))
    return [_record("foxess_battery_serials", raw, {}, {"battery_count": len(serials),
                                                        "battery_serials": ",".join(serials)})]


def _module_info(frame: Frame, raw: RawPayload) -> list[Record]:
    fields, serial = decode_module_info(frame.payload)
    return [_record("foxess_module_info", raw, {}, fields, serial)]


def _registration(frame: Frame, raw: RawPayload) -> list[Record]:
    reg = parse_registration(frame.payload)
    return [_record("foxess_registration", raw, {}, {"datalogger_firmware": reg.firmware}, reg.serial)]


def _bootstrap(frame: Frame, raw: RawPayload) -> list[Record]:
    step = BOOTSTRAP_STEPS[frame.function & 0x7F]
    message = "ack" if frame.function & REPLY else "request"
    return [_record("foxess_bootstrap", raw, {"step": step, "message": message}, {"payload": frame.payload.hex()})]


def _modbus(frame: Frame, raw: RawPayload) -> list[Record]:
    m = parse_modbus(frame)
    register = m.register if m.register is not None else raw.meta.get("request_register")
    count = m.count if m.count is not None else raw.meta.get("request_count")
    fields: dict[str, FieldValue] = {"stamp": frame.stamp, "unit": m.unit, "modbus_function": m.function}
    if register is not None:
        fields["register"] = int(register)
    if count is not None:
        fields["count"] = int(count)
    if m.values:
        fields["values"] = ",".join(map(str, m.values))
    if m.exception is not None:
        fields["exception"] = m.exception
    records = [_record("foxess_modbus", raw, {"operation": m.operation, "message": m.message}, fields)]
    if m.message == "reply" and m.values and register is not None:  # a fact, not an intent
        records += [_record("foxess_register", raw, {"register": str(int(register) + i), "source": m.operation},
                            {"value": value}) for i, value in enumerate(m.values)]
    return records


def _firmware(frame: Frame, raw: RawPayload) -> list[Record]:
    p, code = frame.payload, frame.function
    transfer = {"transfer_id": p[:5].hex()}
    if code == FIRMWARE_METADATA:
        md = parse_firmware_metadata(p)
        return [_record("foxess_firmware", raw, {"stage": "metadata"},
                        {**transfer, "image_size": md.image_size, "image_crc": md.image_crc,
                         "filename": md.filename, "timeout_s": md.timeout_s}, md.serial)]
    if code == FIRMWARE_CHUNK:
        if len(p) < 7:
            raise FrameError(f"firmware chunk of {len(p)} bytes has no index")
        size = _meta_int(raw, "firmware_chunk_bytes", len(p) - 7)
        return [_record("foxess_firmware", raw, {"stage": "chunk"},
                        {**transfer, "index": _u16(p, 5), "chunk_bytes": size})]
    if code == FIRMWARE_CHUNK | REPLY and len(p) >= 8:
        return [_record("foxess_firmware", raw, {"stage": "chunk_ack"}, {**transfer, "next_index": _u16(p, 5)})]
    if code == FIRMWARE_CHUNK | REPLY:
        return [_record("foxess_firmware", raw, {"stage": "final_ack"}, {**transfer, "status": p[5:].hex()})]
    if code == FIRMWARE_PROGRESS:
        if len(p) < 7:
            raise FrameError(f"firmware progress of {len(p)} bytes has no percentage")
        return [_record("foxess_firmware", raw, {"stage": "progress"}, {**transfer, "percent": p[6]})]
    return [_record("foxess_firmware", raw, {"stage": "metadata_ack"}, {**transfer, "status": p[5:].hex()})]


_WIFI_STATUS = {0: "not connected", 3: "connected to server", 4: "transparent transmission"}


def _ble(frame: Frame, raw: RawPayload) -> list[Record]:
    p = frame.payload
    if frame.function == BLE_SET_WIFI:
        if not p:
            return [_record("foxess_wifi_setup", raw, {"message": "ack"}, {"ssid": ""})]
        ssid, _, _ = parse_wifi_setup(p)
        return [_record("foxess_wifi_setup", raw, {"message": "set"}, {"ssid": ssid})]
    query = {4: "connection_status", 6: "ssid_list"}.get(p[0], f"{p[0]:#04x}") if p else "empty"
    if len(p) == 4 and p[0] == 4:
        return [_record("foxess_wifi_status", raw, {"query": query, "message": "reply"},
                        {"status": p[3], "status_text": _WIFI_STATUS.get(p[3], "unknown")})]
    return [_record("foxess_wifi_status", raw, {"query": query, "message": "request" if len(p) == 1 else "reply"},
                    {"payload_length": len(p)})]


def _heartbeat(frame: Frame, raw: RawPayload) -> list[Record]:
    channel = hub_channel(frame)
    if channel is None:
        return [_record("foxess_heartbeat", raw, {}, {"device_clock": frame.stamp, "payload": frame.payload.hex()})]
    op = frame.stamp & 0xFF
    tags = {"channel": channel}
    if op == HUB_LOGIN:
        serial, firmware = hub_login(frame.payload)
        return [_record("foxess_hub_login", raw, tags, {"firmware": firmware}, serial)]
    if op == HUB_HEARTBEAT and frame.payload == HUB_LOGIN_ACK:
        return [_record("foxess_hub_ack", raw, tags, {"payload": frame.payload.hex()})]
    if op == HUB_HEARTBEAT:
        return [_record("foxess_hub_heartbeat", raw, tags, {"payload": frame.payload.hex()})]
    return [_record("foxess_hub_unknown", raw, tags, {"op": op, "payload_length": len(frame.payload)})]


_DECODERS: dict[int, Callable[[Frame, RawPayload], list[Record]]] = {
    PRODUCT_INFO: _product_info, REALTIME: _realtime, BATTERY_SERIALS: _battery_serials,
    MODULE_INFO: _module_info, REGISTRATION: _registration,
    REGISTRATION | REPLY: _bootstrap, BOOTSTRAP_STEP2: _bootstrap, BOOTSTRAP_STEP2 | REPLY: _bootstrap,
    BOOTSTRAP_STEP3: _bootstrap, BOOTSTRAP_STEP3 | REPLY: _bootstrap,
    MODBUS_READ: _modbus, MODBUS_WRITE: _modbus, MODBUS_READ | REPLY: _modbus, MODBUS_WRITE | REPLY: _modbus,
    FIRMWARE_METADATA: _firmware, FIRMWARE_METADATA | REPLY: _firmware, FIRMWARE_CHUNK: _firmware,
    FIRMWARE_CHUNK | REPLY: _firmware, FIRMWARE_PROGRESS: _firmware,
    BLE_STATUS: _ble, BLE_SET_WIFI: _ble, HEARTBEAT: _heartbeat,
}


# -- UDP presence ----------------------------------------------------------------------------

def presence_records(datagram: bytes, port: int, origin: Origin, received: datetime) -> list[Record]:
    """An M1 broadcast as presence: the ESP-MESH `join_me_req` JSON (UDP 6364: MAC, RSSI, mesh
    ids) or the 0xFF heartbeat frame (UDP 3334: its rising clock). Recognised by content, not by
    port; anything else raises ValueError (the ingest worker counts it and keeps a sample)."""
    tags = {"port": str(port)} if port else {}
    if datagram[:1] == b"{":
        try:
            message = json.loads(datagram)
        except ValueError as exc:
            raise ValueError(f"UDP datagram is not valid JSON: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("payload", {}), dict):
            raise ValueError("UDP JSON is not an ESP-MESH message object")
        body = message.get("payload", {})
        fields: dict[str, FieldValue] = {}
        for key, (name, kind) in _MESH_FIELDS.items():
            if key in body and body[key] is not None:
                fields[name] = kind(body[key])
        for key in ("seq",):
            if isinstance(message.get(key), int):
                fields[key] = message[key]
        if "monkey" in message:
            fields["monkey"] = str(message["monkey"])
        if not fields:
            fields["payload_length"] = len(datagram)
        mac = {"mac": str(body["mac"])} if body.get("mac") else {}
        return [Record("foxess_presence", received,
                       {**tags, "source": "mesh", "message": str(message.get("type", "")), **mac}, fields, origin)]
    if datagram[:2] in HEADERS:
        frame = parse_frame(datagram)
        return [Record("foxess_presence", received, {**tags, "source": "heartbeat"},
                       {"device_clock": frame.stamp, "function": frame.function, "payload": frame.payload.hex()},
                       origin)]
    raise ValueError(f"UDP datagram of {len(datagram)} bytes is neither ESP-MESH JSON nor a FoxESS frame")
