"""The ingest worker's reader: takes the forwarding process's messages off the channel, frames the
copies per connection (framing.py: a Tap each), redacts the payloads and queues them for the
archiver (archive.py).

It runs on the worker's main thread and reads as fast as the socket gives (raw first): when a
read is more than a trickle (TRICKLE_BYTES: copies were piling up), or holds a copy taken by the
forwarding side more than LATE_S ago (a fleet the worker cannot keep up with still arrives a
trickle per read, but late), it marks the worker busy, and the decoder takes short turns
(decoding.py), leaving the worker's time to archiving. It returns when the channel ends (EOF: the
parent stopped or died) or, after a SIGTERM, within the archive grace even if the channel stays open.

A fleet's copies trickle in, one small message per read. After a read that small the reader
waits GATHER_S and takes what has come meanwhile in the same pass (`gather`): one hand-off to
the archiver and one ARCHIVED for several copies instead of one each. At 1,000 devices on this
2-core machine that took a quarter off the worker's CPU, and some of the relay's (it reads fewer
acknowledgements); docs/design.md has the figures.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import time
from collections.abc import Sequence

from pvtap.ingest import wire
from pvtap.ingest.archive import ArchiveQueue
from pvtap.ingest.engine import Ingest
from pvtap.ingest.framing import ConnectionRecord, Connections
from pvtap.ingest.wire import Kind
from pvtap.ingest.worker_state import WorkerState
from pvtap.records import RawPayload, Record

log = logging.getLogger("pvtap.ingest")

#: one read of the channel
RECV_SIZE = 1 << 20
#: a read smaller than this is a trickle (a fleet's copies): the reader waits GATHER_S for more
TRICKLE_BYTES = 64 << 10
GATHER_S = 0.005
#: a copy read this long after the forwarding side took it: the worker is behind
LATE_S = 0.5


def gather(sock: socket.socket, data: bytes, wait_s: float = GATHER_S) -> bytes:
    """`data`, a trickle's read, and what has arrived after `wait_s` more (up to RECV_SIZE in
    all); stops at the channel's end or an error, which the next read then sees."""
    time.sleep(wait_s)
    while len(data) < RECV_SIZE and select.select([sock], [], [], 0)[0]:
        try:
            more = sock.recv(RECV_SIZE - len(data))
        except OSError:
            break
        if not more:
            break
        data += more
    return data


class ChannelReader:
    """Reads one channel until it ends (`run`), then finishes the connections left open (`finish`)."""

    def __init__(self, sock: socket.socket, state: WorkerState, queue: ArchiveQueue, ingest: Ingest,
                 connections: Connections) -> None:
        self.sock = sock
        self.state = state
        self.counts = state.counts
        self.queue = queue
        self.ingest = ingest
        self.connections = connections
        self._queued_through = (0, 0)  # copies (and their bytes) whose payloads are queued for the archiver
        self._late_before_ns = 0  # a copy taken before this (wall clock, as the copies carry it) is late
        self._late = False  # this read held a late copy

    def run(self) -> None:
        reader = wire.Reader()
        self.sock.settimeout(0.5)
        while True:
            if self.state.past_stop_deadline():
                log.warning("ingest worker: told to stop; leaving the channel with %d bytes unread", reader.pending)
                return
            try:
                data = self.sock.recv(RECV_SIZE)
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                return
            if not data:
                return
            if len(data) < TRICKLE_BYTES:
                data = gather(self.sock, data)
            if len(data) >= TRICKLE_BYTES:  # more than a trickle: copies pile up, the decoder gives way (raw first)
                self.state.busy_at = time.monotonic()
            self._late_before_ns, self._late = time.time_ns() - int(LATE_S * 1e9), False
            for kind, body in reader.feed(data):
                self._handle(kind, body)
            if self._late:  # behind on a trickle: the decoder gives way too
                self.state.busy_at = time.monotonic()
            if self.counts.copies_received > self._queued_through[0]:  # copies still being framed count too
                self._queue([])

    def finish(self) -> None:
        """The channel ended: the connections still open (the relay died) are finished, and what
        they leave is queued."""
        payloads, records = self.connections.close_all()
        if payloads or records:
            self._queue([self.ingest.redact(p) for p in payloads], records)

    def _handle(self, kind: Kind, body: bytes) -> None:
        if kind is Kind.CHUNK:
            conn, direction, time_ns, data = wire.read_chunk(body)
            if time_ns < self._late_before_ns:
                self._late = True
            self.counts.copies_received += 1
            self.counts.bytes_received += len(data)
            payloads = self.connections.chunk(conn, direction, time_ns, data)
            if payloads:
                self._queue([self.ingest.redact(p) for p in payloads])
        elif kind is Kind.PAYLOAD:
            raw = wire.read_payload(body)
            self.counts.copies_received += 1
            self.counts.bytes_received += len(raw.payload)
            self._queue([self.ingest.redact(raw)])
        elif kind is Kind.OPEN:
            conn, doc = wire.conn_of(body)
            self.counts.connections += 1
            self.connections.open(conn, ConnectionRecord.from_wire(doc["record"]), doc.get("device", ""))
        elif kind is Kind.CLOSE:
            conn, doc = wire.conn_of(body)
            payloads, record = self.connections.close(conn, ConnectionRecord.from_wire(doc))
            self._queue([self.ingest.redact(p) for p in payloads], [record])
        elif kind is Kind.RECORD:
            self._queue([], [wire.read_record(body)])
        elif kind is Kind.COUNTS:
            self.counts.parent = {k: int(v) for k, v in wire.doc(body).items()}
        elif kind is Kind.SETTINGS:  # a worker in a thread was given them directly
            pass
        elif kind is Kind.SYNC:
            token, _ = wire.conn_of(body)
            self.queue.put([], sync=token, through=self._queued_through)
        else:
            log.warning("ingest worker: unexpected %s message ignored", kind.name)

    def _queue(self, raws: list[RawPayload], records: Sequence[Record] = ()) -> None:
        """Queue for the archiver what the copies received so far gave."""
        through = (self.counts.copies_received, self.counts.bytes_received)
        dropped = self.queue.put(raws, records, through=through, give_up=self.state.past_stop_deadline)
        self._queued_through = through
        if dropped:
            self.state.dropped(dropped)
            log.error("ingest: stopping with the archive behind: %d payloads dropped", dropped)
