"""Records as table rows and back: the one place that knows the column layout and the JSON
encoding of tags and fields (the records table, the dead letters and the forwarder share it).

Tags are stored with sorted keys (a tag set compares equal whatever order a decoder built it
in); fields keep the decoder's order. The JSON is the standard library's: it round-trips every
value a Record allows exactly (integers beyond 64 bits, -0.0, every float) and at about 3 µs
a record it is not what limits the store's append rate (docs/design.md, "Store throughput").
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pvtap.records import Origin, Record, from_ns

#: the columns a record is made of, in this order, in `records` and `deadletters`
RECORD_COLUMNS = "time_ns, measurement, tags, fields, protocol, device, connection, direction"

_tags_json = json.JSONEncoder(sort_keys=True).encode
_fields_json = json.JSONEncoder().encode
_loads = json.loads


def record_row(r: Record) -> tuple:
    """The RECORD_COLUMNS values of a record."""
    o = r.origin
    return (r.time_ns, r.measurement, _tags_json(dict(r.tags)), _fields_json(dict(r.fields)),
            o.protocol, o.device, o.connection, o.direction)


def record_from_row(row: Sequence) -> Record:
    """A record from its RECORD_COLUMNS values."""
    time_ns, measurement, tags, fields, protocol, device, connection, direction = row
    return Record(measurement=measurement, time=from_ns(time_ns), tags=_loads(tags), fields=_loads(fields),
                  origin=Origin(protocol=protocol, device=device, connection=connection, direction=direction))
