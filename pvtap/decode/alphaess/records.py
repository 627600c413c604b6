"""AlphaESS bodies and the records they hold (timestamps and field types: the package docstring).

A JSON body is read as a `Body`: its members in order, a repeated key kept as often as it comes
(a real 1-1-4 dump repeats `Generator`). In a record, the first occurrence keeps the key's name
and later ones are numbered from 2 (`Generator`, `Generator_2`, …; a number already taken by a
real key is skipped), so no value is lost and each field name keeps one meaning per frame type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from pvtap.privacy import REDACTED
from pvtap.records import FieldValue, Origin, RawPayload, Record

from ..withhold import is_withheld
from .framing import REQUEST, RESPONSE, AlphaFrame, parse_frame

# -- bodies -----------------------------------------------------------------------------------

class Body(list[tuple[str, Any]]):
    """A JSON object's members in order, repeated keys kept (nested objects are Bodies too)."""

    def get(self, key: str, default: Any = None) -> Any:
        """The first value of `key`."""
        for name, value in self:
            if name == key:
                return value
        return default


_DECODER = json.JSONDecoder(object_pairs_hook=Body)


def json_body(body: bytes) -> Body | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        value = _DECODER.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, Body) else None


def encode_json(obj: dict[str, Any] | Body) -> bytes:
    """Compact, like the device writes it (a Body with its repeated keys)."""
    return dump(obj).encode("utf-8")


def dump(value: Any) -> str:
    if isinstance(value, Body):
        return "{" + ",".join(f"{dump(k)}:{dump(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return dump(Body(value.items()))
    if isinstance(value, list):
        return "[" + ",".join(map(dump, value)) + "]"
    return json.dumps(value, ensure_ascii=False)


def numbered(items: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Members with a repeated key renamed `key_2`, `key_3`, … (module docstring)."""
    seen: set[str] = set()
    repeated: list[tuple[str, Any]] = []
    for name, value in items:
        if name in seen:
            repeated.append((name, value))
        else:
            seen.add(name)
            yield name, value
    for name, value in repeated:
        n = 2
        while f"{name}_{n}" in seen:
            n += 1
        seen.add(f"{name}_{n}")
        yield f"{name}_{n}", value


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


def first_device_time(frame: AlphaFrame) -> datetime | None:
    """The first device clock reading a frame carries (realtime/extended `Time`, first CSV row,
    first event-log entry)."""
    if frame.b1 != REQUEST:
        return None
    if frame.type in (5, 16):
        body = json_body(frame.body)
        return device_time(body.get("Time", "")) if body else None
    if frame.type == 12:
        for row in csv_rows(frame.body):
            t = device_time(f"{row.get('Date', '')} {row.get('Time', '')}")
            if t is not None:
                return t
        return None
    if frame.type == 9:
        body = json_body(frame.body)
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


def csv_rows(body: bytes) -> Iterable[dict[str, str]]:
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
        text = _text(value)
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
    body = json_body(frame.body) if frame.type != 12 else None
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
        fields = typed_fields(numbered(body))
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
        fields = {_snake(k): _text(v) for k, v in numbered(body) if v != REDACTED}
        kind = "request" if frame.b1 == REQUEST else "ack"
        return [Record("alphaess_command", received, {**tags, "kind": kind}, fields, origin)]

    if (frame.type, frame.b1) in ((4, REQUEST), (3, RESPONSE)) and body is not None:
        fields = {k: _text(v) for k, v in numbered(body) if k not in ("SN", "Status") and v != REDACTED}
        if not fields:
            return []
        source = "device" if frame.b1 == REQUEST else "cloud"
        return [Record("alphaess_device", received, {**tags, "source": source}, fields, origin)]

    if frame.type == 2 and frame.b1 == REQUEST and body is not None:
        company = body.get("CompanyName", "")
        return [Record("alphaess_login", received, tags, {"CompanyName": _text(company)}, origin)]

    return []


def _text(value: Any) -> str:
    return value if isinstance(value, str) else dump(value)


def _snake(name: str) -> str:
    """`CmdIndex` → `cmd_index`, `Parameter1` → `parameter1`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _backfill_records(body: bytes, origin: Origin, received: datetime, offset: int | None) -> list[Record]:
    records = []
    for row in csv_rows(body):
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


def _event_records(body: Body, tags: dict[str, str], origin: Origin, received: datetime,
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



def decode_raw(raw: RawPayload) -> list[Record]:
    """Records of a stored (redacted) payload. Garbage, partial, opaque and withheld payloads
    hold none."""
    if raw.kind in ("garbage", "partial", "opaque") or is_withheld(raw):
        return []
    if raw.kind != "frame":
        raise ValueError(f"unknown AlphaESS payload kind {raw.kind!r}")
    offset = raw.meta.get("clock_offset_s")
    return records_from_frame(parse_frame(raw.payload), raw.origin, raw.received,
                              int(offset) if offset is not None else None)

