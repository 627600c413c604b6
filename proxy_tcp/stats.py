"""The relay's traffic counts for /metrics and the pvtap_stats records (pvtap/health.py).

The splice already counts bytes on each connection's record; this adds nothing to the forwarding
path. A connection's counts move into the totals once, as it ends (`ended`, on the event loop);
`traffic` (on the health server's thread) adds the totals to what the open connections have
moved so far. A lock makes the two exclusive, so a connection is counted exactly once in every
snapshot and a counter never goes back. Frames and decoding are the ingest workers' to count.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from pvtap.metrics import Traffic
from pvtap.records import DOWN, UP

if TYPE_CHECKING:
    from .connection import Connection
    from .service import Relay


class RelayStats:
    """Totals of the connections that have ended."""

    def __init__(self) -> None:
        self.totals = Traffic()
        self._lock = threading.Lock()

    def ended(self, connection: Connection) -> None:
        """Move a connection's final counts into the totals (called once, as it ends)."""
        r = connection.record
        with self._lock:
            t = self.totals
            t.closed[(r.protocol, r.outcome)] += 1
            t.bytes[(r.protocol, UP)] += r.bytes[UP]
            t.bytes[(r.protocol, DOWN)] += r.bytes[DOWN]
            connection.counted = True  # it may stay in its listener's list a moment longer

    def traffic(self, relay: Relay) -> Traffic:
        """Totals plus the open connections' counts so far, and the UDP listeners' datagrams."""
        out = Traffic()
        with self._lock:
            out.add(self.totals)
            for listener in list(relay.listeners):
                protocol = listener.config.protocol
                out.open[protocol] += 0  # every protocol listened for has its series, from the start
                out.bytes[(protocol, UP)] += 0
                out.bytes[(protocol, DOWN)] += 0
                if listener.datagrams is not None:
                    out.bytes[(protocol, UP)] += listener.datagrams.bytes
                    continue
                for reason, count in _copy(listener.refusals.total).items():  # reset at accept (admission.py)
                    out.closed[(protocol, str(reason))] += count
                for connection in _open(listener.connections):
                    if connection.counted:
                        continue
                    out.open[protocol] += 1
                    out.bytes[(protocol, UP)] += connection.record.bytes[UP]
                    out.bytes[(protocol, DOWN)] += connection.record.bytes[DOWN]
        return out


def _copy(counter: dict) -> dict:
    """A copy of a dict the event loop may change meanwhile."""
    for _ in range(10):
        try:
            return dict(counter)
        except RuntimeError:  # changed size during iteration
            continue
    return {}


def _open(connections: dict) -> list[Connection]:
    """The listener's open connections; the event loop may change the dict meanwhile, so retry."""
    for _ in range(10):
        try:
            return list(connections.values())
        except RuntimeError:  # changed size during iteration
            continue
    return []
