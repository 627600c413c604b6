"""Protocol decoders: one pure module per protocol, bytes in, frames and records out, no I/O.

Every protocol package offers the same two functions (the `Codec` protocol below), which the
ingest worker and `pvtap replay` call through `codec_for`:

- `redact_raw(raw, privacy) -> RawPayload`: the payload as it may be stored (secrets removed);
- `decode_raw(raw) -> list[Record]`: the records in a (redacted) payload; raises on bad input.

Decoding always runs on the redacted payload, so a replay gives what the live decode gave.

Each step reads the bytes once. On the live path a payload carries what its decoder read of it
in `RawPayload.parsed` — the frame the Tap split off (its body parsed on first use), the tree
redaction parsed and redacted — and `redact_raw` and `decode_raw` use that reading when it is of
exactly the payload's bytes (`RawPayload.parsed_as`), else read the bytes (a replay, an import,
a payload archived before a restart). A reading is a pure function of its bytes, so both ways
give the same stored payload and the same records (tests/test_live_path.py); the ingest engine
keeps readings from archiving to decoding (`pvtap.ingest.LiveReadings`).

Protocols carried by the TCP relay (alphaess, foxess, …) also offer two classes, the only
things the relay knows of them (`StreamCodec`, with the `Tap` and `LocalAnswerer` protocols):

- `Tap(origin)`: the decode side of one relayed connection. `feed(direction, data, received)
  -> list[RawPayload]` reassembles frames per direction (any segmentation, garbage, bad CRCs,
  absurd lengths, bounded buffers) and returns one RawPayload per complete frame (kind "frame",
  the frame as read in `parsed`) or per run of rejected bytes (kind "garbage"); it never raises
  on bad input.
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

import functools
import importlib
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from pvtap.privacy import Privacy
    from pvtap.records import Origin, RawPayload, Record

PROTOCOLS = ("enphase", "alphaess", "foxess")


class Codec(Protocol):
    """What the ingest worker and `pvtap replay` need of a protocol."""

    def redact_raw(self, raw: RawPayload, privacy: Privacy) -> RawPayload: ...

    def decode_raw(self, raw: RawPayload) -> list[Record]: ...


class Tap(Protocol):
    """The decode side of one relayed connection (see the module docstring)."""

    origin: Origin
    frames: int
    rejected: int
    opaque: bool

    def feed(self, direction: str, data: bytes, received: datetime) -> list[RawPayload]: ...

    def finish(self, received: datetime) -> list[RawPayload]: ...


class LocalAnswerer(Protocol):
    """Stands in for the cloud when there is none (policies `local` and `auto`)."""

    def feed(self, data: bytes) -> bytes: ...

    def tick(self, now: float) -> bytes: ...


TapFactory = Callable[["Origin"], Tap]
AnswererFactory = Callable[[], LocalAnswerer]


class StreamCodec(Codec, Protocol):
    """A protocol the TCP relay carries: a Codec that also makes Taps and LocalAnswerers."""

    @property
    def Tap(self) -> TapFactory: ...

    @property
    def LocalAnswerer(self) -> AnswererFactory: ...


@functools.cache
def codec_for(protocol: str) -> Codec:
    """The decoder package for a protocol name; ValueError for an unknown one. Cached: the ingest
    worker asks once per payload, and `import_module` costs some 10 µs even for a loaded module."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"no decoder for protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return cast(Codec, importlib.import_module(f"pvtap.decode.{protocol}"))


def stream_codec(codec: Codec) -> StreamCodec | None:
    """The codec as the relay needs it, or None when it has no Tap/LocalAnswerer (Enphase)."""
    if callable(getattr(codec, "Tap", None)) and callable(getattr(codec, "LocalAnswerer", None)):
        return cast(StreamCodec, codec)
    return None
