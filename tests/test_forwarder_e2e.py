"""The forwarder against real servers: a database outage while records keep flowing, and
`pvtap forward` killed with SIGKILL again and again. The count and the values in the database
must match the store exactly (VictoriaMetrics over /api/v2/write, read back through its export)."""

from __future__ import annotations

import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvtap.store.delivery import read_deadletters, read_status
from pvtap.store.forwarder import start_forwarder
from pvtap.store.local import LocalStore
from tests.conftest import REPO
from tests.forwarder_support import Producer, config, make_records, recent_t0, vm_expected, vm_numeric, wait_until
from tests.servers import VictoriaMetrics

pytestmark = pytest.mark.slow


def test_database_outage_while_records_flow_then_the_backlog_drains(data_dir, tmp_path):
    t0 = recent_t0()
    store = LocalStore.for_process(data_dir, "relay")
    with VictoriaMetrics(tmp_path) as vm:
        forwarder = start_forwarder(store, config(vm.url, retry_initial_s=0.1, retry_max_s=0.3))
        assert forwarder is not None
        with Producer(store, per_tick=10, tick_s=0.05, t0=t0) as producer:
            assert wait_until(lambda: read_status(store.path).delivered >= 100)
            vm.stop()  # the database goes away; records keep coming
            assert wait_until(lambda: read_status(store.path).last_error is not None)
            backlog_during_outage = wait_until(lambda: read_status(store.path).backlog >= 200)
            status = read_status(store.path)
            error = status.last_error or ""
            vm.start()  # same port, same data
            wait_until(lambda: read_status(store.path).delivered > status.delivered, timeout=20,
                       what="delivery to resume, records still flowing, once the database is back")
        assert backlog_during_outage
        assert "refused" in error.lower() or "connection" in error.lower()
        assert forwarder.drain(30)
        assert forwarder.stop()
        records = producer.records
        assert len(records) == store.count_records() and len(records) >= 300
        assert vm_numeric(vm.samples(), records) == vm_expected(records)
        state = read_status(store.path)
        assert (state.delivered, state.backlog, state.deadletters) == (len(records), 0, 0)
    store.close()


def _config_file(tmp_path: Path, url: str, data_dir: Path) -> Path:
    path = tmp_path / "pvtap.toml"
    path.write_text(f'data_dir = "{data_dir}"\n[influx]\nurl = "{url}"\ntoken = "test-token"\norg = "-"\n'
                    'bucket = "pvtap"\nbatch_size = 100\nbatch_age_s = 0.02\n'
                    'retry_initial_s = 0.05\nretry_max_s = 0.2\n')
    return path


