"""AlphaESS battery ↔ cloud protocol (TCP 7777): frames, records, redaction, local answers.

Wire format (`shared/reference/alphaess.md` §1): `01 <B1> <B2> <LEN u32 BE> <body> <CRC16 BE>`,
B1 = 1 request/push, 2 response/ack (NOT the direction), B2 the message type, CRC-16/MODBUS over
header and body stored high byte first. Bodies are compact JSON with numbers as strings, CSV for
B2 = 12, empty for B2 = 0.

Pure: no sockets, no clocks (the caller passes the receive time; only the Tap consults the
host's time zone, see below). The relay uses `Tap` (decode side of one connection) and
`LocalAnswerer` (answers when there is no cloud); the ingest worker uses `redact_raw` and
`decode_raw`.

Records, tagged `serial` (from the frame, else the connection's device): `alphaess_realtime`
(1-1-16), `alphaess_extended` (1-1-5), `alphaess_backfill` (1-1-12, one per CSV row),
`alphaess_event` (1-1-9: an event log gives one per entry, tags `msg_type` and `code`; other
messages one with their text), `alphaess_command` (1-x-8, tag `kind` request/ack),
`alphaess_device` (the cloud's config 1-2-3 and the device's dump 1-1-4, tag `source`, values as
text) and `alphaess_login` (1-1-2). Acks, 1-1-0, 1-1-3 and unknown types give none; their raw
frames are kept.

Timestamps. The device clock is local time of an unknown zone, not NTP-synced, drifts (80 s after
weeks offline) and can be stuck in DST; samples are sometimes sent twice or several at once. So a
record's time is the device's own time converted with a per-connection clock offset, and the
device's clock reading is kept as the field `device_time` (ISO 8601, no zone, as the device said):

- the `Tap` measures, for every realtime (16) and extended (5) frame, `received - device time`;
  the offset is the smallest such lag seen on the connection so far, in whole seconds (delays
  and batching only ever add lag, so the minimum is the best estimate of zone + clock error);
- before the first realtime/extended frame of a connection (the CSV back-fill and the event log
  come right after login), the device clock is assumed to be the proxy host's local time zone
  (set `TZ` for a container);
- the offset used goes into the raw payload's meta (`clock_offset_s`, `clock`), so `decode_raw`
  stays pure and a replay stamps records exactly as the live decode did. Without that meta
  (payloads from elsewhere) realtime/extended use the frame's own lag and the rest take the
  device clock as UTC.

A sample sent twice thus lands on the same timestamp (InfluxDB keeps one point), a batch of
samples keeps its 10-s spacing, and a back-filled row lands at its own minute.

Field types are fixed per field name from the reference's field lists (InfluxDB rejects a field
that changes type): codes, bit fields and packed values are int, measurements float, `EmsStatus`
and `CSQ` text; keys the reference does not list are float. A value that does not parse as its
field's type is kept as text in `<name>_text`, so nothing is lost and no field flips type.

Redaction (`redact_raw`, before anything is stored or logged): `Password`, `License`, `Address`,
`ZipCode`, `PhoneNumber` always; `Country`, the MAC in `System` messages and a network address
used as device label unless `privacy.keep_network_identity`; with `privacy.pseudonym_key` every
serial (`SN`, `UserName`, `InvSN`, `BatterySN*`, …, the CSV serial column, the origin's device)
becomes its pseudonym. A redacted frame is re-encoded with a fresh CRC, so the stored raw is
still a valid frame; an unchanged one is stored byte for byte. Rejected bytes (garbage, a
partial frame) get the same key/value redaction on their text, cut-off values included, and a
run that does not begin at a frame header loses everything up to its first string end: it may
begin inside a secret whose key is in the previous run.

CRC-16/MODBUS comes from `fastcrc` (a compiled, stateless implementation: under a nanosecond a
byte, safe to call from the relay's worker threads).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import fastcrc

from pvtap.privacy import REDACTED, Privacy
from pvtap.records import DOWN, UP, FieldValue, Origin, RawPayload, Record

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

_SYNC = re.compile(rb"\x01[\x01\x02]")


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS (init 0xFFFF, reflected poly 0x8005, no final XOR)."""
    return fastcrc.crc16.modbus(data)


