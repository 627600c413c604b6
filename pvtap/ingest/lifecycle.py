"""An ingest worker's life as the forwarding process sees it: started, reaped, started again.

The worker is a process (`python -m pvtap.ingest.worker --fd N`, given its end of a socketpair)
or, in tests and when embedding with injected codecs, a thread of this process; the channel holds
either as an opaque handle, and these functions treat both alike. A worker that dies is started
again after a back-off (`Restarts`) that doubles up to RESTART_MAX_S and starts over once a
worker ran for a minute.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pvtap.ingest.engine import Codecs
from pvtap.ingest.settings import WorkerSettings
from pvtap.ingest.worker import run_in_thread
from pvtap.privacy import Privacy

log = logging.getLogger("pvtap.ingest")

RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
#: a worker that died after running this long is started again after RESTART_FIRST_S
RESTART_RESET_S = 60.0

#: given the worker's end of a socketpair, start the worker; returns its handle
Spawn = Callable[[socket.socket], Any]


def spawn_process(sock: socket.socket) -> subprocess.Popen:
    """A worker process: `python -m pvtap.ingest.worker`, inheriting `sock`."""
    fd = sock.fileno()
    return subprocess.Popen([sys.executable, "-m", "pvtap.ingest.worker", "--fd", str(fd)], pass_fds=[fd],
                            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def spawn_thread(settings: WorkerSettings, codecs: Codecs, privacy: Privacy | None) -> Spawn:
    """Workers in threads of this process, with these codecs and privacy settings."""
    return lambda sock: run_in_thread(sock, settings, codecs=codecs, privacy=privacy)


def reap(worker: Any, timeout: float, name: str) -> bool:
    """Wait up to `timeout` for a worker (process or thread) to end; a process still running is
    killed. True when it ended by itself."""
    if isinstance(worker, subprocess.Popen):
        try:
            worker.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("%s: the ingest worker (pid %d) did not exit within its grace; killing it (what it did "
                      "not archive is lost)", name, worker.pid)
            worker.kill()
            worker.wait()
            return False
    elif isinstance(worker, threading.Thread):
        worker.join(timeout)
        return not worker.is_alive()
    return True


def kill_if_running(worker: Any) -> None:
    """Before a restart: a worker process that closed its socket but still runs goes."""
    if isinstance(worker, subprocess.Popen) and worker.poll() is None:
        worker.kill()
        worker.wait()


def describe_exit(worker: Any) -> tuple[int | None, int | None]:
    """The worker's pid and exit status, where it has them (a process)."""
    pid = getattr(worker, "pid", None)
    code = worker.poll() if isinstance(worker, subprocess.Popen) else None
    return pid, code


class Restarts:
    """When to start a worker that died again."""

    def __init__(self) -> None:
        self.at: float | None = None  # a restart is due then
        self.delay = RESTART_FIRST_S
        self.started = 0.0

    def started_now(self) -> None:
        self.started = time.monotonic()

    def ready(self, restarts: int) -> None:
        """The worker opened its store: before any restart, the back-off starts at the beginning."""
        if restarts == 0:
            self.delay = RESTART_FIRST_S

    def schedule(self) -> tuple[float, float]:
        """The worker died: plan its restart. Returns how long it ran and the delay."""
        ran = time.monotonic() - self.started
        if ran > RESTART_RESET_S:
            self.delay = RESTART_FIRST_S
        delay, self.delay = self.delay, min(RESTART_MAX_S, self.delay * 2)
        self.at = time.monotonic() + delay
        return ran, delay

    def due(self) -> bool:
        """True once, when the planned restart is due."""
        if self.at is None or time.monotonic() < self.at:
            return False
        self.at = None
        return True
