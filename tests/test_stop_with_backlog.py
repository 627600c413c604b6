"""Raw first, end to end: stop mitmdump with SIGTERM while its ingest worker still has a decode
backlog (many large Envoy reports), start it again, and every payload captured before the stop
is decoded (exact counts). The backlog at the stop is read from the status row the worker writes
when it stops. (The relay's worker is the same code; see the report on why its part is not here.)"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pvtap.simulate.enphase import Simulator, encode_body, post_report
from pvtap.simulate.enphase_cloud import EnphaseCloud
from pvtap.store.local import IngestStatus, LocalStore
from tests.mitm_support import Mitmdump, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

URL = "https://reports.enphaseenergy.com/emu_reports/performance_report?webcomm_version=3.0"


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
        proxy = Mitmdump.reverse(tmp_path, cloud, data_dir=data).start()
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
