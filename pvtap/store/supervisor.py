"""A forwarder that is restarted when it dies, and says when it is stuck.

The ingest worker runs one per store it writes when `[influx] url` is set, and calls
`supervise()` about once a second: a forwarder thread that ended although nobody stopped it is
started again after a back-off (1 s, doubling to a minute; reset after a minute of running).
`state()` is what `pvtap status`, the stats snapshot and /readyz show:

    off         no forwarder
    idle        nothing waiting
    delivering  records waiting and the cursor moves
    restarting  the thread died; it is started again after the back-off
    failing     the last write failed (InfluxDB down, a token refused, ...); retried
    stuck       records waiting and the cursor has not moved for influx.stuck_after_s
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pvtap.config import InfluxConfig
from pvtap.store.delivery import read_status
from pvtap.store.forwarder import STOP_TIMEOUT_S, Forwarder

log = logging.getLogger("pvtap.forward")

RESTART_MAX_S = 60.0
STATE_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class ForwarderState:
    state: str
    error: str | None = None
    backlog: int = 0


class SupervisedForwarder:
    SEVERITY = ("off", "idle", "delivering", "restarting", "failing", "stuck")

    def __init__(self, path: Path, config: InfluxConfig) -> None:
        self.path = Path(path)
        self.config = config
        self.forwarder: Forwarder | None = None
        self.restarts = 0
        self._stopping = False
        self._started = 0.0
        self._delay = 1.0
        self._restart_at: float | None = None
        self._cursor: tuple[int, float] = (-1, time.monotonic())  # (cursor, since when it has not moved)
        self._state: tuple[float, ForwarderState] | None = None

    def start(self) -> SupervisedForwarder:
        self.forwarder = Forwarder(self.path, self.config).start()
        self._started = time.monotonic()
        return self

    def supervise(self) -> None:
        """Restart a forwarder thread that died, after the back-off."""
        if self._stopping or self.forwarder is None or self.forwarder.running:
            return
        now = time.monotonic()
        if self._restart_at is None:
            if now - self._started > RESTART_MAX_S:
                self._delay = 1.0
            self._restart_at = now + self._delay
            log.error("%s: the forwarder stopped unexpectedly (%s); restarting it in %.0f s (records stay in the "
                      "store)", self.path.name, self.forwarder.died_of or "no error given", self._delay)
            self._delay = min(RESTART_MAX_S, self._delay * 2)
        elif now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self.start()

    def state(self) -> ForwarderState:
        now = time.monotonic()
        if self._state is not None and now - self._state[0] < STATE_EVERY_S and self._restart_at is None:
            return self._state[1]
        state = self._read(now)
        self._state = (now, state)
        return state

    def _read(self, now: float) -> ForwarderState:
        if self._restart_at is not None:
            why = self.forwarder.died_of if self.forwarder is not None else None
            return ForwarderState("restarting", f"the forwarder thread died ({why or 'no error given'}); "
                                                f"restart {self.restarts + 1} due in {self._restart_at - now:.0f} s")
        try:
            s = read_status(self.path)
        except Exception as exc:
            return ForwarderState("failing", f"cannot read the delivery state: {type(exc).__name__}: {exc}")
        if s.cursor != self._cursor[0]:
            self._cursor = (s.cursor, now)
        if s.backlog == 0:
            return ForwarderState("idle", None, 0)
        failing = s.last_error_ns is not None and (s.last_success_ns or 0) < s.last_error_ns
        error = s.last_error if failing else None
        if now - self._cursor[1] >= self.config.stuck_after_s:
            return ForwarderState("stuck", error or f"no progress for {now - self._cursor[1]:.0f} s", s.backlog)
        return ForwarderState("failing" if failing else "delivering", error, s.backlog)

    def stop_soon(self) -> None:
        self._stopping = True
        if self.forwarder is not None:
            self.forwarder.stop_soon()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        self._stopping = True
        return self.forwarder.stop(timeout) if self.forwarder is not None else True
