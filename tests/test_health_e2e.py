"""Health and metrics for real: relay and mitmdump processes, a real Prometheus, a real
full file system.

- /readyz of a relay is 503 while a listener is still starting (its upstream name waits on a DNS
  server that answers only when the test says so) and 200 once every listener is up;
- it turns 503 when the store's file system is full (a tmpfs in a mount namespace the test makes
  for the relay), and 200 again once there is room;
- Debian's Prometheus scrapes a relay (an AlphaESS battery simulator through it to a stand-in
  cloud) and mitmdump with the addon (Envoy reports through it to a stand-in cloud), and its
  query API returns exactly the connections, frames and bytes the test sent;
- a relay publishing to Debian's mosquitto counts in /metrics exactly the messages a subscriber
  received, and its /readyz turns 503 naming the reason while the broker is down, 200 once it is
  back.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pvtap.simulate.alphaess import PLACEHOLDER_SERIAL, run_simulator
from pvtap.simulate.alphaess_cloud import AlphaCloud
from pvtap.simulate.enphase import Simulator, encode_body, post_report
from pvtap.simulate.enphase_cloud import EnphaseCloud
from pvtap.store.local import LocalStore
from tests.conftest import REPO
from tests.health_support import HEALTH_LINE, HeldDNS, LoggedProcess, Prometheus, get, url_of, wait_until
from tests.mitm_support import ADDON, MITMDUMP, Mitmdump
from tests.mqtt_support import Mosquitto, Watcher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RELAY = [sys.executable, "-m", "proxy_tcp"]
HEALTH_ANY_PORT = {"PVTAP_HEALTH_RELAY_LISTEN": "127.0.0.1:0", "PVTAP_HEALTH_ENPHASE_LISTEN": "127.0.0.1:0",
                   "PVTAP_HEALTH_STATS_EVERY_S": "60"}  # pvtap_stats: one record, as the relay stops


async def test_readyz_turns_ready_only_once_every_listener_is_up(tmp_path: Path) -> None:
    async with HeldDNS({"cloud.invalid": "127.0.0.1"}) as dns:
        relay = LoggedProcess([*RELAY, "--data-dir", str(tmp_path / "data"), "--protocol", "alphaess",
                               "--listen", "127.0.0.1:0", "--policy", "fixed", "--upstream", "cloud.invalid:7777",
                               "--resolver", dns.address, "--connect-timeout", "60"],
                              env=HEALTH_ANY_PORT, cwd=REPO)
        try:
            address = (await asyncio.to_thread(relay.expect, HEALTH_LINE))["address"]
            await asyncio.wait_for(dns.asked.wait(), 30)  # the listener is up, its upstream check waits
            assert get(url_of(address, "/healthz")) == (200, "ok alive\n")
            status, body = get(url_of(address, "/readyz"))
            assert status == 503 and "FAIL listeners: starting" in body, body
            dns.release()
            await asyncio.to_thread(relay.expect, r"relay ready: 1 listener")
            # ready from the moment the relay says so (the flag is set right after that line)
            status, body = await asyncio.to_thread(
                wait_until, lambda: (r := get(url_of(address, "/readyz")))[0] == 200 and r, 10, what="ready")
            assert "ok listeners: 1 listener(s) up" in body, body
        finally:
            assert relay.stop() == 0, relay.output


@pytest.mark.skipif(not shutil.which("unshare") or not shutil.which("nsenter"), reason="needs util-linux")
def test_readyz_turns_unready_while_the_store_cannot_be_written(tmp_path: Path) -> None:
    """The data directory is a small tmpfs in a mount namespace of the relay's own, filled up to
    the last byte from inside it (a file system cannot go read-only under a file open for
    writing, but it can run full)."""
    data = tmp_path / "data"
    data.mkdir()
    script = 'mount -t tmpfs -o size=16m,mode=0700 pvtap-test "$0" && exec "$@"'
    relay = LoggedProcess(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(data),
                           *RELAY, "--data-dir", str(data), "--protocol", "alphaess", "--listen", "127.0.0.1:0",
                           "--policy", "local"], env=HEALTH_ANY_PORT, cwd=REPO)

    def inside(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "--target", str(relay.proc.pid), "--mount", *argv], capture_output=True,
                              text=True, check=False)

    try:
        address = relay.expect(HEALTH_LINE)["address"]
        relay.expect(r"relay ready: 1 listener")
        wait_until(lambda: get(url_of(address, "/readyz"))[0] == 200, 10, what="ready")
        filled = inside("dd", "if=/dev/zero", f"of={data / 'filler'}", "bs=64k")
        assert "No space left on device" in filled.stderr
        _, body = wait_until(lambda: (r := get(url_of(address, "/readyz")))[0] == 503 and r, what="503")
        assert f"FAIL store: {data} does not take writes: No space left on device" in body, body
        assert "ok listeners: 1 listener(s) up" in body
        assert get(url_of(address, "/healthz"))[0] == 200  # alive all the same
        assert inside("rm", str(data / "filler")).returncode == 0
        wait_until(lambda: get(url_of(address, "/readyz"))[0] == 200, what="ready again")
    finally:
        assert relay.stop() == 0, relay.output


async def test_prometheus_scrapes_the_relay_and_the_addon(tmp_path: Path) -> None:
    data = tmp_path / "data"
    reports = [encode_body(r.xml) for r in (Simulator(micros=2, start=1699956000).next_report() for _ in range(2))]
    async with AlphaCloud() as cloud:
        relay = LoggedProcess([*RELAY, "--data-dir", str(data), "--protocol", "alphaess", "--listen", "127.0.0.1:0",
                               "--upstream", f"127.0.0.1:{cloud.port}"], env=HEALTH_ANY_PORT, cwd=REPO)
        try:
            relay_health = (await asyncio.to_thread(relay.expect, HEALTH_LINE))["address"]
            port = int((await asyncio.to_thread(relay.expect, r"relay listening: alphaess on 127\.0\.0\.1:(\d+)"))[1])
            with EnphaseCloud(cert_dir=tmp_path / "enphase-cloud") as enphase_cloud, \
                    Mitmdump.reverse(tmp_path / "mitm", enphase_cloud, data_dir=data) as mitm:
                addon_health = wait_until(lambda: HEALTH_LINE.search(mitm.output()), what="addon health")["address"]
                with Prometheus(tmp_path, [relay_health, addon_health]) as prom:
                    battery = await run_simulator("127.0.0.1", port, interval=0.05, extended_every=0.2, count=4)
                    answers = [await asyncio.to_thread(
                        post_report, "https://reports.enphaseenergy.com/emu_reports/performance_report", body,
                        connect=("127.0.0.1", mitm.port)) for body in reports]
                    assert [a.status for a in answers] == [200, 200]
                    line = await asyncio.to_thread(relay.expect, r"\[fixed: forward\] device_closed .* frames (\d+),")
                    relay_frames = int(line[1])
                    scraped = {f"http://{a}/metrics": "up" for a in (relay_health, addon_health)}
                    await asyncio.to_thread(wait_until, lambda: prom.targets_up() == scraped, 30, what="targets up")

                    def metric(query: str, expected: float) -> None:
                        prom.wait_value(query, expected)

                    await asyncio.to_thread(metric, 'pvtap_bytes_total{protocol="alphaess",direction="up"}',
                                            len(battery.sent))
                    await asyncio.to_thread(metric, 'pvtap_bytes_total{protocol="alphaess",direction="down"}',
                                            len(battery.received))
                    await asyncio.to_thread(metric, f'pvtap_frames_total{{instance="{relay_health}"}}', relay_frames)
                    await asyncio.to_thread(
                        metric, 'pvtap_connections_total{protocol="alphaess",outcome="device_closed"}', 1)
                    await asyncio.to_thread(metric, 'pvtap_connections_open{protocol="alphaess"}', 0)
                    await asyncio.to_thread(metric, f'pvtap_frames_total{{instance="{addon_health}"}}', 2)
                    await asyncio.to_thread(metric, 'pvtap_bytes_total{protocol="enphase",direction="up"}',
                                            sum(map(len, reports)))
                    await asyncio.to_thread(metric, 'pvtap_bytes_total{protocol="enphase",direction="down"}',
                                            sum(len(a.body) for a in answers))
                    await asyncio.to_thread(metric, 'pvtap_connections_total{protocol="enphase",outcome="closed"}', 2)
                    await asyncio.to_thread(metric, 'pvtap_ingest_payloads_total{job="pvtap",'
                                            f'instance="{addon_health}"}}', 4)  # two reports, two answers
                    contact = prom.query('pvtap_device_last_contact_timestamp_seconds'
                                         f'{{protocol="alphaess",device="{PLACEHOLDER_SERIAL}"}}')
                    assert len(contact) == 1 and contact[0]["metric"]["instance"] == relay_health
                    assert prom.value('sum(pvtap_decode_errors_total)') == 0
        finally:
            assert relay.stop() == 0, relay.output
    assert battery.sent == cloud.received  # forwarded unmodified all along
    with LocalStore(data / "relay.sqlite", readonly=True) as store:
        (connection,) = [r.record for r in store.records(measurements=["pvtap_connection"])]
        assert connection.fields["frames"] == relay_frames and connection.fields["bytes_up"] == len(battery.sent)
        stats = [r.record for r in store.records(measurements=["pvtap_stats"])]
        assert stats and re.fullmatch(r"\d+", str(stats[-1].fields["bytes_up"]))
        assert stats[-1].fields["bytes_up"] == len(battery.sent)  # the last one, stored on the way out


def test_mitmdump_stops_at_start_up_when_its_health_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        mitmdump = LoggedProcess([str(MITMDUMP), "--listen-host", "127.0.0.1", "--listen-port", "0", "-s", str(ADDON),
                                  "--set", f"enphase_data_dir={tmp_path / 'data'}",
                                  "--set", f"confdir={tmp_path / 'conf'}"],
                                 env={"PVTAP_HEALTH_ENPHASE_LISTEN": address}, cwd=tmp_path)
        mitmdump.expect(r"config error: health\.enphase_listen")
        line = mitmdump.lines[-1]
        assert mitmdump.proc.wait(30) == 1  # before it forwarded anything, like a busy listen port
    assert f"health.enphase_listen = '{address}': cannot serve the health endpoints there" in line
    assert 'set health.enphase_listen = "" to turn them off' in line


def scrape(address: str) -> dict[str, float]:
    """{sample with its labels, as Prometheus writes it: value} of one /metrics."""
    status, body = get(url_of(address, "/metrics"))
    assert status == 200, body
    return {s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}" if s.labels else ""):
            s.value for family in text_string_to_metric_families(body) for s in family.samples}


async def test_readyz_and_metrics_follow_the_mqtt_publisher_with_a_real_broker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker = Mosquitto(tmp_path).start()
    env = {**HEALTH_ANY_PORT, "PVTAP_MQTT_URL": broker.url, "PVTAP_MQTT_MIN_INTERVAL_S": "0",
           "PVTAP_MQTT_RETRY_MAX_S": "1"}
    relay: LoggedProcess | None = None
    try:
        async with AlphaCloud() as cloud:
            with Watcher(broker) as watch:  # before pvtap connects: it sees every message pvtap publishes
                relay = LoggedProcess([*RELAY, "--data-dir", str(data), "--protocol", "alphaess", "--listen",
                                       "127.0.0.1:0", "--upstream", f"127.0.0.1:{cloud.port}"], env=env, cwd=REPO)
                address = (await asyncio.to_thread(relay.expect, HEALTH_LINE))["address"]
                port = int((await asyncio.to_thread(
                    relay.expect, r"relay listening: alphaess on 127\.0\.0\.1:(\d+)"))[1])
                await run_simulator("127.0.0.1", port, interval=0.05, extended_every=0.2, count=4)
                state = f"pvtap/alphaess/{PLACEHOLDER_SERIAL}/state"
                await asyncio.to_thread(watch.wait_for, lambda: state in watch.last, 30, what="the state")

                def settled() -> dict[str, float] | None:
                    got = scrape(address)
                    return got if got["pvtap_mqtt_published_messages_total"] == len(watch.messages) \
                        and got["pvtap_mqtt_backlog_records"] == 0 else None
                metrics = await asyncio.to_thread(wait_until, settled, 30, what="the published count")
            assert metrics['pvtap_mqtt_state{state="connected"}'] == 1
            assert sum(v for k, v in metrics.items() if k.startswith("pvtap_mqtt_state{")) == 1
            assert metrics["pvtap_mqtt_devices"] == 1 and metrics["pvtap_mqtt_refused_values_total"] == 0
            status, body = get(url_of(address, "/readyz"))
            assert status == 200 and "ok mqtt: connected, 1 device(s), " in body, body
            # the broker goes away: not ready, saying why (forwarding goes on: test_mqtt_e2e)
            broker.stop()
            _, body = await asyncio.to_thread(
                wait_until, lambda: (r := get(url_of(address, "/readyz")))[0] == 503 and r, 30, what="not ready")
            assert f"FAIL mqtt: cannot publish to {broker.url} as pvtap-relay: " in body, body
            assert "ok listeners" in body, body
            assert scrape(address)['pvtap_mqtt_state{state="failing"}'] == 1
            await asyncio.to_thread(broker.start)
            _, body = await asyncio.to_thread(
                wait_until, lambda: (r := get(url_of(address, "/readyz")))[0] == 200 and r, 30, what="ready again")
            assert "ok mqtt: connected" in body, body
    finally:
        if relay is not None:
            assert relay.stop() == 0, relay.output
        broker.stop()
