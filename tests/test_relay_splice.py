"""The splice takes both sockets over from their streams (proxy_tcp/pump.py): what a stream had
already read before the take-over (bytes, an EOF, a paused reader with a full buffer) is
forwarded as if it had arrived after, and the streams still learn when their socket is lost;
on both of the relay's event loops."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from proxy_tcp.pump import CHUNK, Activity, PumpEnd, Splice, first_ended
from proxy_tcp.service import loop_factory
from pvtap.ingest.framing import ConnectionRecord
from pvtap.records import DOWN, UP
from tests.conftest import RELAY_LOOPS
from tests.waiting import until

pytestmark = pytest.mark.timeout(60)


class Copies:
    """The splice's CopyStream: keeps every chunk."""

    opaque = False
    dropped = 0

    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes]] = []

    def chunk(self, direction: str, data: bytes) -> None:
        self.chunks.append((direction, data))

    def close(self, record: ConnectionRecord) -> None:
        pass


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def stream_pair() -> tuple[Stream, Stream, asyncio.Server]:
    """Two ends of one loopback TCP connection, each a (reader, writer) of its own stream."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0, limit=CHUNK)
    client = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1], limit=CHUNK)
    return client, await accepted, server


@contextlib.asynccontextmanager
async def spliced_path() -> AsyncIterator[tuple[Stream, Stream, Stream, Stream]]:
    """device ⇄ relay's device side, relay's cloud side ⇄ cloud: two loopback connections, all
    four ends closed at the end."""
    device, relay_device, s1 = await stream_pair()
    relay_cloud, cloud, s2 = await stream_pair()
    try:
        yield device, relay_device, relay_cloud, cloud
    finally:
        for _, writer in (device, relay_device, relay_cloud, cloud):
            writer.close()
        for server in (s1, s2):
            server.close()


def splice(relay_device: Stream, relay_cloud: Stream, copies: Copies | None = None,
           counts: dict[str, int] | None = None) -> Splice:
    return Splice(relay_device, relay_cloud, counts=counts if counts is not None else {UP: 0, DOWN: 0},
                  copies=copies or Copies(), activity=Activity(0.0))


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await reader.read()  # until EOF


@pytest.mark.parametrize("loop", RELAY_LOOPS)  # the take-over uses both loops' transports
def test_bytes_and_eof_read_before_the_take_over_reach_the_cloud(loop):
    asyncio.run(read_before_the_take_over(), loop_factory=loop_factory(loop))


async def read_before_the_take_over():
    async with spliced_path() as (device, relay_device, relay_cloud, cloud):
        payload = bytes(range(256)) * 4 + b"the last frame"
        device[1].write(payload)
        device[1].write_eof()
        reader = relay_device[0]
        await until(lambda: reader._eof,  # type: ignore[attr-defined]
                    what="the relay's device stream to hold the bytes and the EOF")
        copies, counts = Copies(), {UP: 0, DOWN: 0}
        spliced = splice(relay_device, relay_cloud, copies, counts)
        assert await asyncio.wait_for(read_all(cloud[0]), 10) == payload  # the bytes, then the half-close
        assert await spliced.ends[UP] == PumpEnd("eof", "device")
        assert counts == {UP: len(payload), DOWN: 0}
        assert b"".join(data for direction, data in copies.chunks if direction == UP) == payload
        cloud[1].write(b"answer after the device's half-close")
        cloud[1].close()
        assert await asyncio.wait_for(read_all(device[0]), 10) == b"answer after the device's half-close"
        assert await spliced.ends[DOWN] == PumpEnd("eof", "cloud")
        spliced.stop()
        relay_device[1].close()
        relay_cloud[1].close()
        # the streams were still told their sockets closed: waiting for them ends
        await asyncio.wait_for(asyncio.gather(relay_device[1].wait_closed(), relay_cloud[1].wait_closed()), 10)


@pytest.mark.parametrize("loop", RELAY_LOOPS)
def test_ends_found_done_together_are_taken_in_the_order_they_happened(loop):
    """Under load the device's EOF and the cloud's close in answer to it are both done when the
    connection's task looks (a set of futures): it must still say the device closed first."""
    asyncio.run(ends_in_order(), loop_factory=loop_factory(loop))


async def ends_in_order():
    async with spliced_path() as (device, relay_device, relay_cloud, cloud):
        spliced = splice(relay_device, relay_cloud)
        device[1].write_eof()
        assert await asyncio.wait_for(read_all(cloud[0]), 10) == b""  # the device's half-close reached the cloud
        cloud[1].close()  # which answers it by closing
        up, down = await asyncio.wait_for(asyncio.gather(spliced.ends[UP], spliced.ends[DOWN]), 10)
        assert (up, down) == (PumpEnd("eof", "device"), PumpEnd("eof", "cloud")) and up.order < down.order
        for done in ([spliced.ends[UP], spliced.ends[DOWN]], [spliced.ends[DOWN], spliced.ends[UP]]):
            assert first_ended(done) is spliced.ends[UP]  # whichever order the two come in
        spliced.stop()


@pytest.mark.parametrize("loop", RELAY_LOOPS)  # the take-over uses both loops' transports
def test_a_stream_paused_with_a_full_buffer_is_resumed_and_everything_forwarded(loop):
    asyncio.run(paused_stream_resumed(), loop_factory=loop_factory(loop))


async def paused_stream_resumed():
    async with spliced_path() as (device, relay_device, relay_cloud, cloud):
        payload = hashlib.sha256(b"seed").digest() * (3 * CHUNK // 32)  # 768 KiB: more than a stream buffers
        device[1].write(payload)
        reader = relay_device[0]
        await until(lambda: reader._paused,  # type: ignore[attr-defined]
                    what="the relay's device stream to pause reading with a full buffer")
        spliced = splice(relay_device, relay_cloud)
        received = bytearray()
        while len(received) < len(payload):
            received += await asyncio.wait_for(cloud[0].read(CHUNK), 10)
        assert bytes(received) == payload
        spliced.stop()


@pytest.mark.parametrize("loop", RELAY_LOOPS)  # the take-over uses both loops' transports
def test_a_reset_ends_both_directions_naming_the_side_that_reset(loop):
    asyncio.run(a_reset_ends_both_directions(), loop_factory=loop_factory(loop))


async def a_reset_ends_both_directions():
    async with spliced_path() as (device, relay_device, relay_cloud, _):
        spliced = splice(relay_device, relay_cloud)
        device[1].get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        device[1].transport.abort()
        ends = await asyncio.wait_for(asyncio.gather(*spliced.ends.values()), 10)
        assert ends == [PumpEnd("reset", "device"), PumpEnd("reset", "device")]
        spliced.stop()
