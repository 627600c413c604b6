"""The records AlphaESS frames hold (timestamps and field types: the package docstring); the
bodies are read in `bodies.py`."""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from pvtap.privacy import REDACTED
from pvtap.records import EPOCH, FieldValue, Origin, RawPayload, Record

from ..withhold import is_withheld
from .bodies import FrameReading, JsonObject, dump, numbered, read_frame
from .framing import REQUEST, RESPONSE

_DEVICE_TIME = re.compile(r"(\d{4})/(\d{1,2})/(\d{1,2}) (\d{1,2}):(\d{2}):(\d{2})")
_EVENT_ENTRY = re.compile(r"(\d{2})/(\d{2})/(\d{2}) (\d{2}):(\d{2}):(\d{2}) (\d+)")


def device_time(text: object) -> datetime | None:
    """`YYYY/MM/DD HH:MM:SS` (device local clock) as a naive datetime; None if it is not one.
    The device's own zero-padded form is read in C (`fromisoformat`, ASCII digits); other
    digits and spellings by slicing and the pattern."""
    if not isinstance(text, str):
        return None
    if len(text) == 19 and text[4] == text[7] == "/" and text[10] == " " and text[13] == text[16] == ":":
        try:
            return datetime.fromisoformat(text.replace("/", "-"))
        except ValueError:
            pass
        if not (text[:4] + text[5:7] + text[8:10] + text[11:13] + text[14:16] + text[17:]).isdigit():
            return None
        try:
            return datetime(int(text[:4]), int(text[5:7]), int(text[8:10]), int(text[11:13]), int(text[14:16]),
                            int(text[17:]))
        except ValueError:
            return None
    m = _DEVICE_TIME.fullmatch(text.strip())
    if not m:
        return None
    try:
        year, month, day, hour, minute, second = map(int, m.groups())
        return datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None


_CLOCKS: dict[str, tuple[datetime, datetime, str] | None] = {}
_CLOCKS_MAX = 1024


def device_clock(text: str) -> tuple[datetime, datetime, str] | None:
    """`device_time(text)`, that time read as UTC (before the connection's clock offset) and its
    ISO text (the `device_time` field), read once per text: the Tap reads a realtime frame's
    `Time` for the clock offset and its decode reads it again (a bounded cache of a pure
    function of the text)."""
    try:
        return _CLOCKS[text]
    except KeyError:
        pass
    naive = device_time(text)
    clock = None if naive is None else (naive, as_utc(naive), _iso(naive))
    if len(_CLOCKS) >= _CLOCKS_MAX:
        _CLOCKS.clear()
    _CLOCKS[text] = clock
    return clock


def first_device_time(reading: FrameReading) -> datetime | None:
    """The first device clock reading a frame carries (realtime/extended `Time`, first CSV row,
    first event-log entry)."""
    frame = reading.frame
    if frame.b1 != REQUEST:
        return None
    if frame.type in (5, 16):
        body = reading.json
        return device_time(body.first.get("Time", "")) if body else None
    if frame.type == 12:
        for row in csv_rows(frame.body):
            t = device_time(f"{row.get('Date', '')} {row.get('Time', '')}")
            if t is not None:
                return t
        return None
    if frame.type == 9:
        body = reading.json
        content = body.first.get("MsgContent") if body else None
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



_SKIPPED_VALUES = ("", REDACTED)


def typed_fields(items: Iterable[tuple[str, Any]]) -> dict[str, FieldValue]:
    """Measurement fields with a fixed type per name (see the package docstring)."""
    fields: dict[str, FieldValue] = {}
    for name, value in items:
        if name in _NOT_FIELDS or value is None or value in _SKIPPED_VALUES:
            continue
        text = value if type(value) is str else _text(value)
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


#: Per key order seen (bounded): the field names and a getter for their values, when every
#: field of the body is a float field (a realtime frame), else None.
_FLOAT_PLANS: dict[tuple[str, ...], tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]] | None] = {}
_FLOAT_PLANS_MAX = 256


def _float_plan(keys: tuple[str, ...]) -> tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]] | None:
    names = tuple(k for k in keys if k not in _NOT_FIELDS)
    if len(names) < 2 or "" in names or any(n in INT_FIELDS or n in TEXT_FIELDS for n in names):  # (one name: no tuple)
        return None
    return names, operator.itemgetter(*names)


def float_fields(body: Mapping[str, Any]) -> dict[str, FieldValue] | None:
    """`typed_fields(body.items())` for the common body whose every field is a float field
    given as decimal text (realtime and extended frames), converted in C; None when any field
    needs typed_fields' care (an int or text field, a value that is not plain decimal text, an
    empty name). What it returns is typed by construction: finite floats under non-empty names."""
    keys = tuple(body)
    try:
        plan = _FLOAT_PLANS[keys]
    except KeyError:
        if len(_FLOAT_PLANS) >= _FLOAT_PLANS_MAX:
            _FLOAT_PLANS.clear()
        plan = _FLOAT_PLANS[keys] = _float_plan(keys)
    if plan is None:
        return None
    names, values_of = plan
    values = values_of(body)
    try:  # "", REDACTED and None fail float(); a non-str fails join(); the sum is not finite if any
        numbers = list(map(float, values))  # is not (or if it overflows: then typed_fields decides)
        if "_" in "".join(values) or not math.isfinite(sum(numbers)):
            return None
    except (ValueError, TypeError, OverflowError):
        return None
    return dict(zip(names, numbers))


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
    """A finite number from a number or its decimal text (`12`, `-1.5`, `.5`, `1e3`; float()
    also reads underscores, refused here, and nan/inf, which are not finite)."""
    kind = type(value)
    if kind is str:
        if "_" in value:
            return None
        try:
            number = float(value)
        except ValueError:
            return None
    elif kind is int or kind is float or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) else None


