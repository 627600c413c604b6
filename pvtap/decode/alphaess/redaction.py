"""AlphaESS redaction: what `redact_raw` removes or pseudonymises (package docstring).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any

from pvtap.privacy import REDACTED, Privacy
from pvtap.records import RawPayload

from .framing import SYNC, AlphaFrame, encode_frame, parse_frame
from .records import encode_json, json_body

# -- redaction --------------------------------------------------------------------------------

#: Redacted always (reference §4).
SECRET_KEYS = frozenset({"Password", "License", "Address", "ZipCode", "PhoneNumber"})
#: Location: redacted unless privacy.keep_network_identity.
LOCATION_KEYS = frozenset({"Country"})
#: Serials: replaced by their pseudonym when privacy.pseudonym_key is set.
SERIAL_KEYS = frozenset({"SN", "UserName", "InvSN", "WifiSN", "BakBoxSN", "SCBSN"}
                        | {f"BatterySN{i}" for i in range(1, 19)})
_VALUE_END = re.compile(r'"(?=\s*[,}\]])')
_PRINTABLE = re.compile(r"[\x20-\x7e\t\r\n]*")
_MAC = re.compile(r"(MAC:\s*)[0-9A-Fa-f]{2}(?:[ :-]?[0-9A-Fa-f]{2}){5}")


class _Redaction:
    """What one payload's redaction changed, for the raw payload's meta."""

    def __init__(self, privacy: Privacy) -> None:
        self.privacy = privacy
        self.redacted: set[str] = set()
        self.pseudonymised: set[str] = set()

    def value(self, key: str, value: Any) -> Any:
        if key in SECRET_KEYS or (key in LOCATION_KEYS and not self.privacy.keep_network_identity):
            if value != REDACTED:
                self.redacted.add(key)
            return REDACTED
        if key in SERIAL_KEYS and self.privacy.pseudonym_key and isinstance(value, str) and value:
            self.pseudonymised.add(key)
            return self.privacy.serial(value)
        if key == "MsgContent" and isinstance(value, str) and not self.privacy.keep_network_identity:
            cleaned = _MAC.sub(rf"\g<1>{REDACTED}", value)
            if cleaned != value:
                self.redacted.add("MAC")
            return cleaned
        if isinstance(value, dict):
            return {k: self.value(k, v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(key, v) for v in value]
        return value

    def csv(self, body: bytes) -> bytes:
        lines = body.decode("utf-8", errors="surrogateescape").split("\n")
        header: list[str] = []
        for i, line in enumerate(lines):
            cells = line.split(",")
            if cells[0].strip() == "Date":
                header = [c.strip() for c in cells]
                continue
            changed = [self.value(header[j], c) if j < len(header) and c else c for j, c in enumerate(cells)]
            lines[i] = ",".join(changed)
        return "\n".join(lines).encode("utf-8", errors="surrogateescape")

    def text(self, data: bytes, *, fragment: bool) -> bytes:
        """Bytes that are not a parsable body (garbage, partial frames, a frame's non-JSON body):
        redact what JSON key/value pairs and CSV serials can be recognised, complete or cut off.
        `fragment`: the bytes were cut out of a stream, so they may begin inside a string."""
        text = data.decode("latin-1")
        if fragment and not SYNC.match(data) and not data.startswith(b"{"):
            text = self._leading_fragment(text)
        keys = SECRET_KEYS | (set() if self.privacy.keep_network_identity else LOCATION_KEYS)
        if self.privacy.pseudonym_key:
            keys |= SERIAL_KEYS
        pattern = re.compile(r'"(' + "|".join(sorted(keys)) + r')"(\s*:\s*)("(?:[^"\\]|\\.)*(?:"|$)|[^,}\]\s"]+)')

        def pair(m: re.Match[str]) -> str:
            key, sep, raw = m.groups()
            if not raw.startswith('"'):
                return f'"{key}"{sep}"{self.value(key, raw)}"'
            closed = len(raw) > 1 and raw.endswith('"')  # else cut off at the end of the bytes
            new = self.value(key, raw[1:-1] if closed else raw[1:])
            return f'"{key}"{sep}"{new}"' if closed else f'"{key}"{sep}"{new}'

        text = pattern.sub(pair, text)
        if self.privacy.pseudonym_key:
            text = re.sub(r"(?m)^(\d{4}/\d{1,2}/\d{1,2},\d{1,2}:\d{2}:\d{2},)([^,\n]+)",
                          lambda m: m.group(1) + self.value("SN", m.group(2)), text)
        if not self.privacy.keep_network_identity:
            cleaned = _MAC.sub(rf"\g<1>{REDACTED}", text)
            if cleaned != text:
                self.redacted.add("MAC")
            text = cleaned
        return text.encode("latin-1")

    def _leading_fragment(self, text: str) -> str:
        """Bytes that do not start at a frame header may start inside a JSON string, or inside
        the key before it, where no key shows what the value is: everything up to the end of the
        first string value goes. Text without one is all fragment; binary bytes stay."""
        end = _VALUE_END.search(text)
        if end is None and not _PRINTABLE.fullmatch(text):
            return text
        self.redacted.add("fragment")
        return REDACTED + (text[end.start():] if end else "")

    def meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        out = dict(meta)
        if self.redacted:
            out["redacted"] = ",".join(sorted(self.redacted))
        if self.pseudonymised:
            out["pseudonymised"] = ",".join(sorted(self.pseudonymised))
        return out


def _redacted_body(frame: AlphaFrame, redaction: _Redaction) -> bytes:
    if not frame.body:
        return frame.body
    if frame.type == 12:
        return redaction.csv(frame.body)
    parsed = json_body(frame.body)
    if parsed is None:
        return redaction.text(frame.body, fragment=False)
    redacted = redaction.value("", parsed)
    return frame.body if redacted == parsed and not redaction.redacted else encode_json(redacted)


def redact_raw(raw: RawPayload, privacy: Privacy) -> RawPayload:
    """The payload as it may be stored: secrets replaced by REDACTED, serials pseudonymised when
    asked, a network address as device label dropped unless kept (see module docstring)."""
    device = _device_label(raw.origin.device, privacy)
    origin = dataclasses.replace(raw.origin, device=device) if device != raw.origin.device else raw.origin
    redaction = _Redaction(privacy)
    if raw.kind == "frame":
        frame = parse_frame(raw.payload)
        body = _redacted_body(frame, redaction)
        payload = raw.payload if body == frame.body else encode_frame(frame.b1, frame.type, body)
    elif raw.kind in ("garbage", "partial"):
        payload = redaction.text(raw.payload, fragment=True)
    else:  # "opaque": a few header bytes only
        payload = raw.payload
    return RawPayload(origin, raw.kind, payload, raw.received, redaction.meta(dict(raw.meta)))


def _device_label(device: str, privacy: Privacy) -> str:
    if not device:
        return device
    if not privacy.keep_network_identity and _is_address(device):
        return ""
    return privacy.serial(device)


def _is_address(label: str) -> bool:
    """`192.0.2.1`, `192.0.2.1:51234`, `[2001:db8::1]:51234`, `2001:db8::1`."""
    host = label
    if label.startswith("["):
        host = label[1:].partition("]")[0]
    elif label.count(":") == 1:
        host = label.partition(":")[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

