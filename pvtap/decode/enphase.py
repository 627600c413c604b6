"""Enphase Envoy cloud reports (`perf_report`, R3.x firmware): bytes in, records out, no I/O.

The Envoy POSTs `/emu_reports/performance_report?webcomm_version=<v>` with a zlib-compressed
body (`Content-Type: application/x-deflate`, no Content-Encoding) that holds a form whose `body`
field is the URL-encoded XML; the cloud answers with a zlib-compressed `perf_report_response`
listing the event ids it took (shared/reference/enphase.md §1, §2). Everything here works on
copies of those bytes: the addon forwards the originals untouched.

Raw payloads (built by the addon): requests are kind `performance_report`, `task_complete` or
`emu_report` (see `report_kind`), direction UP; responses are `<kind>_response`, direction DOWN,
with `meta["status_code"]`. `redact_raw` turns them into what the store keeps, recorded in
`meta["encoding"]`:

- `"xml"`: the report parsed; the payload is the redacted XML (utf-8);
- `"text"`: it inflated but did not parse (truncated XML, a zlib stream cut short, not XML at
  all); the inflated text, form-decoded when it is a `body=` form, with identities scrubbed
  textually;
- `"original"`: it did not inflate at all (corrupt, or a decompression bomb); the bytes as
  received.

`decode_raw` accepts all three, bare XML and the original compressed form.

Measurements (tags: `envoy` = Envoy serial, `eqid` = device or channel; both low-cardinality):
`enphase_envoy`, `enphase_event`, `enphase_device`, `enphase_channel`, `enphase_interval`,
`enphase_reading`, `enphase_report_response` and `enphase_element` (anything unknown). Every
field has one type everywhere (InfluxDB rejects a field that changes type): ids, flags, counts,
joules and seconds are int; physical quantities (V, Hz, A, °C, W, Wh, degrees) are float;
everything else, and every attribute this module does not know, is str.
"""

from __future__ import annotations

import re
import threading
import urllib.parse
import zlib
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta

from lxml import etree

from pvtap.privacy import REDACTED, Privacy
from pvtap.records import FieldValue, Origin, RawPayload, Record, utc_from_unix

PROTOCOL = "enphase"
REPORTS_PREFIX = "/emu_reports/"
DEFLATE_CONTENT_TYPE = "application/x-deflate"

#: Largest inflated body accepted: a 500 + 500 catch-up report is about 0.3 MiB, so this only
#: stops decompression bombs.
MAX_INFLATED = 64 * 1024 * 1024
#: Largest XML document parsed.
MAX_XML = 16 * 1024 * 1024

#: `event_state` values (reference §2.3; 0/1/2 = one-shot/set/clear is an inference that every
#: sample agrees with).
EVENT_STATES = {0: "one-shot", 1: "set", 2: "clear"}
#: Event codes with a public meaning (reference §2.3, from larsks' constants.py).
EVENT_CODES = {
    101: "Grid instability",
    509: "Power on reset",
    512: "DC power too low",
    10000: "Microinverter failed to report",
    10009: "Microinverter sleeping",
}

#: Attributes that identify the site's network and location: removed unless kept by privacy.
NETWORK_ATTRIBUTES = ("ip_addr", "mac_addr", "latitude", "longitude")
#: Attributes holding a serial (an eqid may carry a `.N` channel suffix): pseudonymised.
SERIAL_ATTRIBUTES = ("serial_num", "eqid")
#: Known attributes that cannot hold an identity; any other attribute value, and element text,
#: has the identities found elsewhere in the report scrubbed from it as well.
_PLAIN_ATTRIBUTES = frozenset({
    "report_timestamp", "webcomm_version", "part_num", "sw_version", "timezone", "emu_region",
    "id", "event_code", "event_state", "event_date", "correlation_id", "message_key",
    "device_type", "admin_state", "condition_flags", "observed_flags", "control_bits", "image_bits",
    "channel_type", "end_date", "interval_duration", "stat_duration", "stats", "date", "duration",
    "flags", "status",
})


class ReportError(ValueError):
    """A payload that cannot be decoded; the message says why."""


class PayloadTooLarge(ReportError):
    """A body that inflates (or is) beyond MAX_INFLATED / MAX_XML: refused, never allocated."""


# -- envelope ---------------------------------------------------------------------------------

