"""The forwarding process's socket to its current ingest worker: sending and reading, never waiting.

On an event loop the socket is watched: its back-channel always, writability only while the
outbox holds more than the socket took. Without a loop (start-up, a stop, code that has none)
it is polled. The socket is new with every worker; the outbox (outbox.py: what waits to be sent)
and the loop stay. What the messages mean is the channel's (channel.py): this module tells it of
each message read, each message sent whole, and a worker whose end closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Callable

from pvtap.ingest import wire
from pvtap.ingest.outbox import Message, Outbox
from pvtap.ingest.wire import Kind

_SOCKET_BUFFER = 4 * 2**20


def socket_pair(limit: int) -> tuple[socket.socket, socket.socket]:
    """Our end and the worker's. The kernel holds copies in flight too: at most as much as the
    budget (`limit`; 4 MiB at most)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(OSError):
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, min(_SOCKET_BUFFER, limit))
    return ours, theirs


class ChannelSocket:
    """Our end of the socket to the current worker, if any. Use it from one thread (the event loop's).

    `received(kind, body)`: a message came on the back-channel. `sent(message)`: the socket took
    the whole of a message. `flushed()`: a send is over and the worker is still there. `lost()`:
    the worker's end closed or failed (call `disconnect` then)."""

    def __init__(self, outbox: Outbox, *, received: Callable[[Kind, bytes], None], sent: Callable[[Message], None],
                 flushed: Callable[[], None], lost: Callable[[], None]) -> None:
        self.out = outbox
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._received, self._sent, self._flushed, self._lost = received, sent, flushed, lost
        self._reader = wire.Reader()
        self._reading: socket.socket | None = None  # the socket the loop reads the back-channel of
        self._flush_scheduled = False
        self._writing = False

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def connect(self, sock: socket.socket) -> None:
        """Our end of a new worker's socket (watched once `attach` or `flush` runs)."""
        sock.setblocking(False)
        self.sock = sock
        self._reader = wire.Reader()

    def disconnect(self) -> None:
        """The worker's end closed: stop watching the socket and close it."""
        sock, self.sock = self.sock, None
        self._reading = None
        if sock is None:
            return
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(sock.fileno())
            if self._writing:
                self.loop.remove_writer(sock.fileno())
        self._writing = False
        sock.close()

    def shut_write(self) -> None:
        """End the channel: the worker sees its EOF (and may still answer)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    # -- sending ---------------------------------------------------------------------------------

    def schedule_flush(self) -> None:
        """Send soon: on the next turn of the loop, or now without one."""
        if self._writing or self._flush_scheduled:
            return
        loop = self.attach()
        if loop is None:
            self.flush()
        else:
            self._flush_scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send as much as the socket takes now; the rest when it is writable again."""
        self._flush_scheduled = False
        sock = self.sock
        while self.out and sock is not None:
            try:
                sent = self.out.send(sock)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._lost()
                return
            for message in sent:
                self._sent(message)
        self._want_writable(bool(self.out) and self.sock is not None)
        if self.sock is not None:
            self._flushed()

    def _want_writable(self, want: bool) -> None:
        if self.loop is None or self.sock is None or want == self._writing:
            return
        if want:
            self.loop.add_writer(self.sock.fileno(), self.flush)
        else:
            self.loop.remove_writer(self.sock.fileno())
        self._writing = want

    def drain(self, deadline: float) -> None:
        """Send everything buffered, waiting for the socket (close, sync): not for a hook."""
        drain_together([self], deadline)

    @property
    def unsent(self) -> bool:
        return bool(self.out) and self.sock is not None

    # -- the back-channel and the loop -----------------------------------------------------------

    def attach(self) -> asyncio.AbstractEventLoop | None:
        """Watch the socket on the running event loop (None: no loop runs on this thread)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if loop is not self.loop:
            self.detach()
            self.loop = loop
        if self.sock is not None and self._reading is not self.sock:  # a new loop, or a new worker
            loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = self.sock
        return loop

    def detach(self) -> None:
        """Stop watching the socket on the loop (it is polled from now on)."""
        loop, self.loop = self.loop, None
        self._reading = None
        if loop is None or loop.is_closed() or self.sock is None:
            return
        loop.remove_reader(self.sock.fileno())
        if self._writing:
            loop.remove_writer(self.sock.fileno())
            self._writing = False

    def poll(self, timeout: float) -> bool:
        """Read the back-channel without a loop (stats, sync, close); True if anything came."""
        if self.sock is None:
            return False
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if ready:
            self._on_readable()
        return bool(ready)

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        while True:
            try:
                data = sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            for kind, body in self._reader.feed(data):
                self._received(kind, body)


def drain_together(sockets: list[ChannelSocket], deadline: float) -> None:
    """Send everything the sockets' outboxes hold, all at once, waiting for whichever takes more."""
    while time.monotonic() < deadline:
        for channel_socket in sockets:
            if channel_socket.unsent:
                channel_socket.flush()
        waiting = [s for s in sockets if s.unsent]
        if not waiting:
            return
        writable = [s.sock for s in waiting if s.sock is not None]
        select.select([], writable, [], max(0.0, min(0.2, deadline - time.monotonic())))
        for channel_socket in waiting:
            channel_socket.poll(0)  # the worker may wait for us to read its back-channel
