"""Moving bytes: the forward splice, and where the copies of what it forwards go.

Once a connection's cloud side is open, `Splice` takes both sockets over from their streams and
forwards in the transports' callbacks: each chunk is written to the other side in the callback
that received it (no task, no future, no copy per read; the relay's CPU per round trip and its
garbage are what a busy fleet's latency is made of: docs/benchmarks.md), then handed to the
connection's `CopyStream` without waiting. A full write buffer pauses reading on the other side
(so TCP slows the sender), EOF is passed on as a half-close. The copies go to the ingest worker,
another process that frames, archives and decodes them (pvtap/ingest/worker.py): this process
does only I/O, and a slow, stuck or failing decoder costs dropped, counted copies, never
forwarded bytes or latency.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pvtap.ingest.framing import ConnectionRecord
from pvtap.records import DOWN, UP, RawPayload, Record

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
    """How one direction ended: `eof` (half-close passed on) or `reset`, and on which side;
    `order`: when, among its splice's ends (1 first; 0 when not from a splice)."""

    how: str
    side: str
    order: int = field(default=0, compare=False)


def first_ended(done: Iterable[asyncio.Future[PumpEnd]]) -> asyncio.Future[PumpEnd]:
    """Of ends found done together, the one that happened first. Under load the device's EOF
    and the cloud's close in answer to it are both done by the time the connection's task runs,
    and a set of futures has no order: the connection was then logged as closed by the cloud.
    A future that failed comes first, so that its error is raised as before."""
    def order(future: asyncio.Future[PumpEnd]) -> int:
        if future.cancelled() or future.exception() is not None:
            return 0
        return future.result().order
    return min(done, key=order)


class Splice:
    """Forwards both directions between two established stream connections.

    `ends` holds one future per direction (UP: device to cloud, DOWN: cloud to device), each
    resolved with its `PumpEnd`; `stop()` ends forwarding (anything read later is dropped) and
    leaves closing to the streams, which are still told when their socket is lost."""

    def __init__(self, device: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 cloud: tuple[asyncio.StreamReader, asyncio.StreamWriter], *,
                 counts: dict[str, int], copies: CopyStream, activity: Activity) -> None:
        loop = asyncio.get_running_loop()
        self.counts, self.copies, self.activity, self.loop = counts, copies, activity, loop
        self.stopped = False
        self.order = itertools.count(1)  # the ends, numbered as they happen
        up, down = loop.create_future(), loop.create_future()
        self.ends: dict[str, asyncio.Future[PumpEnd]] = {UP: up, DOWN: down}
        self.device = _Side(self, "device", device[1].transport, UP, up)
        self.cloud = _Side(self, "cloud", cloud[1].transport, DOWN, down)
        self.device.peer, self.cloud.peer = self.cloud, self.device
        for side, (reader, _) in ((self.device, device), (self.cloud, cloud)):
            side.take_over(reader)

    def stop(self) -> None:
        self.stopped = True
        for end in self.ends.values():
            if not end.done():
                end.cancel()


class _Side(asyncio.Protocol):
    """One socket of a splice: what it receives goes to `peer`."""

    peer: _Side

    def __init__(self, splice: Splice, name: str, transport: asyncio.BaseTransport, direction: str,
                 end: asyncio.Future[PumpEnd]) -> None:
        self.splice, self.name, self.direction, self.end = splice, name, direction, end
        self.transport: asyncio.WriteTransport = transport  # type: ignore[assignment]
        #: the stream's own protocol, still told when the socket is lost (so that closing the
        #: stream and waiting for it work as before)
        self.stream: asyncio.BaseProtocol = transport.get_protocol()

    def take_over(self, reader: asyncio.StreamReader) -> None:
        """Become the transport's protocol, then forward what the stream had already read.
        Asyncio offers no public way to take a StreamReader's buffer without awaiting: these
        private attributes are the same from Python 3.8 to 3.13 and under uvloop."""
        self.transport.set_protocol(self)
        buffered, eof, error = bytes(reader._buffer), reader._eof, reader._exception  # type: ignore[attr-defined]
        reader._buffer.clear()  # type: ignore[attr-defined]
        if reader._paused:  # type: ignore[attr-defined]  # the stream had paused reading: its buffer was full
            reader._paused = False  # type: ignore[attr-defined]
            self.transport.resume_reading()  # type: ignore[attr-defined]
        if buffered:
            self.data_received(buffered)
        if error is not None:
            self._ended("reset")
        elif eof:
            self.eof_received()

    def data_received(self, data: bytes) -> None:
        splice = self.splice
        if splice.stopped:
            return
        self.peer.transport.write(data)  # forward first
        splice.counts[self.direction] += len(data)
        splice.activity.last = splice.loop.time()
        splice.copies.chunk(self.direction, data)

    def eof_received(self) -> bool:
        target = self.peer.transport
        if not self.splice.stopped and target.can_write_eof() and not target.is_closing():
            try:
                target.write_eof()
            except OSError:
                self._ended("reset", self.peer.name)
                return True
        self._ended("eof")
        return True  # keep the socket open: the other direction may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._ended("eof")
        else:  # a reset: nothing more goes either way through this socket
            self._ended("reset")
            self.peer._ended("reset", self.name)
        self.stream.connection_lost(exc)

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()  # type: ignore[attr-defined]

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()  # type: ignore[attr-defined]

    def _ended(self, how: str, side: str = "") -> None:
        if not self.end.done():
            self.end.set_result(PumpEnd(how, side or self.name, next(self.splice.order)))