def report_kind(path: str) -> str | None:
    """What an HTTP request path (without query) under /emu_reports/ carries; None elsewhere.

    Only the path counts: `webcomm_version` in the query changed with every firmware line and an
    exact-URL match broke earlier proxies at each bump."""
    path = path.partition("?")[0]
    if not path.startswith(REPORTS_PREFIX):
        return None
    name = path[len(REPORTS_PREFIX):].strip("/")
    return name if name in ("performance_report", "task_complete") else "emu_report"


def is_deflate(content_type: str | None) -> bool:
    return isinstance(content_type, str) and content_type.strip().lower().startswith(DEFLATE_CONTENT_TYPE)


def inflate(body: bytes, content_type: str | None, max_size: int = MAX_INFLATED) -> bytes:
    """The inflated body: a zlib stream (what the Envoy sends), else raw deflate; a body that is
    neither is taken as uncompressed unless the content type says deflate (then ReportError).
    Never produces more than `max_size` bytes: a bigger stream raises PayloadTooLarge."""
    if not body:
        return b""
    failure: zlib.error | None = None
    for wbits in (zlib.MAX_WBITS, -zlib.MAX_WBITS):
        try:
            return _inflate_bounded(body, wbits, max_size)
        except zlib.error as exc:
            failure = failure or exc
    if is_deflate(content_type):
        raise ReportError(f"body says {DEFLATE_CONTENT_TYPE} but is neither zlib nor raw deflate ({failure})")
    if len(body) > max_size:
        raise PayloadTooLarge(f"uncompressed body of {len(body)} bytes exceeds {max_size}")
    return bytes(body)


def _inflate_bounded(data: bytes, wbits: int, max_size: int, *, truncated_ok: bool = False) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(data, max_size + 1)
    if len(out) > max_size:
        raise PayloadTooLarge(f"body inflates beyond {max_size} bytes (compressed {len(data)} bytes)")
    if not inflater.eof and not (truncated_ok and out):
        raise zlib.error("incomplete or truncated stream")
    return out


def _inflate_truncated(body: bytes) -> bytes | None:
    """What a zlib stream cut short (a dropped upload) inflates to, so that it can be scrubbed
    and kept as text; None when the bytes do not start a zlib stream at all."""
    try:
        return _inflate_bounded(body, zlib.MAX_WBITS, MAX_INFLATED, truncated_ok=True)
    except (zlib.error, PayloadTooLarge):
        return None


def report_xml(body: bytes, content_type: str | None) -> tuple[bytes, dict[str, str]]:
    """(XML, other form fields) of a request or response body as sent."""
    return split_form(inflate(body, content_type))


def split_form(text: bytes) -> tuple[bytes, dict[str, str]]:
    """(XML, other form fields) of an inflated body: a `body=<url-encoded XML>&…` form (`+` and
    `%20` both decode to a space) or bare XML."""
    if not text.strip():
        raise ReportError("empty body")
    if _looks_like_xml(text):
        return text, {}
    xml: bytes | None = None
    fields: dict[str, str] = {}
    for part in text.strip().split(b"&"):
        name, _, value = part.partition(b"=")
        key = _form_unquote(name).decode("utf-8", "replace")
        if key == "body" and xml is None:
            xml = _form_unquote(value)
        else:
            fields[key] = _form_unquote(value).decode("utf-8", "replace")
    if xml is None:
        raise ReportError(f"body is neither XML nor a form with a 'body' field (fields: {', '.join(fields) or 'none'})")
    return xml, fields


def _looks_like_xml(text: bytes) -> bool:
    return text.lstrip()[:1] == b"<" or text.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"))


def _form_unquote(value: bytes) -> bytes:
    """urllib.parse.unquote_to_bytes with `+` as space, about twice as fast on a large report:
    each distinct escape is replaced in one C-level pass (`%25` last, so no `%` it produces is
    read again); input with a stray `%` takes the stdlib's exact path."""
    value = value.replace(b"+", b" ")
    parts = value.split(b"%")
    if len(parts) == 1:
        return value
    codes = {part[:2] for part in parts[1:]}
    if not codes <= _HEX_ESCAPES.keys():
        return urllib.parse.unquote_to_bytes(value)
    for code in codes - {b"25"}:
        value = value.replace(b"%" + code, _HEX_ESCAPES[code])
    return value.replace(b"%25", b"%")


