"""Moving bytes: the forward pumps, and where the copies of what they forward go.

A pump writes each chunk to the other side as soon as it is read, then hands the copy to the
connection's `CopyStream` without waiting; `drain()` gives back-pressure (a slow reader stops the
pump reading, so TCP slows the sender), EOF is passed on as a half-close. The copies go to the
ingest worker, another process that frames, archives and decodes them (pvtap/ingest/worker.py):
this process does only I/O, and a slow, stuck or failing decoder costs dropped, counted copies,
never forwarded bytes or latency.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from pvtap.ingest.framing import ConnectionRecord
from pvtap.records import RawPayload, Record

log = logging.getLogger("proxy_tcp.pump")

#: bytes read at once; also the StreamReader buffer limit
CHUNK = 256 * 1024


class CopyStream(Protocol):
    """The copies of one connection (pvtap.ingest.channel.CopyStream): never blocks."""

    opaque: bool  # the decode side said the stream is not its protocol: no more copies are taken
    dropped: int  # copies that could not be queued

    def chunk(self, direction: str, data: bytes) -> None: ...
    def close(self, record: ConnectionRecord) -> None: ...


class CopySink(Protocol):
    """Where the relay sends copies (pvtap.ingest.channel.Channel, pvtap.ingest.pool.ChannelPool)."""

    def open(self, record: ConnectionRecord, device: str = "", spread_by: str = "") -> CopyStream:
        """The copies of a new connection; `spread_by` (the device's address, never sent on)
        keeps one device's connections on one ingest worker."""
        ...
    def payload(self, raw: RawPayload) -> bool: ...
    def record(self, record: Record) -> None: ...


@dataclass
class Activity:
    """When a byte last moved either way (loop time), for the idle timeout."""

    last: float


@dataclass(frozen=True)
class PumpEnd:
    """How one direction ended: `eof` (half-close passed on) or `reset`, and on which side."""

    how: str
    side: str


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str, *,
               source: str, target: str, counts: dict[str, int], copies: CopyStream, activity: Activity) -> PumpEnd:
    """Forward one direction until EOF or an error; forward first, then hand over the copy."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = await reader.read(CHUNK)
        except OSError:
            return PumpEnd("reset", source)
        if not data:
            if writer.can_write_eof() and not writer.is_closing():
                try:
                    writer.write_eof()
                except OSError:
                    return PumpEnd("reset", target)
            return PumpEnd("eof", source)
        writer.write(data)
        counts[direction] += len(data)
        activity.last = loop.time()
        copies.chunk(direction, data)
        try:
            await writer.drain()
        except OSError:
            return PumpEnd("reset", target)
