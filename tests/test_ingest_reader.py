"""The worker's reader gathers a trickle of copies into one pass (pvtap/ingest/reader.py)."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime

from pvtap.decode import codec_for
from pvtap.ingest import reader, wire
from pvtap.ingest.archive import ArchiveQueue
from pvtap.ingest.engine import Ingest
from pvtap.ingest.framing import ConnectionRecord, Connections
from pvtap.ingest.settings import WorkerSettings
from pvtap.ingest.worker_state import WorkerState
from pvtap.privacy import Privacy
from pvtap.store.local import LocalStore

RECORD = ConnectionRecord(id="c-1", protocol="alphaess", listener="alphaess", policy="forward",
                          started=datetime(2024, 6, 1, 12, tzinfo=UTC), peer="192.0.2.9:40000", action="forward")


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


def read_all(tmp_path, messages: list[list[bytes]]):
    """A worker's reader over a channel that carries `messages` and ends: its shared state after."""

    ours, theirs = socket.socketpair()
    with ours, LocalStore(tmp_path / "relay.sqlite") as store:
        state = WorkerState(ours, WorkerSettings(store=str(tmp_path / "relay.sqlite")))
        connections = Connections(Privacy(), codec_for, lambda conn: None)
        channel = reader.ChannelReader(ours, state, ArchiveQueue(64 << 20), Ingest(store, Privacy()), connections)
        theirs.sendall(b"".join(part for parts in messages for part in parts))
        theirs.close()
        channel.run()
    return state


def test_a_trickle_of_copies_leaves_the_decoder_its_full_turns(tmp_path):
    """Copies arriving a few at a time are no backlog: the decoder must keep its long turns (a
    busy test that looked only at what waits after a gather starved decoding at 1,000 devices)."""
    opened = wire.with_conn(wire.Kind.OPEN, 1, {"record": RECORD.to_wire(), "device": ""})
    copies = [wire.chunk(1, "up", time.time_ns(), b"\x01" * 100) for _ in range(20)]
    assert read_all(tmp_path, [opened, *copies]).busy_at < 0


def test_a_late_trickle_makes_the_reader_busy(tmp_path):
    """A fleet the worker cannot keep up with still arrives a trickle per read, but its copies
    were taken long ago: decoding must give way to archiving then too."""
    opened = wire.with_conn(wire.Kind.OPEN, 1, {"record": RECORD.to_wire(), "device": ""})
    taken = time.time_ns() - int(2 * reader.LATE_S * 1e9)
    copies = [wire.chunk(1, "up", taken, b"\x01" * 100) for _ in range(20)]
    assert read_all(tmp_path, [opened, *copies]).busy_at > 0


def test_copies_piling_up_make_the_reader_busy(tmp_path):
    opened = wire.with_conn(wire.Kind.OPEN, 1, {"record": RECORD.to_wire(), "device": ""})
    copies = [wire.chunk(1, "up", time.time_ns(), b"\x01" * 4096) for _ in range(40)]  # 160 KiB waiting at once
    assert read_all(tmp_path, [opened, *copies]).busy_at > 0