# -- frames -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AlphaFrame:
    """One frame. B0 is always 1 and so not kept."""

    b1: int  # 1 request / push, 2 response / ack
    type: int  # B2
    body: bytes
    crc: int  # as carried on the wire

    @property
    def name(self) -> str:
        """The reference's notation, e.g. `1-1-16`."""
        return f"1-{self.b1}-{self.type}"

    def encode(self) -> bytes:
        return _header(self.b1, self.type, len(self.body)) + self.body + self.crc.to_bytes(2, "big")


@dataclass(frozen=True, slots=True)
class Garbage:
    """A run of bytes that are not part of any frame, and why the first of them was rejected."""

    data: bytes
    reason: str


def _header(b1: int, type_: int, length: int) -> bytes:
    return bytes((1, b1, type_)) + length.to_bytes(4, "big")


def encode_frame(b1: int, type_: int, body: bytes) -> bytes:
    """A complete frame with its CRC."""
    head = _header(b1, type_, len(body)) + body
    return head + crc16(head).to_bytes(2, "big")


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
    `01 02`. Between calls at most one incomplete frame (≤ MAX_FRAME bytes) is kept.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[AlphaFrame | Garbage]:
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
                match = _SYNC.search(buf, pos + 1)
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
            out.append(AlphaFrame(buf[pos + 1], buf[pos + 2], bytes(buf[pos + HEADER_LEN:pos + total - 2]), carried))
            pos += total
        flush_garbage()
        del buf[:pos]
        return out

    def _next_frame(self, buf: bytearray, start: int) -> int | None:
        """Where the first complete, CRC-valid frame after `start` begins, if one is buffered: a
        false start (e.g. the `01 02` inside a 1-1-2 header after its CRC failed) must not hold
        up the frames behind it until its length field is satisfied."""
        for match in _SYNC.finditer(buf, start):
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


# -- bodies -----------------------------------------------------------------------------------

