"""The InfluxDB forwarder inside the relay's ingest worker dies for real and is restarted: a
directory where its lock file must be (a damaged data dir) ends its thread at start; the worker
restarts it with back-off, `pvtap status` says RESTARTING and why, records wait in the store; once
the fault is gone the next restart delivers every record to a real VictoriaMetrics and `pvtap
status` shows the forwarder idle and how often it was restarted."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from pvtap.cli import main
from pvtap.decode.alphaess import REQUEST, ack_frame, encode_frame
from pvtap.store.delivery import read_status
from pvtap.store.local import LocalStore
from tests.mitm_support import wait_for
from tests.relay_support import RelayProcess, acking_alpha_cloud
from tests.servers import VictoriaMetrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

FRAMES = 5
START = datetime.now()  # the device's clock: local time, as AlphaESS batteries keep it
ACK = ack_frame(16)


def realtime(n: int) -> bytes:
    """Realtime frame n, stamped n seconds before the device's first: each frame its own point
    (the decoder learns the clock offset from the smallest lag, so times sent at once that went
    forward would all land in the second they arrived in)."""
    when = (START - timedelta(seconds=n)).strftime("%Y/%m/%d %H:%M:%S").encode()
    return encode_frame(REQUEST, 16, b'{"Time":"%s","SN":"ALSIM0000000001","Ppv1":"%d","Pbat":"539.44","SOC":"38.0"}'
                        % (when, n))



async def battery(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for n in range(FRAMES):
        writer.write(realtime(n))
        await reader.readexactly(len(ACK))
    writer.close()


def store_points(path) -> dict[int, object]:
    """Ppv1 per millisecond timestamp."""
    with LocalStore(path, readonly=True) as store:
        records = [s.record for s in store.records(measurements=["alphaess_realtime"])]
    assert len(records) == FRAMES
    points: dict[int, object] = {r.time_ns // 10**6: r.fields["Ppv1"] for r in records}
    assert len(points) == FRAMES
    return points


def vm_points(vm: VictoriaMetrics) -> dict[int, object]:
    return {ts: value for (_name, _tags, ts), value in vm.samples("alphaess_realtime_Ppv1").items()}


def status_showing(data_dir, capsys, words: str) -> str:
    """`pvtap status`'s output once it contains `words` ("" before)."""
    capsys.readouterr()
    assert main(["--data-dir", str(data_dir), "status"]) == 0
    out = capsys.readouterr().out
    return out if words in out else ""


async def test_a_forwarder_that_dies_is_restarted_and_pvtap_status_shows_it(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    lock = data / "relay.sqlite.forward.lock"
    lock.mkdir()  # the fault: the forwarder cannot open its lock file, its thread ends
    server = await asyncio.start_server(acking_alpha_cloud(ACK), "127.0.0.1", 0)
    with VictoriaMetrics(tmp_path / "vm") as vm:
        config = tmp_path / "pvtap.toml"
        config.write_text(f'[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "127.0.0.1:0"\n'
                          f'upstream = "127.0.0.1:{server.sockets[0].getsockname()[1]}"\n[ingest]\nworkers = 1\n'
                          f'[influx]\nurl = "{vm.url}"\norg = "-"\nbucket = "pvtap"\nbatch_age_s = 0\n')
        relay = RelayProcess(["--config", str(config)], data)
        await asyncio.to_thread(relay.start)
        try:
            await battery(relay.port)
            shown = await asyncio.to_thread(wait_for, lambda: status_showing(data, capsys, "forwarder      RESTARTING"),
                                            30, 0.5, "pvtap status to show the forwarder restarting")
            assert "the forwarder thread died (IsADirectoryError: [Errno 21] Is a directory: " in shown
            assert read_status(data / "relay.sqlite").backlog >= FRAMES  # waiting in the store, not lost
            assert vm.count('{__name__=~"alphaess_realtime_.*"}') == 0

            lock.rmdir()  # the fault is gone: the next restart works
            await asyncio.to_thread(wait_for, lambda: read_status(data / "relay.sqlite").backlog == 0, 90, 0.5,
                                    "the records delivered after a restart")
            assert vm_points(vm) == store_points(data / "relay.sqlite")
            recovered = await asyncio.to_thread(wait_for, lambda: status_showing(data, capsys, "forwarder      idle"),
                                                30, 0.5, "pvtap status to show the forwarder idle")
        finally:
            assert await asyncio.to_thread(relay.stop, 60) == 0
            server.close()
    assert "(restarted " in recovered
    assert "the forwarder stopped unexpectedly (IsADirectoryError: " in relay.text
