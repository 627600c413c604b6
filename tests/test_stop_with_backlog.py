"""Raw first, end to end: stop the relay and mitmdump with SIGTERM while their ingest worker still
has a decode backlog, start them again, and every payload captured before the stop is decoded
(exact counts). `ingest.stop_decode_s = 0` makes a stopping worker leave its whole backlog to the
next start, so the backlog at the stop is there whatever the machine's speed; it is read from
the status row the worker writes when it stops."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pvtap.decode.alphaess import ack_frame
from pvtap.simulate.enphase import Simulator, encode_body, post_report
from pvtap.simulate.enphase_cloud import EnphaseCloud
from pvtap.store.local import IngestStatus, LocalStore
from tests.mitm_support import Mitmdump, wait_for
from tests.relay_support import RelayProcess, acking_alpha_cloud, alpha_backfill_frame

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

URL = "https://reports.enphaseenergy.com/emu_reports/performance_report?webcomm_version=3.0"
LEAVE_THE_BACKLOG = {"PVTAP_INGEST_STOP_DECODE_S": "0"}


def stopped_status(path: Path) -> IngestStatus | None:
    """The status row of a worker that has stopped (None while it runs)."""
    with LocalStore(path, readonly=True) as store:
        status = store.status()
    return status if status is not None and not status.running else None


def decoded_everything(path: Path) -> bool:
    with LocalStore(path, readonly=True) as store:
        return store.decode_backlog() == 0


def count(path: Path, measurement: str) -> int:
    with LocalStore(path, readonly=True) as store:
        return store.count_records(measurements=[measurement])


def test_mitmdump_stopped_with_a_decode_backlog_decodes_it_after_a_restart(tmp_path):
    data = tmp_path / "data"
    store = data / "enphase.sqlite"
    simulator = Simulator(micros=3, start=1699956000, seed=5)
    reports = [simulator.next_report(intervals=1500) for _ in range(40)]  # big catch-up reports: slow to decode
    bodies = [encode_body(r.xml) for r in reports]
    with EnphaseCloud(cert_dir=tmp_path / "cloud") as cloud:
        proxy = Mitmdump.reverse(tmp_path, cloud, data_dir=data, env=LEAVE_THE_BACKLOG).start()
        try:
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda body: post_report(URL, body, connect=("127.0.0.1", proxy.port),
                                                                 cafile=str(proxy.ca_cert)), bodies))
            assert [a.status for a in answers] == [200] * len(bodies)
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGTERM)  # at once: the worker is still decoding
            assert proxy.proc.wait(30) == 0
        finally:
            proxy.stop()
        at_stop = wait_for(lambda: stopped_status(store), timeout=60, what="the worker's final status row")
        assert at_stop.decode_backlog > 0, "no backlog at the stop: the test proved nothing"
        with LocalStore(store, readonly=True) as s:
            assert s.count_raw() == 2 * len(bodies)  # every request and response archived
        again = Mitmdump.reverse(tmp_path, cloud, data_dir=data).start()
        try:
            wait_for(lambda: decoded_everything(store), timeout=120, what="the backlog decoded after the restart")
        finally:
            again.stop()
    assert count(store, "enphase_interval") == sum(len(r.intervals) for r in reports)
    assert count(store, "enphase_reading") == sum(len(r.readings) for r in reports)
    assert count(store, "enphase_report_response") == len(reports)


# -- the relay ------------------------------------------------------------------------------------

DEVICES, FRAMES, ROWS = 10, 10, 150
ACK = ack_frame(12)




async def device(port: int, index: int) -> int:
    """Sends its back-fill frames, each after the last one's ack; returns the frames acknowledged."""
    frames = [alpha_backfill_frame(f"ALSIM{index:010d}", n, ROWS) for n in range(FRAMES)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for frame in frames:
            writer.write(frame)
            await reader.readexactly(len(ACK))
    finally:
        writer.close()
    return len(frames)


def archived(path: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        query = {
            "up": "SELECT COUNT(*) FROM raw WHERE kind='frame' AND direction='up'"
                  " AND json_extract(meta, '$.frame')='1-1-12'",
            "rows": "SELECT COUNT(*) FROM records WHERE measurement='alphaess_backfill'",
            "connections": "SELECT COUNT(*) FROM records WHERE measurement='pvtap_connection'",
            "dropped": "SELECT COALESCE(SUM(json_extract(fields, '$.dropped_copies')), 0) FROM records"
                       " WHERE measurement='pvtap_connection'",
        }
        return {name: db.execute(sql).fetchone()[0] for name, sql in query.items()}
    finally:
        db.close()


async def test_the_relay_stopped_with_a_decode_backlog_decodes_it_after_a_restart(tmp_path):
    """The relay as `pvtap run` starts it (a process with its ingest worker process), stopped with
    SIGTERM as soon as the cloud acknowledged every frame: all of them are archived, few decoded;
    after the next start every row of every frame is a record."""
    server = await asyncio.start_server(acking_alpha_cloud(ACK), "127.0.0.1", 0)
    config = tmp_path / "pvtap.toml"
    config.write_text(f'[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "127.0.0.1:0"\n'
                      f'upstream = "127.0.0.1:{server.sockets[0].getsockname()[1]}"\n[ingest]\nworkers = 1\n')
    store = tmp_path / "data" / "relay.sqlite"
    relay = RelayProcess(["--config", str(config)], tmp_path / "data", env=LEAVE_THE_BACKLOG)
    await asyncio.to_thread(relay.start)
    try:
        acked = await asyncio.gather(*(device(relay.port, i) for i in range(DEVICES)))
    finally:
        status = await asyncio.to_thread(relay.stop, 60)  # SIGTERM at once: the worker is still decoding
    assert status == 0, relay.text
    assert sum(acked) == DEVICES * FRAMES
    at_stop = await asyncio.to_thread(wait_for, lambda: stopped_status(store), 30, 0.05, "the final status row")
    assert at_stop.decode_backlog > 0, "no backlog at the stop: the test proved nothing"
    before = archived(store)
    assert before["up"] == DEVICES * FRAMES  # every frame forwarded is archived
    assert before["connections"] == DEVICES and before["dropped"] == 0
    assert before["rows"] < DEVICES * FRAMES * ROWS

    again = RelayProcess(["--config", str(config)], tmp_path / "data")
    await asyncio.to_thread(again.start)
    try:
        await asyncio.to_thread(wait_for, lambda: decoded_everything(store), 120, 0.1, "the backlog decoded")
    finally:
        await asyncio.to_thread(again.stop, 60)
        server.close()
    assert archived(store)["rows"] == DEVICES * FRAMES * ROWS
