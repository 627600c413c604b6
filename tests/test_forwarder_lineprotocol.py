"""The lines the forwarder writes, read back from a real InfluxDB (Debian's influxd 1.6, v1 /write).

Escaping of measurements, tag keys and values, field keys and string values (spaces, commas,
equals signs, quotes, backslashes, unicode), integer/float/boolean/string fields and exact
nanosecond timestamps. Names line protocol cannot carry exactly are refused before sending, and
the test shows why: written anyway, InfluxDB reads back something else or rejects the line.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from pvtap.records import FieldValue, Origin, Record
from pvtap.store.lineprotocol import format_line, to_line
from pvtap.store.writable import Unwritable, check_writable, field_kind, influx_line, settle_types
from tests.servers import Influxd

T = datetime(2026, 11, 1, 12, 0, 0, 654_321, tzinfo=UTC)  # 1793534400654321000 ns
ORIGIN = Origin("alphaess", "SN-TEST-0001")

ESCAPING = [
    Record("inverter power", T, {"site name": "roof east", "serial": "SN-TEST-0001"}, {"p ac w": 1234.5}, ORIGIN),
    Record("grid,meter", T, {"phase,id": "L1,L2", "k=v": "a=b"}, {"x,y=z": 7}, ORIGIN),
    Record("quotes", T, {"label": 'say "hi"', "q'": "it's"}, {"s": 'he said "hi"', "n": -3}, ORIGIN),
    Record("backslash\\mid", T, {"path": "C:\\data\\pv", "key\\x": "v"}, {"s": "a\\b \\\" c\\", "f\\g": 0.5}, ORIGIN),
    Record("unicode", T, {"room": "Wohnzimmer °C ☀", "名前": "太陽"}, {"temp_°c": 21.5, "note": "ünïcødé 😀"}, ORIGIN),
    Record("types", T, {"serial": "SN-TEST-0001"},
           {"int": 9_223_372_036_854_775_807, "neg": -9_223_372_036_854_775_808, "float_whole": 42.0,
            "float_tiny": 1.5e-300, "float_big": 6.02e23, "bool_t": True, "bool_f": False, "empty": "",
            "multi": "line one\nline two\ttab"}, ORIGIN),
    Record("ns", datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), {}, {"v": 1}, ORIGIN),
]

INFLUX_TYPES = {"integer": "integer", "float": "float", "boolean": "boolean", "string": "string"}


@pytest.fixture(scope="module")
def influxd(tmp_path_factory):
    with Influxd(tmp_path_factory.mktemp("influxd")) as server:
        yield server


def test_escaping_cases_read_back_exactly_from_influxdb(influxd):
    lines = [influx_line(r, {}, {}) for r in ESCAPING]
    status, body = influxd.write("\n".join(lines))
    assert status == 204, body
    assert influxd.measurements() == sorted(r.measurement for r in ESCAPING)
    for record in ESCAPING:
        (point,) = influxd.points(record.measurement)
        assert point.pop("time") == record.time_ns
        assert point == {**record.tags, **record.fields}, record.measurement
        types = influxd.field_types(record.measurement)
        assert types == {k: INFLUX_TYPES[field_kind(v)] for k, v in record.fields.items()}
    # tags are tags (part of the series key), not fields
    keys = influxd.series_keys()
    assert "grid\\,meter,k\\=v=a\\=b,phase\\,id=L1\\,L2" in keys
    assert "inverter\\ power,serial=SN-TEST-0001,site\\ name=roof\\ east" in keys


def test_a_record_written_twice_is_one_point(influxd):
    record = Record("dedup", T, {"serial": "SN-TEST-0001"}, {"p_w": 10.25, "e_wh": 5}, ORIGIN)
    line = influx_line(record, {}, {})
    assert influx_line(record, {}, {}) == line  # same record, same line, to the nanosecond
    for _ in range(2):
        assert influxd.write(line)[0] == 204
    assert influxd.points("dedup") == [{"time": record.time_ns, "p_w": 10.25, "e_wh": 5, "serial": "SN-TEST-0001"}]


def test_integer_and_float_fields_stay_stable_in_influxdb(influxd):
    records = [
        Record("stable", T.replace(second=1), {}, {"soc": 40, "p_w": 100.5}, ORIGIN),
        Record("stable", T.replace(second=2), {}, {"soc": 41.0, "p_w": 101}, ORIGIN),  # flipped types in the decoder
    ]
    types: dict[tuple[str, str], str] = {}
    new: dict[tuple[str, str], str] = {}
    lines = [influx_line(r, types, new) for r in records]
    assert influxd.write("\n".join(lines))[0] == 204
    assert influxd.field_types("stable") == {"soc": "integer", "p_w": "float"}
    assert [(p["soc"], p["p_w"]) for p in influxd.points("stable")] == [(40, 100.5), (41, 101.0)]
    # without the rule, the second line is a field type conflict
    status, body = influxd.write(to_line(Record("stable", T.replace(second=3), {}, {"soc": 41.5}, ORIGIN)))
    assert status == 400 and "field type conflict" in body


UNWRITABLE = [
    (Record("m", T, {"site": "trailing\\"}, {"v": 1}, ORIGIN), "backslash"),
    (Record("m", T, {"site\\": "x"}, {"v": 1}, ORIGIN), "backslash"),
    (Record("m\\=x", T, {}, {"v": 1}, ORIGIN), "backslash"),
    (Record("m\\", T, {"t": "x"}, {"v": 1}, ORIGIN), "backslash"),
    (Record("m", T, {}, {"f\\ x": 1}, ORIGIN), "backslash"),
    (Record("m", T, {}, {'f\\"x': 1}, ORIGIN), "backslash"),
    (Record("m", T, {"site": "two\nlines"}, {"v": 1}, ORIGIN), "line break"),
    (Record("m", T, {}, {"tab\tkey": 1}, ORIGIN), "line break"),
    (Record("#m", T, {}, {"v": 1}, ORIGIN), "comment"),
]


@pytest.mark.filterwarnings("ignore::SyntaxWarning")  # influxdb-client warns about "#m" itself
@pytest.mark.parametrize("record, why", UNWRITABLE)
def test_names_that_do_not_survive_line_protocol_are_refused(influxd, record, why):
    with pytest.raises(Unwritable, match=why):
        check_writable(record)
    # the reason: written the way influxdb-client would, InfluxDB rejects it or reads back another point
    db = f"probe{UNWRITABLE.index((record, why))}"
    influxd.query(f'CREATE DATABASE "{db}"', method="POST")
    status, _ = influxd.write(to_line(record), db=db)
    assert status in (204, 400)
    got = [(m, {k: v for k, v in p.items() if k != "time"}) for m in influxd.measurements(db)
           for p in influxd.points(m, db)]
    assert got != [(record.measurement, {**record.tags, **record.fields})]


BACKSLASHES = ["a\\b", "C:\\data\\pv", "a\\\\b", "x\\n"]


@pytest.mark.parametrize("name", BACKSLASHES)
def test_backslashes_elsewhere_are_written_and_read_back_exactly(influxd, name):
    record = Record(name, T, {name: name}, {f"f{name}": 1, "s": name}, ORIGIN)  # a tag and a field never share a key
    check_writable(record)  # not refused
    db = f"backslash{BACKSLASHES.index(name)}"
    influxd.query(f'CREATE DATABASE "{db}"', method="POST")
    status, body = influxd.write(influx_line(record, {}, {}), db=db)
    assert status == 204, body
    assert influxd.measurements(db) == [name]
    (point,) = influxd.points(name, db)
    assert point == {"time": record.time_ns, **record.tags, **record.fields}


def test_field_type_rule():
    types: dict = {("m", "known_int"): "integer", ("m", "known_float"): "float"}
    new: dict = {}
    r = Record("m", T, {}, {"known_int": 3.0, "known_float": 2, "fresh": True}, ORIGIN)
    settled = settle_types(r, types, new)
    assert settled.fields == {"known_int": 3, "known_float": 2.0, "fresh": True}
    assert type(settled.fields["known_int"]) is int and type(settled.fields["known_float"]) is float
    assert new == {("m", "fresh"): "boolean"}
    for bad in ({"known_int": 3.5}, {"known_float": "x"}, {"known_int": True}, {"fresh_big": 2**63}):
        with pytest.raises(Unwritable):
            settle_types(Record("m", T, {}, bad, ORIGIN), types, {})


def test_lines_are_exactly_what_influxdb_client_writes():
    """format_line (the forwarder's and `pvtap export`'s serialiser) writes what influxdb-client's
    own Point serialiser writes."""
    import random
    rng = random.Random(1)
    alphabet = "ab Z09_,= \"'\\\n\t\r°☀😀名-."

    def word() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))

    values: list[Callable[[], FieldValue]] = [
        lambda: rng.uniform(-1e6, 1e6), lambda: rng.randint(-2**63, 2**63 - 1), lambda: rng.random() < 0.5,
        word, lambda: float(rng.randint(-100, 100)), lambda: rng.choice([1e-300, 6.02e23, 1e16, -0.0, 0.1]),
        lambda: ""]
    cases = list(ESCAPING)
    for _ in range(2000):
        tags = {word(): rng.choice([word(), ""]) for _ in range(rng.randint(0, 3))}
        fields = {word(): rng.choice(values)() for _ in range(rng.randint(1, 4))}
        cases.append(Record(word(), T.replace(microsecond=rng.randint(0, 999_999)), tags, fields, ORIGIN))
    for record in cases:
        assert format_line(record.measurement, record.tags, record.fields, record.time_ns) == point_line(record), record


def point_line(record: Record) -> str:
    """influxdb-client's own serialiser, the definition format_line is held to."""
    from influxdb_client import Point, WritePrecision
    return Point.from_dict({"measurement": record.measurement, "tags": dict(record.tags), "fields": dict(record.fields),
                            "time": record.time_ns},
                           # WritePrecision.NS is the str "ns", but from_dict() annotates the class
                           write_precision=WritePrecision.NS).to_line_protocol()  # type: ignore[arg-type]
