"""Enphase redaction: network identity removed, serials pseudonymised (package docstring).
"""

from __future__ import annotations

import re
import urllib.parse

from lxml import etree

from pvtap.privacy import REDACTED, Privacy
from pvtap.records import Origin, RawPayload

from .envelope import (
    PayloadTooLarge,
    ReportError,
    inflate_truncated,
    inflated,
    parse_xml,
    split_form,
)

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


# -- redaction --------------------------------------------------------------------------------

def redact_raw(raw: RawPayload, privacy: Privacy) -> RawPayload:
    """The payload as it may be stored: network identity removed (unless kept), serials
    pseudonymised (when a key is set). Never raises; see the module docstring for the three
    encodings it produces."""
    meta = {**raw.meta, "original_size": len(raw.payload)}
    try:
        text = inflated(raw)
    except PayloadTooLarge:
        return _with(raw, raw.payload, raw.origin.device, {**meta, "encoding": "original"})
    except ReportError:
        truncated = inflate_truncated(raw.payload)
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

