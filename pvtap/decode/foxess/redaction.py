"""FoxESS redaction: what `redact_raw` stores of each payload, failing closed.

A frame is stored when its layout is known: serials become pseudonyms (when enabled) in the
bytes, the meta and the origin alike, so the stored frame and the records agree; WiFi passwords
are always removed, SSIDs and MACs unless network identity is kept; firmware images are never
stored (metadata only); a changed frame is rebuilt with a correct CRC. Everything else is
withheld (`pvtap.decode.withhold`: size + SHA-256 + reason, unless `keep_unredacted`): rejected
bytes, a frame cut off at the end of a connection, an opaque (TLS) sample, frames of undocumented
function codes or lengths (their function, family and length stay in meta, so they still give a
`foxess_unknown_frame` record), a frame whose known layout does not parse, and any frame in which
the device's serial still shows after pseudonymisation.
"""

from __future__ import annotations

import json

from pvtap.privacy import REDACTED, Privacy, pseudonym
from pvtap.records import RawPayload

from ..withhold import is_withheld, redacted_origin, withhold
from .framing import (
    BATTERY_SERIAL_SLOT,
    BATTERY_SERIALS,
    BLE_SET_WIFI,
    BLE_STATUS,
    FIRMWARE_CHUNK,
    FIRMWARE_METADATA,
    H1_PRODUCT_INFO_LENGTH,
    HEADERS,
    HUB_HEARTBEAT,
    HUB_LOGIN,
    MODULE_INFO,
    PRODUCT_INFO,
    REALTIME,
    REGISTRATION,
    Frame,
    FrameError,
    FrameReading,
    hub_channel,
    read_frame,
)
from .payloads import (
    REALTIME_LENGTHS,
    battery_serials,
    decode_module_info,
    hub_login,
    parse_firmware_metadata,
    parse_registration,
    parse_wifi_setup,
)
from .records import DECODERS


class _Unknown(Exception):
    """A frame whose layout this module does not know: its bytes cannot be vouched for."""


def redact_raw(raw: RawPayload, privacy: Privacy) -> RawPayload:
    """The payload as it may be stored (module docstring)."""
    meta = dict(raw.meta)
    origin = redacted_origin(raw.origin, privacy)
    serial = str(meta.get("serial") or "")
    if serial:
        meta["serial"] = privacy.serial(serial)
    if is_withheld(raw):
        return withhold(raw, str(raw.meta["withheld"]), privacy, origin=origin, meta=meta)
    if raw.kind == "frame":
        return _redact_frame_payload(raw, privacy, origin, meta, serial)
    if raw.kind == "datagram":
        return _redact_datagram(raw, privacy, origin, meta)
    reason = {"garbage": "bytes in no frame", "partial": "a frame cut off at the end of the connection",
              "opaque": "an opaque stream's sample"}.get(raw.kind, f"payload kind {raw.kind!r}")
    return withhold(raw, reason, privacy, origin=origin, meta=meta)


def _redact_frame_payload(raw: RawPayload, privacy: Privacy, origin, meta: dict, serial: str) -> RawPayload:
    reading = raw.parsed_as(FrameReading)
    if reading is None:  # a payload from elsewhere (a replay, an import, a datagram): read its bytes
        try:
            reading = read_frame(raw.payload)
        except FrameError as exc:
            return withhold(raw, f"not one frame: {exc}", privacy, origin=origin, meta=meta)
    frame = reading.frame
    try:
        redacted = _redact_frame(frame, privacy, meta)
    except _Unknown as exc:
        meta.update({"function": frame.function, "family": f"{frame.family:02x}",
                     "payload_length": len(frame.payload)})
        return withhold(raw, str(exc), privacy, origin=origin, meta=meta)
    except (FrameError, IndexError, ValueError) as exc:
        return withhold(raw, f"function {frame.function:#04x} does not parse: {exc}", privacy, origin=origin,
                        meta=meta)
    if privacy.pseudonym_key and _shows_serial(redacted, serial, raw.origin.device):
        return withhold(raw, "the device serial shows outside the fields pseudonymised", privacy, origin=origin,
                        meta=meta)
    if redacted != frame.payload:
        frame = Frame(frame.family, frame.function, frame.stamp, redacted)
        reading = FrameReading(frame.encode(), frame)
        meta["redacted"] = True
        return RawPayload(origin, raw.kind, reading.source, raw.received, meta, reading)
    return RawPayload(origin, raw.kind, raw.payload, raw.received, meta, reading)


