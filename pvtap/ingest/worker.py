"""The ingest worker: everything that happens to a copy after it was forwarded, off the
forwarding process's GIL.

    relay / mitmdump process                ingest worker (a process; a thread in tests)
    pump → cloud (first)                    reader: messages → Tap per connection → redact
      └ copy → channel ──── socket ───────►   └► archive queue (bytes-bounded)
                                            archiver: group commit into the raw archive
                                            decoder: follows the archive with its cursor
                                            ticker: snapshots, status row, forwarder supervision
      ◄──────────────── opaque, snapshots, synced ──

The worker process's entry (`python -m pvtap.ingest.worker --fd N`, started by the channel) and
its threads over one shared state: the reader, the archiver, the decoder and the ticker. What
they use lives beside it: the settings (settings.py), the archive queue and writer lock
(archive.py), the forwarders and MQTT publisher (outputs.py), the engine (engine.py).

One worker per store file; a lock file (`<store>.writer.lock`) makes a second writer fail at
start with a message instead of sharing the file. The worker ends by itself when its channel
ends (EOF: the parent stopped or died; PR_SET_PDEATHSIG covers a parent killed before it could
close the socket): it archives what it received, decodes for at most `ingest.stop_decode_s`
more, and leaves the rest of the backlog in the archive for the next start.

A full or failing disk: the archiver keeps its batch and retries with back-off; meanwhile new
copies are dropped and counted once the archive queue is full. One error when it starts, a
summary now and then, one line when it works again. Forwarding is never affected.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import logging
import os
import select
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvtap.config import InfluxConfig, MqttConfig
from pvtap.decode import codec_for
from pvtap.ingest import wire
from pvtap.ingest.archive import ArchiveQueue, Batch, WriterLockError, writer_lock
from pvtap.ingest.engine import Codecs, Ingest
from pvtap.ingest.framing import ConnectionRecord, Connections
from pvtap.ingest.outputs import Outputs
from pvtap.ingest.settings import ARCHIVE_STOP_GRACE_S, WorkerSettings, read_settings
from pvtap.ingest.wire import Kind
from pvtap.privacy import Privacy
from pvtap.records import RawPayload, Record
from pvtap.store.local import IngestStatus, LocalStore

log = logging.getLogger("pvtap.ingest")

SNAPSHOT_EVERY_S = 1.0
#: one read of the channel
RECV_SIZE = 1 << 20
#: while the reader finds more waiting each time it reads, the decoder takes short turns (a few
#: payloads) and pauses between them, so that framing and archiving (raw first) get the GIL;
#: decoding catches up when the load drops
BUSY_S = 0.05
BUSY_DECODE = 50
BUSY_DECODE_S = 0.01
BUSY_PAUSE_S = 0.1
STATUS_EVERY_S = 5.0
FAILURE_SUMMARY_EVERY_S = 60.0
RETRY_MAX_S = 5.0


@dataclass
class WorkerCounts:
    copies_received: int = 0  # chunks and whole payloads from the channel
    copies_archived: int = 0  # of those, the first n are archived (told to the parent: ARCHIVED)
    bytes_received: int = 0
    connections: int = 0
    dropped_copies: int = 0  # framed and redacted, but not archived (the disk failed until the worker stopped)
    archive_errors: int = 0
    parent: dict[str, int] = field(default_factory=dict)  # the forwarding side's own counts (COUNTS)


class Worker:
    """One channel's worker: reads the messages from `sock` until it ends, archives and decodes
    into the store named by `settings`. `run()` blocks; it is the same in a process and a thread."""

    def __init__(self, sock: socket.socket, settings: WorkerSettings, *, codecs: Codecs = codec_for,
                 privacy: Privacy | None = None) -> None:
        self.sock = sock
        self.settings = settings
        self.codecs = codecs
        self.privacy = privacy if privacy is not None else settings.make_privacy()
        self.counts = WorkerCounts()
        self.queue = ArchiveQueue(settings.queue_bytes)
        self.connections = Connections(self.privacy, codecs, self._opaque)
        self.stopping = threading.Event()  # the channel ended (or SIGTERM): finish up
        self._stop_deadline: float | None = None
        self._archived = threading.Event()  # the archiver committed something: the decoder looks
        self._syncs: list[tuple[int, int]] = []  # (token, raw id that must be decoded first)
        self._syncs_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._unsent = bytearray()
        self._queued_through = 0  # copies whose payloads are queued for the archiver
        self._acknowledging = True  # tell the parent what is archived (until something had to be dropped)
        self._busy_at = -1.0  # when the reader last found more waiting than one read takes
        self._failing_since: float | None = None
        self._threads: list[threading.Thread] = []
        self._locks = contextlib.ExitStack()  # the writer locks of adopted stores
        self.ingest: Ingest | None = None
        self.adopted: list[Ingest] = []
        self.outputs = Outputs()  # forwarders (with [influx] url) and the MQTT publisher (with [mqtt] url)

    # -- the whole life ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve the channel until it ends; 0, or 2 when the store could not be opened."""
        store_path = Path(self.settings.store)
        try:
            with writer_lock(store_path):
                store = LocalStore(store_path)
                try:
                    return self._serve(store)
                finally:
                    store.close()
                    for ingest in self.adopted:
                        ingest.store.close()
        except (WriterLockError, sqlite3.Error, OSError, RuntimeError) as exc:
            log.error("ingest worker cannot open its store: %s", exc)
            self._send(wire.control(Kind.FAILED, {"error": str(exc)}))
            return 2
        finally:
            self.sock.close()  # the parent's EOF: everything received is archived

    def _serve(self, store: LocalStore) -> int:
        self.ingest = Ingest(store, self.privacy, codecs=self.codecs)
        self.adopted = [Ingest(s, self.privacy, codecs=self.codecs) for s in self._adopt()]
        paths = [i.store.path for i in [self.ingest, *self.adopted]]
        self.outputs.prepare(paths, InfluxConfig(**self.settings.influx))
        backlog = sum(i.store.decode_backlog() for i in [self.ingest, *self.adopted])
        log.info("ingest worker (pid %d) writing %s%s; %d payloads waiting to be decoded", os.getpid(), store.path,
                 "".join(f", adopting {i.store.path.name}" for i in self.adopted), backlog)
        self._send(wire.control(Kind.READY, {"pid": os.getpid(), "store": str(store.path), "backlog": backlog}))
        for target, name in ((self._archiver, "archive"), (self._decoder, "decode"), (self._ticker, "ticker")):
            thread = threading.Thread(target=target, name=f"pvtap-{name}-{store.path.stem}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.outputs.start(paths, MqttConfig(**self.settings.mqtt) if self.settings.mqtt else MqttConfig())
        try:
            self._read()
        finally:
            self.stop()
        return 0

    def _adopt(self) -> list[LocalStore]:
        stores = []
        for path in map(Path, self.settings.adopt):
            lock = contextlib.ExitStack()
            try:
                lock.enter_context(writer_lock(path))
                stores.append(LocalStore(path))
            except (WriterLockError, sqlite3.Error, OSError) as exc:
                lock.close()
                log.warning("not adopting %s: %s", path.name, exc)
                continue
            self._locks.push(lock)
        return stores

    def request_stop(self) -> None:
        """SIGTERM: stop reading within ARCHIVE_STOP_GRACE_S even if the channel stays open."""
        self._stop_deadline = time.monotonic() + ARCHIVE_STOP_GRACE_S

    def stop(self) -> None:
        """The channel ended: archive what was received, decode a little more, write the final
        status row, stop the forwarders."""
        payloads, records = self.connections.close_all()
        if payloads or records:
            self._queue([self._redact(p) for p in payloads], records)
        self.stopping.set()
        with self.queue.cond:
            self.queue.cond.notify_all()
        for thread in self._threads:
            thread.join(ARCHIVE_STOP_GRACE_S + self.settings.stop_decode_s + 5)
        self.outputs.stop()
        self._write_status(running=False)
        self._locks.close()
        log.info("ingest worker stopped: %s", self._summary())

    # -- reading the channel -------------------------------------------------------------------

    def _read(self) -> None:
        reader = wire.Reader()
        self.sock.settimeout(0.5)
        while True:
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                log.warning("ingest worker: told to stop; leaving the channel with %d bytes unread", reader.pending)
                return
            if select.select([self.sock], [], [], 0)[0]:  # more was waiting: the decoder gives way (raw first)
                self._busy_at = time.monotonic()
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
            for kind, body in reader.feed(data):
                self._handle(kind, body)
            if self.counts.copies_received > self._queued_through:  # copies still being framed count too
                self._queue([])

    def _handle(self, kind: Kind, body: bytes) -> None:
        if kind is Kind.CHUNK:
            conn, direction, time_ns, data = wire.read_chunk(body)
            self.counts.copies_received += 1
            self.counts.bytes_received += len(data)
            payloads = self.connections.chunk(conn, direction, time_ns, data)
            if payloads:
                self._queue([self._redact(p) for p in payloads])
        elif kind is Kind.PAYLOAD:
            raw = wire.read_payload(body)
            self.counts.copies_received += 1
            self.counts.bytes_received += len(raw.payload)
            self._queue([self._redact(raw)])
        elif kind is Kind.OPEN:
            conn, doc = wire.conn_of(body)
            self.counts.connections += 1
            self.connections.open(conn, ConnectionRecord.from_wire(doc["record"]), doc.get("device", ""))
        elif kind is Kind.CLOSE:
            conn, doc = wire.conn_of(body)
            payloads, record = self.connections.close(conn, ConnectionRecord.from_wire(doc))
            self._queue([self._redact(p) for p in payloads], [record])
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

    def _redact(self, raw: RawPayload) -> RawPayload:
        assert self.ingest is not None  # set before reading starts
        return self.ingest.redact(raw)

    def _queue(self, raws: list[RawPayload], records: Sequence[Record] = ()) -> None:
        """Queue for the archiver what the copies received so far gave."""
        through = self.counts.copies_received
        dropped = self.queue.put(raws, records, through=through, give_up=self._past_stop_deadline)
        self._queued_through = through
        if dropped:
            self.counts.dropped_copies += dropped
            self._acknowledging = False  # the parent counts every copy after the last acknowledged one as lost
            log.error("ingest: stopping with the archive behind: %d payloads dropped", dropped)

    def _past_stop_deadline(self) -> bool:
        return self._stop_deadline is not None and time.monotonic() > self._stop_deadline

    def _opaque(self, conn: int) -> None:
        self._send(wire.with_conn(Kind.OPAQUE, conn))

    # -- archiving -----------------------------------------------------------------------------

    def _archiver(self) -> None:
        assert self.ingest is not None
        held: Batch | None = None
        delay = 0.1
        while True:
            if held is None:
                if self.stopping.is_set() and not len(self.queue):
                    return
                held = self.queue.take(0.5)
            batch = held
            if batch.raws or batch.records:
                try:
                    self.ingest.archive(batch.raws, batch.records)
                except sqlite3.Error as exc:
                    self._archive_failed(exc, len(batch.raws))
                    if self.stopping.is_set() and self._past_grace():
                        self.counts.dropped_copies += len(batch.raws)
                        self._acknowledging = False
                        log.error("ingest: stopping with %d payloads that could not be archived (%s)",
                                  len(batch.raws), exc)
                        self.queue.done(batch.size)
                        return
                    time.sleep(delay)
                    delay = min(RETRY_MAX_S, delay * 2)
                    continue
                self._archive_works()
                delay = 0.1
            self.queue.done(batch.size)
            held = None
            if self._acknowledging and batch.through > self.counts.copies_archived:
                self.counts.copies_archived = batch.through
                self._send(wire.archived(batch.through))
            cursor_target = self.ingest.store.newest_raw_id() if batch.syncs else 0
            with self._syncs_lock:
                self._syncs += [(token, cursor_target) for token in batch.syncs]
            self._archived.set()

    def _past_grace(self) -> bool:
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + ARCHIVE_STOP_GRACE_S
        return time.monotonic() > self._stop_deadline

    def _archive_failed(self, exc: sqlite3.Error, payloads: int) -> None:
        self.counts.archive_errors += 1
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = self._last_summary = now
            full = "full" in str(exc)
            log.error("ingest: CANNOT ARCHIVE to %s (%s)%s; %d payloads held and retried, new copies are dropped and "
                      "counted once %d MiB are waiting; forwarding is unaffected", self.settings.store, exc,
                      ": free space on its disk" if full else "", payloads, self.queue.limit >> 20)
        elif now - self._last_summary >= FAILURE_SUMMARY_EVERY_S:
            self._last_summary = now
            log.error("ingest: still cannot archive after %.0f s (%s); %d payloads dropped so far",
                      now - self._failing_since, exc, self.counts.dropped_copies)

    def _archive_works(self) -> None:
        if self._failing_since is not None:
            log.warning("ingest: archiving works again after %.0f s; %d payloads were dropped meanwhile",
                        time.monotonic() - self._failing_since, self.counts.dropped_copies)
            self._failing_since = None

    # -- decoding ------------------------------------------------------------------------------

    def _decoder(self) -> None:
        assert self.ingest is not None
        engines = [self.ingest, *self.adopted]
        stop_at: float | None = None
        delay = 0.1
        while True:
            if self.stopping.is_set():  # decode for stop_decode_s more at most: the rest waits in the archive
                stop_at = stop_at or time.monotonic() + self.settings.stop_decode_s
                archiver_done = not self._threads[0].is_alive()  # started first
                if time.monotonic() >= stop_at or (archiver_done and not self._any_backlog(engines)):
                    return
            busy = time.monotonic() - self._busy_at < BUSY_S
            try:
                decoded = sum(engine.decode_pending(*((BUSY_DECODE, BUSY_DECODE_S) if busy else ()))
                              for engine in engines)
            except sqlite3.Error as exc:
                log.error("ingest: cannot store decoded records (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            delay = 0.1
            self._answer_syncs()
            if busy:
                time.sleep(BUSY_PAUSE_S)
            elif not decoded:
                self._archived.wait(0.2)
                self._archived.clear()

    @staticmethod
    def _any_backlog(engines: list[Ingest]) -> bool:
        return any(engine.store.decode_backlog() for engine in engines)

    def _answer_syncs(self) -> None:
        assert self.ingest is not None
        with self._syncs_lock:
            if not self._syncs:
                return
            cursor = self.ingest.store.decode_cursor()
            ready = [token for token, target in self._syncs if target <= cursor]
            self._syncs = [(t, target) for t, target in self._syncs if target > cursor]
        if ready:  # a fresh snapshot first: whoever waited reads the counts next
            self._send(wire.control(Kind.SNAPSHOT, self.snapshot()))
        for token in ready:
            self._send(wire.with_conn(Kind.SYNCED, token))

    # -- telling how it goes -------------------------------------------------------------------

    def _ticker(self) -> None:
        next_status = 0.0
        while not self.stopping.wait(SNAPSHOT_EVERY_S):
            self.outputs.supervise()
            self._send(wire.control(Kind.SNAPSHOT, self.snapshot()))
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_EVERY_S
                self._write_status(running=True)

    def snapshot(self) -> dict[str, Any]:
        """The worker's counts, flat (for `stats()` on the channel, /readyz and metrics)."""
        assert self.ingest is not None
        c, i = self.counts, self.ingest.counts
        try:
            backlog = sum(engine.store.decode_backlog() for engine in [self.ingest, *self.adopted])
        except sqlite3.Error:
            backlog = -1
        out: dict[str, Any] = {
            "pid": os.getpid(), "store": self.settings.store, "copies_received": c.copies_received,
            "bytes_received": c.bytes_received, "copies_archived": c.copies_archived, "connections": c.connections,
            "connections_open": len(self.connections), "frames": self.connections.frames,
            "tap_errors": self.connections.tap_errors, "raw_archived": i.stored_raw, "archive_errors": c.archive_errors,
            "archive_failing": self._failing_since is not None, "dropped_copies": c.dropped_copies,
            "decoded": i.decoded + sum(a.counts.decoded for a in self.adopted),
            "records": i.records + sum(a.counts.records for a in self.adopted),
            "decode_errors": i.decode_errors + sum(a.counts.decode_errors for a in self.adopted),
            "redact_errors": i.redact_errors, "decode_backlog": backlog,
        }
        out.update(self.outputs.state())
        return out

    def _write_status(self, running: bool) -> None:
        if self.ingest is None:
            return
        snap = self.snapshot()
        parent_dropped = self.counts.parent.get("copies_dropped", 0)
        status = IngestStatus(running=running, pid=os.getpid(), dropped_copies=snap["dropped_copies"] + parent_dropped,
                              decode_backlog=max(0, snap["decode_backlog"]), forwarder=snap["forwarder"],
                              forwarder_error=snap["forwarder_error"],
                              counts={**snap, **{f"parent_{k}": v for k, v in self.counts.parent.items()}})
        try:
            self.ingest.store.write_status(status)
        except sqlite3.Error as exc:
            log.debug("could not write the status row: %s", exc)

    def _summary(self) -> str:
        s = self.snapshot() if self.ingest is not None else {}
        return (f"{s.get('copies_received', 0)} copies received, {s.get('raw_archived', 0)} payloads archived, "
                f"{s.get('records', 0)} records, {s.get('decode_errors', 0)} decode errors, "
                f"{s.get('dropped_copies', 0)} dropped, {s.get('decode_backlog', 0)} left to decode")

    def _send(self, parts: list[bytes]) -> None:
        """Send on the back-channel without ever blocking: the parent reads it when it can; what
        does not fit waits, and snapshots are dropped when too much waits."""
        with self._send_lock:
            if len(self._unsent) > 1 << 20:
                return
            self._unsent += b"".join(parts)
            try:
                while self._unsent:
                    sent = self.sock.send(self._unsent, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                    del self._unsent[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._unsent.clear()  # the parent is gone; the reader sees the EOF


# -- as a process --------------------------------------------------------------------------------

#: ingest.cpu_priority = "low": how much lower the worker's CPU priority is than its forwarding process's (nice(2))
WORKER_NICENESS = 10


def yield_cpu(priority: str) -> None:
    """When the cores are busy, the forwarding process goes first: a round trip waiting behind a
    decode is what devices feel, and the worker's backlog is bounded and archived anyway.

    "low" (the default): nice 10. "idle" (SCHED_IDLE): a forwarding process that wakes takes the
    core from the worker at once, where at nice 10 it could wait out the worker's time slice, some
    milliseconds (1,000 devices × 1 frame/s, relay pinned to one core with its worker: added p99
    +3 ms at nice 10, +1 ms idle); but a worker starved by other work falls behind while the
    relay forwards, and its copies are dropped past ingest.queue_mb, so it is opt-in. (At the stop
    the parent gives it its full share back: lifecycle.full_cpu_for_the_stop.)
    Where the kernel refuses it (not Linux), nice 10 as with "low"."""
    if priority == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except (AttributeError, OSError) as exc:
            log.info("ingest.cpu_priority = idle not available here (%s): running at nice %d", exc, WORKER_NICENESS)
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)


def _die_with_parent(parent_pid: int) -> None:
    """PR_SET_PDEATHSIG: SIGTERM when the parent dies (it may die before it closes the socket)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent_pid and os.getppid() != parent_pid:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pvtap.ingest.worker",
                                     description="The ingest worker of a relay or mitmdump process (started by it).")
    parser.add_argument("--fd", type=int, required=True, help="the channel socket inherited from the parent")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    settings = read_settings(sock)
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    _die_with_parent(settings.parent_pid)
    yield_cpu(settings.cpu_priority)
    worker = Worker(sock, settings)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent too; it closes the channel
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop())
    return worker.run()


def run_in_thread(sock: socket.socket, settings: WorkerSettings, *, codecs: Codecs = codec_for,
                  privacy: Privacy | None = None, name: str = "pvtap-ingest-worker") -> threading.Thread:
    """The same worker in a thread of this process (tests, embedding with injected codecs)."""
    worker = Worker(sock, settings, codecs=codecs, privacy=privacy)
    thread = threading.Thread(target=worker.run, name=name, daemon=True)
    thread.worker = worker  # type: ignore[attr-defined]
    thread.start()
    return thread


if __name__ == "__main__":
    sys.exit(main())
