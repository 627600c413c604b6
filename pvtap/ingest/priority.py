"""The ingest worker's CPU priority (ingest.cpu_priority), so that forwarding goes first.

At start the worker lowers its own priority (`yield_cpu`): "low", nice 10; "idle", Linux
SCHED_IDLE, only CPU time nothing else wants. Nice 10 still lets a busy worker hold a core for
its time slice while the relay, woken by a device, waits (at 1,000 devices with both on one core:
an added p99 of about 3 ms at nice 10 against about 1 ms idle, docs/design.md). Idle alone is
unsafe: other work on the cores starves the worker, and past ingest.queue_mb its copies are
dropped. "adaptive" takes both: the forwarding side, which the worker's starvation cannot stop,
runs the worker on idle time while it keeps up and puts it back to nice 10 as soon as it falls
behind (`AdaptivePriority`). At the stop, forwarding is over and the worker gets the relay's own
priority to archive the last copies (`full_cpu_for_the_stop`).

Changing another process's threads needs CAP_SYS_NICE (root, as in the container); where it is
refused, "adaptive" stays at nice 10 and the stop goes on as the worker ran.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pvtap.ingest")

#: how much lower the worker's priority is than its forwarding process's (nice(2)): "low", and
#: "adaptive" while the worker is behind
WORKER_NICENESS = 10
#: "adaptive": the worker is behind when copies sent this long ago are not all archived yet...
BEHIND_S = 1.0
#: ...or when the copies not yet archived pass this share of what the channel may hold for it (the
#: copies and bytes the worker archives within its stop grace, backlog.py, and ingest.queue_mb)
BEHIND_SHARE = 0.25
#: ...or when its last snapshot (every second) had more than this many payloads left to decode
BEHIND_DECODING = 5000
#: and it goes back to idle time after keeping up this long
CALM_S = 5.0
#: the forwarding side looks at most this often (it is asked on every copy)
CHECK_EVERY_S = 0.1


def yield_cpu(priority: str) -> None:
    """The worker's own priority at start ("adaptive" starts as "low"). Where the kernel refuses
    SCHED_IDLE (not Linux), nice 10 as with "low"."""
    if priority == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except (AttributeError, OSError) as exc:
            log.info("ingest.cpu_priority = idle not available here (%s): running at nice %d", exc, WORKER_NICENESS)
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)


def set_worker_threads(worker: Any, policy: int, niceness: int) -> bool:
    """Every thread of a worker process to `policy` at `niceness`; False for a worker thread (its
    process is ours), or where a thread refused (not permitted)."""
    if not isinstance(worker, subprocess.Popen):
        return False
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{worker.pid}/task")]
    except OSError:
        return False
    done = True
    for tid in threads:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except OSError:  # not permitted, or a thread that just ended
            done = False
    return done


def full_cpu_for_the_stop(worker: Any) -> bool:
    """When forwarding is over, a worker process need not yield the cores any more: its threads go
    back to the normal policy at the niceness of the calling (forwarding) thread, so that on cores
    busy with other work it still archives the last copies within its stop grace."""
    return set_worker_threads(worker, os.SCHED_OTHER, os.getpriority(os.PRIO_PROCESS, 0))


class AdaptivePriority:
    """ingest.cpu_priority = "adaptive", run by the channel for its current worker: idle time
    while the worker keeps up (CALM_S), nice 10 once it is behind in archiving (BEHIND_S,
    BEHIND_SHARE) or in decoding (BEHIND_DECODING)."""

    def __init__(self) -> None:
        self.worker: Any = None
        self.idle = False
        self.switches = 0
        self._marks: deque[tuple[float, int]] = deque()  # (when, copies sent by then), BEHIND_S back
        self._calm_since: float | None = None
        self._next_check = 0.0
        self._refused = False  # the kernel would not let us switch (stays so for restarted workers)
        self._off = True  # nothing to switch: no worker yet, a worker thread, or refused
        self.decode_backlog = 0  # from the worker's last snapshot

    def started(self, worker: Any) -> None:
        """A new worker: it starts at nice 10 (yield_cpu)."""
        self.worker, self.idle, self._calm_since, self.decode_backlog = worker, False, None, 0
        self._off = self._refused or not isinstance(worker, subprocess.Popen)
        self._marks.clear()

    def check(self, sent: int, archived: int, fill: Callable[[], float]) -> None:
        """`sent` copies went to the worker, it archived the first `archived`, and the copies not
        yet archived take `fill()` of what the channel may hold for it (1.0: full; asked only
        when a check is due, as this runs on every copy)."""
        now = time.monotonic()
        if self._off or now < self._next_check:
            return
        self._next_check = now + CHECK_EVERY_S
        self._marks.append((now, sent))
        while len(self._marks) > 1 and self._marks[1][0] <= now - BEHIND_S:
            self._marks.popleft()
        then, sent_then = self._marks[0]
        behind = ((then <= now - BEHIND_S and archived < sent_then) or fill() > BEHIND_SHARE
                  or self.decode_backlog > BEHIND_DECODING)
        if behind:
            self._calm_since = None
            if self.idle:
                self._switch(idle=False)
        elif self._calm_since is None:
            self._calm_since = now
        elif not self.idle and now - self._calm_since >= CALM_S:
            self._switch(idle=True)

    def _switch(self, idle: bool) -> None:
        low = min(19, os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICENESS)
        if set_worker_threads(self.worker, os.SCHED_IDLE if idle else os.SCHED_OTHER, low):
            self.idle = idle
            self.switches += 1
            log.debug("ingest worker (pid %d): %s", self.worker.pid,
                      "kept up: runs on idle CPU time" if idle else f"behind: back to nice {WORKER_NICENESS}")
            return
        self._refused = self._off = True
        set_worker_threads(self.worker, os.SCHED_OTHER, low)
        log.info("ingest.cpu_priority = adaptive: the worker's priority cannot be changed here (needs root or "
                 "CAP_SYS_NICE); it stays at nice %d, as with \"low\"", WORKER_NICENESS)
