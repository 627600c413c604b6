"""The Envoy upload's envelope: paths, zlib, the `body=` form, safe XML parsing and the cloud's answer.
"""

from __future__ import annotations

import re
import threading
import urllib.parse
import zlib
from codecs import escape_decode as _escape_decode
from collections.abc import Iterable
from typing import NamedTuple

from lxml import etree

from pvtap.records import RawPayload

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


def _inflate_bounded(data: bytes, wbits: int, max_size: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(data, max_size + 1)
    if len(out) > max_size:
        raise PayloadTooLarge(f"body inflates beyond {max_size} bytes (compressed {len(data)} bytes)")
    if not inflater.eof:
        raise zlib.error("incomplete or truncated stream")
    return out


def report_xml(body: bytes, content_type: str | None) -> tuple[bytes, dict[str, str]]:
    """(XML, other form fields) of a request or response body as sent."""
    return split_form(inflate(body, content_type))


def split_form(text: bytes) -> tuple[bytes, dict[str, str]]:
    """(XML, other form fields) of an inflated body: a `body=<url-encoded XML>&…` form (`+` and
    `%20` both decode to a space) or bare XML."""
    if not text.strip():
        raise ReportError("empty body")
    if looks_like_xml(text):
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
        raise ReportError(f"body is neither XML nor a form with a 'body' field ({len(fields)} other fields)")
    return xml, fields


def looks_like_xml(text: bytes) -> bool:
    return text.lstrip()[:1] == b"<" or text.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"))


def inflated(raw: RawPayload) -> bytes:
    """The inflated text of a payload in any of the stored encodings (or as sent)."""
    if raw.meta.get("encoding") in ("xml", "text") or looks_like_xml(raw.payload):
        return bytes(raw.payload)
    return inflate(raw.payload, raw.meta.get("content_type"))  # type: ignore[arg-type]


def _form_unquote(value: bytes) -> bytes:
    """urllib.parse.unquote_to_bytes with `+` as space, some fifteen times as fast on a large
    report: every `\\` is first written as the escape `\\x5c` and every `%` as `\\x`, then
    `escape_decode` (the C decoder of bytes literals' escapes, bytes to bytes; the stdlib's own
    pickle uses it) turns the `\\xXX` escapes into bytes and copies every other byte. A `%` not
    followed by two hex digits makes it fail; such input takes the stdlib's exact path."""
    value = value.replace(b"+", b" ")
    if b"%" not in value:
        return value
    try:
        escaped = value.replace(b"\\", b"\\x5c").replace(b"%", b"\\x")
        return _escape_decode(escaped)[0]
    except ValueError:
        return urllib.parse.unquote_to_bytes(value)


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


#: The declarations a plain UTF-8 document may start with (lxml's serialisation, the Envoy's).
_UTF8_DECLARATION = re.compile(rb"<\?xml version=(['\"])1\.0\1 encoding=(['\"])(?i:utf-8)\2\?>")


def utf8_markup(xml: bytes) -> int | None:
    """Where the markup of a UTF-8 document starts (after its XML declaration), or None for a
    document that may be in another encoding (another declaration, a byte order mark, leading
    space: rare enough to be left to the checks on the tree)."""
    if xml[:2] == b"<?":
        declaration = _UTF8_DECLARATION.match(xml)
        return declaration.end() if declaration is not None else None
    return 0 if xml[:1] == b"<" else None


def plain_markup(xml: bytes) -> bool:
    """UTF-8 markup of elements, attributes and text only (an XML declaration at the start): no
    comment, CDATA section, DOCTYPE, processing instruction or namespace declaration. In such a
    text every attribute or element name written is one of the tree's, under that name, and every
    value the tree holds is written as it is or with an entity (`&`)."""
    start = utf8_markup(xml)
    return start is not None and b"xmlns" not in xml \
        and (xml.find(b"?", start) < 0 or xml.find(b"<?", start) < 0) \
        and (b"!" not in xml or b"<!" not in xml)  # ("?" and "!" are rare: found by memchr, no "<" tried)


class ReportReading(NamedTuple):
    """A report as the live path reads it, once: `redact_raw` parses and redacts the tree, and
    the stored payload (`source`) is what the tree was parsed from or the tree's serialisation
    (`redaction.redact_raw`); `decode_raw` takes the tree from the payload
    (`RawPayload.parsed`) instead of parsing those bytes again. Nothing changes the tree after."""

    source: bytes
    root: etree._Element


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

