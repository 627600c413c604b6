"""The ingest worker: everything that happens to a copy after it was forwarded, off the
forwarding process's GIL.

    relay / mitmdump process                ingest worker (a process; a thread in tests)
    pump → cloud (first)                    reader: messages → Tap per connection → redact
      └ copy → channel ──── socket ───────►   └► archive queue (bytes-bounded)
                                            archiver: group commit into the raw archive
                                            decoder: follows the archive with its cursor
                                            ticker: snapshots, status row, forwarder supervision
      ◄──────────────── opaque, snapshots, synced ──

This module is the worker's life: its entry as a process (`python -m pvtap.ingest.worker --fd N`,
started by the channel) or as a thread, its store files, its threads and its stop, and what it
tells of itself (the ticker: snapshots, the status row). The threads share one WorkerState
(worker_state.py): the reader (reader.py), the archiver (archive.py, with the writer lock and the
archive queue), the decoder (decoding.py). Beside them: the settings (settings.py), the
forwarders and MQTT publisher (outputs.py), the engine (engine.py).

One worker per store file; a lock file (`<store>.writer.lock`) makes a second writer fail at
start with a message instead of sharing the file. The worker ends by itself when its channel
ends (EOF: the parent stopped or died; PR_SET_PDEATHSIG covers a parent killed before it could
close the socket): it archives what it received, decodes for at most `ingest.stop_decode_s`
more, and leaves the rest of the backlog in the archive for the next start.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvtap.config import InfluxConfig, MqttConfig
from pvtap.decode import codec_for
from pvtap.ingest import wire
from pvtap.ingest.archive import ArchiveQueue, Archiver, WriterLockError, writer_lock
from pvtap.ingest.backlog import ArchiveCost, thread_clock
from pvtap.ingest.decoding import Decoder
from pvtap.ingest.engine import Codecs, Ingest
from pvtap.ingest.framing import Connections
from pvtap.ingest.outputs import Outputs
from pvtap.ingest.priority import yield_cpu
from pvtap.ingest.reader import ChannelReader
from pvtap.ingest.settings import WorkerSettings, read_settings
from pvtap.ingest.wire import Kind
from pvtap.ingest.worker_state import WorkerState
from pvtap.privacy import Privacy
from pvtap.store.local import IngestStatus, LocalStore

log = logging.getLogger("pvtap.ingest")

SNAPSHOT_EVERY_S = 1.0
STATUS_EVERY_S = 5.0


class Worker:
    """One channel's worker: reads the messages from `sock` until it ends, archives and decodes
    into the store named by `settings`. `run()` blocks; it is the same in a process and a thread."""

    def __init__(self, sock: socket.socket, settings: WorkerSettings, *, codecs: Codecs = codec_for,
                 privacy: Privacy | None = None) -> None:
        self.sock = sock
        self.settings = settings
        self.codecs = codecs
        self.privacy = privacy if privacy is not None else settings.make_privacy()
        self.state = WorkerState(sock, settings)
        self.counts = self.state.counts
        self.queue = ArchiveQueue(settings.queue_bytes)  # from the reader to the archiver
        self.connections = Connections(self.privacy, codecs, self._opaque)
        self._threads: list[threading.Thread] = []
        self._locks = contextlib.ExitStack()  # the writer locks of adopted stores
        self.ingest: Ingest | None = None
        self.adopted: list[Ingest] = []
        self.outputs = Outputs()  # forwarders (with [influx] url) and the MQTT publisher (with [mqtt] url)
        self.cost: ArchiveCost | None = None  # what archiving a copy costs (the channel's bound at the stop)

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
            self.state.send(wire.control(Kind.FAILED, {"error": str(exc)}))
            return 2
        finally:
            self.sock.close()  # the parent's EOF: everything received is archived

    def _serve(self, store: LocalStore) -> int:
        self.ingest = Ingest(store, self.privacy, codecs=self.codecs)
        self.adopted = [Ingest(s, self.privacy, codecs=self.codecs) for s in self._adopt()]
        engines = [self.ingest, *self.adopted]
        paths = [i.store.path for i in engines]
        self.outputs.prepare(paths, InfluxConfig(**self.settings.influx))
        backlog = sum(i.store.decode_backlog() for i in engines)
        log.info("ingest worker (pid %d) writing %s%s; %d payloads waiting to be decoded", os.getpid(), store.path,
                 "".join(f", adopting {i.store.path.name}" for i in self.adopted), backlog)
        self.state.send(wire.control(Kind.READY, {"pid": os.getpid(), "store": str(store.path), "backlog": backlog}))
        archiver = self._start("archive", Archiver(self.state, self.queue, self.ingest).run)
        self.cost = ArchiveCost(reader=thread_clock(threading.get_ident()), archiver=thread_clock(archiver.ident))
        self._start("decode", Decoder(self.state, engines, archiver, self.snapshot).run)
        self._start("ticker", self._ticker)
        self.outputs.start(paths, MqttConfig(**self.settings.mqtt) if self.settings.mqtt else MqttConfig())
        reader = ChannelReader(self.sock, self.state, self.queue, self.ingest, self.connections)
        try:
            reader.run()
        finally:
            self._stop(reader)
        return 0

    def _start(self, name: str, target: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=target, name=f"pvtap-{name}-{Path(self.settings.store).stem}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

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
        """SIGTERM: stop reading within the archive grace even if the channel stays open."""
        self.state.request_stop()

    def _stop(self, reader: ChannelReader) -> None:
        """The channel ended: archive what was received, decode a little more, write the final
        status row, stop the forwarders."""
        reader.finish()
        self.state.stopping.set()
        self.queue.wake()
        for thread in self._threads:
            thread.join(self.settings.archive_grace_s + self.settings.stop_decode_s + 5)
        self.outputs.stop()
        self._write_status(running=False)
        self._locks.close()
        log.info("ingest worker stopped: %s", self._summary())

    def _opaque(self, conn: int) -> None:
        """A connection's Tap says the stream is not its protocol: the parent stops sending its copies."""
        self.state.send(wire.with_conn(Kind.OPAQUE, conn))

    # -- telling how it goes -------------------------------------------------------------------

    def _ticker(self) -> None:
        next_status = 0.0
        while not self.state.stopping.wait(SNAPSHOT_EVERY_S):
            if self.cost is not None:
                c = self.counts
                self.cost.sample((c.copies_received, c.bytes_received), (c.copies_archived, c.bytes_archived))
            self.outputs.supervise()
            self.state.send(wire.control(Kind.SNAPSHOT, self.snapshot()))
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
            "archive_failing": self.state.archive_failing_since is not None, "dropped_copies": c.dropped_copies,
            "decoded": i.decoded + sum(a.counts.decoded for a in self.adopted),
            "records": i.records + sum(a.counts.records for a in self.adopted),
            "decode_errors": i.decode_errors + sum(a.counts.decode_errors for a in self.adopted),
            "redact_errors": i.redact_errors, "decode_backlog": backlog,
            **(self.cost.rates() if self.cost is not None else {}),
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


# -- as a process --------------------------------------------------------------------------------

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
    thread.start()
    return thread


if __name__ == "__main__":
    sys.exit(main())
