"""Who may take one of a listener's connection slots, decided the moment a connection is accepted.

Any host on the LAN can open connections; if slots were only checked after a TLS handshake, or
held by sockets that never speak, it could lock the real device out. So the listener decides in
accept, before any byte is read: a source outside `allow_from`, or one connection more than
`max_connections`, is reset at once and costs nothing but a counter. Refusals are counted and
logged at most once per `WINDOW` seconds per listener, so a flood cannot fill the log either.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable, Sequence

log = logging.getLogger("proxy_tcp.listener")

#: seconds between two log lines about refused connections of one listener
WINDOW = 10.0


class Refusal(enum.StrEnum):
    """Why a connection was refused at accept."""

    NOT_ALLOWED = "refused_not_allowed"  # its source is not in allow_from
    LIMIT = "refused_limit"  # max_connections are open


class AllowList:
    """The source networks of `allow_from`; empty allows everyone."""

    def __init__(self, networks: Sequence[str]) -> None:
        self.networks = [ipaddress.ip_network(network.strip()) for network in networks]

    def allows(self, host: str) -> bool:
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:  # not an IP address (a Unix socket path): not from an allowed network
            return False
        return any(address in network for network in self.networks)


class Refusals:
    """Counts refused connections of one listener and logs them, rate-limited: the first refusal
    after a quiet window at once, then what accumulated once per window. `total` keeps the
    counts for the life of the listener."""

    def __init__(self, name: Callable[[], str], limit: int, window: float = WINDOW) -> None:
        self.name = name  # the listener as logged (its endpoints are known only once it listens)
        self.limit = limit
        self.window = window
        self.total: Counter[Refusal] = Counter()
        self._pending: Counter[Refusal] = Counter()
        self._last_peer = ""
        self._timer: asyncio.TimerHandle | None = None

    def note(self, reason: Refusal, peer: str) -> None:
        self.total[reason] += 1
        self._pending[reason] += 1
        self._last_peer = peer
        if self._timer is None:  # quiet until now: say so at once, then at most once per window
            self._flush()

    def _flush(self, rearm: bool = True) -> None:
        """Log what accumulated; with `rearm`, look again after a window (the timer stays unset
        once a window passes quietly, so the next refusal is logged at once)."""
        self._timer = None
        if not self._pending:
            return
        words = {Refusal.NOT_ALLOWED: "not in allow_from", Refusal.LIMIT: f"over max_connections ({self.limit} open)"}
        log.warning("%s: refused %s (last from %s); refused connections are reset at accept and logged at most "
                    "every %g s", self.name(),
                    ", ".join(f"{count} {words[reason]}" for reason, count in self._pending.items()),
                    self._last_peer, self.window)
        self._pending.clear()
        if rearm:
            self._timer = asyncio.get_running_loop().call_later(self.window, self._flush)

    def close(self) -> None:
        """Log what is still pending."""
        if self._timer is not None:
            self._timer.cancel()
        self._flush(rearm=False)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0): for a refused connection, and to pass a peer's
    reset on. No FIN handshake and no TIME_WAIT are left behind."""
    _linger_zero(writer.get_extra_info("socket"))
    writer.transport.abort()


def reset_socket(sock: socket.socket) -> None:
    """`reset` for a socket no transport has taken (a TLS listener's, refused at accept)."""
    _linger_zero(sock)
    sock.close()


def _linger_zero(sock: socket.socket | None) -> None:
    if sock is None:  # a TLS transport on uvloop whose socket is already gone: nothing to linger
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