def _json_body(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _encode_json(obj: dict[str, Any]) -> bytes:
    """Compact, like the device writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_DEVICE_TIME = re.compile(r"(\d{4})/(\d{1,2})/(\d{1,2}) (\d{1,2}):(\d{2}):(\d{2})")
_EVENT_ENTRY = re.compile(r"(\d{2})/(\d{2})/(\d{2}) (\d{2}):(\d{2}):(\d{2}) (\d+)")


def device_time(text: str) -> datetime | None:
    """`YYYY/MM/DD HH:MM:SS` (device local clock) as a naive datetime; None if it is not one."""
    m = _DEVICE_TIME.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        return None
    try:
        year, month, day, hour, minute, second = map(int, m.groups())
        return datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None


def _first_device_time(frame: AlphaFrame) -> datetime | None:
    """The first device clock reading a frame carries (realtime/extended `Time`, first CSV row,
    first event-log entry)."""
    if frame.b1 != REQUEST:
        return None
    if frame.type in (5, 16):
        body = _json_body(frame.body)
        return device_time(body.get("Time", "")) if body else None
    if frame.type == 12:
        for row in _csv_rows(frame.body):
            t = device_time(f"{row.get('Date', '')} {row.get('Time', '')}")
            if t is not None:
                return t
        return None
    if frame.type == 9:
        body = _json_body(frame.body)
        content = body.get("MsgContent") if body else None
        if isinstance(content, str) and (m := _EVENT_ENTRY.search(content)):
            return _event_time(m)
    return None


def _event_time(m: re.Match[str]) -> datetime | None:
    yy, mo, dd, hh, mi, ss = map(int, m.groups()[:6])
    try:
        return datetime(2000 + yy, mo, dd, hh, mi, ss)
    except ValueError:
        return None


def _csv_rows(body: bytes) -> Iterable[dict[str, str]]:
    """CSV back-fill rows as dicts; every line starting `Date,` is a header (each frame repeats it)."""
    header: list[str] | None = None
    for line in body.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        cells = line.strip().split(",")
        if cells[0] == "Date":
            header = cells
        elif header is not None:
            yield dict(zip(header, cells))


# -- field typing -----------------------------------------------------------------------------

#: Integers by nature: modes, flags, bit fields, packed (module, cell, value) words, codes.
INT_FIELDS = frozenset({
    "InvWorkMode", "FlagBms", "BmsWork", "BmsRelay", "BmsNum", "VcellLow", "VcellHigh", "TcellLow",
    "TcellHigh", "IdTempelover", "IdTempEover", "IdTempediffe", "IdChargcurre", "IdDischcurre",
    "IdCellvolover", "IdCellvollower", "IdSoclower", "IdCellvoldiffe", "ErrInv", "WarInv", "ErrEms",
    "ErrBms", "ErrMeter", "ErrBackupBox", "BmsShutdown", "BmuRelay", "BmsHardVer1", "BmsHardVer2",
    "BmsHardVer3", "DispatchSwitch", "DispatchMode", "UPSModel", "SYSMode", "EVCGunLockFlag",
})
#: Text by nature.
TEXT_FIELDS = frozenset({"EmsStatus", "CSQ"})
#: Keys that are not measurements: the clock (kept as `device_time`) and the serial (a tag).
_NOT_FIELDS = frozenset({"Time", "Date", "SN"})
#: CSV back-fill names differing from the JSON names of the same quantity.
_CSV_RENAMES = {"Vpv1": "Upv1", "Vpv2": "Upv2"}

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def typed_fields(items: Iterable[tuple[str, Any]]) -> dict[str, FieldValue]:
    """Measurement fields with a fixed type per name (see module docstring)."""
    fields: dict[str, FieldValue] = {}
    for name, value in items:
        if name in _NOT_FIELDS or value is None or value == "" or value == REDACTED:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if name in TEXT_FIELDS:
            fields[name] = text
            continue
        number = _number(value)
        if number is None:
            fields[f"{name}_text"] = text
        elif name in INT_FIELDS:
            whole = _whole(value, number)
            if whole is None:
                fields[f"{name}_text"] = text
            else:
                fields[name] = whole
        else:
            fields[name] = number
    return fields


def _whole(value: Any, number: float) -> int | None:
    """An int field's value: exact from digits, else from an integral float; None beyond int64."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("+-").isdigit()):
        whole = int(value)
    elif number.is_integer():
        whole = int(number)
    else:
        return None
    return whole if -2**63 <= whole < 2**63 else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) or (isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) else None


# -- records ----------------------------------------------------------------------------------

def _stamp(naive: datetime | None, offset_s: int | None, received: datetime) -> datetime:
    if naive is None:
        return received
    return naive.replace(tzinfo=UTC) + timedelta(seconds=offset_s or 0)


def _iso(naive: datetime) -> str:
    return naive.isoformat(timespec="seconds")


