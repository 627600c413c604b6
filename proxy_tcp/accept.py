"""Listening sockets that hand on each accepted socket unread: how a TLS listener accepts.

A stream server (`asyncio.start_server`) makes a transport at accept, and uvloop's transport
starts reading as soon as the connection is made — pausing it in the accept callback comes too
late, so the device's ClientHello landed in the stream as cleartext before `start_tls`. Here
the loop only accepts (`loop.sock_accept`, on both loops); the listener admits or resets the
raw socket, and the connection gives it to the TLS layer itself
(`loop.connect_accepted_socket`, proxy_tcp/connection.py), so no byte is read before the
handshake on either loop. Plain listeners keep the stream server: it is the faster path.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("proxy_tcp.listener")

#: seconds to wait before accepting again when the process is out of descriptors (as asyncio's servers do)
ACCEPT_RETRY_DELAY = 1.0


class SocketServer:
    """Listening sockets, each with a task that accepts and calls `accepted(socket, peername)`;
    the callee owns the socket from then on."""

    def __init__(self, sockets: list[socket.socket], accepted: Callable[[socket.socket, tuple], None]) -> None:
        self.sockets = sockets
        self.accepted = accepted
        self._tasks = [asyncio.create_task(self._accept(sock), name=f"accept {sock.getsockname()}")
                       for sock in sockets]

    @classmethod
    async def start(cls, host: str | None, port: int, accepted: Callable[[socket.socket, tuple], None], *,
                    backlog: int) -> SocketServer:
        """Listen where asyncio's start_server would (host None: every address, IPv4 and IPv6
        each on its own socket), with SO_REUSEADDR; OSError as a stream server raises it."""
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, _, _, _, address in dict.fromkeys(infos):
                sock = socket.create_server(address, family=family, backlog=backlog)
                sockets.append(sock)
                sock.setblocking(False)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, accepted)

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peername = await loop.sock_accept(listening)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # gone before we got to it
            except OSError as exc:  # out of descriptors or buffers: the next accept would fail as well
                log.error("accepting on %s failed (%s); accepting again in %g s", listening.getsockname(), exc,
                          ACCEPT_RETRY_DELAY)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            sock.setblocking(False)
            try:
                self.accepted(sock, peername)
            except Exception:  # a relay bug costs this connection, not the listener
                log.exception("accepting a connection from %s failed", peername)
                sock.close()

    async def close(self) -> None:
        """Stop accepting and close the listening sockets (connections already accepted stay)."""
        for task in self._tasks:
            task.cancel()
        # the loop lets go of a listening socket as its accept is cancelled: close it after that
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self.sockets:
            sock.close()