def _shows_serial(payload: bytes, serial: str, device: str) -> bool:
    """Whether the connection's serial or device label shows in the payload (each searched
    once: they are usually the same; `find` runs faster here than `in`)."""
    if len(serial) >= 6 and payload.find(serial.encode("utf-8", "replace")) >= 0:
        return True
    return device != serial and len(device) >= 6 and payload.find(device.encode("utf-8", "replace")) >= 0


def _replace(p: bytes, span: tuple[int, int], new: bytes) -> bytes:
    """Replace the length-prefixed string at span[0] (length byte included) with `new`."""
    return p[:span[0]] + bytes([len(new)]) + new + p[span[1]:]


def _redact_frame(frame: Frame, privacy: Privacy, meta: dict) -> bytes:
    """The payload as it may be stored; _Unknown for a layout this module cannot vouch for,
    FrameError (or another ValueError) for a known one that does not parse."""
    p, code = frame.payload, frame.function

    def pseudo(serial: str) -> bytes:
        return privacy.serial(serial).encode()

    if code not in DECODERS:
        raise _Unknown(f"undocumented function {code:#04x}")
    if code == REALTIME and len(p) not in REALTIME_LENGTHS:
        raise _Unknown(f"realtime block of an undocumented length ({len(p)} bytes)")
    if code == PRODUCT_INFO and len(p) != H1_PRODUCT_INFO_LENGTH and len(p) < 80:
        raise _Unknown(f"product info of an undocumented length ({len(p)} bytes)")
    if code == FIRMWARE_CHUNK:  # keep the transfer id and index, never the image
        meta["firmware_chunk_bytes"] = max(len(p) - 7, 0)
        return p[:7]
    if code == BLE_SET_WIFI and p:
        ssid, _, (start, end) = parse_wifi_setup(p)
        if end != len(p):
            raise FrameError(f"{len(p) - end} bytes follow the WiFi password")
        keep = ssid.encode() if privacy.keep_network_identity else REDACTED.encode()
        return p[:start] + bytes([len(keep)]) + keep + bytes([len(REDACTED)]) + REDACTED.encode()
    if code == BLE_STATUS and len(p) not in (1, 4) and not privacy.keep_network_identity:
        raise _Unknown("a WiFi scan reply (the SSIDs around the device)")
    channel = hub_channel(frame)
    if channel and frame.stamp & 0xFF not in (HUB_LOGIN, HUB_HEARTBEAT):
        raise _Unknown(f"hub channel op {frame.stamp & 0xFF:#04x}")
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
    if channel and frame.stamp & 0xFF == HUB_LOGIN:
        login = hub_login(p)[0].encode()
        if not login:
            return p
        at = p.index(login)
        if at and p[at - 1] == len(login):
            return _replace(p, (at - 1, at + len(login)), pseudo(login.decode()))
        return p[:at] + pseudo(login.decode()) + p[at + len(login):]
    return p


def _redact_datagram(raw: RawPayload, privacy: Privacy, origin, meta: dict) -> RawPayload:
    """An ESP-MESH JSON message (its MAC redacted unless kept) or a FoxESS frame; anything else
    is withheld."""
    p = raw.payload
    if p[:2] in HEADERS:
        return _redact_frame_payload(raw, privacy, origin, meta, str(raw.meta.get("serial") or ""))
    try:
        message = json.loads(p) if p[:1] == b"{" else None
    except ValueError:
        message = None
    if not isinstance(message, dict) or not isinstance(message.get("payload", {}), dict):
        return withhold(raw, "neither ESP-MESH JSON nor a FoxESS frame", privacy, origin=origin, meta=meta)
    body = message.get("payload", {})
    if privacy.keep_network_identity:
        return RawPayload(origin, raw.kind, p, raw.received, meta)
    if "mac" in body:
        body["mac"] = _mac(str(body["mac"]), privacy)
    payload = json.dumps(message, separators=(",", ":")).encode()
    return RawPayload(origin, raw.kind, payload, raw.received, meta)


def _mac(mac: str, privacy: Privacy) -> str:
    if privacy.keep_network_identity:
        return mac
    return pseudonym(mac.lower(), privacy.pseudonym_key) if privacy.pseudonym_key else REDACTED
