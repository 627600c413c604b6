"""Many devices through the real relay process and its real ingest worker: 200 AlphaESS
batteries × 5 realtime frames a second, each answered by the stand-in cloud. Nothing decoded is
lost: every frame sent is a record in the store, every ack a raw frame, every connection a
record with 0 dropped copies (exact counts, not rates)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from pvtap.decode.alphaess import REQUEST, ack_frame, encode_frame
from pvtap.ingest import Ingest
from pvtap.store.local import LocalStore
from tests.relay_support import RelayProcess, acking_alpha_cloud

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

DEVICES, RATE, SECONDS = 200, 5, 4
ACK = ack_frame(16)


def frame(serial: str, n: int) -> bytes:
    return encode_frame(REQUEST, 16, (
        b'{"Time":"2024/03/03 22:05:21","SN":"' + serial.encode() + b'","Ppv1":"' + str(n).encode() +
        b'","Pbat":"539.44","SOC":"38.0"}'))



async def device(port: int, index: int, frames: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    tick = loop.time() + index / DEVICES / RATE  # spread over the interval
    for n in range(frames):
        await asyncio.sleep(max(0.0, tick - loop.time()))
        writer.write(frame(f"ALSIM{index:010d}", n))
        await reader.readexactly(len(ACK))
        tick += 1 / RATE
    writer.close()
    await writer.wait_closed()
    return frames


def counts(path: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        query = {
            "realtime": "SELECT COUNT(*) FROM records WHERE measurement='alphaess_realtime'",
            "frames": "SELECT COUNT(*) FROM raw WHERE kind='frame'",
            "connections": "SELECT COUNT(*) FROM records WHERE measurement='pvtap_connection'",
            "dropped": "SELECT COALESCE(SUM(json_extract(fields, '$.dropped_copies')), 0) FROM records"
                       " WHERE measurement='pvtap_connection'",
            "backlog": "SELECT COUNT(*) FROM raw WHERE id > (SELECT cursor FROM decoding)",
        }
        return {name: db.execute(sql).fetchone()[0] for name, sql in query.items()}
    finally:
        db.close()


async def test_200_devices_at_5_frames_a_second_lose_no_decoded_copy(tmp_path):
    server = await asyncio.start_server(acking_alpha_cloud(ACK), "127.0.0.1", 0, backlog=1024)
    cloud_port = server.sockets[0].getsockname()[1]
    config = tmp_path / "pvtap.toml"
    config.write_text(f'[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "127.0.0.1:0"\n'
                      f'upstream = "127.0.0.1:{cloud_port}"\nmax_connections = {DEVICES * 2}\n'
                      f'[ingest]\nworkers = 1\n')
    relay = RelayProcess(["--config", str(config)], tmp_path / "data")
    await asyncio.to_thread(relay.start)
    try:
        sent = await asyncio.gather(*(device(relay.port, i, RATE * SECONDS) for i in range(DEVICES)))
    finally:
        status = await asyncio.to_thread(relay.stop, 60)  # SIGTERM: every connection ends and is recorded
        server.close()
    assert status == 0, relay.text
    total = sum(sent)
    assert total == DEVICES * RATE * SECONDS
    got = counts(tmp_path / "data" / "relay.sqlite")
    # a stop may leave a decode backlog (decoded at the next start); it never loses a frame
    assert got["frames"] == 2 * total  # every frame up and every ack down is archived
    assert got["connections"] == DEVICES and got["dropped"] == 0
    if got["backlog"]:  # what the next start would do: decode the rest
        with LocalStore(tmp_path / "data" / "relay.sqlite") as store:
            ingest = Ingest(store)
            while ingest.decode_pending():
                pass
    assert counts(tmp_path / "data" / "relay.sqlite")["realtime"] == total
