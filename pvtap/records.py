"""The record model every decoder produces and every store and forwarder consumes.

A `Record` is one time-series point: measurement, tags, typed fields and a UTC timestamp taken
from the device or report whenever it carries one. A `RawPayload` is the (redacted) bytes a
record came from, kept so today's decoders can decode them again later. `Origin` says where
both came from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

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


@dataclass(frozen=True, slots=True)
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

    def __post_init__(self) -> None:
        """The one check every record passes when it is made (so none that InfluxDB would refuse
        reaches the store): one pass, exact types first (a decoder's fields are int, float, str
        or bool already), the general checks only for what is not."""
        if not self.measurement:
            raise ValueError("a record needs a measurement")
        if self.time.tzinfo is not UTC and (self.time.tzinfo is None or self.time.utcoffset() != _ZERO):
            raise ValueError(f"record time must be timezone-aware UTC, got {self.time!r}")
        if not self.fields:
            raise ValueError(f"record {self.measurement!r} has no fields")
        for key, value in self.tags.items():
            if type(key) is not str or type(value) is not str or not key:
                _check_tag(key, value)
        for name, field_value in self.fields.items():
            kind = type(field_value)
            if type(name) is not str or not name:
                raise ValueError(f"field name {name!r} must be a non-empty str")
            if kind is float:
                if not math.isfinite(field_value):  # type: ignore[arg-type]
                    raise ValueError(f"field {name!r} is {field_value!r}; only finite floats can be stored")
            elif kind is not int and kind is not str and kind is not bool:
                _check_field(name, field_value)

    @classmethod
    def trusted(cls, measurement: str, time: datetime, tags: Mapping[str, str], fields: Mapping[str, FieldValue],
                origin: Origin) -> Record:
        """A record read back from the store, which checked it when it was made: not checked
        again (pay for the check once)."""
        record = object.__new__(cls)
        for name, value in (("measurement", measurement), ("time", time), ("tags", tags), ("fields", fields),
                            ("origin", origin)):
            object.__setattr__(record, name, value)
        return record

    @property
    def time_ns(self) -> int:
        return to_ns(self.time)


@dataclass(frozen=True, slots=True)
class RawPayload:
    """The bytes records are decoded from, already redacted, as the store keeps them.

    `kind` names what the bytes are within the protocol ("performance_report", "frame",
    "opaque", …); `meta` holds JSON-able context a decoder needs again on replay (HTTP path,
    content type, …).
    """

    origin: Origin
    kind: str
    payload: bytes
    received: datetime
    meta: Mapping[str, str | int | float | bool | None] = field(default_factory=dict)


_ZERO = timedelta(0)


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
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC).replace(microsecond=(ns % 1_000_000_000) // 1_000)


def utc_from_unix(seconds: int | float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def now_utc() -> datetime:
    return datetime.now(UTC)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