# -- records ----------------------------------------------------------------------------------

def _stamp(naive: datetime | None, offset_s: int | None, received: datetime) -> datetime:
    if naive is None:
        return received
    return as_utc(naive, offset_s or 0)


_NAIVE_EPOCH = datetime(1970, 1, 1)
_OFFSETS: dict[int, timedelta] = {}  # a connection's clock offset recurs in every frame


def as_utc(naive: datetime, offset_s: int = 0) -> datetime:
    """`naive.replace(tzinfo=UTC) + timedelta(seconds=offset_s)`, without the keyword calls that
    cost more here than the arithmetic."""
    return EPOCH + ((naive - _NAIVE_EPOCH) + _offset(offset_s))


def _offset(offset_s: int) -> timedelta:
    offset = _OFFSETS.get(offset_s)
    if offset is None:
        if len(_OFFSETS) >= 1024:
            _OFFSETS.clear()
        offset = _OFFSETS[offset_s] = timedelta(seconds=offset_s)
    return offset


def _iso(naive: datetime) -> str:
    return naive.isoformat()  # device readings are whole seconds: no fraction shown


def records_from_frame(reading: FrameReading, origin: Origin, received: datetime,
                       clock_offset_s: int | None = None) -> list[Record]:
    """The records one frame holds. `origin.direction` is the socket's; `clock_offset_s`
    converts the device clock to UTC (the package docstring); redacted values are left out."""
    frame = reading.frame
    body = reading.json if frame.type != 12 else None
    serial = origin.device
    if body is not None:
        found = body.first.get("SN") or body.first.get("UserName")
        if isinstance(found, str) and found:
            serial = found
            if found != origin.device:
                origin = Origin(origin.protocol, found, origin.connection, origin.direction)
    tags = {"serial": serial} if serial else {}

    if frame.type in (5, 16) and frame.b1 == REQUEST and body is not None:
        text = body.first.get("Time", "")
        clock = device_clock(text) if type(text) is str else None
        fast = float_fields(body.first) if body.plain else None
        fields = fast if fast is not None else typed_fields(_members(body))
        if clock is None:
            time = received
        else:
            _, time, fields["device_time"] = clock
            if clock_offset_s is None:
                clock_offset_s = math.floor((received - time).total_seconds())
            if clock_offset_s:
                time += _offset(clock_offset_s)
        if not fields:
            return []
        measurement = "alphaess_realtime" if frame.type == 16 else "alphaess_extended"
        make = Record if fast is None else Record.typed  # float_fields' are typed by construction
        return [make(measurement, time, tags, fields, origin)]

    if frame.type == 12 and frame.b1 == REQUEST:
        return _backfill_records(frame.body, origin, received, clock_offset_s)

    if frame.type == 9 and frame.b1 == REQUEST and body is not None:
        return _event_records(body.first, tags, origin, received, clock_offset_s)

    if frame.type == 8 and body is not None and body.first.get("Command"):
        fields = {_snake(k): _text(v) for k, v in _members(body) if v != REDACTED}
        kind = "request" if frame.b1 == REQUEST else "ack"
        return [Record("alphaess_command", received, {**tags, "kind": kind}, fields, origin)]

    if (frame.type, frame.b1) in ((4, REQUEST), (3, RESPONSE)) and body is not None:
        fields = {k: _text(v) for k, v in _members(body) if k not in ("SN", "Status") and v != REDACTED}
        if not fields:
            return []
        source = "device" if frame.b1 == REQUEST else "cloud"
        return [Record("alphaess_device", received, {**tags, "source": source}, fields, origin)]

    if frame.type == 2 and frame.b1 == REQUEST and body is not None:
        company = body.first.get("CompanyName", "")
        return [Record("alphaess_login", received, tags, {"CompanyName": _text(company)}, origin)]

    return []


def _members(body: JsonObject) -> Collection[tuple[str, Any]] | Iterator[tuple[str, Any]]:
    """The body's members, a repeated key numbered (`numbered`)."""
    return body.members if body.plain else numbered(body.members)


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


def _event_records(body: Mapping[str, Any], tags: dict[str, str], origin: Origin, received: datetime,
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
    """Records of a stored (redacted) payload: from the live path's reading when it carries one,
    else from the bytes. Garbage, partial, opaque and withheld payloads hold none."""
    if raw.kind in ("garbage", "partial", "opaque") or is_withheld(raw):
        return []
    if raw.kind != "frame":
        raise ValueError(f"unknown AlphaESS payload kind {raw.kind!r}")
    offset = raw.meta.get("clock_offset_s")
    return records_from_frame(raw.parsed_as(FrameReading) or read_frame(raw.payload), raw.origin, raw.received,
                              int(offset) if offset is not None else None)
