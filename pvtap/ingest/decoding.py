"""The ingest worker's decoder: decodes what the archiver committed, in turns, and answers the
SYNCs whose payloads are decoded.

Raw first: while the reader finds more waiting each time it reads (the worker is busy), the
decoder takes short turns (a few payloads) and pauses between them, so that framing and archiving
get the GIL; decoding catches up when the load drops. What is not decoded yet waits in the
archive (the engine's cursor follows it). At the stop (a SIGTERM, or the channel's end) the
decoder waits until the archiver is done, so that archiving has the worker's GIL and core to
itself within its grace (what the channel held back was bounded by that: backlog.py), then goes
on for at most `ingest.stop_decode_s` and leaves the rest for the next start.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from pvtap.ingest import wire
from pvtap.ingest.engine import Ingest
from pvtap.ingest.wire import Kind
from pvtap.ingest.worker_state import RETRY_MAX_S, WorkerState

log = logging.getLogger("pvtap.ingest")

#: the worker counts as busy this long after the reader last found more waiting
BUSY_S = 0.05
#: a busy turn: at most this many payloads (per store), this long; then a pause
BUSY_DECODE = 50
BUSY_DECODE_S = 0.01
BUSY_PAUSE_S = 0.1


class Decoder:
    """The decode thread of one worker: its own store (`engines[0]`, whose cursor answers the
    SYNCs) and the adopted ones."""

    def __init__(self, state: WorkerState, engines: list[Ingest], archiver: threading.Thread,
                 snapshot: Callable[[], dict[str, Any]]) -> None:
        self.state = state
        self.engines = engines
        self.archiver = archiver  # at the stop, once it ended and nothing waits, decoding is done
        self.snapshot = snapshot  # sent before SYNCED: whoever waited reads the counts next

    def run(self) -> None:
        state, engines = self.state, self.engines
        stop_at: float | None = None
        delay = 0.1
        while True:
            if state.stop_requested:
                if self.archiver.is_alive():  # archiving first: its grace is for it alone
                    state.commits.wait(0.05)
                    continue
                # then decode for stop_decode_s more at most: the rest waits in the archive
                stop_at = stop_at or time.monotonic() + state.settings.stop_decode_s
                if time.monotonic() >= stop_at or not self._any_backlog():
                    return
            busy = time.monotonic() - state.busy_at < BUSY_S
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
                state.commits.wait(0.2)

    def _any_backlog(self) -> bool:
        return any(engine.store.decode_backlog() for engine in self.engines)

    def _answer_syncs(self) -> None:
        ready = self.state.commits.decoded(self.engines[0].store.decode_cursor)
        if ready:  # a fresh snapshot first: whoever waited reads the counts next
            self.state.send(wire.control(Kind.SNAPSHOT, self.snapshot()))
        for token in ready:
            self.state.send(wire.with_conn(Kind.SYNCED, token))