def records_from_frame(frame: AlphaFrame, origin: Origin, received: datetime,
                       clock_offset_s: int | None = None) -> list[Record]:
    """The records one frame holds. `origin.direction` is the socket's; `clock_offset_s`
    converts the device clock to UTC (module docstring); redacted values are left out."""
    body = _json_body(frame.body) if frame.type != 12 else None
    serial = origin.device
    if body is not None:
        found = body.get("SN") or body.get("UserName")
        if isinstance(found, str) and found:
            serial = found
            origin = dataclasses.replace(origin, device=found)
    tags = {"serial": serial} if serial else {}

    if frame.type in (5, 16) and frame.b1 == REQUEST and body is not None:
        naive = device_time(body.get("Time", ""))
        if clock_offset_s is None and naive is not None:
            clock_offset_s = math.floor((received - naive.replace(tzinfo=UTC)).total_seconds())
        fields = typed_fields(body.items())
        if naive is not None:
            fields["device_time"] = _iso(naive)
        if not fields:
            return []
        measurement = "alphaess_realtime" if frame.type == 16 else "alphaess_extended"
        return [Record(measurement, _stamp(naive, clock_offset_s, received), tags, fields, origin)]

    if frame.type == 12 and frame.b1 == REQUEST:
        return _backfill_records(frame.body, origin, received, clock_offset_s)

    if frame.type == 9 and frame.b1 == REQUEST and body is not None:
        return _event_records(body, tags, origin, received, clock_offset_s)

    if frame.type == 8 and body is not None and body.get("Command"):
        fields = {_snake(k): _text(v) for k, v in body.items() if v != REDACTED}
        kind = "request" if frame.b1 == REQUEST else "ack"
        return [Record("alphaess_command", received, {**tags, "kind": kind}, fields, origin)]

    if (frame.type, frame.b1) in ((4, REQUEST), (3, RESPONSE)) and body is not None:
        fields = {k: _text(v) for k, v in body.items() if k not in ("SN", "Status") and v != REDACTED}
        if not fields:
            return []
        source = "device" if frame.b1 == REQUEST else "cloud"
        return [Record("alphaess_device", received, {**tags, "source": source}, fields, origin)]

    if frame.type == 2 and frame.b1 == REQUEST and body is not None:
        company = body.get("CompanyName", "")
        return [Record("alphaess_login", received, tags, {"CompanyName": _text(company)}, origin)]

    return []


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _snake(name: str) -> str:
    """`CmdIndex` → `cmd_index`, `Parameter1` → `parameter1`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _backfill_records(body: bytes, origin: Origin, received: datetime, offset: int | None) -> list[Record]:
    records = []
    for row in _csv_rows(body):
        naive = device_time(f"{row.get('Date', '')} {row.get('Time', '')}")
        if naive is None:
            continue
        serial = row.get("SN") or origin.device
        fields = typed_fields((_CSV_RENAMES.get(k, k), v) for k, v in row.items())
        fields["device_time"] = _iso(naive)
        records.append(Record("alphaess_backfill", _stamp(naive, offset, received),
                              {"serial": serial} if serial else {}, fields,
                              dataclasses.replace(origin, device=serial)))
    return records


def _event_records(body: dict[str, Any], tags: dict[str, str], origin: Origin, received: datetime,
                   offset: int | None) -> list[Record]:
    msg_type = _text(body.get("MsgType", ""))
    content = _text(body.get("MsgContent", ""))
    if msg_type == "EventLog":
        records = []
        for m in _EVENT_ENTRY.finditer(content):
            naive = _event_time(m)
            if naive is None:
                continue
            records.append(Record("alphaess_event", _stamp(naive, offset, received),
                                  {**tags, "msg_type": msg_type, "code": m.group(7)},
                                  {"device_time": _iso(naive)}, origin))
        return records
    fields = {"content": content, "description": _text(body.get("Description", ""))}
    return [Record("alphaess_event", received, {**tags, "msg_type": msg_type}, fields, origin)]


# -- redaction --------------------------------------------------------------------------------

#: Redacted always (reference §4).
SECRET_KEYS = frozenset({"Password", "License", "Address", "ZipCode", "PhoneNumber"})
#: Location: redacted unless privacy.keep_network_identity.
LOCATION_KEYS = frozenset({"Country"})
#: Serials: replaced by their pseudonym when privacy.pseudonym_key is set.
SERIAL_KEYS = frozenset({"SN", "UserName", "InvSN", "WifiSN", "BakBoxSN", "SCBSN"}
                        | {f"BatterySN{i}" for i in range(1, 19)})
_VALUE_END = re.compile(r'"(?=\s*[,}\]])')
_PRINTABLE = re.compile(r"[\x20-\x7e\t\r\n]*")
_MAC = re.compile(r"(MAC:\s*)[0-9A-Fa-f]{2}(?:[ :-]?[0-9A-Fa-f]{2}){5}")


class _Redaction:
    """What one payload's redaction changed, for the raw payload's meta."""

    def __init__(self, privacy: Privacy) -> None:
        self.privacy = privacy
        self.redacted: set[str] = set()
        self.pseudonymised: set[str] = set()

    def value(self, key: str, value: Any) -> Any:
        if key in SECRET_KEYS or (key in LOCATION_KEYS and not self.privacy.keep_network_identity):
            if value != REDACTED:
                self.redacted.add(key)
            return REDACTED
        if key in SERIAL_KEYS and self.privacy.pseudonym_key and isinstance(value, str) and value:
            self.pseudonymised.add(key)
            return self.privacy.serial(value)
        if key == "MsgContent" and isinstance(value, str) and not self.privacy.keep_network_identity:
            cleaned = _MAC.sub(rf"\g<1>{REDACTED}", value)
            if cleaned != value:
                self.redacted.add("MAC")
            return cleaned
        if isinstance(value, dict):
            return {k: self.value(k, v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(key, v) for v in value]
        return value

    def csv(self, body: bytes) -> bytes:
        lines = body.decode("utf-8", errors="surrogateescape").split("\n")
        header: list[str] = []
        for i, line in enumerate(lines):
            cells = line.split(",")
            if cells[0].strip() == "Date":
                header = [c.strip() for c in cells]
                continue
            changed = [self.value(header[j], c) if j < len(header) and c else c for j, c in enumerate(cells)]
            lines[i] = ",".join(changed)
        return "\n".join(lines).encode("utf-8", errors="surrogateescape")

    def text(self, data: bytes, *, fragment: bool) -> bytes:
        """Bytes that are not a parsable body (garbage, partial frames, a frame's non-JSON body):
        redact what JSON key/value pairs and CSV serials can be recognised, complete or cut off.
        `fragment`: the bytes were cut out of a stream, so they may begin inside a string."""
        text = data.decode("latin-1")
        if fragment and not _SYNC.match(data) and not data.startswith(b"{"):
            text = self._leading_fragment(text)
        keys = SECRET_KEYS | (set() if self.privacy.keep_network_identity else LOCATION_KEYS)
        if self.privacy.pseudonym_key:
            keys |= SERIAL_KEYS
        pattern = re.compile(r'"(' + "|".join(sorted(keys)) + r')"(\s*:\s*)("(?:[^"\\]|\\.)*(?:"|$)|[^,}\]\s"]+)')

        def pair(m: re.Match[str]) -> str:
            key, sep, raw = m.groups()
            if not raw.startswith('"'):
                return f'"{key}"{sep}"{self.value(key, raw)}"'
            closed = len(raw) > 1 and raw.endswith('"')  # else cut off at the end of the bytes
            new = self.value(key, raw[1:-1] if closed else raw[1:])
            return f'"{key}"{sep}"{new}"' if closed else f'"{key}"{sep}"{new}'

        text = pattern.sub(pair, text)
        if self.privacy.pseudonym_key:
            text = re.sub(r"(?m)^(\d{4}/\d{1,2}/\d{1,2},\d{1,2}:\d{2}:\d{2},)([^,\n]+)",
                          lambda m: m.group(1) + self.value("SN", m.group(2)), text)
        if not self.privacy.keep_network_identity:
            cleaned = _MAC.sub(rf"\g<1>{REDACTED}", text)
            if cleaned != text:
                self.redacted.add("MAC")
            text = cleaned
        return text.encode("latin-1")

    def _leading_fragment(self, text: str) -> str:
        """Bytes that do not start at a frame header may start inside a JSON string, or inside
        the key before it, where no key shows what the value is: everything up to the end of the
        first string value goes. Text without one is all fragment; binary bytes stay."""
        end = _VALUE_END.search(text)
        if end is None and not _PRINTABLE.fullmatch(text):
            return text
        self.redacted.add("fragment")
        return REDACTED + (text[end.start():] if end else "")

    def meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        out = dict(meta)
        if self.redacted:
            out["redacted"] = ",".join(sorted(self.redacted))
        if self.pseudonymised:
            out["pseudonymised"] = ",".join(sorted(self.pseudonymised))
        return out


def _redacted_body(frame: AlphaFrame, redaction: _Redaction) -> bytes:
    if not frame.body:
        return frame.body
    if frame.type == 12:
        return redaction.csv(frame.body)
    parsed = _json_body(frame.body)
    if parsed is None:
        return redaction.text(frame.body, fragment=False)
    redacted = redaction.value("", parsed)
    return frame.body if redacted == parsed and not redaction.redacted else _encode_json(redacted)


def redact_raw(raw: RawPayload, privacy: Privacy) -> RawPayload:
    """The payload as it may be stored: secrets replaced by REDACTED, serials pseudonymised when
    asked, a network address as device label dropped unless kept (see module docstring)."""
    device = _device_label(raw.origin.device, privacy)
    origin = dataclasses.replace(raw.origin, device=device) if device != raw.origin.device else raw.origin
    redaction = _Redaction(privacy)
    if raw.kind == "frame":
        frame = parse_frame(raw.payload)
        body = _redacted_body(frame, redaction)
        payload = raw.payload if body == frame.body else encode_frame(frame.b1, frame.type, body)
    elif raw.kind in ("garbage", "partial"):
        payload = redaction.text(raw.payload, fragment=True)
    else:  # "opaque": a few header bytes only
        payload = raw.payload
    return RawPayload(origin, raw.kind, payload, raw.received, redaction.meta(dict(raw.meta)))


def _device_label(device: str, privacy: Privacy) -> str:
    if not device:
        return device
    if not privacy.keep_network_identity and _is_address(device):
        return ""
    return privacy.serial(device)


def _is_address(label: str) -> bool:
    """`192.0.2.1`, `192.0.2.1:51234`, `[2001:db8::1]:51234`, `2001:db8::1`."""
    host = label
    if label.startswith("["):
        host = label[1:].partition("]")[0]
    elif label.count(":") == 1:
        host = label.partition(":")[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def decode_raw(raw: RawPayload) -> list[Record]:
    """Records of a stored (redacted) payload. Garbage, partial and opaque payloads hold none."""
    if raw.kind in ("garbage", "partial", "opaque"):
        return []
    if raw.kind != "frame":
        raise ValueError(f"unknown AlphaESS payload kind {raw.kind!r}")
    offset = raw.meta.get("clock_offset_s")
    return records_from_frame(parse_frame(raw.payload), raw.origin, raw.received,
                              int(offset) if offset is not None else None)


# -- the relay's side -------------------------------------------------------------------------

_TLS_RECORD = re.compile(rb"\x16\x03[\x00-\x04]")


class Tap:
    """Decode side of one relayed connection (interface: `pvtap.decode` docstring).

    `feed(direction, data, received)` returns one RawPayload per complete frame (kind "frame",
    meta `frame` = "1-1-16" etc., `length`, and for frames carrying device times
    `clock_offset_s` / `clock`) or per run of rejected bytes (kind "garbage", meta `reason`).
    If the device's first two bytes are not `01 01` / `01 02` (e.g. a TLS ClientHello) the
    connection is `opaque`: one "opaque" payload holding the first 5 bytes, then nothing.
    `origin.device` becomes the real serial once a frame shows it (`redact_raw` pseudonymises
    it; apply `privacy.serial()` before logging it). Counts: `frames`, `unknown` (frames of
    undocumented types), `rejected` (bytes in no frame), `opaque_bytes`.
    """

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.frames = 0
        self.unknown = 0
        self.rejected = 0
        self.opaque = False
        self.opaque_bytes = 0
        self._framers = {UP: Framer(), DOWN: Framer()}
        self._first: bytearray | None = bytearray()  # the device's first bytes, until two are seen
        self._min_lag: float | None = None

    def feed(self, direction: str, data: bytes, received: datetime) -> list[RawPayload]:
        if self.opaque:
            self.opaque_bytes += len(data)
            return []
        if direction == UP and self._first is not None:  # is this AlphaESS at all?
            self._first += data
            if len(self._first) < 2:
                return []
            data, self._first = bytes(self._first), None
            if not _SYNC.match(data):
                return [self._go_opaque(data[:5], len(data), received)]
        out = []
        for item in self._framers[direction].feed(data):
            if isinstance(item, Garbage):
                self.rejected += len(item.data)
                out.append(self._raw(direction, "garbage", item.data, received, {"reason": item.reason}))
            else:
                out.append(self._frame(direction, item, received))
        return out

    def finish(self, received: datetime) -> list[RawPayload]:
        out = []
        if self._first:  # a single byte was all the device sent
            self.rejected += len(self._first)
            out.append(self._raw(UP, "partial", bytes(self._first), received, {"reason": "connection ended"}))
            self._first = None
        for direction, framer in self._framers.items():
            rest = framer.flush()
            if rest and not self.opaque:
                self.rejected += len(rest)
                out.append(self._raw(direction, "partial", rest, received,
                                     {"reason": "connection ended inside a frame"}))
        return out

    def _go_opaque(self, head: bytes, size: int, received: datetime) -> RawPayload:
        self.opaque = True
        self.opaque_bytes += size
        reason = "TLS handshake" if _TLS_RECORD.match(head) else "not AlphaESS framing"
        return self._raw(UP, "opaque", head, received, {"reason": reason})

    def _frame(self, direction: str, frame: AlphaFrame, received: datetime) -> RawPayload:
        self.frames += 1
        if frame.type not in KNOWN_TYPES:
            self.unknown += 1
        meta: dict[str, Any] = {"frame": frame.name, "length": len(frame.body)}
        try:  # a frame is kept whatever its body holds; serial and clock are extras
            self._learn_serial(frame)
            naive = _first_device_time(frame)
            if naive is not None:
                meta.update(self._clock(frame, naive, received))
        except (ValueError, OverflowError, OSError) as exc:  # absurd device dates
            meta["clock_error"] = str(exc)
        return self._raw(direction, "frame", frame.encode(), received, meta)

    def _clock(self, frame: AlphaFrame, naive: datetime, received: datetime) -> dict[str, Any]:
        """The device-clock offset for this frame (module docstring)."""
        if frame.type in (5, 16):
            lag = (received - naive.replace(tzinfo=UTC)).total_seconds()
            self._min_lag = lag if self._min_lag is None else min(self._min_lag, lag)
        if self._min_lag is not None:
            return {"clock_offset_s": math.floor(self._min_lag), "clock": "learned"}
        as_utc = naive.astimezone(UTC).replace(tzinfo=None)  # naive = host local time
        return {"clock_offset_s": round((as_utc - naive).total_seconds()), "clock": "host-timezone"}

    def _learn_serial(self, frame: AlphaFrame) -> None:
        if frame.type == 12:
            serial = next((row.get("SN", "") for row in _csv_rows(frame.body)), "")
        else:
            body = _json_body(frame.body) if frame.body else None
            serial = (body.get("SN") or body.get("UserName") or "") if body else ""
        if isinstance(serial, str) and serial and serial != self.origin.device:
            self.origin = dataclasses.replace(self.origin, device=serial)

    def _raw(self, direction: str, kind: str, payload: bytes, received: datetime, meta: dict[str, Any]) -> RawPayload:
        return RawPayload(dataclasses.replace(self.origin, protocol=PROTOCOL, direction=direction),
                          kind, payload, received, meta)


class LocalAnswerer:
    """Answers the device as the cloud would (policies `local` and `auto`): every device request
    (B1 = 1) gets `01 02 <B2> … {"Status":"Success"}`, like the fake AlphaESS server did, so the
    battery keeps streaming. Responses from the device (its 1-2-8 command acks) and garbage get
    no answer. The cloud's unprompted traffic (Resume, SetConfig) is not imitated: nothing needs
    back-filling when pvtap stores everything itself."""

    def __init__(self) -> None:
        self._framer = Framer()
        self.answered = 0

    def feed(self, data: bytes) -> bytes:
        answers = [ack_frame(item.type) for item in self._framer.feed(data)
                   if isinstance(item, AlphaFrame) and item.b1 == REQUEST]
        self.answered += len(answers)
        return b"".join(answers)

    def tick(self, now: float) -> bytes:
        return b""
