"""The forwarding process's end of the channel to its ingest worker.

Everything here runs on the forwarding process's event loop (the relay's, mitmproxy's) and
never waits: a copy is appended to a user-space buffer bounded in bytes and sent with one
non-blocking `sendmsg` per loop iteration (the chunk's bytes are not copied on the way); when
the buffer is full, the worker is down, or the copies not yet archived are as many as the
worker archives within its stop grace (backlog.py), the copy is dropped and counted. Control
messages (a connection opened or closed, counts, syncs) are small and always queued, so every
connection still gets its record. A worker that dies is started again with back-off; the
connections open at that moment are announced to the new one. The buffer and its budget are
outbox.py; the socket, watched on the event loop or polled, channel_socket.py; starting, reaping
and restarting the worker lifecycle.py. This module is the API, what the worker says on the back-channel (acks,
snapshots, syncs) and the counts, including the copies lost with a worker.

    channel = Channel.process(settings)        # or Channel.thread(settings, codecs=...) in tests
    channel.start(wait_ready=30)               # IngestStartError if the store cannot be opened
    copies = channel.open(record, device)      # per relayed connection: chunk(), close()
    channel.payload(raw)                       # a whole payload (the addon, UDP datagrams)
    channel.record(record)                     # a record of its own (the addon's enphase_fallback)
    channel.stats()                            # counts of both ends, flat
    await channel.idle()                       # tests: everything sent so far is decoded
    channel.close(timeout)                     # flush, end the channel, wait for the worker
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pvtap.decode import codec_for
from pvtap.ingest import wire
from pvtap.ingest.backlog import StopBound
from pvtap.ingest.channel_socket import ChannelSocket, drain_together, socket_pair
from pvtap.ingest.engine import Codecs
from pvtap.ingest.framing import ConnectionRecord
from pvtap.ingest.lifecycle import (
    Restarts,
    Spawn,
    describe_exit,
    kill_if_running,
    reap,
    spawn_process,
    spawn_thread,
)
from pvtap.ingest.outbox import Message, Outbox
from pvtap.ingest.priority import AdaptivePriority, full_cpu_for_the_stop
from pvtap.ingest.settings import WorkerSettings
from pvtap.ingest.wire import Kind
from pvtap.privacy import Privacy
from pvtap.records import RawPayload, Record
from pvtap.store.local import LocalStore

log = logging.getLogger("pvtap.ingest")

COUNTS_EVERY_S = 1.0


class IngestStartError(RuntimeError):
    """The worker could not start (its store cannot be opened, or is written by another process)."""


@dataclass
class ChannelCounts:
    copies_sent: int = 0
    bytes_sent: int = 0
    copies_dropped: int = 0  # never reached the worker: the buffer was full, the worker down or behind
    copies_dropped_behind: int = 0  # of those: the worker could not have archived them within its stop grace
    bytes_dropped: int = 0
    copies_lost: int = 0  # reached a worker that ended (killed at a stop, or crashed) before it archived them
    worker_restarts: int = 0
    worker_exits: int = 0
    snapshot: dict[str, Any] = field(default_factory=dict)  # the worker's last SNAPSHOT


class CopyStream:
    """The copies of one relayed connection. Never blocks; `dropped` counts what was lost."""

    def __init__(self, channel: Channel, conn: int, open_doc: dict[str, Any]) -> None:
        self.channel = channel
        self.conn = conn
        self.open_doc = open_doc
        self.opaque = False  # the worker's Tap said the stream is not its protocol: copies stop
        self.dropped = 0

    def chunk(self, direction: str, data: bytes) -> None:
        if self.opaque:
            return
        if not self.channel._enqueue(wire.chunk(self.conn, direction, time.time_ns(), data), len(data)):
            self.dropped += 1

    def close(self, record: ConnectionRecord) -> None:
        """The connection ended: the worker completes, logs and stores its record."""
        record.dropped_copies += self.dropped
        self.channel._streams.pop(self.conn, None)
        self.channel._enqueue_control(wire.with_conn(Kind.CLOSE, self.conn, record.to_wire()))


class Channel:
    """One ingest worker and the socket to it (ChannelSocket). Use it from one thread (the event loop's)."""

    def __init__(self, settings: WorkerSettings, spawn: Spawn, name: str) -> None:
        self.settings = settings
        self.name = name
        self._spawn_worker = spawn  # given the worker's end of a socketpair, starts it; returns a handle
        self.limit = settings.queue_bytes
        self.counts = ChannelCounts()
        self.worker: Any = None  # subprocess.Popen or threading.Thread
        self._out = Outbox(self.limit)  # bounded in bytes: copies over the budget are dropped
        self.bound = StopBound(settings.archive_grace_s)  # and by what the worker archives at a stop
        self._socket = ChannelSocket(self._out, received=self._handle, sent=self._account_sent,
                                     flushed=self._send_counts, lost=self._worker_lost)
        self._streams: dict[int, CopyStream] = {}
        self._numbers = itertools.count(1)
        self._restarts = Restarts()
        self._closed = False
        self._tokens = itertools.count(1)
        self._synced: set[int] = set()
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._counts_sent = (0.0, -1)
        self._sent_now = 0  # copies sent to the current worker (the bound knows how many it archived)
        self.ready: dict[str, Any] = {}
        self.failed: str | None = None
        self.priority = AdaptivePriority() if settings.cpu_priority == "adaptive" else None

    @classmethod
    def process(cls, settings: WorkerSettings, name: str = "ingest") -> Channel:
        """A worker process: `python -m pvtap.ingest.worker`."""
        return cls(settings, spawn_process, name)

    @classmethod
    def thread(cls, settings: WorkerSettings, *, codecs: Codecs = codec_for, privacy: Privacy | None = None,
               name: str = "ingest") -> Channel:
        """The same worker in a thread of this process (tests that inject codecs, embedding)."""
        return cls(settings, spawn_thread(settings, codecs, privacy), name)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, wait_ready: float | None = None) -> Channel:
        """Start the worker; with `wait_ready`, wait that long for it to open its store
        (IngestStartError when it cannot). Call it from the thread that lives as long as the
        worker should (the event loop's): PR_SET_PDEATHSIG follows the thread that spawned it."""
        self._spawn()
        if wait_ready is None:
            return self
        deadline = time.monotonic() + wait_ready
        while not self.ready and self.failed is None and self._socket.connected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close(0)
                raise IngestStartError(f"the ingest worker for {self.settings.store} did not start within "
                                       f"{wait_ready:g} s")
            self._socket.poll(min(remaining, 0.2))
        if not self.ready:
            self.close(0)
            raise IngestStartError(self.failed or f"the ingest worker for {self.settings.store} exited at start "
                                                  "(its log above says why)")
        return self

    def attach(self) -> None:
        """Read the back-channel on the running event loop from now on."""
        self._socket.attach()

    def _spawn(self) -> None:
        ours, theirs = socket_pair(self.limit)
        self.worker = self._spawn_worker(theirs)
        if isinstance(self.worker, subprocess.Popen):
            theirs.close()  # the child has its copy; ours must go, or its EOF never comes
        self._socket.connect(ours)
        self._sent_now = 0
        self.bound.started()
        self._restarts.started_now()
        if self.priority is not None:
            self.priority.started(self.worker)
        self.ready, self.failed = {}, None
        first = [Message.of_control(wire.control(Kind.SETTINGS, self.settings.to_wire()))]
        first += [Message.of_control(wire.with_conn(Kind.OPEN, s.conn, s.open_doc)) for s in self._streams.values()]
        self._out.put_first(first)
        self._socket.attach()
        self._socket.flush()

    def close(self, timeout: float = 10.0) -> bool:
        """Send what is buffered (for up to `timeout`), end the channel and wait for the worker
        to archive what it got and exit. True when it did in time."""
        deadline = time.monotonic() + timeout
        self.hang_up(deadline)
        return self.wait_closed(deadline)

    def hang_up(self, deadline: float) -> None:
        """Send what is buffered (until `deadline`) and end the channel: the worker sees its EOF.
        Forwarding is over by now, so the worker gets its full share of the cores to finish."""
        hang_up_together([self], deadline)

    def _forwarding_over(self) -> None:
        self.priority = None
        full_cpu_for_the_stop(self.worker)
        self._send_counts(force=True)

    def _end(self) -> None:
        self._closed = True
        self._drop_unsent()
        self._socket.detach()
        self._socket.shut_write()

    def wait_closed(self, deadline: float) -> bool:
        """After hang_up: read the back-channel until the worker closes its end (it archived
        everything), then reap it. A worker still running at `deadline` is killed: the copies it
        had not archived are counted as lost, logged, and noted in the store's status row."""
        lost_before = self.counts.copies_lost
        while self._socket.connected and time.monotonic() < deadline:
            self._socket.poll(min(0.2, max(0.0, deadline - time.monotonic())))
        finished = self._reap(max(0.0, deadline - time.monotonic()))
        while self._socket.poll(0):  # what a killed worker said before it died: its last ARCHIVED
            pass
        if self._socket.connected:  # a worker thread that did not end in time
            self._worker_lost()
        if self.counts.copies_lost > lost_before:
            self._note_lost(self.counts.copies_lost - lost_before)
        return finished

    def _note_lost(self, lost: int) -> None:
        """Add copies lost at the stop to the status row the worker left (pvtap status shows it)."""
        try:
            with LocalStore(self.settings.store) as store:
                store.note_lost(lost, self.counts.copies_lost)
        except (sqlite3.Error, OSError) as exc:
            log.error("%s: could not note the %d lost copies in %s (%s)", self.name, lost, self.settings.store, exc)

    def close_soon(self, timeout: float = 10.0) -> None:
        """End the channel without waiting on this thread (a mitmproxy hook must not block): a
        thread the interpreter waits for at exit sends what is buffered (up to `timeout`), ends
        the channel and waits for the worker to archive it and exit (up to its stop grace),
        counting what it could not archive as `close` does."""
        if self._closed:
            return
        self._send_counts(force=True)
        self._socket.flush()
        self._socket.detach()
        def finish() -> None:
            deadline = time.monotonic() + timeout
            self.hang_up(deadline)
            self.wait_closed(max(deadline, time.monotonic()) + self.settings.stop_grace)
        threading.Thread(target=finish, name=f"pvtap-{self.name}-close", daemon=False).start()

    def _reap(self, timeout: float) -> bool:
        worker, self.worker = self.worker, None
        return reap(worker, timeout, self.name)

    @property
    def alive(self) -> bool:
        return self._socket.connected

    # -- what the relay and the addon call -------------------------------------------------------

    def open(self, record: ConnectionRecord, device: str = "", spread_by: str = "") -> CopyStream:
        conn = next(self._numbers)
        doc = {"record": record.to_wire(), "device": device}
        stream = CopyStream(self, conn, doc)
        self._streams[conn] = stream
        self._enqueue_control(wire.with_conn(Kind.OPEN, conn, doc))
        return stream

    def payload(self, raw: RawPayload) -> bool:
        """Queue a whole payload; False (counted) when it had to be dropped."""
        return self._enqueue(wire.payload(raw), len(raw.payload))

    def record(self, record: Record) -> None:
        """Queue a record that needs no decoding (rare, so always queued, like a control message)."""
        self._enqueue_control(wire.record(record))

    def stats(self, poll: bool = True) -> dict[str, Any]:
        """Both ends' counts, flat: this side's (copies sent and dropped, buffered bytes, worker
        restarts) and the worker's last snapshot (about a second old). `poll=False` does not read
        the back-channel: the only way to call it from another thread than the event loop's (the
        health endpoints), on a channel the loop reads (attached)."""
        if poll:
            self._socket.poll(0)
        c = self.counts
        return {**c.snapshot, "copies_sent": c.copies_sent, "bytes_sent": c.bytes_sent,
                "copies_dropped": c.copies_dropped, "copies_dropped_behind": c.copies_dropped_behind,
                "bytes_dropped": c.bytes_dropped, "copies_lost": c.copies_lost, "buffered_bytes": self._out.buffered,
                "unarchived_copies": self.bound.copies, "unarchived_copies_max": self.bound.max_copies,
                "worker_alive": self.alive, "worker_restarts": c.worker_restarts, "worker_exits": c.worker_exits}

    async def idle(self, timeout: float = 30.0) -> None:
        """Wait until everything sent so far is archived and decoded (tests, benchmarks)."""
        loop = self._socket.attach()
        assert loop is not None  # in a coroutine
        token = next(self._tokens)
        future: asyncio.Future[None] = loop.create_future()
        self._waiters[token] = future
        self._enqueue_control(wire.with_conn(Kind.SYNC, token))
        try:
            async with asyncio.timeout(timeout):
                await future
        finally:
            self._waiters.pop(token, None)

    def sync(self, timeout: float = 30.0) -> bool:
        """`idle()` for code without an event loop: blocks, True when done in time."""
        token = next(self._tokens)
        self._enqueue_control(wire.with_conn(Kind.SYNC, token))
        deadline = time.monotonic() + timeout
        self._socket.drain(deadline)
        while token not in self._synced and self._socket.connected and time.monotonic() < deadline:
            self._socket.poll(min(0.2, max(0.0, deadline - time.monotonic())))
            self._socket.drain(deadline)
        done = token in self._synced
        self._synced.discard(token)
        return done

    # -- queueing, and counting what was sent or dropped -----------------------------------------

    def _enqueue(self, parts: list[bytes], size: int) -> bool:
        """Queue a copy of `size` bytes; False (counted) when over a bound or no worker."""
        self._restart_if_due()
        if self._closed or not self._socket.connected:
            return self._drop(size)
        if not self.bound.fits(size):
            self.counts.copies_dropped_behind += 1
            return self._drop(size)
        if not self._out.add_copy(parts, size):
            return self._drop(size)
        self.bound.accepted(size)
        self._socket.schedule_flush()
        self._watch_pace()
        return True

    def _drop(self, size: int) -> bool:
        self.counts.copies_dropped += 1
        self.counts.bytes_dropped += size
        return False

    def _enqueue_control(self, parts: list[bytes]) -> None:
        """Queue a control message: kept for the next worker when this one is down."""
        self._restart_if_due()
        if self._closed or not self._out.add_control(parts):
            log.debug("%s: control message dropped (%d bytes waiting)", self.name, self._out.control)
            return
        self._socket.schedule_flush()

    def _watch_pace(self) -> None:
        """ingest.cpu_priority = "adaptive": is the worker keeping up (priority.py)?"""
        if self.priority is not None:
            self.priority.check(self._sent_now, self.bound.archived_copies, self._fill)

    def _fill(self) -> float:
        """How much of what the channel may hold for its worker is taken (1.0: full)."""
        return max(self.bound.fill(), self._out.buffered / self.limit)

    def _account_sent(self, message: Message) -> None:
        if not message.control:
            self.counts.copies_sent += 1
            self._sent_now += 1
            self.counts.bytes_sent += len(message.parts[-1])

    def _drop_unsent(self) -> None:
        """At the end: copies the worker did not take in time (a half-sent one too: the worker
        cannot read a part) are dropped and counted."""
        self._count_dropped(self._out.clear())

    def _count_dropped(self, copies: list[Message]) -> None:
        self.counts.copies_dropped += len(copies)
        self.counts.bytes_dropped += sum(message.size for message in copies)

    def _send_counts(self, force: bool = False) -> None:
        """Tell the worker this side's drops (for the status row), now and then."""
        now = time.monotonic()
        last, dropped = self._counts_sent
        losses = self.counts.copies_dropped + self.counts.copies_lost
        if force or (losses != dropped and now - last >= COUNTS_EVERY_S):
            self._counts_sent = (now, losses)
            c = self.counts
            doc = {"copies_dropped": c.copies_dropped, "copies_dropped_behind": c.copies_dropped_behind,
                   "bytes_dropped": c.bytes_dropped, "copies_lost": c.copies_lost, "worker_restarts": c.worker_restarts}
            self._out.add_control(wire.control(Kind.COUNTS, doc), always=True)

    # -- the back-channel --------------------------------------------------------------------------

    def _handle(self, kind: Kind, body: bytes) -> None:
        if kind is Kind.OPAQUE:
            conn, _ = wire.conn_of(body)
            stream = self._streams.get(conn)
            if stream is not None:
                stream.opaque = True
        elif kind is Kind.ARCHIVED:
            self.bound.archived(*wire.read_archived(body))
            self._watch_pace()
        elif kind is Kind.SNAPSHOT:
            snapshot = self.counts.snapshot = wire.doc(body)
            self.bound.measured(snapshot.get("archive_rate", 0), snapshot.get("archive_byte_rate", 0))
            if self.priority is not None:
                self.priority.decode_backlog = snapshot.get("decode_backlog", 0)
        elif kind is Kind.SYNCED:
            token, _ = wire.conn_of(body)
            self._synced.add(token)
            future = self._waiters.pop(token, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind is Kind.READY:
            self.ready = wire.doc(body)
            self._restarts.ready(self.counts.worker_restarts)
        elif kind is Kind.FAILED:
            self.failed = wire.doc(body)["error"]

    # -- a worker that died ------------------------------------------------------------------------

    def _worker_lost(self) -> None:
        """The worker's end closed: after a clean close that is the end; otherwise count what is
        lost, keep the control messages for the next worker and restart it after a back-off."""
        self._socket.disconnect()
        half_sent = self._out.pop_half_sent() if not self._closed else None
        if half_sent is not None:  # the new worker cannot read the rest
            self._account_sent(half_sent)  # sent to the worker that is gone: counted as lost below
        self._count_lost()
        if self._closed:
            return
        self.counts.worker_exits += 1
        self._count_dropped(self._out.keep_for_next_worker())  # OPENs are sent again for the connections still open
        if self.failed is not None:
            return  # it could not open its store: the start-up error says why; no restarts
        ran, delay = self._restarts.schedule()
        pid, code = describe_exit(self.worker)
        log.error("%s: the ingest worker%s ended unexpectedly%s after %.0f s; restarting it in %.1f s; copies are "
                  "dropped and counted until then (forwarding is unaffected)", self.name,
                  f" (pid {pid})" if pid else "", f" with status {code}" if code is not None else "", ran, delay)
        loop = self._socket.loop
        if loop is not None and not loop.is_closed():
            loop.call_later(delay, self._restart_if_due)

    def _count_lost(self) -> None:
        """The worker is gone and its back-channel read to the end: what it got and did not say
        it archived is lost (it was killed at a stop, or crashed), counted and logged once."""
        lost, self._sent_now = max(0, self._sent_now - self.bound.archived_copies), 0
        self.bound.started()  # nothing is waiting for this worker any more
        if lost:
            self.counts.copies_lost += lost
            log.error("%s: %d copies the ingest worker had received were not archived before it ended; they are "
                      "lost (forwarding was not affected)%s", self.name, lost,
                      "" if not self._closed else ". Fix: give the stop more time (a slow disk or an overload: "
                      "docs/relay.md, \"Stopping\")")

    def _restart_if_due(self) -> None:
        if self._closed or not self._restarts.due():
            return
        kill_if_running(self.worker)
        self.counts.worker_restarts += 1
        try:
            self._spawn()
        except OSError as exc:
            log.error("%s: cannot start the ingest worker again (%s)", self.name, exc)
            self._worker_lost()


def hang_up_together(channels: list[Channel], deadline: float) -> None:
    """`Channel.hang_up` for several channels (a pool's) at once: each worker gets the rest of its
    copies while the others get theirs, so none spends its stop grace waiting for another's."""
    channels = [channel for channel in channels if not channel._closed]
    for channel in channels:
        channel._forwarding_over()
    drain_together([channel._socket for channel in channels], deadline)
    for channel in channels:
        channel._end()
