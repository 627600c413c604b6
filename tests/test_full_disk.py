"""The store on a small tmpfs that fills up (mounted here; the tests run as root): forwarding goes
on byte for byte, the failure is one clear error (not a flood), nothing committed is damaged, and
archiving resumes when space returns."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess

import pytest

from pvtap.store.local import LocalStore
from tests.relay_support import StandInCloud, listener, read_all, running_relay
from tests.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk) -> None:
    with open(disk / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


async def send(port: int, data: bytes) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def test_a_full_disk_never_stops_forwarding_and_archiving_resumes(small_disk, caplog):
    store = LocalStore(small_disk / "relay.sqlite")
    before, during, after = os.urandom(50_000), os.urandom(300_000), os.urandom(20_000)
    with caplog.at_level(logging.WARNING, logger="pvtap.ingest"):
        async with StandInCloud(read_all) as cloud:
            async with running_relay(listener(cloud.address), store=store) as (relay, port):
                await send(port, before)
                await relay.copies.idle()
                committed = [s.raw.payload for s in store.raw_payloads()]
                fill(small_disk)
                for _ in range(5):
                    await send(port, during)  # forwarded while nothing can be archived
                conns = [await cloud.connection(i) for i in range(6)]
                for conn in conns:
                    await conn.done.wait()
                await until(lambda: "CANNOT ARCHIVE" in caplog.text, 30, what="the loud CANNOT ARCHIVE error")
                (small_disk / "filler").unlink()  # space returns
                await send(port, after)
                await relay.copies.idle(timeout=60)
    assert [bytes(c.received) for c in conns] == [before] + [during] * 5  # byte for byte, all of it
    assert caplog.text.count("CANNOT ARCHIVE") == 1 and "free space on its disk" in caplog.text
    assert "archiving works again" in caplog.text
    db = sqlite3.connect(small_disk / "relay.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    payloads = [s.raw.payload for s in store.raw_payloads()]
    assert payloads[:len(committed)] == committed  # nothing committed was damaged
    assert b"".join(payloads).endswith(after)  # archived again once there was room
    store.close()