def _forward(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pvtap", "--config", str(cfg), "forward", *extra], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_batch_repeatedly_loses_nothing(data_dir, tmp_path):
    rng = random.Random(7)
    t0 = recent_t0()
    store = LocalStore.for_process(data_dir, "relay")
    store.append(make_records(3000, t0=t0))
    with VictoriaMetrics(tmp_path) as vm:
        cfg = _config_file(tmp_path, vm.url, data_dir)
        kills = []
        with Producer(store, per_tick=20, tick_s=0.02, start=3000, t0=t0) as producer:
            for _ in range(8):
                before = read_status(store.path).cursor
                proc = _forward(cfg)
                # once it is delivering, kill it at a random moment (mostly mid-batch: a batch is ~5 ms)
                assert wait_until(lambda before=before: read_status(store.path).cursor > before, timeout=20), \
                    proc.stderr
                time.sleep(rng.uniform(0.0, 0.15))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                state = read_status(store.path)
                kills.append((before, state.cursor, state.backlog))
        assert all(backlog > 0 for _, _, backlog in kills)  # every kill hit a forwarder with work left
        assert all(after > before for before, after, _ in kills)  # and each run made progress
        records = make_records(3000, t0=t0) + producer.records
        assert store.count_records() == len(records)
        final = _forward(cfg, "--once", "--timeout", "30")
        assert final.wait(60) == 0, final.stderr.read() if final.stderr else ""
        assert vm_numeric(vm.samples(), records) == vm_expected(records)
        state = read_status(store.path)
        assert (state.delivered, state.backlog, state.deadletters) == (len(records), 0, 0)
        assert read_deadletters(store.path) == []
    store.close()


def test_sigterm_during_a_hanging_write_exits_within_5_seconds(data_dir, tmp_path):
    """Docker's stop grace is 10 s: `pvtap forward` must be out well before."""
    from tests.servers import Reply, ScriptedInflux
    store = LocalStore.for_process(data_dir, "relay")
    store.append(make_records(10))
    with ScriptedInflux(lambda req, n: Reply(204, delay=30)) as server:
        cfg = _config_file(tmp_path, server.url, data_dir)
        proc = _forward(cfg)
        assert wait_until(lambda: len(server.requests) == 1, timeout=20)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t < 5
    assert read_status(store.path).backlog == 10
    store.close()


def _store_records(path: Path) -> list:
    with LocalStore(path, readonly=True) as store:
        return [s.record for s in store.records()]


def _influx_view(records: list) -> list:
    """Records as InfluxDB stores them: empty tag values are no tags (line protocol has none)."""
    from dataclasses import replace
    return [replace(r, tags={k: v for k, v in r.tags.items() if v}) for r in records]


async def test_steady_flow_from_the_simulators_through_the_relay_and_the_addon(data_dir, tmp_path):
    """AlphaESS simulator -> relay process -> stand-in cloud, Enphase simulator -> mitmdump with
    the addon -> stand-in cloud; the forwarders embedded in the relay and in mitmdump's process
    (configured by the same pvtap config) deliver both stores to VictoriaMetrics: every record
    arrives once with its values."""
    import asyncio
    from datetime import UTC, datetime, timedelta

    from pvtap.simulate.alphaess_cloud import AlphaCloud
    from pvtap.simulate.enphase_cloud import EnphaseCloud
    from tests.conftest import free_port
    from tests.mitm_support import Mitmdump
    from tests.relay_support import RelayProcess

    start = (datetime.now(UTC) - timedelta(hours=6)).strftime("%Y-%m-%dT%H:%MZ")
    stores = [data_dir / "relay.sqlite", data_dir / "enphase.sqlite"]
    with VictoriaMetrics(tmp_path) as vm:
        cfg = _config_file(tmp_path, vm.url, data_dir)
        with EnphaseCloud(cert_dir=tmp_path / "cloud") as enphase_cloud, \
                Mitmdump.reverse(tmp_path / "mitm", enphase_cloud, data_dir=data_dir,
                                 extra=["--set", f"pvtap_config={cfg}"]) as mitm:
            async with AlphaCloud() as alpha_cloud:
                relay = RelayProcess(["--config", str(cfg), "--protocol", "alphaess", "--listen",
                                      f"127.0.0.1:{free_port()}", "--upstream", f"127.0.0.1:{alpha_cloud.port}"],
                                     data_dir)
                await asyncio.to_thread(relay.start)
                try:
                    simulators = [
                        [sys.executable, "-m", "pvtap", "simulate", "alphaess", "--host", "127.0.0.1", "--port",
                         str(relay.port), "--interval", "0.05", "--extended-every", "0.2", "--count", "40", "--quiet"],
                        [sys.executable, "-m", "pvtap", "simulate", "enphase", "--url",
                         "https://reports.enphaseenergy.com", "--connect", f"127.0.0.1:{mitm.port}", "--reports", "6",
                         "--every", "0.2", "--start", start],
                    ]
                    procs = [await asyncio.create_subprocess_exec(*argv, cwd=REPO, stdout=asyncio.subprocess.PIPE,
                                                                  stderr=asyncio.subprocess.STDOUT)
                             for argv in simulators]
                    for proc in procs:
                        out, _ = await asyncio.wait_for(proc.communicate(), 60)
                        assert proc.returncode == 0, out.decode()
                    await alpha_cloud.wait_for(lambda: not any(s.open for s in alpha_cloud.sessions))
                    assert all(p.exists() for p in stores)

                    def drained() -> bool:
                        return all(read_status(p).forwarded and read_status(p).backlog == 0 for p in stores)

                    assert await asyncio.to_thread(wait_until, drained, 30), [read_status(p) for p in stores]
                finally:
                    assert await asyncio.to_thread(relay.stop) == 0, relay.text
        records = [r for p in stores for r in _store_records(p)]
        measurements = {r.measurement for r in records}
        assert {"alphaess_realtime", "enphase_interval", "enphase_reading"} <= measurements, measurements
        assert len([r for r in records if r.measurement == "alphaess_realtime"]) >= 40  # more if a frame was re-sent
        for p in stores:
            assert read_deadletters(p) == [], read_deadletters(p)[:3]
            state = read_status(p)
            assert state.delivered == len(_store_records(p)) and state.backlog == 0
        # The simulator reports faster than its 1-second clock ticks, so some records share measurement,
        # tags and timestamp: in InfluxDB (and VictoriaMetrics) they are one point, holding one of their values.
        view = _influx_view(records)
        candidates: dict = {}
        for r in view:
            for key, value in vm_expected([r]).items():
                candidates.setdefault(key, set()).add(value)
        got = vm_numeric(vm.samples(), view)
        assert got.keys() == candidates.keys()
        # VictoriaMetrics keeps 12 significant digits of a float (its decimal encoding): 0.44027777777777777
        # comes back as 0.440277777778. Equal to that precision, and nothing looser.
        assert all(any(math.isclose(value, c, rel_tol=1e-11, abs_tol=0.0) for c in candidates[key])
                   for key, value in got.items()), [(k, v, candidates[k]) for k, v in got.items()
                                                    if v not in candidates[k]][:5]
        assert sum(len(c) == 1 for c in candidates.values()) > 500  # most points had exactly one record
