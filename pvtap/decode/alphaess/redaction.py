"""AlphaESS redaction: what `redact_raw` removes or pseudonymises (package docstring).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from pvtap.privacy import REDACTED, Privacy
from pvtap.records import RawPayload

from ..withhold import is_withheld, redacted_origin, withhold
from .bodies import UNREAD, Body, FrameReading, JsonObject, Unread, dump, read_frame
from .framing import REQUEST, AlphaFrame, encode_frame, new_frame

#: Redacted always (reference §4).
SECRET_KEYS = frozenset({"Password", "License", "Address", "ZipCode", "PhoneNumber"})
#: Location: redacted unless privacy.keep_network_identity.
LOCATION_KEYS = frozenset({"Country"})
#: Serials: replaced by their pseudonym when privacy.pseudonym_key is set.
SERIAL_KEYS = frozenset({"SN", "UserName", "InvSN", "WifiSN", "BakBoxSN", "SCBSN"}
                        | {f"BatterySN{i}" for i in range(1, 19)})
_MAC = re.compile(r"(MAC:\s*)[0-9A-Fa-f]{2}(?:[ :-]?[0-9A-Fa-f]{2}){5}")
#: A JSON string token; scanned from the start of a valid document, these are exactly its
#: strings (outside strings JSON has no quotes), so a token followed by `:` is a key.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_COLON = re.compile(r"\s*:\s*")
_JSON_SPACE = " \t\n\r"
_VALUE = json.JSONDecoder(object_pairs_hook=Body)


def _keys(keep_network_identity: bool, pseudonyms: bool) -> tuple[frozenset[str], re.Pattern[str]]:
    """The keys whose values redaction may change, and a pattern that finds them as keys."""
    keys = SECRET_KEYS | (frozenset() if keep_network_identity else LOCATION_KEYS | {"MsgContent"}) | \
        (SERIAL_KEYS if pseudonyms else frozenset())
    return keys, re.compile(r'"(' + "|".join(map(re.escape, sorted(keys))) + r')"\s*:\s*')


#: `_keys` for each (keep_network_identity, pseudonyms): made once, looked up per payload.
_KEYS = {(keep, pseudonyms): _keys(keep, pseudonyms) for keep in (False, True) for pseudonyms in (False, True)}


class _Redaction:
    """One payload's redaction, and what it changed (for the raw payload's meta)."""

    def __init__(self, privacy: Privacy) -> None:
        self.privacy = privacy
        self.redacted: set[str] = set()
        self.pseudonymised: set[str] = set()
        self.keys, self.key_pattern = _KEYS[privacy.keep_network_identity, bool(privacy.pseudonym_key)]

    def value(self, key: str, value: Any) -> Any:
        """What a value of `key` may be stored as."""
        if key in SECRET_KEYS or (key in LOCATION_KEYS and not self.privacy.keep_network_identity):
            if value != REDACTED:
                self.redacted.add(key)
            return REDACTED
        if key in SERIAL_KEYS and self.privacy.pseudonym_key:
            if isinstance(value, str) and value:
                self.pseudonymised.add(key)
                return self.privacy.serial(value)
            if isinstance(value, list) and not isinstance(value, Body):
                return [self.value(key, v) for v in value]
            return value
        if key == "MsgContent" and isinstance(value, str) and not self.privacy.keep_network_identity:
            cleaned = _MAC.sub(rf"\g<1>{REDACTED}", value)
            if cleaned != value:
                self.redacted.add("MAC")
            return cleaned
        return value

    def json(self, body: bytes, parsed: JsonObject | None) -> tuple[bytes, JsonObject | Unread | None] | None:
        """A JSON body (`parsed`: as read) with only the secret values replaced, every other byte
        (repeated keys, spacing, key order) as it was, and the redacted body as read when that
        is known without reading it (else UNREAD); None when the body is not a JSON object."""
        if parsed is None:
            return None
        if parsed.plain:
            spliced = self._plain(body, parsed)
            if spliced is not None:
                return spliced
        text = body.decode("utf-8")
        out: list[str] = []
        changed: dict[str, Any] = {}
        pos = skip_to = 0
        plain = "\\" not in text
        for key, start in self._keys_in(text, parsed):
            if start < skip_to:
                continue  # inside a value already replaced
            if plain and text[start] == '"':  # a string without escapes: it ends at the next quote
                end = text.index('"', start + 1) + 1
                value: Any = text[start + 1:end - 1]
            else:
                value, end = _VALUE.raw_decode(text, start)
            new = self.value(key, value)
            if new == value and type(new) is type(value):
                continue
            out += (text[pos:start], dump(new))
            changed[key] = new
            pos = skip_to = end
        if not out:
            return body, parsed
        out.append(text[pos:])
        if not parsed.plain:
            return "".join(out).encode("utf-8"), UNREAD
        # Each key once, at the top level: the text now reads as `first` with the new values (the
        # new values are strings without escapes, or the old ones), and stays plain.
        first = {**parsed.first, **changed}
        return "".join(out).encode("utf-8"), JsonObject(first.items(), first, True)

    def _plain(self, body: bytes, parsed: JsonObject) -> tuple[bytes, JsonObject] | None:
        """`json` for a plain body (each key once, at the top level, no escapes) whose changed
        values are all strings, the common case (a realtime frame's serial). Without escapes a
        string is its text between quotes and `"Key":` is found only as that key, so the member
        reads `"Key":"value"` in the compact text devices send, once, and is replaced as a whole.
        None: the general path decides (a changed value that is not a string, spaces around the
        colon)."""
        first = parsed.first
        text = ""
        new_first: dict[str, Any] | None = None
        for key in self.keys.intersection(first):  # each key is in `first`: the only ones to look at
            value = first[key]
            new = self.value(key, value)
            if new == value and type(new) is type(value):
                continue
            if type(value) is not str:
                return None
            if new_first is None:
                text = body.decode("utf-8")
                new_first = dict(first)
            member = f'"{key}":"{value}"'
            at = text.find(member)
            if at < 0:
                return None  # not as written here (spaces around the colon)
            text = f'{text[:at]}"{key}":{dump(new)}{text[at + len(member):]}'
            new_first[key] = new
        if new_first is None:
            return body, parsed
        # The text now reads as `new_first` (new values are strings without escapes), and stays plain.
        return text.encode("utf-8"), JsonObject(new_first.items(), new_first, True)

    def _keys_in(self, text: str, parsed: JsonObject) -> Iterator[tuple[str, int]]:
        """(key, where its value starts) for each key of interest in a valid JSON text, in text
        order. Without a backslash no string can hold a quote, so every `"Key":` is a key: a
        plain body's keys of interest (known from `first`) are looked up directly, others found
        by the pattern; with a backslash every string token is looked at, escaped keys decoded."""
        if parsed.plain:
            found = []
            for key in self.keys.intersection(parsed.first):
                at = text.find(f'"{key}":')  # (the pattern below finds a space before the colon too)
                if at < 0:
                    break
                start = at + len(key) + 3
                while text[start] in _JSON_SPACE:  # a value follows the colon: the index stays in the text
                    start += 1
                found.append((start, key))
            else:
                yield from ((key, start) for start, key in sorted(found))
                return
        if "\\" not in text:
            for match in self.key_pattern.finditer(text):
                yield match.group(1), match.end()
            return
        for token in _STRING.finditer(text):
            colon = _COLON.match(text, token.end())
            if colon is None:
                continue  # a value
            key = token.group()
            key = json.loads(key) if "\\" in key else key[1:-1]
            if key in self.keys:
                yield key, colon.end()

    def csv(self, body: bytes) -> bytes | None:
        """The back-fill CSV with the cells of secret or serial columns replaced; None when a row
        has no header before it or more cells than its header (columns this module cannot name)."""
        lines = body.decode("utf-8", errors="surrogateescape").split("\n")
        header: list[str] = []
        for i, line in enumerate(lines):
            cells = line.split(",")
            if cells[0].strip() == "Date":
                header = [c.strip() for c in cells]
                continue
            if not line.strip():
                continue
            if len(cells) > len(header):
                return None
            lines[i] = ",".join(self.value(header[j], c) if c else c for j, c in enumerate(cells))
        return "\n".join(lines).encode("utf-8", errors="surrogateescape")

    def meta(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(meta)
        if self.redacted:
            out["redacted"] = _listed(self.redacted)
        if self.pseudonymised:
            out["pseudonymised"] = _listed(self.pseudonymised)
        return out


def _listed(keys: set[str]) -> str:
    return ",".join(sorted(keys)) if len(keys) > 1 else next(iter(keys))  # (one key, a realtime frame's SN: no sort)


def _redacted(reading: FrameReading, redaction: _Redaction) -> FrameReading | None:
    """The frame as it may be stored (the same reading when nothing changed); None when its
    body cannot be vouched for."""
    frame = reading.frame
    if not frame.body:
        return reading
    json: JsonObject | Unread | None = UNREAD
    if frame.type == 12 and frame.b1 == REQUEST:
        body = redaction.csv(frame.body)
    else:
        redacted = redaction.json(frame.body, reading.json)
        body, json = redacted if redacted is not None else (None, UNREAD)
    if body is None:
        return None
    if body is frame.body or body == frame.body:
        return reading
    wire = encode_frame(frame.b1, frame.type, body)
    return FrameReading(wire, new_frame(AlphaFrame, (frame.b1, frame.type, body, wire[-2] << 8 | wire[-1])), json)


_REJECTED = {"garbage": "bytes in no frame", "partial": "a frame cut off at the end of the connection",
             "opaque": "a stream that is not AlphaESS framing"}


def redact_raw(raw: RawPayload, privacy: Privacy) -> RawPayload:
    """The payload as it may be stored: secrets replaced by REDACTED, serials pseudonymised when
    asked, a network address as device label dropped unless kept (package docstring). Bytes it
    cannot vouch for — rejected, cut off, opaque, a body that is neither JSON nor the back-fill
    CSV — are withheld (`pvtap.decode.withhold`)."""
    origin = redacted_origin(raw.origin, privacy)
    if is_withheld(raw):
        return withhold(raw, str(raw.meta["withheld"]), privacy, origin=origin)
    if raw.kind != "frame":
        return withhold(raw, _REJECTED.get(raw.kind, f"payload kind {raw.kind!r}"), privacy, origin=origin)
    reading = raw.parsed_as(FrameReading)
    if reading is None:  # a payload from elsewhere (a replay, an import): read its bytes
        try:
            reading = read_frame(raw.payload)
        except ValueError as exc:
            return withhold(raw, f"not one frame: {exc}", privacy, origin=origin)
    redaction = _Redaction(privacy)
    redacted = _redacted(reading, redaction)
    if redacted is None:
        return withhold(raw, f"{reading.frame.name} body is neither a JSON object nor the back-fill CSV", privacy,
                        origin=origin)
    payload = raw.payload if redacted is reading else redacted.source  # an unchanged frame: stored as it came
    return RawPayload(origin, raw.kind, payload, raw.received, redaction.meta(raw.meta), redacted)