_HEX_ESCAPES = {f"{a}{b}".encode(): bytes([int(a + b, 16)]) for a in "0123456789abcdefABCDEF"
                for b in "0123456789abcdefABCDEF"}


# -- XML --------------------------------------------------------------------------------------

_parsers = threading.local()


def _parser() -> etree.XMLParser:
    """One safe parser per thread (an lxml parser must not be used by two threads at once)."""
    parser = getattr(_parsers, "parser", None)
    if parser is None:
        parser = _parsers.parser = etree.XMLParser(
            resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
            remove_comments=True, remove_pis=True, collect_ids=False)
    return parser


def parse_xml(xml: bytes) -> etree._Element:
    """The root element of a report or response. Refuses DOCTYPE/ENTITY declarations outright
    (no Envoy sends them; they are the shape of entity-expansion attacks) and anything above
    MAX_XML; malformed or truncated XML raises ReportError."""
    if not xml.strip():
        raise ReportError("empty XML")
    if len(xml) > MAX_XML:
        raise PayloadTooLarge(f"XML of {len(xml)} bytes exceeds {MAX_XML}")
    if b"<!DOCTYPE" in xml or b"<!ENTITY" in xml:
        raise ReportError("XML with a DOCTYPE or ENTITY declaration is refused")
    try:
        root = etree.fromstring(xml, _parser())
    except etree.LxmlError as exc:
        raise ReportError(f"XML does not parse: {exc}") from None
    info = root.getroottree().docinfo
    if info.internalDTD is not None or info.doctype:  # e.g. hidden from the byte check by UTF-16
        raise ReportError("XML with a DOCTYPE or ENTITY declaration is refused")
    return root


def event_ids(body: bytes, content_type: str | None) -> list[str]:
    """The `<event id>`s of a posted report, in order: what a local answer acknowledges."""
    xml, _ = report_xml(body, content_type)
    return [i for i in (e.get("id") for e in parse_xml(xml).iter("event")) if i is not None]


def build_response(event_ids: Iterable[str]) -> bytes:
    """The zlib-compressed `perf_report_response` the cloud sends, acknowledging `event_ids`."""
    events = "".join(f'<event id="{_attr_escape(i)}"/>' for i in event_ids)
    xml = ('<?xml version="1.0" encoding="UTF-8"?><perf_report_response status="success">'
           f"<events_processed>{events}</events_processed></perf_report_response>")
    return zlib.compress(xml.encode("utf-8"))


