"""Protocol decoders: one pure module per protocol, bytes in, frames and records out, no I/O.

Every protocol module offers the same two functions, which the ingest worker and
`pvtap replay` call through `codec_for`:

- `redact_raw(raw, privacy) -> RawPayload`: the payload as it may be stored (secrets removed);
- `decode_raw(raw) -> list[Record]`: the records in a (redacted) payload; raises on bad input.

Decoding always runs on the redacted payload, so a replay gives what the live decode gave.

Protocols carried by the TCP relay (alphaess, foxess, …) also offer two classes, the only
things the relay knows of them:

- `Tap(origin)`: the decode side of one relayed connection. `feed(direction, data, received)
  -> list[RawPayload]` reassembles frames per direction (any segmentation, garbage, bad CRCs,
  absurd lengths, bounded buffers) and returns one RawPayload per complete frame (kind "frame")
  or per run of rejected bytes (kind "garbage"); it never raises on bad input.
  `finish(received) -> list[RawPayload]` returns bytes left over at the end (kind "partial").
  Attributes: `frames` and `rejected` (counts), `opaque` (True once the stream is recognisably
  not this protocol, e.g. a TLS handshake: the relay then just forwards and notes it), and
  `origin` (its `device` becomes the serial once a frame reveals it).
- `LocalAnswerer()`: answers the device as the cloud would when there is no cloud (policies
  `local` and `auto`). `feed(data: bytes) -> bytes` takes what the device sent and returns what
  to send back (possibly b""); `tick(now: float) -> bytes` is polled about once a second for
  anything the cloud would send unprompted (b"" if nothing).
"""

from __future__ import annotations

import importlib
from types import ModuleType

PROTOCOLS = ("enphase", "alphaess", "foxess")


def codec_for(protocol: str) -> ModuleType:
    """The decoder module for a protocol name; ValueError for an unknown one."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"no decoder for protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return importlib.import_module(f"pvtap.decode.{protocol}")
