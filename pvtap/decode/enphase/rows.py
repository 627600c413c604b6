"""The usual intervals and readings of a report read from its XML text: one regex pass in C
instead of a thousand lxml attribute reads (`records` takes these rows where it can).

Sound only where every `<interval` or `<reading` in the text is the start tag of exactly that
element of the parsed tree, in document order: UTF-8 text with no comment, CDATA section,
DOCTYPE, processing instruction or namespace declaration (`usual_rows` gives None otherwise).
An element is then read from the text only when its start tag is written exactly in the Envoy's
usual layout (`INTERVAL`, `READING`): double-quoted integers of at most 18 characters (within 64
bits) and an eqid of letters, digits and `._-`, so every captured value is the attribute's value
in the tree. Any other start tag gives no row (None), and that element is read from the tree
as before; so is every element when the counts of the text and the tree differ (the caller
checks).
"""

from __future__ import annotations

import json
import re

from .envelope import plain_markup

#: An integer of at most 18 characters (within 64 bits), or something else of digits and dashes,
#: which `int` refuses (a simple character class: the regex engine's fast loop).
_INT = r"([0-9-]{1,18})"
_N = f'"{_INT}"'
#: An eqid of the characters serials and their pseudonyms have, captured with its quotes: a JSON string.
_EQID = r'("[0-9A-Za-z._-]*")'
#: The attributes of a row, in the order of its groups.
INTERVAL = ("interval_duration", "stat_duration", "end_date", "stats", "id", "eqid")
READING = ("duration", "stats", "date", "id", "flags", "eqid")
#: A start tag in the usual layout (its groups), else any other start tag of the element (no groups).
_INTERVAL_TAGS = re.compile(
    rf'<interval(?: interval_duration={_N} stat_duration={_N} end_date={_N} stats={_N} id={_N} eqid={_EQID}/>'
    r'|[ \t\r\n/>])')
_READING_TAGS = re.compile(
    rf'<reading(?: duration={_N} stats="{",".join([_INT] * 8)}" date={_N} id={_N} flags={_N}'
    rf' eqid={_EQID}/>|[ \t\r\n/>])')

Rows = list[list[int | str] | None]


def usual_rows(xml: bytes) -> tuple[Rows, Rows] | None:
    """(interval rows, reading rows), one per start tag in document order: a row holds the values
    as int (interval: `INTERVAL`; reading: duration, the 8 stats, date, id, flags) and the eqid
    as str; None for a start tag in any other layout. None when the text is not plain enough for
    its start tags to be the tree's elements."""
    if not plain_markup(xml):
        return None
    try:
        text = xml.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return _rows(_INTERVAL_TAGS, text), _rows(_READING_TAGS, text)


def _rows(tags: re.Pattern[str], text: str) -> Rows:
    """The captures of every start tag, converted by one JSON parse in C (a thousand int() calls
    cost twice as much): each row is written as a JSON array, and a row of empty captures (a
    start tag in another layout), which no usual row can be written like, as `null`. JSON reads
    a number as `int` does or not at all (a leading zero, a misplaced dash): then row by row."""
    found = tags.findall(text)
    if not found:
        return []
    arrays = "[[" + "],[".join(map(",".join, found)) + "]]"
    try:
        return json.loads(arrays.replace("[" + "," * (tags.groups - 1) + "]", "null"))
    except ValueError:
        return [_row(captures) for captures in found]


def _row(captures: tuple[str, ...]) -> list[int | str] | None:
    if not captures[0]:
        return None
    try:
        return [*map(int, captures[:-1]), captures[-1][1:-1]]
    except ValueError:
        return None

