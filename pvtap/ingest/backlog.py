"""What a stop can archive, and so how far behind an ingest worker may fall (issue 14, raw first).

At a stop every copy the worker was sent, or that still waits for it in the forwarding process,
must be archived within its stop grace (`archive_grace_s`, ARCHIVE_STOP_GRACE_S). A budget in
bytes cannot promise that: the cost is per payload (framing, redaction, the archive's row), and
32 MiB of 300-byte copies are some 100,000 of them. So the two ends share a measurement:

- the worker (`ArchiveCost`) reads the CPU time of the two threads that archive (the reader:
  framing and redaction; the archiver: group commits) and divides it by the copies and the bytes
  they got through, in the seconds when they were busy (at one copy a second the fixed cost per
  read and per commit would make a copy look dear). Its SNAPSHOT carries the rates that follows,
  with a full core: copies and bytes a second. CPU time, not wall time, because at the stop the
  forwarding is over and the worker gets a core (`full_cpu_for_the_stop`), whatever its priority
  and the load were while it was measured.
- the channel (`StopBound`, in the forwarding process) counts the copies and bytes it accepted
  that the worker has not said it archived (in its buffer, in the socket, in the worker's queues)
  and refuses a copy that would take them past what the worker archives in SHARE of its grace.
  Refused copies are dropped and counted like any other (`copies_dropped`), and on their own
  (`copies_dropped_behind`).

Both bounds have a floor (a burst must not be dropped because one busy second looked slow), low
enough to be archived within the grace on a slow machine. Until a worker's first measurement
(its first busy second) only the floor in copies applies, and the byte budget (`ingest.queue_mb`),
which applies beside them always: a fresh worker given a burst of bulk in its first second can
still fall further behind than its grace, for that second.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

#: the share of the archive grace the backlog may need: the stop also commits and syncs the last
#: batches, and the worker may share its core with other workers or other work
SHARE = 0.5
#: whatever was measured, this much may be unarchived: at 80 µs a copy 0.16 s of archiving (a
#: slow machine several times that), and enough for a fleet's burst before the first measurement
FLOOR_COPIES = 2000
#: ...and, once measured, this many bytes (copies as large as bulk's: about a second of archiving here)
FLOOR_BYTES = 4 << 20
#: a thread counts as busy in a second when it spent this much CPU time in it (1 % of a core)
BUSY_CPU_S = 0.01
#: the weight of a busy second in the smoothed cost (an exponentially weighted average)
WEIGHT = 0.3


@dataclass
class Cost:
    """A thread's smoothed CPU seconds per copy and per byte (0: not measured yet)."""

    per_copy: float = 0.0
    per_byte: float = 0.0

    def add(self, cpu_s: float, copies: int, size: int) -> None:
        if cpu_s < BUSY_CPU_S or copies <= 0 or size <= 0:
            return
        self.per_copy = _smooth(self.per_copy, cpu_s / copies)
        self.per_byte = _smooth(self.per_byte, cpu_s / size)


def _smooth(old: float, new: float) -> float:
    return new if not old else old + WEIGHT * (new - old)


def thread_clock(ident: int | None) -> Callable[[], float]:
    """The CPU time of the thread `ident` (0.0 once it ended, or where the platform has no such clock)."""
    try:
        clock = time.pthread_getcpuclockid(ident or 0)
    except (AttributeError, OSError, OverflowError):
        return lambda: 0.0

    def read() -> float:
        with contextlib.suppress(OSError):
            return time.clock_gettime(clock)
        return 0.0
    return read


