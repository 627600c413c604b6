"""Records as table rows and back: the one place that knows the column layout and the JSON
encoding of tags and fields (the records table, the dead letters and the forwarder share it).

Tags are stored with sorted keys (a tag set compares equal whatever order a decoder built it
in); fields keep the decoder's order. Encoding is `orjson` (compiled: about a tenth of the
standard library's time, which made JSON the largest cost of a record's append); an integer
beyond 64 bits, which a Record allows and orjson refuses, is encoded by the standard library
instead. Decoding is orjson's too; the standard library reads again fields where orjson gave a
float of 2**63 or more (which may have been such an integer: orjson reads those as floats) and
those orjson refuses (NaN, infinities). Both round-trip every other value a Record allows exactly
(-0.0 and every finite float), and keep the fields' order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import orjson

from pvtap.records import Origin, Record, from_ns

#: the columns a record is made of, in this order, in `records` and `deadletters`
RECORD_COLUMNS = "time_ns, measurement, tags, fields, protocol, device, connection, direction"

_dumps = orjson.dumps
_SORTED = orjson.OPT_SORT_KEYS
_fields_stdlib = json.JSONEncoder().encode
_fields_stdlib_loads = json.loads
_loads = orjson.loads
_BEYOND_INT64 = 2.0**63


def tags_json(tags: Mapping[str, str]) -> str:
    return _dumps(tags if type(tags) is dict else dict(tags), option=_SORTED).decode()


def fields_json(fields: Mapping) -> str:
    try:
        return _dumps(fields if type(fields) is dict else dict(fields)).decode()
    except TypeError:  # an integer beyond 64 bits
        return _fields_stdlib(dict(fields))


def tags_from_json(text: str) -> dict[str, str]:
    return _loads(text)  # strings only: orjson reads them exactly


def fields_from_json(text: str) -> dict:
    try:
        fields = _loads(text)
    except orjson.JSONDecodeError:  # NaN or an infinity, written by the standard library
        return _fields_stdlib_loads(text)
    for value in fields.values():
        if type(value) is float and abs(value) >= _BEYOND_INT64:
            return _fields_stdlib_loads(text)
    return fields


def record_row(r: Record) -> tuple:
    """The RECORD_COLUMNS values of a record."""
    o = r.origin
    return (r.time_ns, r.measurement, tags_json(r.tags), fields_json(r.fields), o.protocol, o.device, o.connection,
            o.direction)


def record_from_row(row: Sequence) -> Record:
    """A record from its RECORD_COLUMNS values."""
    time_ns, measurement, tags, fields, protocol, device, connection, direction = row
    return Record(measurement=measurement, time=from_ns(time_ns), tags=tags_from_json(tags),
                  fields=fields_from_json(fields),
                  origin=Origin(protocol=protocol, device=device, connection=connection, direction=direction))