def _attr_escape(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# -- redaction --------------------------------------------------------------------------------

def redact_raw(raw: RawPayload, privacy: Privacy) -> RawPayload:
    """The payload as it may be stored: network identity removed (unless kept), serials
    pseudonymised (when a key is set). Never raises; see the module docstring for the three
    encodings it produces."""
    meta = {**raw.meta, "original_size": len(raw.payload)}
    try:
        text = _inflated(raw)
    except PayloadTooLarge:
        return _with(raw, raw.payload, raw.origin.device, {**meta, "encoding": "original"})
    except ReportError:
        truncated = _inflate_truncated(raw.payload)
        if truncated is None:
            return _with(raw, raw.payload, raw.origin.device, {**meta, "encoding": "original"})
        text = truncated
        meta["truncated_stream"] = True
    try:
        xml, fields = split_form(text)
    except ReportError:
        xml, fields = text, {}
    scrub = _Scrubber(privacy)
    try:
        root = parse_xml(xml)
    except ReportError:
        payload = scrub.text(xml)
        device = _envoy_serial_in_text(payload)
        encoding = "text"
    else:
        scrub.tree(root)
        payload = etree.tostring(root, encoding="utf-8", xml_declaration=True)
        envoy = next(root.iter("envoy"), None)
        device = envoy.get("serial_num", "") if envoy is not None else ""
        encoding = "xml"
    if fields:
        meta["form_fields"] = urllib.parse.urlencode({k: scrub.value(v) for k, v in fields.items()})
    return _with(raw, payload, device or raw.origin.device, {**meta, "encoding": encoding})


def _with(raw: RawPayload, payload: bytes, device: str, meta: dict) -> RawPayload:
    origin = Origin(raw.origin.protocol, device, raw.origin.connection, raw.origin.direction)
    return RawPayload(origin=origin, kind=raw.kind, payload=payload, received=raw.received, meta=meta)


def _inflated(raw: RawPayload) -> bytes:
    """The inflated text of a payload in any of the stored encodings (or as sent)."""
    if raw.meta.get("encoding") in ("xml", "text") or _looks_like_xml(raw.payload):
        return bytes(raw.payload)
    return inflate(raw.payload, raw.meta.get("content_type"))  # type: ignore[arg-type]


_NETWORK_XPATH = etree.XPath("|".join(f"//@{name}" for name in NETWORK_ATTRIBUTES))
_SERIAL_XPATH = etree.XPath("|".join(f"//@{name}" for name in SERIAL_ATTRIBUTES))
_NO_IDENTITY_ATTRIBUTES = _PLAIN_ATTRIBUTES | set(SERIAL_ATTRIBUTES)  # (serials: already replaced)
_PSEUDONYM = re.compile(r"anon-[0-9a-f]{12}")
#: Identity-shaped tokens in free text (serials, IPs, MACs, coordinates), looked up in the values
#: found in this report's identity attributes.
_TOKEN = re.compile(r"[0-9A-Za-z:._-]{6,}")
_TEXT_NETWORK = re.compile(rb"""\s(?:ip_addr|mac_addr|latitude|longitude)\s*=\s*(?:"[^"]*"?|'[^']*'?)""")
_TEXT_SERIAL = re.compile(rb"""(\b(?:serial_num|eqid)\s*=\s*["'])([^"'<>\s]*)""")
_TEXT_ENVOY_SERIAL = re.compile(rb"""<envoy\s[^>]*?\bserial_num\s*=\s*["']([^"'<>\s]*)""")


class _Scrubber:
    """Applies one report's redaction, remembering every identity value it removed or replaced
    so the same values can also be scrubbed where they turn up in free text."""

    def __init__(self, privacy: Privacy) -> None:
        self.privacy = privacy
        self.replacements: dict[str, str] = {}

    def tree(self, root: etree._Element) -> None:
        """Redact a parsed report in place (XPath finds the attributes in C: a 500 + 500 report
        has some 7000 attributes, of which only the eqids need touching)."""
        if not self.privacy.keep_network_identity:
            for value in _NETWORK_XPATH(root):
                el = value.getparent()
                self._remember(str(value), REDACTED)
                del el.attrib[value.attrname]
        if self.privacy.pseudonym_key:
            for value in _SERIAL_XPATH(root):
                if value:
                    value.getparent().set(value.attrname, self.eqid(str(value)))
        if self.replacements:
            for el in root.iter():
                for name, value in el.items():
                    if name not in _NO_IDENTITY_ATTRIBUTES:
                        el.set(name, self.value(value))
                if el.text and el.text.strip():
                    el.text = self.value(el.text)
                if el.tail and el.tail.strip():
                    el.tail = self.value(el.tail)

    def text(self, text: bytes) -> bytes:
        """Textual scrub of a report that does not parse."""
        if not self.privacy.keep_network_identity:
            text = _TEXT_NETWORK.sub(b"", text)
        if self.privacy.pseudonym_key:
            text = _TEXT_SERIAL.sub(
                lambda m: m.group(1) + self.eqid(m.group(2).decode("utf-8", "replace")).encode(), text)
        return text

    def eqid(self, value: str) -> str:
        """A serial or `serial.N` channel id with the serial pseudonymised; idempotent."""
        serial, dot, channel = value.partition(".")
        if _PSEUDONYM.fullmatch(serial):
            return value
        replacement = self.replacements.get(serial)
        if replacement is None:
            replacement = self.privacy.serial(serial)
            self._remember(serial, replacement)
        return replacement + dot + channel

    def value(self, text: str) -> str:
        if not self.replacements:
            return text
        return _TOKEN.sub(self._token, text)

    def _token(self, match: re.Match) -> str:
        token = match.group(0)
        hit = self.replacements.get(token)
        if hit is not None:
            return hit
        head, dot, rest = token.partition(".")
        hit = self.replacements.get(head) if dot else None
        return hit + dot + rest if hit is not None else token

    def _remember(self, value: str, replacement: str) -> None:
        if len(value) >= 6:  # shorter values are too likely to hit unrelated text
            self.replacements[value] = replacement


def _envoy_serial_in_text(text: bytes) -> str:
    match = _TEXT_ENVOY_SERIAL.search(text)
    return match.group(1).decode("utf-8", "replace") if match else ""


# -- decoding ---------------------------------------------------------------------------------

def decode_raw(raw: RawPayload) -> list[Record]:
    """The records of a (redacted) report or response. Raises ReportError for a performance
    report or its response that cannot be read; other /emu_reports/ kinds (whose format is not
    public) give [] unless they hold a report this module knows."""
    strict = raw.kind.startswith("performance_report")
    try:
        xml, _ = split_form(_inflated(raw))
        root = parse_xml(xml)
    except ReportError:
        if strict:
            raise
        return []
    if root.tag == "perf_report":
        return _Report(root, raw).records()
    if root.tag == "perf_report_response":
        return _response_records(root, raw)
    if strict:
        raise ReportError(f"unexpected root element <{root.tag!s}> in a {raw.kind}")
    return []


def _response_records(root: etree._Element, raw: RawPayload) -> list[Record]:
    """The cloud's answer. It carries no time of its own, so its record is stamped with the
    proxy's receive time (`raw.received`) — the one exception to report time."""
    origin = raw.origin
    ids = [i for i in (e.get("id") for e in root.iter("event")) if i is not None]
    fields: dict[str, FieldValue] = {
        "status": root.get("status", ""), "events_acknowledged": len(ids), "event_ids": ",".join(ids)}
    status_code = raw.meta.get("status_code")
    if isinstance(status_code, int) and not isinstance(status_code, bool):
        fields["http_status"] = status_code
    fields.update(_unknown(root.attrib, {"status"}, fields))
    tags = {"envoy": origin.device} if origin.device else {}
    records = [Record("enphase_report_response", raw.received, tags, fields, origin)]
    elements = _Elements(raw.received, tags, origin)
    for el in root.iterdescendants():
        if isinstance(el.tag, str) and el.tag not in ("events_processed", "event"):
            elements.add(el)
    return records + elements.records


class _Report:
    """One `perf_report` decoded into records, in document order after the envoy record."""

    def __init__(self, root: etree._Element, raw: RawPayload) -> None:
        self.root = root
        try:
            self.timestamp = _int(root, "report_timestamp")
            self.time = utc_from_unix(self.timestamp)
        except _ELEMENT_ERRORS as exc:  # every report record needs it: nothing to stamp them with
            raise ReportError(f"perf_report without a usable report_timestamp ({exc})") from None
        self.envoy = next(root.iter("envoy"), None)
        serial = self.envoy.get("serial_num", "") if self.envoy is not None else ""
        self.origin = Origin(PROTOCOL, serial or raw.origin.device, raw.origin.connection, raw.origin.direction)
        self.tags = {"envoy": serial} if serial else {}
        self.elements = _Elements(self.time, self.tags, self.origin)

    def records(self) -> list[Record]:
        out: list[Record] = []
        counts = {"event": 0, "device": 0, "channel": 0, "interval": 0, "reading": 0}
        decoded: set[etree._Element] = set()
        for el in self.root.iterdescendants():
            if not isinstance(el.tag, str) or el is self.envoy:
                continue
            if el.tag == "message_params" and el.getparent() in decoded:
                continue  # part of its event's record
            decoder = _DECODERS.get(el.tag)
            if decoder is None:
                self.elements.add(el)
                continue
            try:
                out.append(decoder(self, el))
            except _ELEMENT_ERRORS as exc:
                self.elements.add(el, f"{type(exc).__name__}: {exc}")
            else:
                counts[el.tag] += 1
                if el.tag == "event":
                    decoded.add(el)
        return [self._envoy_record(counts), *out, *self.elements.records]

    def _envoy_record(self, counts: Mapping[str, int]) -> Record:
        """The report itself: the Envoy's identity (as redaction left it), the root attributes and
        how many records of each type the report held (a large count means a catch-up)."""
        fields: dict[str, FieldValue] = {"report_timestamp": self.timestamp}
        fields.update(_unknown(self.root.attrib, {"report_timestamp"}, fields))
        if self.envoy is not None:
            for name, value in self.envoy.attrib.items():
                if name in ("latitude", "longitude"):
                    number = _float_or_none(value)
                    if number is None:
                        fields[f"{name}_text"] = value
                    else:
                        fields[name] = number
                elif name != "serial_num":
                    fields[name] = value
        fields.update({f"{kind}_count": n for kind, n in counts.items()})
        return Record("enphase_envoy", self.time, self.tags, fields, self.origin)

    def _event(self, el: etree._Element) -> Record:
        """An event at its own `event_date`, shifted by (id mod 10⁶) µs.

        InfluxDB keeps one point per measurement + tags + timestamp, and event_date has one-second
        resolution: two events with the same eqid and code in the same second (a quick set and
        clear) would otherwise overwrite each other. The id is unique and monotonic, so the
        offset keeps them apart deterministically, keeps the point inside its stated second,
        orders events within a second by id, and makes an event the Envoy sends again (same id)
        the same point. Tagging the id instead would create a new series per event."""
        event_id = _int(el, "id")
        code = _int(el, "event_code")
        state = _int(el, "event_state")
        fields: dict[str, FieldValue] = {
            "id": event_id, "event_code": code, "state": EVENT_STATES.get(state, f"unknown-{state}"),
            "state_code": state}
        for name in ("correlation_id", "message_key"):
            if el.get(name) is not None:
                fields[name] = _int(el, name)
        serial = el.get("serial_num")
        if serial is not None:
            fields["serial_num"] = serial
        if code in EVENT_CODES:
            fields["description"] = EVENT_CODES[code]
        params = el.find("message_params")
        if params is not None:
            fields["message_params"] = params.text or ""
        fields.update(_unknown(el.attrib, _EVENT_ATTRIBUTES, fields))
        time = utc_from_unix(_int(el, "event_date")) + timedelta(microseconds=event_id % 1_000_000)
        return self._record("enphase_event", time, el, fields, code=str(code))

    def _device(self, el: etree._Element) -> Record:
        fields = self._state_fields(el, _DEVICE_INTS, {"part_num"})
        return self._record("enphase_device", self.time, el, fields)

    def _channel(self, el: etree._Element) -> Record:
        fields = self._state_fields(el, _CHANNEL_INTS, set())
        return self._record("enphase_channel", self.time, el, fields)

    def _state_fields(self, el: etree._Element, ints: frozenset[str], strs: set[str]) -> dict[str, FieldValue]:
        fields: dict[str, FieldValue] = {name: _int(el, name) for name in sorted(ints) if el.get(name) is not None}
        fields.update({name: value for name in sorted(strs) if (value := el.get(name)) is not None})
        fields.update(_unknown(el.attrib, ints | strs | {"eqid"}, fields))
        if not fields:
            raise ValueError("no state attributes")
        return fields

    def _interval(self, el: etree._Element) -> Record:
        """Energy of one channel over one interval ending at `end_date`. `stats` is one integer,
        joules (webcomm 4.6.0); a comma list (possibly the 3.0 form, meaning unconfirmed) is kept
        as the text `stats`. Intervals of one channel with the same end_date (a catch-up roll-up
        ending with a 5-minute one) are one InfluxDB point; filter on interval_duration_s."""
        duration = _int(el, "interval_duration")
        fields: dict[str, FieldValue] = {"id": _int(el, "id"), "interval_duration_s": duration}
        if el.get("stat_duration") is not None:
            fields["stat_duration_s"] = _int(el, "stat_duration")
        stats = el.get("stats", "")
        if stats and "," not in stats:
            joules = _int64(stats)
            fields["energy_j"] = joules
            fields["energy_wh"] = joules / 3600
            if duration > 0:
                fields["avg_power_w"] = joules / duration
        elif stats:
            fields["stats"] = stats
        fields.update(_unknown(el.attrib, _INTERVAL_ATTRIBUTES, fields))
        return self._record("enphase_interval", utc_from_unix(_int(el, "end_date")), el, fields)

    def _reading(self, el: etree._Element) -> Record:
        """Electrical readings of one channel over `duration` seconds ending at `date`.

        stats = AC mV, AC mHz, DC mV, DC mA, °C, two unknown counters, and (8-value form) joules
        over the duration (reference §2.6). The two unknowns are kept as `stats_5`/`stats_6`: they
        may be pwrConvErrSecs/pwrConvMaxErrCycles, but that is unverified."""
        stats = [_int64(v) for v in el.get("stats", "").split(",")]
        if len(stats) < 5:
            raise ValueError(f"reading stats has {len(stats)} values, expected at least 5")
        duration = _int(el, "duration")
        fields: dict[str, FieldValue] = {
            "id": _int(el, "id"),
            "duration_s": duration,
            "ac_voltage_v": stats[0] / 1000,
            "ac_frequency_hz": stats[1] / 1000,
            "dc_voltage_v": stats[2] / 1000,
            "dc_current_a": stats[3] / 1000,
            "temperature_c": float(stats[4]),
        }
        if el.get("flags") is not None:
            fields["flags"] = _int(el, "flags")
        for index, value in enumerate(stats[5:], start=5):
            if index == 7:
                fields["energy_j"] = value
                if duration > 0:
                    fields["avg_power_w"] = value / duration
            else:
                fields[f"stats_{index}"] = value
        fields.update(_unknown(el.attrib, _READING_ATTRIBUTES, fields))
        return self._record("enphase_reading", utc_from_unix(_int(el, "date")), el, fields)

    def _record(self, measurement: str, time: datetime, el: etree._Element, fields: dict[str, FieldValue],
                **extra_tags: str) -> Record:
        tags = dict(self.tags)
        eqid = el.get("eqid")
        if eqid:
            tags["eqid"] = eqid
        tags.update(extra_tags)
        return Record(measurement, time, tags, fields, self.origin)


#: What a malformed known element raises (missing or non-integer attribute, a date out of range):
#: the element is then kept as an `enphase_element` with the error.
_ELEMENT_ERRORS = (ValueError, KeyError, OverflowError, OSError)
_EVENT_ATTRIBUTES = frozenset({"id", "event_code", "event_state", "correlation_id", "eqid", "serial_num",
                               "event_date", "message_key"})
_DEVICE_INTS = frozenset({"condition_flags", "observed_flags", "control_bits", "image_bits", "device_type",
                          "admin_state"})
_CHANNEL_INTS = frozenset({"condition_flags", "observed_flags", "control_bits", "channel_type"})
_INTERVAL_ATTRIBUTES = frozenset({"id", "eqid", "end_date", "interval_duration", "stat_duration", "stats"})
_READING_ATTRIBUTES = frozenset({"id", "eqid", "date", "duration", "flags", "stats"})

_DECODERS: dict[str, Callable[[_Report, etree._Element], Record]] = {
    "event": _Report._event,
    "device": _Report._device,
    "channel": _Report._channel,
    "interval": _Report._interval,
    "reading": _Report._reading,
}


class _Elements:
    """`enphase_element` records for elements this module does not know (or could not read):
    their attributes and text as str fields, tagged with the element name and its ordinal among
    same-named elements of the payload, so two of them never collide into one point. Wrapper
    elements without attributes or text add nothing and are skipped."""

    def __init__(self, time: datetime, tags: Mapping[str, str], origin: Origin) -> None:
        self.time, self.tags, self.origin = time, tags, origin
        self.records: list[Record] = []
        self._seen: dict[str, int] = {}

    def add(self, el: etree._Element, error: str | None = None) -> None:
        tag = el.tag
        assert isinstance(tag, str), "an element, not a comment or processing instruction"
        fields: dict[str, FieldValue] = dict(el.attrib)
        text = (el.text or "").strip()
        if text:
            fields["text"] = text
        if not fields and error is None:
            return
        if error is not None:
            fields["decode_error"] = error
        parent = el.getparent()
        if parent is not None:
            fields["parent"] = str(parent.tag)  # the parent of a parsed element: its tag is a str already
        n = self._seen.get(tag, 0)
        self._seen[tag] = n + 1
        tags = {**self.tags, "element": tag, "n": str(n)}
        self.records.append(Record("enphase_element", self.time, tags, fields, self.origin))


def _unknown(attrib: etree._Attrib, known: frozenset[str] | set[str],
             taken: Mapping[str, FieldValue]) -> dict[str, str]:
    """Attributes this module does not know, as str fields under their own names (a later
    version that learns one gives its typed value a new name, so the type never flips)."""
    return {name: value for name, value in attrib.items() if name not in known and name not in taken}


def _int(el: etree._Element, name: str) -> int:
    value = el.get(name)
    if value is None:
        raise KeyError(f"<{el.tag!s}> has no {name}")
    try:
        return _int64(value)
    except ValueError as exc:
        raise ValueError(f"<{el.tag!s}> {name}: {exc}") from None


def _int64(text: str) -> int:
    """An integer InfluxDB can store (a bigger one would make it reject the whole write)."""
    number = int(text)
    if not -(2**63) <= number < 2**63:
        raise ValueError(f"{text!r} is out of the 64-bit range")
    return number


def _float_or_none(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None
