"""The record model every decoder produces and every store and forwarder consumes.

A `Record` is one time-series point: measurement, tags, typed fields and a UTC timestamp taken
from the device or report whenever it carries one. A `RawPayload` is the (redacted) bytes a
record came from, kept so today's decoders can decode them again later. `Origin` says where
both came from.

On the live path (Tap → redact → archive → decode) a payload also carries its decoder's reading
of the bytes (`RawPayload.parsed`: the frame the Tap split off, the report redaction parsed), so
each frame is parsed, its body read and its CRC checked once. The reading is transient — never
stored, sent or compared — and a decoder uses it only for exactly the bytes it was read from
(`RawPayload.parsed_as`); a stored payload (replay, a restart) is read from its bytes alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

FieldValue = int | float | str | bool

#: Direction as seen from the socket: the device sent it (towards the cloud) or received it.
UP = "up"
DOWN = "down"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record or payload came from."""

    protocol: str  # "enphase", "alphaess", "foxess", …
    device: str = ""  # serial (or its pseudonym) once known, else the peer address
    connection: str = ""  # relay connection id or mitmproxy flow id
    direction: str = ""  # UP (device → cloud), DOWN (cloud → device) or "" when not applicable


@dataclass(frozen=True, slots=True, init=False)
class Record:
    """One decoded point.

    `time` is the device's or report's own time converted to UTC, not the proxy's clock, so a
    back-filled or replayed record lands where it belongs.
    """

    measurement: str
    time: datetime
    tags: Mapping[str, str]
    fields: Mapping[str, FieldValue]
    origin: Origin

    def __init__(self, measurement: str, time: datetime, tags: Mapping[str, str], fields: Mapping[str, FieldValue],
                 origin: Origin) -> None:
        """The one check every record passes when it is made (so none that InfluxDB would refuse
        reaches the store): one pass, exact types first (a decoder's fields are int, float, str
        or bool already), the general checks only for what is not. The slots are set directly
        (frozen: `object.__setattr__` per field, as a frozen dataclass's own `__init__` does,
        costs twice as much)."""
        _check_head(measurement, time, tags, fields)
        for name, field_value in fields.items():
            kind = type(field_value)
            if type(name) is not str or not name:
                raise ValueError(f"field name {name!r} must be a non-empty str")
            if kind is float:
                if not math.isfinite(field_value):  # type: ignore[arg-type]
                    raise ValueError(f"field {name!r} is {field_value!r}; only finite floats can be stored")
            elif kind is not int and kind is not str and kind is not bool:
                _check_field(name, field_value)
        _set_measurement(self, measurement)
        _set_time(self, time)
        _set_tags(self, tags)
        _set_fields(self, fields)
        _set_origin(self, origin)

    @classmethod
    def typed(cls, measurement: str, time: datetime, tags: Mapping[str, str], fields: Mapping[str, FieldValue],
              origin: Origin) -> Record:
        """A record whose fields a decoder typed by construction — literal or non-empty names,
        values int, str, bool or float from integer arithmetic (a telemetry block's words) or
        checked finite — so the per-field check is skipped; the rest is checked as always. A
        test holds every decoder that makes these to the full check, on random input."""
        _check_head(measurement, time, tags, fields)
        return cls.trusted(measurement, time, tags, fields, origin)

    @classmethod
    def trusted(cls, measurement: str, time: datetime, tags: Mapping[str, str], fields: Mapping[str, FieldValue],
                origin: Origin) -> Record:
        """A record read back from the store, which checked it when it was made, or one a decoder
        made entirely by construction (literal measurement, UTC time, str tags, non-empty typed
        fields; tests/test_live_path.py holds it to the full check): not checked again."""
        record = object.__new__(cls)
        _set_measurement(record, measurement)
        _set_time(record, time)
        _set_tags(record, tags)
        _set_fields(record, fields)
        _set_origin(record, origin)
        return record

    @property
    def time_ns(self) -> int:
        return to_ns(self.time)


