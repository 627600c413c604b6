"""Issue 9 F6: a connection task cancelled while it closes (its cloud side still has unsent
bytes: the cloud stopped reading) ends with CancelledError, not swallowed, leaves no task and
no socket behind, and its connection record is still stored."""

from __future__ import annotations

import asyncio
import os

import pytest

from pvtap.store.local import LocalStore
from tests.relay_support import CloudConnection, StandInCloud, listener, running_relay

pytestmark = pytest.mark.timeout(60)

#: where a connection's own tasks run (its serving, pumps, close waiters)
CONNECTION_CODE = ("proxy_tcp/connection.py", "proxy_tcp/pump.py")


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path / "relay.sqlite")
    yield s
    s.close()


def connection_code(task: asyncio.Task) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and code.co_filename.endswith(CONNECTION_CODE)


def socket_inode(writer: asyncio.StreamWriter) -> str:
    return os.readlink(f"/proc/self/fd/{writer.get_extra_info('socket').fileno()}")


def open_sockets() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the fd of listdir itself
    return out


async def test_cancelling_a_closing_connection_propagates_and_leaves_nothing_behind(store):
    release = asyncio.Event()

    async def never_reads(conn: CloudConnection) -> None:
        await release.wait()

    async with StandInCloud(never_reads) as cloud:
        async with running_relay(listener(cloud.address), store=store) as (relay, port):
            _, device = await asyncio.open_connection("127.0.0.1", port)
            await cloud.connection(0)
            (task, connection), = relay.listeners[0].connections.items()
            chunk = b"\x5a" * 65536
            async with asyncio.timeout(20):  # until the relay's cloud side holds bytes it cannot send
                while connection.cloud_writer is None or not connection.cloud_writer.transport.get_write_buffer_size():
                    device.write(chunk)
                    await asyncio.sleep(0.01)
            sockets = {socket_inode(connection.device_writer), socket_inode(connection.cloud_writer)}

            connection.stop()  # as a stopping relay does: serving ends, closing begins
            async with asyncio.timeout(10):  # closing waits for the unsent bytes (up to CLOSE_GRACE)
                while not connection.cloud_writer.is_closing():
                    await asyncio.sleep(0.01)
            assert not task.done()
            task.cancel()  # no time left: the closing itself is cancelled
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled()

            left = [t for t in asyncio.all_tasks() if connection_code(t)]
            assert not left, left  # no pump, no close waiter
            async with asyncio.timeout(5):  # aborted transports give their sockets back on the next loop turn
                while sockets & open_sockets():
                    await asyncio.sleep(0.01)
            assert connection.record.outcome == "shutdown"
            device.close()
    release.set()
    records = [s.record for s in store.records(measurements=["pvtap_connection"])]
    assert [r.tags.get("outcome", r.fields.get("outcome")) for r in records] == ["shutdown"]  # not relay_gone
