"""What the ingest worker's threads share: the counts, the stop, what the worker tells its
forwarding process (the back-channel; how far it archived) and what the archiver tells the decoder.

The worker (worker.py) makes one WorkerState and passes it to each of its threads: the reader
(reader.py), the archiver (archive.py), the decoder (decoding.py) and its own ticker. The queue
from the reader to the archiver is not here: it is archive.py's, and only those two use it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pvtap.ingest import wire
from pvtap.ingest.settings import WorkerSettings

#: a thread that cannot write the store retries with back-off, at most this long apart
RETRY_MAX_S = 5.0
#: what may wait to be sent on the back-channel; beyond it messages are dropped (the parent is not reading)
BACK_CHANNEL_BYTES = 1 << 20


@dataclass
class WorkerCounts:
    copies_received: int = 0  # chunks and whole payloads from the channel
    copies_archived: int = 0  # of those, the first n are archived (told to the parent: ARCHIVED)
    bytes_received: int = 0
    bytes_archived: int = 0  # the bytes of the copies archived
    connections: int = 0
    dropped_copies: int = 0  # framed and redacted, but not archived (the disk failed until the worker stopped)
    archive_errors: int = 0
    parent: dict[str, int] = field(default_factory=dict)  # the forwarding side's own counts (COUNTS)


class BackChannel:
    """The worker's messages to its forwarding process, from any of its threads, without ever
    blocking: the parent reads them when it can; what does not fit waits, and while more than
    BACK_CHANNEL_BYTES wait (a parent that does not read), new messages are dropped."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._unsent = bytearray()

    def send(self, parts: list[bytes]) -> None:
        with self._lock:
            if len(self._unsent) > BACK_CHANNEL_BYTES:
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


class Commits:
    """What the archiver tells the decoder after each commit: that there is more to decode, and
    the SYNC tokens it committed. A token is answered once the decode cursor reaches the newest
    raw id at its commit: everything before the SYNC is archived and decoded."""

    def __init__(self) -> None:
        self._syncs: list[tuple[int, int]] = []  # (token, raw id that must be decoded first)
        self._lock = threading.Lock()
        self._new = threading.Event()

    def committed(self, tokens: list[int], newest_raw_id: int) -> None:
        with self._lock:
            self._syncs += [(token, newest_raw_id) for token in tokens]
        self._new.set()

    def wait(self, timeout: float) -> None:
        """The decoder found nothing to decode: wait for the next commit, up to `timeout`."""
        self._new.wait(timeout)
        self._new.clear()

    def decoded(self, cursor: Callable[[], int]) -> list[int]:
        """The tokens to answer now; `cursor()` (the decode cursor) is read only while some wait."""
        with self._lock:
            if not self._syncs:
                return []
            at = cursor()
            ready = [token for token, target in self._syncs if target <= at]
            self._syncs = [(t, target) for t, target in self._syncs if target > at]
        return ready


class WorkerState:
    """One worker's shared state; see the module's docstring."""

    def __init__(self, sock: socket.socket, settings: WorkerSettings) -> None:
        self.settings = settings
        self.counts = WorkerCounts()
        self.send = BackChannel(sock).send
        self.commits = Commits()
        self.stopping = threading.Event()  # the channel ended: finish up
        self.busy_at = -1.0  # when the reader last read more than a trickle (copies piling up)
        self.archive_failing_since: float | None = None  # the archiver cannot commit since then
        self._stop_deadline: float | None = None
        self._acknowledging = True  # tell the parent what is archived (until something had to be dropped)

    # -- the stop --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM: stop reading within the archive grace (ARCHIVE_STOP_GRACE_S) even if the
        channel stays open. A second SIGTERM keeps the first one's deadline (it must not put the
        stop off)."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.settings.archive_grace_s

    @property
    def stop_requested(self) -> bool:
        """A SIGTERM came, or the channel ended: archiving what was received comes first."""
        return self._stop_deadline is not None or self.stopping.is_set()

    def past_stop_deadline(self) -> bool:
        return self._stop_deadline is not None and time.monotonic() > self._stop_deadline

    def past_archive_grace(self) -> bool:
        """The archiver, failing while the worker stops: True once the archive grace passed
        since its first failure at the stop (or since a SIGTERM)."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.settings.archive_grace_s
        return time.monotonic() > self._stop_deadline

    # -- what the parent is told of the archive ------------------------------------------------

    def archived(self, through: tuple[int, int]) -> None:
        """The first copies received are archived (`through`: how many, and their bytes): tell
        the parent (ARCHIVED), as long as nothing had to be dropped."""
        copies, size = through
        if self._acknowledging and copies > self.counts.copies_archived:
            self.counts.copies_archived, self.counts.bytes_archived = copies, size
            self.send(wire.archived(copies, size))

    def dropped(self, payloads: int) -> None:
        """Payloads received that will not be archived (the worker stops with the archive behind
        or failing). The parent is told nothing more: it counts every copy after the last
        acknowledged one as lost."""
        self.counts.dropped_copies += payloads
        self._acknowledging = False