def _slot_setters(cls: type, names: str) -> tuple[Callable[[Any, Any], None], ...]:
    """The setters of a frozen slots class's fields, for its own `__init__`."""
    return tuple(vars(cls)[name].__set__ for name in names.split())


_set_measurement, _set_time, _set_tags, _set_fields, _set_origin = _slot_setters(
    Record, "measurement time tags fields origin")


class Parsed(Protocol):
    """A decoder's reading of some bytes (a frame, a parsed report): a pure function of `source`,
    the exact bytes it was read from."""

    @property
    def source(self) -> bytes: ...


ParsedT = TypeVar("ParsedT", bound=Parsed)


@dataclass(frozen=True, slots=True, init=False)
class RawPayload:
    """The bytes records are decoded from, already redacted, as the store keeps them.

    `kind` names what the bytes are within the protocol ("performance_report", "frame",
    "opaque", …); `meta` holds JSON-able context a decoder needs again on replay (HTTP path,
    content type, …). `parsed`: the live path's reading of `payload` (module docstring).
    """

    origin: Origin
    kind: str
    payload: bytes
    received: datetime
    meta: Mapping[str, str | int | float | bool | None] = field(default_factory=dict)
    parsed: Parsed | None = field(default=None, compare=False, repr=False)

    def __init__(self, origin: Origin, kind: str, payload: bytes, received: datetime,
                 meta: Mapping[str, str | int | float | bool | None] | None = None,
                 parsed: Parsed | None = None) -> None:
        """Slots set directly, as Record's: every copy the relay frames makes one or two."""
        _set_raw_origin(self, origin)
        _set_kind(self, kind)
        _set_payload(self, payload)
        _set_received(self, received)
        _set_meta(self, {} if meta is None else meta)
        _set_parsed(self, parsed)

    def parsed_as(self, kind: type[ParsedT]) -> ParsedT | None:
        """`parsed` when it is a `kind` read from exactly these bytes (equal bytes will do: a
        reading depends on nothing else), else None: the caller reads the bytes."""
        parsed = self.parsed
        if type(parsed) is kind and parsed.source == self.payload:
            return parsed
        return None


_set_raw_origin, _set_kind, _set_payload, _set_received, _set_meta, _set_parsed = _slot_setters(
    RawPayload, "origin kind payload received meta parsed")


_ZERO = timedelta(0)


def _check_head(measurement: str, time: datetime, tags: Mapping[str, str], fields: Mapping[str, FieldValue]) -> None:
    """Record's checks but the per-field one."""
    if not measurement:
        raise ValueError("a record needs a measurement")
    if time.tzinfo is not UTC and (time.tzinfo is None or time.utcoffset() != _ZERO):
        raise ValueError(f"record time must be timezone-aware UTC, got {time!r}")
    if not fields:
        raise ValueError(f"record {measurement!r} has no fields")
    for key, value in tags.items():
        if type(key) is not str or type(value) is not str or not key:
            _check_tag(key, value)


def _check_tag(key: object, value: object) -> None:
    if not isinstance(key, str) or not isinstance(value, str) or not key:
        raise ValueError(f"tag {key!r}={value!r} must be a non-empty str key and a str value")


def _check_field(name: str, value: object) -> None:
    """A field whose type is not exactly int, float, str or bool: a subclass may do."""
    if not isinstance(value, (int, float, str, bool)):
        raise ValueError(f"field {name!r} has unsupported type {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"field {name!r} is {value!r}; only finite floats can be stored")


def to_ns(moment: datetime) -> int:
    """Nanoseconds since the epoch, exact (no float rounding)."""
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def from_ns(ns: int) -> datetime:
    """The UTC moment, to the microsecond (`datetime` holds no more). Exact integer arithmetic, and
    a third of the time `fromtimestamp(…, UTC)` takes: every payload read back to be decoded and
    every record exported passes here."""
    return EPOCH + timedelta(microseconds=ns // 1_000)


def utc_from_unix(seconds: int | float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def now_utc() -> datetime:
    return datetime.now(UTC)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
