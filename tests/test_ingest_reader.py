"""The worker's reader gathers a trickle of copies into one pass (pvtap/ingest/reader.py)."""

from __future__ import annotations

import socket

from pvtap.ingest import reader


def test_a_trickle_read_takes_what_has_arrived_meanwhile():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        for part in (b"copy-2;", b"copy-3;", b"copy-4;"):
            theirs.sendall(part)
        assert reader.gather(ours, b"copy-1;", wait_s=0) == b"copy-1;copy-2;copy-3;copy-4;"
        theirs.sendall(b"copy-5;")
        assert reader.gather(ours, b"", wait_s=0) == b"copy-5;"


def test_gathering_stops_at_the_channels_end_and_leaves_it_to_the_next_read():
    ours, theirs = socket.socketpair()
    with ours:
        theirs.sendall(b"last copy")
        theirs.close()
        assert reader.gather(ours, b"first;", wait_s=0) == b"first;last copy"
        assert ours.recv(100) == b""


def test_gathering_takes_at_most_one_read_of_bytes(monkeypatch):
    monkeypatch.setattr(reader, "RECV_SIZE", 16)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(bytes(range(40)))
        assert reader.gather(ours, b"ab", wait_s=0) == b"ab" + bytes(range(14))
        assert ours.recv(100) == bytes(range(14, 40))


class _Resetting:
    """A channel that is readable and then fails, as a reset socket does."""

    def __init__(self, readable: socket.socket) -> None:
        self._readable = readable

    def fileno(self) -> int:
        return self._readable.fileno()

    def recv(self, size: int) -> bytes:
        raise ConnectionResetError(104, "Connection reset by peer")


def test_an_error_while_gathering_keeps_what_was_read():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"pending")
        assert reader.gather(_Resetting(ours), b"read before", wait_s=0) == b"read before"  # type: ignore[arg-type]
