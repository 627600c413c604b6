"""An upstream certificate that is not the pinned one: a loud error now and again (not one per
connection), an alert record (sent by the relay to its ingest worker, which stores it), and `pvtap
status` showing it with the command to inspect and re-pin."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy_tcp import relay_running
from proxy_tcp.alerts import MEASUREMENT, PinMismatch
from pvtap.certs import foxess_pair
from pvtap.cli.status import active_alerts
from pvtap.config import ListenerConfig
from pvtap.privacy import Privacy
from pvtap.records import Record
from pvtap.simulate.foxess_cloud import FoxCloud
from pvtap.simulate.foxess_m1 import M1Simulator
from pvtap.store.local import LocalStore
from tests.waiting import until

WRONG_PIN = "cd" * 32
CLOUD = "127.0.0.1:14431"


def _listener(upstream: str = CLOUD, certs: tuple[Path, Path] | None = None, policy: str = "auto") -> ListenerConfig:
    cert, key = (str(certs[0]), str(certs[1])) if certs else ("", "")
    return ListenerConfig(protocol="foxess", listen="127.0.0.1:0", policy=policy, upstream=upstream,
                          upstream_tls=True, upstream_pin_sha256=WRONG_PIN, tls_cert=cert, tls_key=key)


def _expected(endpoint: str, seen: str, tail: str = "") -> str:
    return (f"foxess listener on 127.0.0.1:0: the upstream {endpoint} presents a certificate with SHA-256 {seen}, "
            f"not the pinned {WRONG_PIN} (upstream_pin_sha256): the device is answered locally and the cloud gets "
            f"NO data{tail}. Inspect it with `pvtap certs fingerprint {endpoint}`; if it is the real cloud, set "
            "upstream_pin_sha256 of this listener to it ([[relay.listeners]], docs/foxess.md)")


def test_a_mismatch_is_logged_when_it_starts_then_every_interval_then_when_it_ends(caplog) -> None:
    now = [1000.0]
    records: list[Record] = []
    alarm = PinMismatch(_listener(), records.append, repeat=600, clock=lambda: now[0])
    seen = "ab" * 32
    with caplog.at_level(logging.INFO, logger="proxy_tcp.alerts"):
        for moment in (1000, 1010, 1500, 1599):  # four connections within ten minutes: one line
            now[0] = moment
            alarm.mismatch(CLOUD, seen)
        now[0] = 1720  # past the interval: again, with the count since
        alarm.mismatch(CLOUD, seen)
        alarm.passed()
        alarm.passed()  # over once
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("ERROR", _expected(CLOUD, seen)),
        ("ERROR", _expected(CLOUD, seen, "; still so: 4 connection(s) in the last 12 min")),
        ("INFO", f"foxess listener on 127.0.0.1:0: the upstream {CLOUD} presents the pinned certificate again; "
                 "forwarding to it")]
    assert [(r.measurement, r.fields["active"]) for r in records] == [(MEASUREMENT, True), (MEASUREMENT, True),
                                                                      (MEASUREMENT, False)]
    assert records[0].tags == {"alert": "upstream_pin_mismatch", "protocol": "foxess", "listener": "127.0.0.1:0"}
    assert (records[0].fields["seen_sha256"], records[0].fields["connections"]) == (seen, 1)
    assert records[1].fields["connections"] == 4


def test_status_shows_an_alert_only_while_it_lasts(data_dir: Path) -> None:
    records: list[Record] = []
    alarm = PinMismatch(_listener(), records.append)
    alarm.mismatch(CLOUD, "ab" * 32)
    with LocalStore.for_process(data_dir, "relay") as store:
        store.append(records)
    (alert,) = active_alerts(data_dir / "relay.sqlite")
    assert (alert.alert, alert.listener, alert.message) == ("upstream_pin_mismatch", "127.0.0.1:0",
                                                            _expected(CLOUD, "ab" * 32))
    alarm.passed()
    with LocalStore.for_process(data_dir, "relay") as store:
        store.append(records[1:])
    assert active_alerts(data_dir / "relay.sqlite") == []


@pytest.mark.slow
async def test_a_wrong_cloud_certificate_is_one_loud_line_and_shows_in_status(data_dir: Path, caplog) -> None:
    certs = foxess_pair(data_dir / "certs")
    async with FoxCloud(tls=True) as cloud:
        endpoint, fingerprint = f"127.0.0.1:{cloud.port}", cloud.fingerprint
        listener = _listener(endpoint, certs)
        with caplog.at_level(logging.INFO):
            # the relay's ingest worker (in a thread here) writes relay.sqlite; the relay itself stores nothing
            async with relay_running([listener], store=data_dir / "relay.sqlite", privacy=Privacy()) as relay:
                port = relay.listeners[0].endpoints[0].port
                for _ in range(3):  # three M1 connections, each answered by the relay itself
                    assert await M1Simulator().run_cloud("127.0.0.1", port, count=1, interval=0.01) == 1
                await until(lambda: not relay.connections, what="the relay to end every connection")
        assert [bytes(session.received) for session in cloud.sessions] == [b"", b"", b""]  # not a byte
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [_expected(endpoint, fingerprint)]
    with LocalStore(data_dir / "relay.sqlite", readonly=True) as store:
        (stored,) = [s.record for s in store.records(measurements=[MEASUREMENT])]
    assert (stored.fields["active"], stored.fields["connections"], stored.fields["seen_sha256"]) == (
        True, 1, fingerprint)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PVTAP_")}
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "pvtap", "--data-dir", str(data_dir),
                                                     "status"], capture_output=True, text=True, env=env, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    (line,) = [line for line in done.stdout.splitlines() if "ALERT" in line]
    assert line.startswith("  ALERT          since ")
    assert line.endswith(f": {_expected(endpoint, fingerprint)}")
