"""The Enphase decoder's text fast path (`pvtap.decode.enphase.rows`): the records of usual
intervals and readings read by one regex over the XML text are exactly those the tree path gives,
on the reference vectors, a simulated catch-up and reports of unusual shapes; and the comparison
notices a fast path that reads a wrong column."""

from __future__ import annotations

import pytest

from pvtap.decode.enphase import decode_raw, redact_raw
from pvtap.decode.enphase import records as enphase_records
from pvtap.decode.enphase.rows import usual_rows
from pvtap.privacy import Privacy
from pvtap.records import RawPayload, Record
from pvtap.simulate.enphase import Simulator, encode_body
from tests.enphase_support import VECTOR_1, VECTOR_2, assert_records, request_raw

USUAL_INTERVAL = (b'<interval interval_duration="300" stat_duration="295" end_date="1700000100" stats="60000" '
                  b'id="1000001" eqid="999900000001.1"/>')
USUAL_READING = (b'<reading duration="300" stats="240000,50000,32000,6500,40,0,0,60000" date="1700000100" '
                 b'id="2000001" flags="0" eqid="999900000001.1"/>')

#: Start tags in other layouts, each read from the tree (the row is None); between usual ones, so a
#: row read for the wrong element would show.
UNUSUAL = {
    "missing attribute": b'<interval interval_duration="300" end_date="1700000400" stats="7" id="3" eqid="e.1"/>',
    "reading without flags": b'<reading duration="300" stats="1,2,3,4,5,6,7,8" date="1700000400" id="4" eqid="e.1"/>',
    "extra attribute": (b'<interval interval_duration="300" stat_duration="295" end_date="1700000400" stats="7" '
                        b'id="5" eqid="e.1" extra="x"/>'),
    "reordered": (b'<reading stats="1,2,3,4,5,6,7,8" duration="300" date="1700000400" id="6" flags="0" '
                  b'eqid="e.1"/>'),
    "single quotes": (b"<interval interval_duration='300' stat_duration='295' end_date='1700000400' stats='7' "
                      b"id='7' eqid='e.1'/>"),
    "entity in a value": (b'<interval interval_duration="300" stat_duration="295" end_date="1700000400" '
                          b'stats="6&#48;" id="8" eqid="e&#x2e;1"/>'),
    "a misplaced dash": (b'<interval interval_duration="300" stat_duration="2-95" end_date="1700000400" stats="7" '
                         b'id="9" eqid="e.1"/>'),
    "19 digits": (b'<interval interval_duration="300" stat_duration="295" end_date="1700000400" '
                  b'stats="1234567890123456789" id="10" eqid="e.1"/>'),
    "beyond 64 bits": (b'<interval interval_duration="300" stat_duration="295" end_date="1700000400" '
                       b'stats="99999999999999999999" id="11" eqid="e.1"/>'),
    "seven stats": (b'<reading duration="300" stats="1,2,3,4,5,6,7" date="1700000400" id="12" flags="0" '
                    b'eqid="e.1"/>'),
    "an eqid with an entity": (b'<reading duration="300" stats="1,2,3,4,5,6,7,8" date="1700000400" id="13" '
                               b'flags="0" eqid="e&amp;1"/>'),
    "not a number": (b'<reading duration="300" stats="1,2,x,4,5,6,7,8" date="1700000400" id="13" flags="0" '
                     b'eqid="e.1"/>'),
    "a newline in the tag": (b'<interval\ninterval_duration="300" stat_duration="295" end_date="1700000400" '
                             b'stats="7" id="14" eqid="e.1"/>'),
    "with content": (b'<interval interval_duration="300" stat_duration="295" end_date="1700000400" stats="7" '
                     b'id="15" eqid="e.1">text<x a="1"/></interval>'),
    "an eqid with a space": (b'<interval interval_duration="300" stat_duration="295" end_date="1700000400" '
                             b'stats="7" id="17" eqid="e 1"/>'),
}
#: Usual layouts with edge values the text path reads itself (the last one's date is beyond what a
#: datetime holds: an element record with the error, as from the tree).
USUAL_EDGES = (
    b'<interval interval_duration="0" stat_duration="-0" end_date="1700000400" stats="-5" id="18" eqid=""/>',
    b'<reading duration="-300" stats="-1,0,99999999999999999,4,5,6,7,8" date="0" id="19" flags="7" eqid="A-b_c"/>',
    b'<reading duration="300" stats="1,2,3,4,5,6,7,8" date="99999999999999999" id="16" flags="0" eqid="e.1"/>',
    b'<interval interval_duration="300" stat_duration="295" end_date="1700000400" stats="999999999999999999" '
    b'id="-99999999999999999" eqid="e.1"/>',
)
#: A value JSON does not read as int does (every row of the report is then converted by int).
LEADING_ZERO = (b'<interval interval_duration="300" stat_duration="0295" end_date="1700000400" stats="7" id="9" '
                b'eqid="e.1"/>')


def report(*elements: bytes, head: bytes = b'<?xml version="1.0" encoding="UTF-8"?>') -> bytes:
    return head + b'<perf_report report_timestamp="1700000107">' + b"".join(elements) + b"</perf_report>"


def tree_path(raw: RawPayload, monkeypatch: pytest.MonkeyPatch) -> list[Record]:
    """The records with the text rows turned off: every element read from the tree."""
    with monkeypatch.context() as patch:
        patch.setattr(enphase_records, "usual_rows", lambda xml: None)
        return decode_raw(raw)


