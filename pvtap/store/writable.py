"""What InfluxDB can be given exactly: names that line protocol reads back as written, integers
that fit 64 bits, and field types that never change (InfluxDB rejects a field whose type changes,
so the first type written for a measurement's field is kept and later values converted where that
is exact, refused otherwise). The forwarder's lines are made here (`LineMaker`); a refused record
goes to the dead letters with the reason instead of failing its whole batch at the server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from pvtap.records import FieldValue, Record
from pvtap.store.lineprotocol import format_line


class Unwritable(ValueError):
    """A record that line protocol cannot carry exactly, or whose field type would conflict."""


_INT64 = (-(2**63), 2**63 - 1)
# In measurement names, tag keys, tag values and field keys InfluxDB reads a backslash literally,
# except before a comma, space, equals sign or (in some places) double quote, which it takes as an
# escape; a backslash at the end escapes the delimiter that follows. influxdb-client writes such
# names unchanged, and InfluxDB then reads back another name or rejects the line (checked against
# influxd: tests/test_forwarder_lineprotocol.py), so they are refused instead.
_AMBIGUOUS_BACKSLASH = re.compile(r'\\(?=[,= "]|$)')
_CONTROL = re.compile(r"[\n\r\t]")


def field_kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    return "string"


def settle_fields(measurement: str, fields: Mapping[str, FieldValue], types: dict[tuple[str, str], str],
                  new: dict[tuple[str, str], str]) -> Mapping[str, FieldValue]:
    """Apply the field type rule: the first type written for a (measurement, field) is kept.

    An integer for a float field is written as a float; a whole float for an integer field as an
    integer. Anything else (a fraction for an integer field, a string for a number, ...) would be
    rejected by InfluxDB as a field type conflict, so it is refused here with a clear message.
    First-seen types are added to `new`."""
    out = None
    for name, value in fields.items():
        kind = field_kind(value)
        if kind == "integer" and isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
            raise Unwritable(f"field {name!r} = {value} does not fit InfluxDB's 64-bit integers")
        key = (measurement, name)
        known = types.get(key) or new.get(key)
        if known is None:
            new[key] = kind
        elif known != kind:
            written: FieldValue
            if known == "float" and kind == "integer":
                written = float(value)
            elif (known == "integer" and isinstance(value, float) and value.is_integer()
                  and _INT64[0] <= value <= _INT64[1]):
                written = int(value)
            else:
                raise Unwritable(
                    f"field {name!r} of {measurement!r} was first written as {known}; this value "
                    f"{value!r} is {kind}, and InfluxDB rejects a field that changes type")
            out = dict(fields) if out is None else out
            out[name] = written
    return fields if out is None else out


def settle_types(record: Record, types: dict[tuple[str, str], str], new: dict[tuple[str, str], str]) -> Record:
    """`settle_fields` for a Record."""
    fields = settle_fields(record.measurement, record.fields, types, new)
    return record if fields is record.fields else replace(record, fields=fields)


def check_names(measurement: str, tags: Mapping[str, str], fields: Mapping[str, FieldValue]) -> None:
    """Refuse names that line protocol would not read back exactly (see _AMBIGUOUS_BACKSLASH)."""
    if measurement.startswith("#"):
        raise Unwritable(f"measurement {measurement!r} starts with '#', which makes the line a comment")
    names = [("measurement", measurement)]
    names += [("tag key", k) for k in tags] + [(f"tag {k!r} value", v) for k, v in tags.items()]
    names += [("field key", k) for k in fields]
    for what, name in names:
        if _CONTROL.search(name):
            raise Unwritable(f"{what} {name!r} contains a tab or line break, which line protocol cannot carry")
        if _AMBIGUOUS_BACKSLASH.search(name):
            raise Unwritable(f"{what} {name!r} has a backslash before a comma, space, equals sign or double "
                             "quote, or at its end, which line protocol cannot carry exactly")


def check_writable(record: Record) -> None:
    check_names(record.measurement, record.tags, record.fields)


class LineMaker:
    """Builds the forwarder's lines: names checked (once per distinct name), field types
    settled, then formatted. `types` is the store's memory; first-seen types collect in `new`."""

    def __init__(self, types: dict[tuple[str, str], str]) -> None:
        self.types = types
        self.new: dict[tuple[str, str], str] = {}
        self._checked: set[tuple] = set()

    def line(self, measurement: str, tags: Mapping[str, str], fields: Mapping[str, FieldValue], time_ns: int) -> str:
        shape = (measurement, *tags.items(), *fields.keys())
        if shape not in self._checked:
            check_names(measurement, tags, fields)
            if len(self._checked) > 10_000:
                self._checked.clear()
            self._checked.add(shape)
        return format_line(measurement, tags, settle_fields(measurement, fields, self.types, self.new), time_ns)


def influx_line(record: Record, types: dict[tuple[str, str], str], new: dict[tuple[str, str], str]) -> str:
    """The exact line the forwarder writes for a record (nanosecond timestamp)."""
    check_writable(record)
    return format_line(record.measurement, record.tags, settle_fields(record.measurement, record.fields, types, new),
                       record.time_ns)
