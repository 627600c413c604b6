"""Protocol decoders: one pure module per protocol, bytes in, frames and records out, no I/O.

Every protocol module offers the same two functions, which the ingest worker and
`pvtap replay` call through `codec_for`:

- `redact_raw(raw, privacy) -> RawPayload`: the payload as it may be stored (secrets removed);
- `decode_raw(raw) -> list[Record]`: the records in a (redacted) payload; raises on bad input.

Decoding always runs on the redacted payload, so a replay gives what the live decode gave.
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
