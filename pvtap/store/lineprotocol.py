"""Records as InfluxDB line protocol, through influxdb-client's own `Point` serialiser.

Using the client's serialiser means `pvtap export` and the forwarder escape exactly as
influxdb-client does (measurement, tag and field escaping, `i` suffix for integers, quoted
strings) and nanosecond timestamps are written without float rounding.
"""

from __future__ import annotations

from influxdb_client import Point, WritePrecision

from pvtap.records import Record


def to_line(record: Record) -> str:
    """One line of line protocol, nanosecond precision."""
    return Point.from_dict(
        {"measurement": record.measurement, "tags": dict(record.tags), "fields": dict(record.fields),
         "time": record.time_ns},
        write_precision=WritePrecision.NS,
    ).to_line_protocol()
