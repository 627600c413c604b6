"""One device connection, from accept to its connection record.

The listener's policy decides where the connection goes: forwarded to the cloud (fixed, auto,
transparent), answered locally as the cloud would (local, and auto while the cloud cannot be
reached), or refused (no such cloud, a destination that leads back to the relay, too many
connections). Whatever happens, the end is one log line and one `pvtap_connection` record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from pvtap.records import DOWN, UP, Origin, Record, now_utc

from .pump import CHUNK, Activity, Copies, PumpEnd, pump
from .tls import DEVICE_HANDSHAKE_TIMEOUT
from .upstream import Endpoint, RefusedDestination, UpstreamError, open_upstream, original_destination

if TYPE_CHECKING:
    import ssl

    from .listeners import Listener

log = logging.getLogger("proxy_tcp.connection")

MEASUREMENT = "pvtap_connection"
#: how long closing a side may wait for its unsent bytes to leave
CLOSE_GRACE = 5.0
#: how long the decode side may take to finish what was queued when a connection ends
DECODE_GRACE = 10.0


@dataclass
class ConnectionRecord:
    """What the relay knows about a connection when it ends."""

    id: str
    protocol: str
    listener: str
    policy: str
    started: datetime
    peer: Endpoint
    upstream: str = ""  # where it was forwarded, or the cloud it could not reach
    action: str = ""  # forward, local or refused
    outcome: str = ""  # device_closed, cloud_closed, device_reset, cloud_reset, idle_timeout, ...
    detail: str = ""
    cloud_error: str = ""  # why auto answered locally
    bytes: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    frames: int = 0
    rejected: int = 0
    dropped_copies: int = 0
    decode_errors: int = 0
    answer_errors: int = 0
    opaque: bool = False
    device: str = ""  # the serial (or its pseudonym) once a frame revealed it
    duration: float = 0.0

    def log_line(self) -> str:
        where = f" → {self.upstream}" if self.upstream else ""
        device = f" device {self.device}," if self.device else ""
        opaque = " OPAQUE (not this protocol; forwarded untouched)," if self.opaque else ""
        detail = f" ({self.detail})" if self.detail else ""
        if self.cloud_error:
            detail += f" [cloud unreachable: {self.cloud_error}]"
        return (f"{self.protocol} {self.id} {self.peer}{where} [{self.policy}: {self.action}] {self.outcome}{detail}"
                f" after {self.duration:.1f} s;{device}{opaque} up {self.bytes[UP]} B, down {self.bytes[DOWN]} B,"
                f" frames {self.frames}, rejected {self.rejected}, dropped copies {self.dropped_copies},"
                f" decode errors {self.decode_errors}")

    def to_record(self, store_peer: bool) -> Record:
        fields: dict[str, int | float | str | bool] = {
            "bytes_up": self.bytes[UP], "bytes_down": self.bytes[DOWN], "frames": self.frames,
            "rejected": self.rejected, "dropped_copies": self.dropped_copies, "decode_errors": self.decode_errors,
            "answer_errors": self.answer_errors, "opaque": self.opaque, "duration_s": round(self.duration, 3),
        }
        if self.upstream:
            fields["upstream"] = self.upstream
        if self.detail:
            fields["detail"] = self.detail
        if self.cloud_error:
            fields["cloud_error"] = self.cloud_error
        if store_peer:
            fields["peer"] = str(self.peer)
        tags = {"protocol": self.protocol, "listener": self.listener, "policy": self.policy,
                "action": self.action, "outcome": self.outcome}
        return Record(MEASUREMENT, self.started, tags, fields,
                      Origin(protocol=self.protocol, device=self.device, connection=self.id))


class Connection:
    """Serves one accepted device connection according to its listener's policy."""

    def __init__(self, listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.listener = listener
        self.device_reader, self.device_writer = reader, writer
        self.cloud_writer: asyncio.StreamWriter | None = None
        config = listener.config
        self.peer = Endpoint.of(writer.get_extra_info("peername"))
        self.record = ConnectionRecord(
            id="c-" + secrets.token_hex(4), protocol=config.protocol, listener=config.listen, policy=config.policy,
            started=now_utc(), peer=self.peer)
        self.label = f"{config.protocol} {self.record.id} {self.peer}"
        relay = listener.relay
        self.initial_device = str(self.peer.host) if relay.privacy.keep_network_identity else ""
        try:
            self.tap = listener.codec.Tap(Origin(protocol=config.protocol, device=self.initial_device,
                                                 connection=self.record.id))
        except Exception:
            log.exception("%s: the decoder could not start; forwarding without decoding", self.label)
            self.tap = None
        self.copies = Copies(self.tap, relay.sink, config.decode_queue, relay.executor, self.label)
        self.activity = Activity(asyncio.get_running_loop().time())
        self._t0 = time.monotonic()
        self._serving: asyncio.Task[None] | None = None
        self._stopping = False

    def end(self, outcome: str, detail: str = "") -> None:
        """Note how the connection ended; the first word wins."""
        if not self.record.outcome:
            self.record.outcome, self.record.detail = outcome, detail

    async def run(self) -> None:
        """Serve, then close both sides and report. `stop()` ends the serving only, so that a
        stopping relay still closes and records every connection."""
        log.debug("%s: accepted on %s (%s)", self.label, self.listener.config.listen, self.listener.config.policy)
        self.copies.start()
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
            self.end("shutdown", "the relay stopped")
        except Exception as exc:  # a relay bug ends this connection only
            log.exception("%s: relay error", self.label)
            self.end("error", f"{type(exc).__name__}: {exc}")
        finally:
            await self._close()
            await self._report()

    def stop(self) -> None:
        """End the serving (the relay is stopping); closing and the record follow in `run`."""
        self._stopping = True
        if self._serving is not None:
            self._serving.cancel()
        self.copies.abandon()

    # -- policies ---------------------------------------------------------------------------

    async def _serve(self) -> None:
        config = self.listener.config
        if self.listener.device_tls is not None and not await self._device_tls(self.listener.device_tls):
            return
        if len(self.listener.connections) > config.max_connections:
            self.record.action = "refused"
            self.end("refused_limit", f"{config.max_connections} connections already open (max_connections)")
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
            self.end("upstream_failed", reason)
            return
        self.record.upstream = str(endpoint)
        await self._forward(cloud_reader, self.cloud_writer)

    async def _device_tls(self, context: ssl.SSLContext) -> bool:
        """Terminate the device's TLS (listener tls_cert): from here on the pumps, the decoder
        and the local answerer see application bytes."""
        try:
            await self.device_writer.start_tls(context,
                                               ssl_handshake_timeout=DEVICE_HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self.record.action = "refused"
            self.end("device_tls_failed", f"TLS handshake with the device failed: {exc or type(exc).__name__}")
            return False
        return True

    async def _destinations(self) -> list[Endpoint]:
        """Where this connection may go: the redirect's original destination, or the upstream's
        addresses; RefusedDestination for anything that leads back to the relay."""
        guard = self.listener.relay.guard
        if self.listener.config.policy == "transparent":
            own = Endpoint.of(self.device_writer.get_extra_info("sockname"))
            dest = original_destination(self.device_writer.get_extra_info("socket"))
            if dest is None or dest == own:
                raise RefusedDestination("refused_not_redirected",
                                         f"not redirected: the original destination is the relay itself ({own})")
            self.record.upstream = str(dest)
            reason = guard.reason(dest)
            if reason:
                raise RefusedDestination("refused_self", reason)
            return [dest]
        self.record.upstream = self.listener.config.upstream
        assert self.listener.resolver is not None  # policies fixed and auto have one; local does not come here
        targets = await self.listener.resolver.resolve()
        for target in targets:
            reason = guard.reason(target)
            if reason:
                raise RefusedDestination("refused_self", f"{self.listener.config.upstream} resolves to {reason}")
        return targets

    async def _forward(self, cloud_reader: asyncio.StreamReader, cloud_writer: asyncio.StreamWriter) -> None:
        self.record.action = "forward"
        counts, copies, activity = self.record.bytes, self.copies, self.activity
        pumps = {
            asyncio.create_task(pump(self.device_reader, cloud_writer, UP, source="device", target="cloud",
                                     counts=counts, copies=copies, activity=activity)),
            asyncio.create_task(pump(cloud_reader, self.device_writer, DOWN, source="cloud", target="device",
                                     counts=counts, copies=copies, activity=activity)),
        }
        pending, first_eof = set(pumps), ""
        try:
            while pending:
                ended = await self._next_end(pending)
                if ended is None:
                    return
                if ended.how == "reset":
                    self.end(f"{ended.side}_reset")
                    return
                first_eof = first_eof or ended.side
                target = cloud_writer if ended.side == "device" else self.device_writer
                if not target.can_write_eof():  # TLS has no half-close: the EOF ends the connection
                    break
            self.end(f"{first_eof}_closed")
        finally:
            await _cancel(pumps)

    async def _answer_locally(self) -> None:
        """Be the cloud: the protocol's LocalAnswerer gets what the device sends and says what
        to send back; it is also ticked once a second for anything unprompted."""
        self.record.action = "local"
        answerer = self.listener.codec.LocalAnswerer()
        tasks = {asyncio.create_task(self._answer(answerer)), asyncio.create_task(self._tick(answerer))}
        try:
            ended = await self._next_end(set(tasks))
            if ended is not None:
                self.end(f"device_{'reset' if ended.how == 'reset' else 'closed'}")
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
            self.copies.offer(UP, data)
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
        self.copies.offer(DOWN, data)
        try:
            await self.device_writer.drain()
        except OSError:
            return False
        return True

    def _answer_failed(self) -> None:
        self.record.answer_errors += 1
        if self.record.answer_errors == 1:
            log.exception("%s: the local answerer raised (later errors are counted)", self.label)

    async def _next_end(self, pending: set[asyncio.Task[PumpEnd]]) -> PumpEnd | None:
        """The PumpEnd of the next task in `pending` to finish (taken out of it); None, with the
        outcome noted, when nothing moved either way for idle_timeout."""
        idle_timeout = self.listener.config.idle_timeout
        loop = asyncio.get_running_loop()
        while True:
            wait = self.activity.last + idle_timeout - loop.time()
            if wait <= 0:
                self.end("idle_timeout", f"nothing moved for {idle_timeout:g} s (idle_timeout)")
                return None
            done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if done:
                task = done.pop()
                pending.discard(task)
                return task.result()

    # -- the end ----------------------------------------------------------------------------

    async def _close(self) -> None:
        writers = [w for w in (self.device_writer, self.cloud_writer) if w is not None]
        if self.record.outcome.endswith("_reset"):
            for writer in writers:
                _reset(writer)  # pass the reset on
        else:
            if self.record.action == "refused":
                await self._discard_unread()
            for writer in writers:
                writer.close()
        for writer in writers:
            try:
                async with asyncio.timeout(CLOSE_GRACE):
                    await writer.wait_closed()
            except (OSError, TimeoutError):
                writer.transport.abort()
        await self.copies.close(timeout=DECODE_GRACE)

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

    async def _report(self) -> None:
        r = self.record
        r.duration = time.monotonic() - self._t0
        r.frames = int(getattr(self.tap, "frames", 0))
        r.rejected = int(getattr(self.tap, "rejected", 0))
        r.dropped_copies = self.copies.dropped
        r.decode_errors = self.copies.tap_errors
        r.opaque = self.copies.opaque
        relay = self.listener.relay
        device = getattr(getattr(self.tap, "origin", None), "device", "")
        r.device = relay.privacy.serial(device) if device and device != self.initial_device else ""
        log.log(logging.WARNING if r.outcome in WARN_OUTCOMES else logging.INFO, "%s", r.log_line())
        if relay.store is not None:
            records = [r.to_record(store_peer=relay.privacy.keep_network_identity)]
            if self.listener.upstream_tls is not None:  # a pin mismatch is stored as an alert (proxy_tcp.alerts)
                records += self.listener.upstream_tls.alerts()
            try:
                await asyncio.get_running_loop().run_in_executor(None, relay.store.append, records)
            except Exception:
                log.exception("%s: could not store the connection record", self.label)


WARN_OUTCOMES = {"upstream_failed", "refused_not_redirected", "refused_self", "refused_limit", "device_tls_failed",
                 "error"}


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as the peer did on the other side."""
    with contextlib.suppress(OSError):
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _cancel(tasks: set[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
