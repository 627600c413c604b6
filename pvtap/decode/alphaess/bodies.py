"""AlphaESS JSON bodies, read once: a `Body` keeps a JSON object's members in order, a repeated
key as often as it comes (a real 1-1-4 dump repeats `Generator`). In a record, the first
occurrence keeps the key's name and later ones are numbered from 2 (`Generator`, `Generator_2`,
…; a number already taken by a real key is skipped), so no value is lost and each field name
keeps one meaning per frame type (`numbered`).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import orjson

from .framing import AlphaFrame, parse_frame


class Body(list[tuple[str, Any]]):
    """A JSON object's members in order, repeated keys kept (nested objects are Bodies too)."""

    def get(self, key: str, default: Any = None) -> Any:
        """The first value of `key`."""
        for name, value in self:
            if name == key:
                return value
        return default


class JsonObject(NamedTuple):
    """A JSON body, read once.

    `members`: every member in order, a repeated key as often as it comes (nested objects as
    Bodies); `first`: each key's first value, for lookups; `plain`: the text has no escapes, no
    repeated keys and no nested objects or arrays, so each key is in it exactly once, as a
    top-level key, spelled as in `first` (what lets redaction skip a body that holds no secret)."""

    members: Collection[tuple[str, Any]]
    first: Mapping[str, Any]
    plain: bool


_PAIRS = json.JSONDecoder(object_pairs_hook=Body)
_CONTAINERS = frozenset({dict, list})
#: The end of a key: in JSON without escapes no string holds a quote, so this is found after
#: every key and nowhere else.
_KEY_END = re.compile(r'"\s*:')


def read_json(body: bytes) -> JsonObject | None:
    """The body as a JSON object, or None when it is not one.

    orjson (some four times as fast as json) when that loses nothing: it keeps only the last
    of repeated keys, so a body with escapes, or with more keys in its text than in the parse,
    goes to the json module's pairs decoder, as does anything orjson refuses (json reads NaN)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _read_pairs(body)
    if type(value) is not dict:
        return None
    text = body.decode("utf-8")  # valid: orjson took it (and str searches run faster here than bytes ones)
    # flat, the usual case: strings and numbers (no nested container without a second `{` or a `[`)
    flat = (text.find("{", 1) < 0 and "[" not in text) or _CONTAINERS.isdisjoint(map(type, value.values()))
    if "\\" in text or _keys_in_text(text) != (len(value) if flat else _keys(value)):
        return _read_pairs(body)
    if flat:
        return JsonObject(value.items(), value, True)
    members = _as_body(value)
    return JsonObject(members, dict(members), False)


def _read_pairs(body: bytes) -> JsonObject | None:
    try:
        value = _PAIRS.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(value, Body):
        return None
    return JsonObject(value, dict(reversed(value)), False)  # reversed: the first of a repeated key wins


def _keys_in_text(text: str) -> int:
    """How many keys a JSON text without escapes holds (repeated ones too): a quote followed by
    a colon, directly in the compact text devices send (counted in C), else after spaces."""
    if "\t" in text or "\n" in text or "\r" in text or '" ' in text:  # (one character is found fastest)
        return len(_KEY_END.findall(text))
    return text.count('":')


def _keys(value: Any) -> int:
    """How many keys a parsed document holds, at every depth."""
    if type(value) is dict:
        return len(value) + sum(_keys(v) for v in value.values() if type(v) in (dict, list))
    if type(value) is list:
        return sum(_keys(v) for v in value if type(v) in (dict, list))
    return 0


def _as_body(value: Any) -> Any:
    """orjson's dicts as Bodies, at every depth."""
    if type(value) is dict:
        return Body((k, _as_body(v) if type(v) in (dict, list) else v) for k, v in value.items())
    if type(value) is list:
        return [_as_body(v) if type(v) in (dict, list) else v for v in value]
    return value


class Unread(enum.Enum):
    """A part of a FrameReading not read yet."""

    UNREAD = enum.auto()


UNREAD = Unread.UNREAD


class FrameReading:
    """A frame as the live path reads it, once: the Tap splits it off, `redact_raw` and
    `decode_raw` take it from the payload (`RawPayload.parsed`) instead of checking and parsing
    the bytes again. `source` is the frame's exact bytes; `json` its body read as a JSON object
    on first use (None when it is not one)."""

    __slots__ = ("_json", "frame", "source")

    def __init__(self, source: bytes, frame: AlphaFrame, json: JsonObject | Unread | None = UNREAD) -> None:
        self.source = source
        self.frame = frame
        self._json = json

    @property
    def json(self) -> JsonObject | None:
        if self._json is UNREAD:
            self._json = read_json(self.frame.body) if self.frame.body else None
        return self._json


def read_frame(data: bytes) -> FrameReading:
    """Exactly one frame, checked (`parse_frame`: ValueError if the bytes are not one)."""
    return FrameReading(data, parse_frame(data))


_dump_str = json.encoder.encode_basestring  # the C one, when built


def encode_json(obj: dict[str, Any] | Body) -> bytes:
    """Compact, like the device writes it (a Body with its repeated keys)."""
    return dump(obj).encode("utf-8")


def dump(value: Any) -> str:
    if type(value) is str:
        return _dump_str(value)  # what json.dumps(value, ensure_ascii=False) does, without its keywords
    if isinstance(value, Body):
        return "{" + ",".join(f"{dump(k)}:{dump(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return dump(Body(value.items()))
    if isinstance(value, list):
        return "[" + ",".join(map(dump, value)) + "]"
    return json.dumps(value, ensure_ascii=False)


def numbered(items: Collection[tuple[str, Any]]) -> Collection[tuple[str, Any]] | Iterator[tuple[str, Any]]:
    """Members with a repeated key renamed `key_2`, `key_3`, … (module docstring)."""
    if len({name for name, _ in items}) == len(items):
        return items  # the usual case: nothing repeated
    return _numbered(items)


def _numbered(items: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    seen: set[str] = set()
    repeated: list[tuple[str, Any]] = []
    for name, value in items:
        if name in seen:
            repeated.append((name, value))
        else:
            seen.add(name)
            yield name, value
    for name, value in repeated:
        n = 2
        while f"{name}_{n}" in seen:
            n += 1
        seen.add(f"{name}_{n}")
        yield f"{name}_{n}", value
