"""Fail closed: bytes a decoder could not positively redact are stored as size + SHA-256 + why.

Every protocol's `redact_raw` ends here for what it cannot vouch for — bytes the framer rejected,
a frame cut off at the end of a connection, a body that does not parse, a layout it does not
know. The payload is then stored empty, with `meta["withheld"]` (the reason),
`meta["withheld_size"]` and `meta["withheld_sha256"]` (so a capture the owner holds can still be
matched to it). `[privacy] keep_unredacted = true` keeps such bytes in full instead, marked
`meta["unredacted"]` with the same reason.

The SHA-256 is plain, not keyed: it lets the owner match a payload to their own capture, and it
says nothing a guess of the whole payload (stamp, CRC and all) would not.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from typing import Any

from pvtap.privacy import Privacy
from pvtap.records import Origin, RawPayload

WITHHELD = "withheld"


def withhold(raw: RawPayload, reason: str, privacy: Privacy, *, origin: Origin | None = None,
             meta: Mapping[str, Any] | None = None) -> RawPayload:
    """`raw` as it may be stored when its bytes were not positively redacted. `origin` and `meta`
    are the already-redacted ones the caller made (default: raw's, with the device label
    redacted); anything a codec copied out of the bytes into meta must be redacted already."""
    origin = origin if origin is not None else redacted_origin(raw.origin, privacy)
    meta = dict(raw.meta if meta is None else meta)
    if is_withheld(raw):  # already withheld (a replay of a stored payload): nothing more to do
        return RawPayload(origin, raw.kind, b"", raw.received, meta)
    if privacy.keep_unredacted:
        meta["unredacted"] = reason
        return RawPayload(origin, raw.kind, bytes(raw.payload), raw.received, meta)
    meta.update({WITHHELD: reason, "withheld_size": len(raw.payload),
                 "withheld_sha256": hashlib.sha256(raw.payload).hexdigest()})
    return RawPayload(origin, raw.kind, b"", raw.received, meta)


def is_withheld(raw: RawPayload) -> bool:
    return WITHHELD in raw.meta and not raw.payload


def redacted_origin(origin: Origin, privacy: Privacy) -> Origin:
    """The origin with its device label as it may be stored (`device_label`)."""
    hit = _REDACTED_ORIGINS.get(id(origin))
    if hit is not None and hit[0] is origin and hit[1] is privacy:
        return hit[2]
    device = device_label(origin.device, privacy)
    redacted = origin if device == origin.device else Origin(origin.protocol, device, origin.connection,
                                                               origin.direction)
    if len(_REDACTED_ORIGINS) >= _REDACTED_ORIGINS_MAX:
        _REDACTED_ORIGINS.clear()
    _REDACTED_ORIGINS[id(origin)] = (origin, privacy, redacted)
    return redacted


#: Origins redacted lately, by identity (a Tap hands out one Origin object for all the payloads
#: of a direction); each entry holds the objects it was made for, so an id is never mistaken.
_REDACTED_ORIGINS: dict[int, tuple[Origin, Privacy, Origin]] = {}
_REDACTED_ORIGINS_MAX = 4096


def device_label(device: str, privacy: Privacy) -> str:
    """A device label as it may be stored: a serial becomes its pseudonym (when enabled), a
    network address is dropped unless network identity is kept."""
    if not device:
        return device
    if is_address(device):
        return device if privacy.keep_network_identity else ""
    return privacy.serial(device)


def is_address(label: str) -> bool:
    """`192.0.2.1`, `192.0.2.1:51234`, `[2001:db8::1]:51234`, `2001:db8::1`."""
    host = label
    if label.startswith("["):
        host = label[1:].partition("]")[0]
    elif label.count(":") == 1:
        host = label.partition(":")[0]
    if not host or not (host[0].isdigit() or ":" in host):  # a serial: no need to ask ipaddress
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
