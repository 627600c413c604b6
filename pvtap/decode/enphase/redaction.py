"""Enphase redaction: network identity removed, serials pseudonymised, failing closed.
"""

from __future__ import annotations

import re
import urllib.parse

from lxml import etree

from pvtap.privacy import REDACTED, Privacy
from pvtap.records import Origin, RawPayload

from ..withhold import is_withheld, redacted_origin, withhold
from .envelope import (
    PayloadTooLarge,
    ReportError,
    ReportReading,
    inflated,
    parse_xml,
    plain_markup,
    split_form,
    utf8_markup,
)

#: The documents whose layout is known (reference §2): anything else is withheld.
KNOWN_DOCUMENTS = frozenset({"perf_report", "perf_report_response"})
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


def redact_raw(raw: RawPayload, privacy: Privacy) -> RawPayload:
    """The payload as it may be stored: the report parsed, network identity removed (unless
    kept) and serials pseudonymised (when a key is set), stored as XML (`encoding: "xml"`): the
    redacted text itself when the checks on the tree found nothing left to do and the text is
    plain markup (no comment or PI the parse dropped unseen), else the tree serialised.
    A body that does not get that far — not zlib, cut off, over the size bounds, XML that does not
    parse — is withheld (`pvtap.decode.withhold`), since no part of it was positively redacted;
    with `keep_unredacted` it is kept as received (`encoding: "original"`). Never raises."""
    meta = {**raw.meta, "original_size": len(raw.payload)}
    origin = redacted_origin(raw.origin, privacy)
    if is_withheld(raw):
        return withhold(raw, str(raw.meta["withheld"]), privacy, origin=origin, meta=meta)
    scrub = _Scrubber(privacy)
    try:
        xml, fields = split_form(inflated(raw))
        text = scrub.identities_in_text(xml)
        root = parse_xml(text)
    except PayloadTooLarge as exc:
        return withhold(raw, f"too large: {exc}", privacy, origin=origin, meta={**meta, "encoding": "original"})
    except ReportError as exc:
        return withhold(raw, f"does not decode: {exc}", privacy, origin=origin, meta={**meta, "encoding": "original"})
    if root.tag not in KNOWN_DOCUMENTS:  # no schema to say where its identities are
        return withhold(raw, f"unknown document <{root.tag!s}>", privacy, origin=origin,
                        meta={**meta, "encoding": "original"})
    plain = plain_markup(text)
    if scrub.tree(root, text if plain else None) or not plain:
        payload = etree.tostring(root, encoding="utf-8", xml_declaration=True)
    else:  # the text pass did all the tree pass would have, and the text holds only what the tree does
        payload = text
    envoy = next(root.iter("envoy"), None)
    device = envoy.get("serial_num", "") if envoy is not None else ""
    if fields:
        meta["form_fields"] = urllib.parse.urlencode({k: scrub.value(v) for k, v in fields.items()})
    meta["encoding"] = "xml"
    if device:
        origin = Origin(origin.protocol, device, origin.connection, origin.direction)
    return RawPayload(origin, raw.kind, payload, raw.received, meta, ReportReading(payload, root))


_NETWORK_XPATH = etree.XPath("|".join(f"//@{name}" for name in NETWORK_ATTRIBUTES))
_WITH_SERIAL = etree.XPath("//*[" + " or ".join(f"@{name}" for name in SERIAL_ATTRIBUTES) + "]")
_SERIAL_VALUES = etree.XPath("|".join(f"//@{name}" for name in SERIAL_ATTRIBUTES), smart_strings=False)
#: A serial attribute as an Envoy writes it (a space before, double quotes, an ASCII value), split
#: into its start and its value; any other spelling is left to `_Scrubber.tree`.
_SERIAL_IN_TEXT = re.compile(rb'( (?:' + "|".join(SERIAL_ATTRIBUTES).encode() + rb')=")([0-9A-Za-z._-]+)(?=")')
#: Parts of every network attribute's name (in plain markup, a tree without them has none of those).
_NETWORK_NAME_PARTS = (b"_addr", b"itude")
#: A network attribute written so (double quotes, printable ASCII but `"&<>`: its value as the tree has it).
_NETWORK_IN_TEXT = re.compile(rb' (?:' + "|".join(NETWORK_ATTRIBUTES).encode() + rb')="([ !#-%\'-;=?-~]*)"')
#: A serial attribute written otherwise than as a pseudonym in double quotes (`_serials_done`).
_NOT_PSEUDONYMISED = tuple(re.compile(name.encode() + rb'(?!="anon-[0-9a-f]{12}[".])') for name in SERIAL_ATTRIBUTES)
_NO_IDENTITY_ATTRIBUTES = _PLAIN_ATTRIBUTES | set(SERIAL_ATTRIBUTES)  # (serials: already replaced)
#: Every text or tail that is not just whitespace: where identities found elsewhere may also turn
#: up, as in any attribute but the known ones (found in C; a report has thousands of elements).
_FREE_TEXT = etree.XPath("//text()[normalize-space()]")
_PSEUDONYM = re.compile(r"anon-[0-9a-f]{12}")
#: Identity-shaped tokens in free text (serials, IPs, MACs, coordinates), looked up in the values
#: found in this report's identity attributes.
_TOKEN = re.compile(r"[0-9A-Za-z:._-]{6,}")