def assert_same_as_tree(raw: RawPayload, monkeypatch: pytest.MonkeyPatch) -> list[Record]:
    fast = decode_raw(raw)
    assert_records(fast, tree_path(raw, monkeypatch))
    return fast


def catch_up() -> RawPayload:
    report_ = Simulator(micros=10, start=1718928000).next_report(500)
    return request_raw(encode_body(report_.xml))


def test_a_catch_up_is_read_from_the_text_and_gives_the_tree_paths_records(monkeypatch):
    for privacy in (Privacy(), Privacy(pseudonym_key=b"k" * 32), Privacy(keep_network_identity=True)):
        redacted = redact_raw(catch_up(), privacy)
        rows = usual_rows(redacted.payload)
        assert rows is not None and len(rows[0]) == len(rows[1]) == 500
        assert None not in rows[0] and None not in rows[1]  # the fast path is taken for every one
        records = assert_same_as_tree(redacted, monkeypatch)
        assert len(records) == 1031


@pytest.mark.parametrize("xml", [VECTOR_1, VECTOR_2], ids=["vector 1", "vector 2"])
def test_reference_vectors_give_the_tree_paths_records(xml, monkeypatch):
    assert_same_as_tree(request_raw(xml, None), monkeypatch)
    assert_same_as_tree(redact_raw(request_raw(xml, None), Privacy(pseudonym_key=b"k" * 32)), monkeypatch)


def test_vector_2_rows_are_its_values():
    assert usual_rows(VECTOR_2) == ([[300, 295, 1700000100, 60000, 1000001, "999900000001.1"]],
                                    [[300, 240000, 50000, 32000, 6500, 40, 0, 0, 60000, 1700000100, 2000001, 0,
                                      "999900000001.1"]])


@pytest.mark.parametrize("edges", [USUAL_EDGES, (*USUAL_EDGES, LEADING_ZERO)], ids=["json", "int by row"])
def test_unusual_layouts_are_read_from_the_tree_between_usual_ones(edges, monkeypatch):
    elements = [USUAL_INTERVAL, USUAL_READING]
    for element in UNUSUAL.values():
        elements += [element, USUAL_INTERVAL, USUAL_READING]
    xml = report(*elements, *edges)
    rows = usual_rows(xml)
    assert rows is not None
    taken = [row is not None for row in rows[0] + rows[1]]
    assert taken.count(False) == len(UNUSUAL)  # every unusual one, and only those, left to the tree
    records = assert_same_as_tree(request_raw(xml, None), monkeypatch)
    assert sum(r.measurement == "enphase_element" for r in records) >= 4  # the unreadable ones, as before
    assert_same_as_tree(redact_raw(request_raw(xml, None), Privacy(pseudonym_key=b"k" * 32)), monkeypatch)


@pytest.mark.parametrize("xml", [
    report(USUAL_INTERVAL, b"<!-- " + USUAL_INTERVAL + b" -->", USUAL_READING),
    report(USUAL_INTERVAL, b"<![CDATA[" + USUAL_READING + b"]]>", USUAL_READING),
    report(USUAL_INTERVAL, b"<?pi " + USUAL_READING + b"?>", USUAL_READING),
    report(USUAL_INTERVAL, USUAL_INTERVAL.replace(b"<interval ", b'<interval xmlns="urn:x" '), USUAL_READING),
    report(USUAL_INTERVAL, USUAL_READING, head=b"<?xml version='1.0' encoding='iso-8859-1'?>"),
    report(USUAL_INTERVAL, USUAL_READING, head=b"\xef\xbb\xbf"),
    report(USUAL_INTERVAL, USUAL_READING, head=b""),
], ids=["comment", "cdata", "processing instruction", "namespace", "latin-1", "byte order mark", "no declaration"])
def test_text_that_is_not_plain_is_read_from_the_tree(xml, monkeypatch):
    assert (usual_rows(xml) is None) == (not xml.startswith(b"<perf_report"))
    assert_same_as_tree(request_raw(xml, None), monkeypatch)


def test_a_text_and_tree_count_that_differ_leave_every_element_to_the_tree(monkeypatch):
    raw = request_raw(report(USUAL_INTERVAL, USUAL_READING), None)
    wrong: tuple[list[list[int | str] | None], list[list[int | str] | None]] = (
        [[1, 2, 3, 4, 5, "x"], [1, 2, 3, 4, 5, "x"]], [])
    monkeypatch.setattr(enphase_records, "usual_rows", lambda xml: wrong)
    fast = decode_raw(raw)
    monkeypatch.undo()
    assert_records(fast, tree_path(raw, monkeypatch))


@pytest.mark.parametrize("swap", [(0, 1), (2, 4)], ids=["interval columns", "reading columns"])
def test_the_comparison_fails_for_a_fast_path_reading_a_wrong_column(swap, monkeypatch):
    raw = catch_up()
    expected = tree_path(raw, monkeypatch)

    def swapped(xml: bytes):
        rows = usual_rows(xml)
        assert rows is not None
        table = rows[0] if swap == (0, 1) else rows[1]
        for row in table:
            assert row is not None
            row[swap[0]], row[swap[1]] = row[swap[1]], row[swap[0]]
        return rows

    monkeypatch.setattr(enphase_records, "usual_rows", swapped)
    with pytest.raises(AssertionError):
        assert_records(decode_raw(raw), expected)
