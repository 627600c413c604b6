"""The archive side of the worker: one writer per store file, the bytes-bounded queue from the
reader (framing, redaction) and the archiver thread's group commit.

Raw first: what the reader framed waits here, not in the channel, so one commit takes many
payloads; when the disk is slow the queue fills and the channel backs up, and the forwarding
side drops and counts copies (never the forwarded bytes).

A full or failing disk: the archiver keeps its batch and retries with back-off; meanwhile new
copies are dropped and counted once the archive queue is full. One error when it starts, a
summary now and then, one line when it works again. Forwarding is never affected.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvtap.files import open_private
from pvtap.ingest.engine import Ingest
from pvtap.ingest.worker_state import RETRY_MAX_S, WorkerState
from pvtap.records import RawPayload, Record

log = logging.getLogger("pvtap.ingest")

#: how long a new worker waits for the previous writer of its store to finish
WRITER_LOCK_WAIT_S = 15.0
#: a group commit waits this long for more payloads after the first, unless GROUP_MAX are there
GROUP_WAIT_S = 0.005
GROUP_MAX = 2000
FAILURE_SUMMARY_EVERY_S = 60.0


class WriterLockError(RuntimeError):
    """Another process writes this store."""


@contextlib.contextmanager
def writer_lock(store: Path) -> Any:
    """Hold `<store>.writer.lock` (0600) while writing the store; WriterLockError if another
    process holds it for longer than WRITER_LOCK_WAIT_S."""
    path = store.with_name(store.name + ".writer.lock")
    fd = open_private(path)
    try:
        deadline = time.monotonic() + WRITER_LOCK_WAIT_S
        while True:  # a worker that is still finishing (its parent restarted quickly) lets go soon
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
            raise WriterLockError(
                f"{store} is being written by another pvtap process (pid {holder}). Fix: give each relay or "
                "mitmproxy its own data_dir (docs/relay.md, \"More than one relay\"), or stop the other one") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@dataclass
class Batch:
    """What the archiver commits at once: payloads, records, the sync tokens it answers, the
    copies it completes (`through`: the first n copies the worker received, and their bytes) and
    its size in the queue's budget."""

    raws: list[RawPayload] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    syncs: list[int] = field(default_factory=list)
    through: tuple[int, int] = (0, 0)
    size: int = 0


class ArchiveQueue:
    """What the reader framed and redacted, waiting for the archiver; bounded in bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self.items: deque[tuple[list[RawPayload], list[Record], int | None, tuple[int, int]]] = deque()
        self.cond = threading.Condition()

    def put(self, raws: list[RawPayload], records: Sequence[Record] = (), sync: int | None = None,
            through: tuple[int, int] = (0, 0), give_up: Callable[[], bool] = lambda: False) -> int:
        """Queue payloads, records, a sync token and the copies they complete (how many the
        worker received so far, and their bytes). While
        the queue is over its budget this waits (the channel backs up and the forwarding side
        drops and counts, per connection), unless `give_up()` says the worker is stopping: then
        the payloads are dropped (returns how many)."""
        size = _budget(raws, self.limit)
        with self.cond:
            while raws and self.bytes and self.bytes + size > self.limit:
                if give_up():
                    return len(raws)
                self.cond.wait(0.2)
            self.items.append((raws, list(records), sync, through))
            self.bytes += size
            self.cond.notify_all()
        return 0

    def take(self, wait: float) -> Batch:
        """Everything queued (after waiting up to `wait` for the first item, then GROUP_WAIT_S for
        more), as one batch; release its bytes with `done` once it is committed."""
        with self.cond:
            if not self.items:
                self.cond.wait(wait)
            if self.items and len(self.items) < GROUP_MAX:
                self.cond.wait(GROUP_WAIT_S)
            batch = Batch()
            while self.items:
                raws, records, sync, through = self.items.popleft()
                batch.raws += raws
                batch.records += records
                if sync is not None:
                    batch.syncs.append(sync)
                batch.through = max(batch.through, through)
            batch.size = _budget(batch.raws, self.limit)
            return batch

    def done(self, size: int) -> None:
        with self.cond:
            self.bytes -= size
            self.cond.notify_all()

    def wake(self) -> None:
        """The worker stops: whoever waits on the queue looks again."""
        with self.cond:
            self.cond.notify_all()

    def __len__(self) -> int:
        return len(self.items)


def _budget(raws: list[RawPayload], limit: int) -> int:
    """What payloads count against the archive queue's budget: their bytes; a batch larger than
    the whole budget passes alone and counts as half of it (as in the channel)."""
    size = sum(len(r.payload) + 200 for r in raws)
    return min(size, limit // 2) if size > limit else size


class Archiver:
    """The archive thread of one worker: commits what the reader queued, many payloads at once,
    into the worker's own store; tells the parent how far it archived and the decoder what it
    committed."""

    def __init__(self, state: WorkerState, queue: ArchiveQueue, ingest: Ingest) -> None:
        self.state = state
        self.queue = queue
        self.ingest = ingest
        self._last_summary = 0.0

    def run(self) -> None:
        state = self.state
        held: Batch | None = None
        delay = 0.1
        while True:
            if held is None:
                if state.stopping.is_set() and not len(self.queue):
                    return
                held = self.queue.take(0.5)
            batch = held
            if batch.raws or batch.records:
                try:
                    self.ingest.archive(batch.raws, batch.records)
                except sqlite3.Error as exc:
                    self._failed(exc, len(batch.raws))
                    if state.stopping.is_set() and state.past_archive_grace():
                        state.dropped(len(batch.raws))
                        log.error("ingest: stopping with %d payloads that could not be archived (%s)",
                                  len(batch.raws), exc)
                        self.queue.done(batch.size)
                        return
                    time.sleep(delay)
                    delay = min(RETRY_MAX_S, delay * 2)
                    continue
                self._works()
                delay = 0.1
            self.queue.done(batch.size)
            held = None
            state.archived(batch.through)
            state.commits.committed(batch.syncs, self.ingest.store.newest_raw_id() if batch.syncs else 0)

    def _failed(self, exc: sqlite3.Error, payloads: int) -> None:
        state = self.state
        state.counts.archive_errors += 1
        now = time.monotonic()
        if state.archive_failing_since is None:
            state.archive_failing_since = self._last_summary = now
            full = "full" in str(exc)
            log.error("ingest: CANNOT ARCHIVE to %s (%s)%s; %d payloads held and retried, new copies are dropped and "
                      "counted once %d MiB are waiting; forwarding is unaffected", state.settings.store, exc,
                      ": free space on its disk" if full else "", payloads, self.queue.limit >> 20)
        elif now - self._last_summary >= FAILURE_SUMMARY_EVERY_S:
            self._last_summary = now
            log.error("ingest: still cannot archive after %.0f s (%s); %d payloads dropped so far",
                      now - state.archive_failing_since, exc, state.counts.dropped_copies)

    def _works(self) -> None:
        since = self.state.archive_failing_since
        if since is not None:
            log.warning("ingest: archiving works again after %.0f s; %d payloads were dropped meanwhile",
                        time.monotonic() - since, self.state.counts.dropped_copies)
            self.state.archive_failing_since = None