class _Scrubber:
    """Applies one report's redaction, remembering every identity value it removed or replaced
    so the same values can also be scrubbed where they turn up in free text."""

    def __init__(self, privacy: Privacy) -> None:
        self.privacy = privacy
        self.replacements: dict[str, str] = {}
        self._pseudonyms: set[str] = set()  # what identities_in_text wrote

    def tree(self, root: etree._Element, text: bytes | None) -> bool:
        """Redact a parsed report in place (XPath finds the attributes in C: a 500 + 500 report
        has some 7000 attributes, of which only the eqids need touching; an element's other
        attributes are looked at only when it has one outside the known ones). `text` is what
        `root` was parsed from when that is plain markup (`plain_markup`), else None. True when
        the tree may have changed."""
        changed = False
        if not self.privacy.keep_network_identity \
                and (text is None or any(part in text for part in _NETWORK_NAME_PARTS)):
            for value in _NETWORK_XPATH(root):
                el = value.getparent()
                self._remember(str(value), REDACTED)
                del el.attrib[value.attrname]
                changed = True
        if self.privacy.pseudonym_key and not self._serials_done(root, text):
            changed = True
            done: dict[str, str] = {}  # a report names each device in many elements
            for el in _WITH_SERIAL(root):
                for name in SERIAL_ATTRIBUTES:
                    value = el.get(name)
                    if value:
                        new = done.get(value)
                        if new is None:
                            new = done[value] = self.eqid(value)
                        el.set(name, new)
        if self.replacements and not self._nothing_else_to_scrub(text):
            changed = True
            plain = _NO_IDENTITY_ATTRIBUTES.issuperset
            for el in root.iter():
                if not plain(el.keys()):
                    for name, value in el.items():
                        if name not in _NO_IDENTITY_ATTRIBUTES:
                            el.set(name, self.value(value))
            for node in _FREE_TEXT(root):
                parent = node.getparent()
                if node.is_tail:
                    parent.tail = self.value(str(node))
                else:
                    parent.text = self.value(str(node))
        return changed

    def identities_in_text(self, xml: bytes) -> bytes:
        """The XML with the serials of plainly written `eqid`/`serial_num` attributes already
        pseudonymised (when a key is set) and, in a UTF-8 document, plainly written network
        attributes removed (unless kept): one C pass over the text instead of a thousand
        attribute writes on the tree. Only a shortcut: `tree` then checks on the parsed tree that
        every serial attribute holds a pseudonym (`_serials_done`) and that no network attribute
        is left, and redacts any it finds (an entity, another encoding). A match elsewhere (a
        comment, another attribute's value) only puts a serial's pseudonym where the free-text
        scrub would have put it anyway, or removes a network identity from there outright."""
        if self.privacy.pseudonym_key:
            xml = self._serials_in_text(xml)
        if not self.privacy.keep_network_identity and utf8_markup(xml) is not None:
            xml = _NETWORK_IN_TEXT.sub(self._network_match, xml)
        return xml

    def _network_match(self, match: re.Match) -> bytes:
        self._remember(match.group(1).decode("ascii"), REDACTED)
        return b""

    def _serials_in_text(self, xml: bytes) -> bytes:
        """Split around the serial values, each distinct one pseudonymised once (a report names
        each device in a hundred elements), joined again: no Python call per attribute."""
        parts = _SERIAL_IN_TEXT.split(xml)  # text, attribute start, value, text, …
        values = parts[2::3]
        written: dict[bytes, bytes] = {}
        for value in set(values):
            new = self.eqid(value.decode("ascii"))
            self._pseudonyms.add(new)
            written[value] = new.encode("ascii")
        parts[2::3] = map(written.__getitem__, values)
        return b"".join(parts)

    def _serials_done(self, root: etree._Element, text: bytes | None) -> bool:
        """Every non-empty serial attribute of the tree holds a pseudonym (as `eqid` leaves it).
        In plain markup every serial attribute is written under its name, so when each name in
        the text is followed by a pseudonym in double quotes, the tree holds those; otherwise the
        tree's values are each looked up among those `identities_in_text` wrote."""
        if text is not None and not any(p.search(text) for p in _NOT_PSEUDONYMISED):
            return True
        values = set(_SERIAL_VALUES(root))
        values.discard("")  # an empty serial is left as it is
        return values <= self._pseudonyms

    def _nothing_else_to_scrub(self, text: bytes | None) -> bool:
        """No identity found in this report is written anywhere in plain markup without
        character references (`&#`): then no attribute value or text of the tree holds one, and
        the scrub of free text would change nothing."""
        return text is not None and b"&#" not in text \
            and not any(value.encode("utf-8") in text for value in self.replacements)

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


