"""One device connection, from accept to its connection record.

The listener's policy decides where the connection goes: forwarded to the cloud (fixed, auto,
transparent), answered locally as the cloud would (local, and auto while the cloud cannot be
reached), or refused (no such cloud, a destination that leads back to the relay). Connections
refused at accept (allow_from, max_connections) never get this far: proxy_tcp/admission.py.
Whatever happens, the end is one `pvtap_connection` record and one log line: the relay sends
what it knows (bytes, outcome, upstream, the peer as the privacy settings let it be logged:
pvtap/peers.py) with its copies' CLOSE, and the ingest worker, where the connection's Tap runs,
adds frames and device, logs the line and stores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from typing import TYPE_CHECKING

from pvtap.ingest.framing import ConnectionRecord, Outcome
from pvtap.records import DOWN, UP, now_utc

from .admission import reset
from .pump import CHUNK, Activity, PumpEnd, Splice, first_ended
from .upstream import Endpoint, RefusedDestination, UpstreamError, open_upstream, original_destination

if TYPE_CHECKING:
    import ssl

    from .listeners import Listener

log = logging.getLogger("proxy_tcp.connection")

#: how long closing a side may wait for its unsent bytes to leave (the graces add up: service.py)
CLOSE_GRACE = 5.0


class Connection:
    """Serves one accepted device connection according to its listener's policy: a plain
    listener's with its streams, a TLS listener's as the socket accept gave it, unread."""

    device_reader: asyncio.StreamReader
    device_writer: asyncio.StreamWriter  # a TLS listener's: once the handshake is over (_device_tls)

    def __init__(self, listener: Listener, peername: tuple,
                 device: tuple[asyncio.StreamReader, asyncio.StreamWriter] | socket.socket) -> None:
        self.listener = listener
        #: a TLS listener's socket until _device_tls hands it to the TLS layer (which closes it from then on)
        self._unhandled_socket: socket.socket | None = None
        if isinstance(device, socket.socket):
            self._unhandled_socket = device
        else:
            self.device_reader, self.device_writer = device
        self.cloud_writer: asyncio.StreamWriter | None = None
        config = listener.config
        self.peer = Endpoint.of(peername)
        relay = listener.relay
        self.record = ConnectionRecord(
            id="c-" + secrets.token_hex(4), protocol=config.protocol, listener=config.listen, policy=config.policy,
            started=now_utc(), peer=relay.peers.endpoint(self.peer.host, self.peer.port))
        self.label = f"{config.protocol} {self.record.id} {self.record.peer}"
        initial_device = str(self.peer.host) if relay.privacy.keep_network_identity else ""
        self.copies = relay.copies.open(self.record, initial_device, spread_by=str(self.peer.host))
        self.activity = Activity(asyncio.get_running_loop().time())
        #: loop time by which the device must have sent a byte (first_byte_timeout)
        self.first_byte_by = self.activity.last + config.first_byte_timeout
        self._t0 = time.monotonic()
        self._serving: asyncio.Task[None] | None = None
        #: no device stream to close: a failed TLS handshake closed the socket, or there has been no handshake yet
        self.device_lost = self._unhandled_socket is not None
        self._stopping = False
        self.counted = False  # its counts moved into the relay's totals (proxy_tcp/stats.py)

    def end(self, outcome: Outcome, detail: str = "") -> None:
        """Note how the connection ended; the first word wins."""
        if not self.record.outcome:
            self.record.outcome, self.record.detail = outcome.value, detail

    async def run(self) -> None:
        """Serve, then close both sides and report. `stop()` ends the serving only, so that a
        stopping relay still closes and records every connection."""
        log.debug("%s: accepted on %s (%s)", self.label, self.listener.config.listen, self.listener.config.policy)
        self._serving = asyncio.create_task(self._serve(), name=f"serve {self.label}")
        if self._stopping:  # stopped before it ran
            self._serving.cancel()
        try:
            await self._serving
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None  # run() is a task's coroutine
            if task.cancelling():  # run itself was cancelled: no time left
                raise
            self.end(Outcome.SHUTDOWN, "the relay stopped")
        except Exception as exc:  # a relay bug ends this connection only
            log.exception("%s: relay error", self.label)
            self.end(Outcome.ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            try:
                await self._close()
            finally:  # even when closing was cancelled: the record is the connection's only trace
                self._report()

    def stop(self) -> None:
        """End the serving (the relay is stopping); closing and the record follow in `run`."""
        self._stopping = True
        if self._serving is not None:
            self._serving.cancel()

    # -- policies ---------------------------------------------------------------------------

    async def _serve(self) -> None:
        config = self.listener.config
        if self.listener.device_tls is not None and not await self._device_tls(self.listener.device_tls):
            return
        if config.policy == "local":
            await self._answer_locally()
            return
        try:
            async with asyncio.timeout(config.connect_timeout):
                targets = await self._destinations()
                cloud_reader, self.cloud_writer, endpoint = await open_upstream(targets, limit=CHUNK,
                                                                                 tls=self.listener.upstream_tls)
        except RefusedDestination as exc:
            self.record.action = "refused"
            self.end(exc.outcome, str(exc))
            return
        except (UpstreamError, TimeoutError, OSError) as exc:
            reason = str(exc) or f"no answer within {config.connect_timeout:g} s (connect_timeout)"
            if config.policy == "auto":
                log.info("%s: cloud %s unreachable (%s): answering locally", self.label, config.upstream, reason)
                self.record.cloud_error = reason
                await self._answer_locally()
                return
            self.record.action = "refused"
            self.end(Outcome.UPSTREAM_FAILED, reason)
            return
        self.record.upstream = str(endpoint)
        await self._forward(cloud_reader, self.cloud_writer)

    async def _device_tls(self, context: ssl.SSLContext) -> bool:
        """Terminate the device's TLS (listener tls_cert) on the socket as accepted, so that not
        a byte of the handshake is read as cleartext: from here on the splice, the decoder and the
        local answerer see application bytes. The handshake must be over by the first-byte
        deadline: a client that trickles its hello holds a slot no longer than one that says
        nothing."""
        loop = asyncio.get_running_loop()
        left = max(self.first_byte_by - loop.time(), 0)
        sock, self._unhandled_socket = self._unhandled_socket, None
        assert sock is not None  # a TLS listener's connection, served once
        reader = asyncio.StreamReader(limit=CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            async with asyncio.timeout(left):
                # the loop's own handshake timeout only as a backstop: ours names the setting
                transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, ssl=context,
                                                                  ssl_handshake_timeout=left + 5)
        except TimeoutError:
            self._first_byte_late("no TLS handshake")
        except OSError as exc:  # ssl.SSLError is an OSError
            self.end(Outcome.DEVICE_TLS_FAILED, f"TLS handshake with the device failed: {exc or type(exc).__name__}")
        else:
            self.device_reader, self.device_writer = reader, asyncio.StreamWriter(transport, protocol, reader, loop)
            self.device_lost = False
            return True
        # both loops close the socket when the handshake fails or is cancelled: nothing to wait for
        self.record.action = "refused"
        return False

    async def _destinations(self) -> list[Endpoint]:
        """Where this connection may go: the redirect's original destination, or the upstream's
        addresses; RefusedDestination for anything that leads back to the relay."""
        guard = self.listener.relay.guard
        if self.listener.config.policy == "transparent":
            own = Endpoint.of(self.device_writer.get_extra_info("sockname"))
            dest = original_destination(self.device_writer.get_extra_info("socket"))
            if dest is None or dest == own:
                raise RefusedDestination(Outcome.REFUSED_NOT_REDIRECTED,
                                         f"not redirected: the original destination is the relay itself ({own})")
            self.record.upstream = str(dest)
            reason = guard.reason(dest)
            if reason:
                raise RefusedDestination(Outcome.REFUSED_SELF, reason)
            return [dest]
        self.record.upstream = self.listener.config.upstream
        assert self.listener.resolver is not None  # policies fixed and auto have one; local does not come here
        targets = await self.listener.resolver.resolve()
        for target in targets:
            reason = guard.reason(target)
            if reason:
                raise RefusedDestination(Outcome.REFUSED_SELF, f"{self.listener.config.upstream} resolves to {reason}")
        return targets

    async def _forward(self, cloud_reader: asyncio.StreamReader, cloud_writer: asyncio.StreamWriter) -> None:
        self.record.action = "forward"
        splice = Splice((self.device_reader, self.device_writer), (cloud_reader, cloud_writer),
                        counts=self.record.bytes, copies=self.copies, activity=self.activity)
        pending: set[asyncio.Future[PumpEnd]] = set(splice.ends.values())
        first_eof = ""
        try:
            while pending:
                ended = await self._next_end(pending)
                if ended is None:
                    return
                if ended.how == "reset":
                    self.end(Outcome(f"{ended.side}_reset"))
                    return
                first_eof = first_eof or ended.side
                target = cloud_writer if ended.side == "device" else self.device_writer
                if not target.can_write_eof():  # TLS has no half-close: the EOF ends the connection
                    break
            self.end(Outcome(f"{first_eof}_closed"))
        finally:
            splice.stop()

    async def _answer_locally(self) -> None:
        """Be the cloud: the protocol's LocalAnswerer gets what the device sends and says what
        to send back; it is also ticked once a second for anything unprompted."""
        self.record.action = "local"
        answerer = self.listener.codec.LocalAnswerer()
        tasks = {asyncio.create_task(self._answer(answerer)), asyncio.create_task(self._tick(answerer))}
        try:
            ended = await self._next_end(set(tasks))
            if ended is not None:
                self.end(Outcome.DEVICE_RESET if ended.how == "reset" else Outcome.DEVICE_CLOSED)
        finally:
            await _cancel(tasks)

    async def _answer(self, answerer) -> PumpEnd:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await self.device_reader.read(CHUNK)
            except OSError:
                return PumpEnd("reset", "device")
            if not data:
                return PumpEnd("eof", "device")
            self.record.bytes[UP] += len(data)
            self.activity.last = loop.time()
            self.copies.chunk(UP, data)
            try:
                reply = answerer.feed(data)
            except Exception:
                self._answer_failed()
                continue
            if not await self._send_local(reply):
                return PumpEnd("reset", "device")

    async def _tick(self, answerer) -> PumpEnd:
        while True:
            await asyncio.sleep(1.0)
            try:
                unprompted = answerer.tick(time.time())
            except Exception:
                self._answer_failed()
                continue
            if not await self._send_local(unprompted):
                return PumpEnd("reset", "device")

    async def _send_local(self, data: bytes) -> bool:
        if not data:
            return True
        self.device_writer.write(data)
        self.record.bytes[DOWN] += len(data)
        self.activity.last = asyncio.get_running_loop().time()
        self.copies.chunk(DOWN, data)
        try:
            await self.device_writer.drain()
        except OSError:
            return False
        return True

    def _first_byte_late(self, what: str) -> None:
        timeout = self.listener.config.first_byte_timeout
        self.end(Outcome.FIRST_BYTE_TIMEOUT, f"{what} from the device within {timeout:g} s (first_byte_timeout)")

    def _answer_failed(self) -> None:
        self.record.answer_errors += 1
        if self.record.answer_errors == 1:
            log.exception("%s: the local answerer raised (later errors are counted)", self.label)

    async def _next_end(self, pending: set[asyncio.Future[PumpEnd]]) -> PumpEnd | None:
        """The PumpEnd of the next in `pending` to finish (taken out of it); None, with the
        outcome noted, when nothing moved either way for idle_timeout, or the device sent
        nothing by its first-byte deadline."""
        idle_timeout = self.listener.config.idle_timeout
        loop = asyncio.get_running_loop()
        waited = False  # the tasks ran at least once: bytes already buffered have been counted
        while True:
            silent = self.record.bytes[UP] == 0
            deadline = self.activity.last + idle_timeout
            if silent:
                deadline = min(deadline, self.first_byte_by)
            wait = deadline - loop.time()
            if wait <= 0 and waited:
                if silent and deadline == self.first_byte_by:
                    self._first_byte_late("nothing")
                else:
                    self.end(Outcome.IDLE_TIMEOUT, f"nothing moved for {idle_timeout:g} s (idle_timeout)")
                return None
            done, _ = await asyncio.wait(pending, timeout=max(wait, 0), return_when=asyncio.FIRST_COMPLETED)
            waited = True
            if done:
                task = first_ended(done)
                pending.discard(task)
                return task.result()

    # -- the end ----------------------------------------------------------------------------

    async def _close(self) -> None:
        if self._unhandled_socket is not None:  # stopped before its TLS handshake began
            self._unhandled_socket.close()
        writers = [w for w in (None if self.device_lost else self.device_writer, self.cloud_writer) if w is not None]
        try:
            await self._close_within_grace(writers)
        except asyncio.CancelledError:
            for writer in writers:  # no time left: let go of both sockets now
                writer.transport.abort()
            raise

    async def _close_within_grace(self, writers: list[asyncio.StreamWriter]) -> None:
        if self.record.outcome.endswith("_reset"):
            for writer in writers:
                reset(writer)  # pass the reset on
        else:
            if self.record.action == "refused" and not self.device_lost:
                await self._discard_unread()
            for writer in writers:
                writer.close()
        if not writers:  # the device's socket went with a failed TLS handshake, and there is no cloud side
            return
        # both sides at once, so that a connection ends within one CLOSE_GRACE (< STOP_GRACE)
        waits = [asyncio.ensure_future(_wait_closed(writer)) for writer in writers]
        try:
            await asyncio.wait(waits, timeout=CLOSE_GRACE)
        finally:  # a side still closing after the grace (or when this is cancelled) is aborted
            for wait, writer in zip(waits, writers):
                if not wait.done():
                    wait.cancel()
                    writer.transport.abort()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _discard_unread(self) -> None:
        """Half-close towards the device and read what it already sent, so that closing sends
        a FIN and not a reset (the kernel resets a socket closed with unread data). TLS has no
        half-close: its close_notify says the same."""
        if not self.device_writer.can_write_eof():
            return
        try:
            self.device_writer.write_eof()
            async with asyncio.timeout(CLOSE_GRACE):
                while await self.device_reader.read(CHUNK):
                    pass
        except (OSError, TimeoutError):
            pass

    def _report(self) -> None:
        """Hand the record to the ingest worker, which completes it (frames, device), logs it and
        stores it after the connection's last copies."""
        self.record.duration = time.monotonic() - self._t0
        self.listener.relay.stats.ended(self)
        self.copies.close(self.record)


async def _wait_closed(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _cancel(tasks: set[asyncio.Task]) -> None:
    """Cancel the tasks and wait for them. Their CancelledErrors are theirs and end here; if the
    task awaiting this is cancelled itself, its CancelledError goes on (gather re-raises it)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
