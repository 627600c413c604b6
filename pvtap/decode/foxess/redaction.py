"""FoxESS redaction: what `redact_raw` removes or pseudonymises.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json

from pvtap.privacy import REDACTED, Privacy, pseudonym
from pvtap.records import RawPayload

from .framing import (
    BATTERY_SERIAL_SLOT,
    BATTERY_SERIALS,
    BLE_SET_WIFI,
    FIRMWARE_CHUNK,
    FIRMWARE_METADATA,
    HEADERS,
    HUB_LOGIN,
    MAX_DATAGRAM_KEPT,
    MODULE_INFO,
    REGISTRATION,
    Frame,
    hub_channel,
    parse_frame,
)
from .payloads import (
    battery_serials,
    decode_module_info,
    hub_login,
    parse_firmware_metadata,
    parse_registration,
    parse_wifi_setup,
)

# -- redaction -------------------------------------------------------------------------------

def redact_raw(raw: RawPayload, privacy: Privacy) -> RawPayload:
    """Serials become pseudonyms (when enabled) in the bytes, the meta and the origin alike, so
    the stored frame and the records agree; WiFi passwords are always removed, SSIDs and MACs
    unless network identity is kept; firmware images are never stored (metadata only).
    Redacted frames are rebuilt with a correct CRC."""
    meta = dict(raw.meta)
    payload = raw.payload
    origin = dataclasses.replace(raw.origin, device=_device_label(raw.origin.device, privacy))
    if meta.get("serial"):
        meta["serial"] = privacy.serial(str(meta["serial"]))
    if raw.kind == "frame":
        frame = parse_frame(payload)
        redacted = _redact_frame(frame, privacy, meta)
        if redacted != frame.payload:
            payload = dataclasses.replace(frame, payload=redacted).encode()
            meta["redacted"] = True
    elif raw.kind == "datagram":
        payload = _redact_datagram(payload, privacy, meta)
    return RawPayload(origin, raw.kind, payload, raw.received, meta)


def _device_label(device: str, privacy: Privacy) -> str:
    """A serial becomes its pseudonym (when enabled); a peer address is dropped unless kept."""
    host = device.rpartition(":")[0].strip("[]") if device.count(":") == 1 or device.startswith("[") else device
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return privacy.serial(device)
    return device if privacy.keep_network_identity else ""


def _replace(p: bytes, span: tuple[int, int], new: bytes) -> bytes:
    """Replace the length-prefixed string at span[0] (length byte included) with `new`."""
    return p[:span[0]] + bytes([len(new)]) + new + p[span[1]:]


def _redact_frame(frame: Frame, privacy: Privacy, meta: dict) -> bytes:
    p, code = frame.payload, frame.function

    def pseudo(serial: str) -> bytes:
        return privacy.serial(serial).encode()

    if code == FIRMWARE_CHUNK:  # keep the transfer id and index, never the image
        meta["firmware_chunk_bytes"] = max(len(p) - 7, 0)
        return p[:7]
    if code == BLE_SET_WIFI and p:
        ssid, _, (start, end) = parse_wifi_setup(p)
        keep = ssid.encode() if privacy.keep_network_identity else REDACTED.encode()
        return p[:start] + bytes([len(keep)]) + keep + bytes([len(REDACTED)]) + REDACTED.encode() + p[end:]
    if not privacy.pseudonym_key:  # the rest only replaces serials by pseudonyms
        return p
    if code == REGISTRATION:
        reg = parse_registration(p)
        return _replace(p, reg.serial_span, pseudo(reg.serial))
    if code == MODULE_INFO:
        serial = decode_module_info(p)[1]
        return p[:6] + pseudo(serial) if serial else p
    if code == BATTERY_SERIALS:
        serials = [pseudo(s) for s in battery_serials(p)]
        slot = max([BATTERY_SERIAL_SLOT, *map(len, serials)])
        meta["serial_slot"] = slot
        return b"".join(s.ljust(slot, b"\0") for s in serials)
    if code == FIRMWARE_METADATA:
        md = parse_firmware_metadata(p)
        return _replace(p, md.serial_span, pseudo(md.serial))
    if hub_channel(frame) and frame.stamp & 0xFF == HUB_LOGIN:
        login = hub_login(p)[0].encode()
        if not login:
            return p
        at = p.index(login)
        if at and p[at - 1] == len(login):
            return _replace(p, (at - 1, at + len(login)), pseudo(login.decode()))
        return p[:at] + pseudo(login.decode()) + p[at + len(login):]
    return p


def _redact_datagram(p: bytes, privacy: Privacy, meta: dict) -> bytes:
    if p[:1] == b"{" and not privacy.keep_network_identity:
        try:
            message = json.loads(p)
        except ValueError:
            message = None
        if isinstance(message, dict) and isinstance(message.get("payload"), dict) and "mac" in message["payload"]:
            message["payload"]["mac"] = _mac(str(message["payload"]["mac"]), privacy)
            return json.dumps(message, separators=(",", ":")).encode()
    if p[:2] in HEADERS:
        return p
    if len(p) > MAX_DATAGRAM_KEPT:  # not ours: keep a sample and the size
        meta["datagram_bytes"] = len(p)
        return p[:MAX_DATAGRAM_KEPT]
    return p


def _mac(mac: str, privacy: Privacy) -> str:
    if privacy.keep_network_identity:
        return mac
    return pseudonym(mac.lower(), privacy.pseudonym_key) if privacy.pseudonym_key else REDACTED

