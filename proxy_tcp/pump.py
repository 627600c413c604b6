"""Moving bytes: the forward pumps and the decode side that gets a copy of every chunk.

A pump writes each chunk to the other side as soon as it is read, then offers the copy to the
connection's `Copies` without waiting; `drain()` gives back-pressure (a slow reader stops the
pump reading, so TCP slows the sender), EOF is passed on as a half-close. The copies go through
a bounded queue to the protocol's Tap, which runs in a worker thread: a slow, stuck or failing
decoder costs dropped copies, never forwarded bytes.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

from pvtap.records import RawPayload, now_utc

log = logging.getLogger("proxy_tcp.pump")

#: bytes read at once; also the StreamReader buffer limit
CHUNK = 256 * 1024
#: bytes of copies one connection may have waiting for its decoder (besides the chunk count)
QUEUED_BYTES = 4 * 1024 * 1024


class Sink(Protocol):
    """Where decoded payloads go: `pvtap.ingest.Ingest` (never blocks)."""

    def submit(self, raw: RawPayload) -> Any: ...


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
               source: str, target: str, counts: dict[str, int], copies: Copies, activity: Activity) -> PumpEnd:
    """Forward one direction until EOF or an error; forward first, then offer the copy."""
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
        copies.offer(direction, data)
        try:
            await writer.drain()
        except OSError:
            return PumpEnd("reset", target)


_END = object()
#: a copy waiting for the decoder: (direction, bytes, when received)
_Chunk = tuple[str, bytes, datetime]


class Copies:
    """The decode side of one connection: a bounded queue of copies feeding the protocol's Tap
    in a worker thread, and the payloads it returns going to the sink."""

    def __init__(self, tap: Any | None, sink: Sink, maxsize: int, executor: Executor, label: str) -> None:
        self.tap = tap  # None: the Tap could not be made; forward without decoding
        self.sink = sink
        self.executor = executor
        self.label = label
        self.queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.queued_bytes = 0
        self.dropped = 0  # copies not decoded because the queue was full
        self.dropped_bytes = 0
        self.tap_errors = 0 if tap is not None else 1  # Tap(), Tap.feed or Tap.finish raised
        self.opaque = False  # the Tap said the stream is not its protocol: copies stop
        self.abandoned = False  # the relay is stopping: what is queued is dropped, not decoded
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.tap is None:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"decode-{self.label}")

    def offer(self, direction: str, data: bytes) -> None:
        """Queue a copy if there is room; never waits."""
        if self.opaque or self.tap is None:
            return
        try:
            if self.queued_bytes + len(data) > QUEUED_BYTES:
                raise asyncio.QueueFull
            self.queue.put_nowait((direction, data, now_utc()))
            self.queued_bytes += len(data)
        except asyncio.QueueFull:
            self.dropped += 1
            self.dropped_bytes += len(data)
            if self.dropped == 1:
                log.warning("%s: decoding is behind (%d chunks, %d bytes queued): dropping copies; forwarding is "
                        "unaffected", self.label, self.queue.qsize(), self.queued_bytes)

    def abandon(self) -> None:
        """Drop (and count) the copies not decoded yet, so that stopping is quick."""
        self.abandoned = True

    async def close(self, timeout: float) -> None:
        """Decode what is queued, then the Tap's leftovers; returns when all went to the sink,
        or after `timeout` seconds (a stuck decoder must not hold the connection's end)."""
        if self._task is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.queue.put(_END)
                await asyncio.shield(self._task)
        except TimeoutError:
            log.error("%s: the decoder did not finish within %g s; %d queued copies are lost",
                      self.label, timeout, self.queue.qsize())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            end = batch[-1] is _END
            # copies, then at most one _END, put last by close()
            chunks = cast(list[_Chunk], batch[:-1] if end else batch)
            self.queued_bytes -= sum(len(chunk[1]) for chunk in chunks)
            if chunks:
                await loop.run_in_executor(self.executor, self._feed, chunks)
            if end:
                await loop.run_in_executor(self.executor, self._finish)
                return

    def _feed(self, chunks: list[_Chunk]) -> None:
        """Runs in a worker thread, one batch at a time per connection; the sink is submitted
        to from here too, so whatever it does (count, log a drop) stays off the event loop."""
        assert self.tap is not None  # without a Tap, start() runs no decoder
        for index, (direction, data, received) in enumerate(chunks):
            if self.opaque:
                break
            if self.abandoned:
                self.dropped += len(chunks) - index
                self.dropped_bytes += sum(len(chunk[1]) for chunk in chunks[index:])
                break
            try:
                payloads = self.tap.feed(direction, data, received)
            except Exception:
                self._tap_failed("feed")
                payloads = []
            for payload in payloads:
                self.sink.submit(payload)
            self.opaque = bool(getattr(self.tap, "opaque", False))

    def _finish(self) -> None:
        assert self.tap is not None  # without a Tap, start() runs no decoder
        try:
            payloads = self.tap.finish(now_utc())
        except Exception:
            self._tap_failed("finish")
            return
        for payload in payloads:
            self.sink.submit(payload)

    def _tap_failed(self, what: str) -> None:
        self.tap_errors += 1
        if self.tap_errors == 1:
            log.exception("%s: the decoder raised in %s (forwarding is unaffected; later errors are counted)",
                          self.label, what)
        else:
            log.debug("%s: the decoder raised again in %s", self.label, what, exc_info=True)