class ArchiveCost:
    """The worker's side: what archiving a copy costs it, from its reader's and archiver's CPU
    time. `sample` is called once a second (the ticker) with the counts so far."""

    def __init__(self, reader: Callable[[], float], archiver: Callable[[], float]) -> None:
        self._clocks = (reader, archiver)
        self._costs = (Cost(), Cost())
        self._last: tuple[tuple[float, int, int], ...] = ((reader(), 0, 0), (archiver(), 0, 0))

    def sample(self, received: tuple[int, int], archived: tuple[int, int]) -> None:
        """`received` and `archived`: (copies, bytes) so far, by the reader and by the archiver."""
        now = []
        for clock, cost, (cpu_then, copies_then, bytes_then), (copies, size) in zip(
                self._clocks, self._costs, self._last, (received, archived), strict=True):
            cpu = clock()
            cost.add(cpu - cpu_then, copies - copies_then, size - bytes_then)
            now.append((cpu, copies, size))
        self._last = tuple(now)

    def rates(self) -> dict[str, float]:
        """Copies and bytes a second the worker archives with a full core (0: not measured yet)."""
        if not all(cost.per_copy for cost in self._costs):
            return {"archive_rate": 0.0, "archive_byte_rate": 0.0}
        return {"archive_rate": round(1 / sum(c.per_copy for c in self._costs), 1),
                "archive_byte_rate": round(1 / sum(c.per_byte for c in self._costs))}


class StopBound:
    """The channel's side: the copies and bytes accepted for the current worker and not yet
    archived, and whether one more fits in what the worker archives within SHARE of `grace_s`."""

    def __init__(self, grace_s: float) -> None:
        self.budget_s = grace_s * SHARE
        self.max_copies = FLOOR_COPIES
        self.max_bytes = math.inf  # until the worker's first measurement
        self.copies = self.bytes = 0  # accepted and not archived (bytes as charged)
        self._archived = (0, 0)
        self._accepted = 0  # copies accepted for this worker: the worker counts them in the same order
        self._uncharged: deque[tuple[int, int]] = deque()  # (which copy, bytes it was not charged)

    def started(self) -> None:
        """A new worker: nothing is accepted for it yet, and its speed is not known."""
        self.copies = self.bytes = self._accepted = 0
        self._archived = (0, 0)
        self._uncharged.clear()
        self.max_copies, self.max_bytes = FLOOR_COPIES, math.inf

    def fits(self, size: int) -> bool:
        """Whether one more copy of `size` bytes would still be archived within the grace."""
        return self.copies < self.max_copies and self.bytes + self._charge(size) <= self.max_bytes

    @staticmethod
    def _charge(size: int) -> int:
        """A copy counts at most half the smallest byte bound (FLOOR_BYTES), whenever it came (a
        copy accepted before the first measurement must not hold out the copies after it once
        the bound is measured): a 50 MB report that will not inflate, kept as its size and hash
        quickly, passes, and so does the answer after it. The channel's buffer does the same
        with its budget (outbox.py)."""
        return min(size, FLOOR_BYTES // 2)

    def accepted(self, size: int) -> None:
        charge = self._charge(size)
        self.copies += 1
        self.bytes += charge
        self._accepted += 1
        if charge < size:
            self._uncharged.append((self._accepted, size - charge))

    def archived(self, copies: int, size: int) -> None:
        """The worker's ARCHIVED: the first `copies` copies it got (`size` bytes) are archived."""
        before_copies, before_bytes = self._archived
        released = size - before_bytes
        while self._uncharged and self._uncharged[0][0] <= copies:
            released -= self._uncharged.popleft()[1]
        self.copies -= copies - before_copies
        self.bytes -= released
        self._archived = (copies, size)

    @property
    def archived_copies(self) -> int:
        """How many of the copies the current worker got it said it archived (its last ARCHIVED)."""
        return self._archived[0]

    def measured(self, rate: float, byte_rate: float) -> None:
        """The worker's rates with a full core (its SNAPSHOT; 0: not measured yet)."""
        if rate > 0 and byte_rate > 0:
            self.max_copies = max(FLOOR_COPIES, int(rate * self.budget_s))
            self.max_bytes = max(FLOOR_BYTES, int(byte_rate * self.budget_s))

    def fill(self) -> float:
        """How much of the bound is taken (1.0: full)."""
        return max(self.copies / self.max_copies, self.bytes / self.max_bytes)
