"""Issue 9 F3: the forwarder's steps outside the write are guarded, and a stuck forwarder is seen.

- pruning and the backlog count (used by the failure path's log line and at start) raise
  sqlite3.Error (what a full disk gives) until the test lets them work: the forwarder thread
  keeps running, says so once per step (not once per delivered batch), every record still
  reaches a real VictoriaMetrics once it is up, and pruning's recovery is logged;
- a relay whose InfluxDB refuses every write reaches "stuck" through the real detection (the
  cursor has not moved for influx.stuck_after_s, shortened here) and `pvtap status` and /readyz
  say so.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from pvtap.cli import main
from pvtap.store import forwarder as forwarder_module
from pvtap.store.delivery import DeliveryLog, read_status
from pvtap.store.local import LocalStore
from tests.conftest import free_port
from tests.forwarder_support import config, forwarding, make_records, recent_t0, vm_expected, vm_numeric, wait_until
from tests.health_support import HEALTH_LINE, get, url_of
from tests.relay_support import RelayProcess, acking_alpha_cloud
from tests.servers import VictoriaMetrics
from tests.test_forwarder_supervised import ACK, FRAMES, battery, status_showing

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

DISK_FULL = "database or disk is full"


class Broken:
    """Makes DeliveryLog methods raise sqlite3.OperationalError in the forwarder's thread only
    (read_status and the test's own reads keep working), and counts the failures it caused."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.failed = {name: 0 for name in names}
        self.seen = {name: threading.Event() for name in names}
        self.on = True
        for name in names:
            monkeypatch.setattr(DeliveryLog, name, self._wrap(name, getattr(DeliveryLog, name)))

    def _wrap(self, name, real):
        def step(delivery, *args, **kwargs):
            if self.on and threading.current_thread().name.startswith("pvtap-forward"):
                self.failed[name] += 1
                self.seen[name].set()
                raise sqlite3.OperationalError(DISK_FULL)
            return real(delivery, *args, **kwargs)
        return step


def test_pruning_and_backlog_errors_never_end_the_forwarder(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(forwarder_module, "PRUNE_EVERY_S", 0.05)
    broken = Broken(monkeypatch, "prune", "backlog")
    records = make_records(250, t0=recent_t0())
    store = LocalStore(tmp_path / "relay.sqlite")
    store.append(records)
    with VictoriaMetrics(tmp_path / "vm") as vm, caplog.at_level(logging.INFO, "pvtap.forward"):
        vm.stop()  # down: every write fails, and the failure path counts the backlog for its log line
        cfg = config(vm.url, max_store_mb=64, batch_size=100)
        with forwarding(store, cfg) as fwd:
            assert broken.seen["prune"].wait(20) and broken.seen["backlog"].wait(20)
            assert wait_until(lambda: fwd.failed_attempts >= 2, 20)  # it went on after both errors
            assert fwd.running and fwd.died_of is None
            assert read_status(store.path).backlog == len(records)
            vm.start()  # same port: the next retry is accepted, pruning and counting still fail
            assert wait_until(lambda: read_status(store.path).backlog == 0, 30), read_status(store.path)
            failed_prunes = broken.failed["prune"]
            assert wait_until(lambda: broken.failed["prune"] > failed_prunes, 10)  # still pruning, still failing
            assert fwd.running and fwd.died_of is None
            assert fwd.delivered == len(records)
            broken.on = False
            assert wait_until(lambda: "pruning works again" in caplog.text, 10)
        assert vm_numeric(vm.samples(), records) == vm_expected(records)
    store.close()
    assert caplog.text.count(f"pruning failed (OperationalError: {DISK_FULL}); forwarding goes on") == 1
    assert "-1 records waiting" in caplog.text  # the count failed, its log line did not
    assert "the forwarder stopped on an unexpected error" not in caplog.text


async def test_a_forwarder_that_makes_no_progress_is_stuck_in_status_and_readyz(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens: every write fails, the cursor never moves
    server = await asyncio.start_server(acking_alpha_cloud(ACK), "127.0.0.1", 0)
    config_file = tmp_path / "pvtap.toml"
    config_file.write_text(
        f'[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "127.0.0.1:0"\n'
        f'upstream = "127.0.0.1:{server.sockets[0].getsockname()[1]}"\n[ingest]\nworkers = 1\n'
        f'[influx]\nurl = "{refused}"\norg = "-"\nbucket = "pvtap"\nbatch_age_s = 0\nretry_initial_s = 0.1\n'
        f'retry_max_s = 0.5\nstuck_after_s = 2\n')
    relay = RelayProcess(["--config", str(config_file)], data, env={"PVTAP_HEALTH_RELAY_LISTEN": "127.0.0.1:0"})
    await asyncio.to_thread(relay.start)
    try:
        address = next(m["address"] for line in relay.log if (m := HEALTH_LINE.search(line)))
        await battery(relay.port)
        shown = await asyncio.to_thread(wait_for_status, data, capsys, "forwarder      STUCK")
        assert "Connection refused" in shown or "ConnectionRefused" in shown, shown
        status, body = await asyncio.to_thread(get, url_of(address, "/readyz"))
        assert status == 503, body
        shown_waiting = re.search(r"FAIL forwarder: stuck: (\d+) records waiting; .*Connection refused.*; "
                                  r"see `pvtap status`", body)
        assert shown_waiting, body
        assert int(shown_waiting[1]) >= FRAMES  # the frames' records (and the connection's, once it ended)
        assert read_status(data / "relay.sqlite").backlog >= FRAMES  # waiting, not lost
    finally:
        assert await asyncio.to_thread(relay.stop, 60) == 0
        server.close()


def wait_for_status(data: Path, capsys, words: str) -> str:
    assert wait_until(lambda: status_showing(data, capsys, words), 60, 0.3), f"pvtap status never showed {words!r}"
    capsys.readouterr()
    assert main(["--data-dir", str(data), "status"]) == 0
    return capsys.readouterr().out
