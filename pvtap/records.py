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
from datetime import UTC, datetime

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
        if not self.measurement:
            raise ValueError("a record needs a measurement")
        if self.time.tzinfo is None or self.time.utcoffset() != UTC.utcoffset(None):
            raise ValueError(f"record time must be timezone-aware UTC, got {self.time!r}")
        if not self.fields:
            raise ValueError(f"record {self.measurement!r} has no fields")
        for key, value in self.tags.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise ValueError(f"tag {key!r}={value!r} must be a non-empty str key and a str value")
        for name, field_value in self.fields.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"field name {name!r} must be a non-empty str")
            if not isinstance(field_value, (int, float, str, bool)):
                raise ValueError(f"field {name!r} has unsupported type {type(field_value).__name__}")
            if isinstance(field_value, float) and not math.isfinite(field_value):
                raise ValueError(f"field {name!r} is {field_value!r}; only finite floats can be stored")

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
