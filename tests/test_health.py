"""Health and metrics of one process (pvtap/health.py, pvtap/metrics.py, proxy_tcp/stats.py):
the exposition Prometheus reads, the relay's counts against the exact bytes a real connection
moved, /readyz's checks over real HTTP, the device contacts followed in a real store."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pvtap.config import ConfigError, HealthConfig
from pvtap.health import STATS_MEASUREMENT, STATS_ORIGIN, Health, StoreContacts
from pvtap.metrics import FORWARDER_STATES, MAX_DEVICES, MQTT_STATES, Contact, Traffic, WorkerStats
from pvtap.records import UP, Origin, RawPayload, Record
from pvtap.store.local import LocalStore
from tests.health_support import get, url_of
from tests.relay_support import StandInCloud, listener, read_to_eof, running_relay
from tests.waiting import until, wait_until


def samples(health: Health) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a scrape, parsed as Prometheus parses it."""
    out = {}
    for family in text_string_to_metric_families(health.metrics().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def workers(**overrides) -> WorkerStats:
    values: dict = dict(workers=1, alive=1, restarts=0, frames=0, framing_errors=0, decode_errors=0, redact_errors=0,
                        payloads=0, records=0, decode_backlog=0, buffered_bytes=0, channel_dropped=0,
                        archive_dropped=0, archive_failing=False, forwarder="off", forwarder_error=None, backlog=0,
                        delivered=0, delivery_failures=0, forwarder_restarts=0)
    values.update(overrides)
    return WorkerStats(**values)


@pytest.fixture
def health():
    h = Health("relay", HealthConfig(stats_every_s=0))
    yield h
    h.stop()


def test_the_exposition_carries_every_snapshot_with_few_labels(health: Health) -> None:
    traffic = Traffic(open=Counter({"alphaess": 2}), closed=Counter({("alphaess", "device_closed"): 5}),
                      bytes=Counter({("alphaess", "up"): 1000, ("alphaess", "down"): 58}))
    health.providers.traffic.append(lambda: traffic)
    health.providers.workers.append(lambda: workers(frames=12, framing_errors=1, decode_errors=2, redact_errors=3,
                                                    payloads=18, records=40, decode_backlog=4, buffered_bytes=512,
                                                    channel_dropped=5, archive_dropped=6, forwarder="failing",
                                                    backlog=7, delivered=33, delivery_failures=2,
                                                    forwarder_restarts=1, restarts=1, mqtt="connected",
                                                    mqtt_published=120, mqtt_backlog=3, mqtt_devices=2,
                                                    mqtt_refused=1, behind_dropped=2))
    health.providers.contacts.append(lambda: [Contact("alphaess", "ALSIM0000000001", 1_700_000_001.0)])
    got = samples(health)
    states: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {
        ("pvtap_forwarder_state", (("state", s),)): float(s == "failing") for s in FORWARDER_STATES}
    states.update({("pvtap_mqtt_state", (("state", s),)): float(s == "connected") for s in MQTT_STATES})
    assert got == {
        ("pvtap_info", (("process", "relay"),)): 1,
        ("pvtap_connections_open", (("protocol", "alphaess"),)): 2,
        ("pvtap_connections_total", (("outcome", "device_closed"), ("protocol", "alphaess"))): 5,
        ("pvtap_bytes_total", (("direction", "down"), ("protocol", "alphaess"))): 58,
        ("pvtap_bytes_total", (("direction", "up"), ("protocol", "alphaess"))): 1000,
        ("pvtap_frames_total", ()): 12,
        ("pvtap_ingest_workers", (("state", "configured"),)): 1,
        ("pvtap_ingest_workers", (("state", "alive"),)): 1,
        ("pvtap_ingest_worker_restarts_total", ()): 1,
        ("pvtap_decode_errors_total", (("stage", "framing"),)): 1,
        ("pvtap_decode_errors_total", (("stage", "decoding"),)): 2,
        ("pvtap_decode_errors_total", (("stage", "redaction"),)): 3,
        ("pvtap_dropped_copies_total", (("stage", "channel"),)): 3,  # 5 in all, 2 of them held back
        ("pvtap_dropped_copies_total", (("stage", "behind"),)): 2,
        ("pvtap_dropped_copies_total", (("stage", "archive"),)): 6,
        ("pvtap_ingest_queue_bytes", ()): 512,
        ("pvtap_decode_backlog_payloads", ()): 4,
        ("pvtap_ingest_payloads_total", ()): 18,
        ("pvtap_ingest_records_total", ()): 40,
        ("pvtap_archive_failing", ()): 0,
        ("pvtap_store_backlog_records", ()): 7,
        ("pvtap_delivered_records_total", ()): 33,
        ("pvtap_delivery_failures_total", ()): 2,
        ("pvtap_forwarder_restarts_total", ()): 1,
        ("pvtap_mqtt_published_messages_total", ()): 120,
        ("pvtap_mqtt_backlog_records", ()): 3,
        ("pvtap_mqtt_devices", ()): 2,
        ("pvtap_mqtt_refused_values_total", ()): 1,
        **states,
        ("pvtap_device_last_contact_timestamp_seconds", (("device", "ALSIM0000000001"), ("protocol", "alphaess"))):
            1_700_000_001.0,
        ("pvtap_devices_not_shown", ()): 0,
    }


def test_worker_stats_read_a_pool_snapshot() -> None:
    one = {"worker_alive": True, "frames": 3, "forwarder": "delivering", "forwarder_backlog": 2}
    two = {"worker_alive": False, "frames": 4, "forwarder": "stuck", "forwarder_error": "503 unavailable",
           "forwarder_backlog": 5, "archive_failing": True}
    pool = {"frames": 7, "forwarder_backlog": 7, "copies_dropped": 1, "decode_backlog": -1, "workers": [one, two]}
    stats = WorkerStats.of(pool)
    assert (stats.workers, stats.alive, stats.frames, stats.backlog, stats.channel_dropped) == (2, 1, 7, 7, 1)
    assert (stats.forwarder, stats.forwarder_error, stats.archive_failing, stats.decode_backlog) == \
        ("stuck", "503 unavailable", True, 0)  # -1: the worker could not read its backlog
    assert WorkerStats.of({"worker_alive": True, "forwarder": "idle"}).forwarder == "idle"  # one channel's


def test_worker_stats_read_the_mqtt_publishers_of_a_pool() -> None:
    one = {"mqtt": "connected", "mqtt_published": 10, "mqtt_backlog": 0, "mqtt_devices": 2, "mqtt_error": None,
           "mqtt_broker": "mqtt://broker as pvtap-relay-1"}
    two = {"mqtt": "failing", "mqtt_published": 4, "mqtt_backlog": 6, "mqtt_devices": 1, "mqtt_refused": 1,
           "mqtt_error": "[Errno 111] Connection refused", "mqtt_broker": "mqtt://broker as pvtap-relay-2"}
    pool = {"mqtt_published": 14, "mqtt_backlog": 6, "mqtt_devices": 3, "mqtt_refused": 1, "workers": [one, two]}
    stats = WorkerStats.of(pool)
    assert (stats.mqtt, stats.mqtt_error, stats.mqtt_published, stats.mqtt_backlog, stats.mqtt_devices,
            stats.mqtt_refused) == ("failing", "[Errno 111] Connection refused", 14, 6, 3, 1)
    assert stats.mqtt_broker == "mqtt://broker as pvtap-relay-2"  # the failing one's
    assert WorkerStats.of({"mqtt": "dead", "workers": [one, {"mqtt": "dead"}]}).mqtt == "dead"
    assert WorkerStats.of({"worker_alive": True}).mqtt == "off"  # before the worker's first snapshot


def test_a_failing_provider_costs_its_own_metrics_only(health: Health, caplog) -> None:
    def broken() -> Traffic:
        raise RuntimeError("provider bug (test)")
    health.providers.traffic.append(broken)
    health.providers.workers.append(lambda: workers(backlog=3))
    got = samples(health)
    assert got[("pvtap_store_backlog_records", ())] == 3
    assert not any(name.startswith(("pvtap_connections", "pvtap_frames")) for name, _ in got)
    assert "metrics: _traffic failed" in caplog.text


def test_last_contact_keeps_the_most_recent_devices_and_counts_the_rest(health: Health) -> None:
    contacts = [Contact("foxess", f"SN{i:04d}", 1_700_000_000.0 + i) for i in range(MAX_DEVICES + 5)]
    health.providers.contacts.append(lambda: contacts)
    got = samples(health)
    shown = {dict(labels)["device"] for name, labels in got if name == "pvtap_device_last_contact_timestamp_seconds"}
    assert len(shown) == MAX_DEVICES and "SN0004" not in shown and f"SN{MAX_DEVICES + 4:04d}" in shown
    assert got[("pvtap_devices_not_shown", ())] == 5


async def test_relay_counts_are_exact_while_open_and_after_the_end(data_dir: Path) -> None:
    up, down = b"u" * 70_000, b"d" * 1_234
    release = asyncio.Event()

    async def cloud_side(conn) -> None:
        while len(conn.received) < len(up):
            conn.received += await conn.reader.read(65536)
        conn.writer.write(down)
        await conn.writer.drain()
        await release.wait()

    async with StandInCloud(cloud_side) as cloud:
        async with running_relay(listener(cloud.address), store=LocalStore(data_dir / "relay.sqlite")) as (relay, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(up)
            assert await reader.readexactly(len(down)) == down
            open_now = relay.stats.traffic(relay)
            assert open_now.open == Counter({"alphaess": 1}) and not open_now.closed
            assert open_now.bytes == Counter({("alphaess", "up"): len(up), ("alphaess", "down"): len(down)})
            release.set()
            writer.close()
            await read_to_eof(reader)
            await until(lambda: not relay.connections, what="the relay to end every connection")
            ended = relay.stats.traffic(relay)
    assert ended.open == Counter({"alphaess": 0})
    (((protocol, outcome), count),) = ended.closed.items()  # whichever side closed first
    assert (protocol, count) == ("alphaess", 1) and outcome in ("cloud_closed", "device_closed")
    assert ended.bytes == open_now.bytes  # counted once: moved from the open connection into the totals


def test_readyz_waits_for_the_listeners_and_says_why(health: Health, data_dir: Path) -> None:
    health.serve("127.0.0.1:0", "health.relay_listen")
    health.attach([data_dir / "relay.sqlite"], lambda: workers(decode_backlog=3))
    assert get(url_of(health.address, "/healthz")) == (200, "ok alive\n")
    status, body = get(url_of(health.address, "/readyz"))
    assert status == 503 and body.splitlines()[:2] == ["relay NOT READY", "FAIL listeners: starting"]
    health.listening("2 listener(s) up")
    status, body = get(url_of(health.address, "/readyz"))
    assert status == 200, body
    assert body.splitlines() == ["relay ready", "ok listeners: 2 listener(s) up",
                                 f"ok store: {data_dir / 'relay.sqlite'} writable",
                                 "ok ingest: 1 worker(s), 3 payload(s) left to decode",
                                 "ok forwarder: off ([influx] url is not set)",
                                 "ok mqtt: off ([mqtt] url is not set)"]
    assert get(url_of(health.address, "/nothing"))[0] == 404


@pytest.mark.parametrize("stats, failing", [
    (workers(forwarder="failing", backlog=10), ""),  # retried: not stuck yet
    (workers(forwarder="stuck", backlog=10, forwarder_error="401 unauthorized"),
     "FAIL forwarder: stuck: 10 records waiting; 401 unauthorized; see `pvtap status`"),
    (workers(forwarder="restarting"), "FAIL forwarder: restarting: 0 records waiting; see `pvtap status`"),
    (workers(workers=2, alive=1), "FAIL ingest: 1 of 2 ingest worker(s) down (restarted by pvtap)"),
    (workers(archive_failing=True), "FAIL ingest: the store does not take the archived copies"),
    (None, "FAIL ingest: no ingest worker: the store could not be opened"),
    (workers(mqtt="connecting"), ""),  # the first attempt is under way
    (workers(mqtt="connected", mqtt_devices=2, mqtt_published=40), ""),
    (workers(mqtt="failing", mqtt_backlog=12, mqtt_error="[Errno 111] Connection refused",
             mqtt_broker="mqtt://127.0.0.1:1883 as pvtap-relay"),
     "FAIL mqtt: cannot publish to mqtt://127.0.0.1:1883 as pvtap-relay: [Errno 111] Connection refused; 12 "
     "record(s) wait in the store for it; see `pvtap status`"),
    (workers(mqtt="dead"), "FAIL mqtt: the publisher stopped on an unexpected error (see the log); 0 record(s)"),
])
def test_readyz_fails_on_the_workers_and_the_forwarder(health: Health, data_dir: Path, stats, failing: str) -> None:
    health.attach([data_dir / "relay.sqlite"], (lambda: stats) if stats is not None else None)
    health.listening("1 listener(s) up")
    lines = [f"{'ok' if v.ok else 'FAIL'} {name}: {v.detail}" for name, v in health.readiness().items()]
    assert [line for line in lines if line.startswith("FAIL")] == ([line for line in lines if
                                                                    line.startswith(failing)] if failing else [])
    if failing:
        assert any(line.startswith(failing) for line in lines), lines


def test_readyz_fails_when_the_store_directory_is_gone(health: Health, tmp_path: Path) -> None:
    health.attach([tmp_path / "missing" / "relay.sqlite"], workers)
    health.listening("1 listener(s) up")
    verdict = health.readiness()["store"]
    assert not verdict.ok
    assert verdict.detail == f"{tmp_path / 'missing'} does not take writes: No such file or directory"


def test_healthz_fails_when_the_event_loop_stops_turning(health: Health, monkeypatch) -> None:
    loop = asyncio.new_event_loop()
    try:
        health.watch_loop(loop)
        loop.run_until_complete(asyncio.sleep(0.01))  # one tick
        assert health.alive().ok
        monkeypatch.setattr("pvtap.health.LOOP_STALL_S", -1.0)  # as if it had been stuck for long
        assert health.alive().detail.startswith("the event loop has not turned for")
    finally:
        loop.close()


def test_a_busy_port_stops_start_up_naming_the_setting(health: Health) -> None:
    health.serve("127.0.0.1:0", "health.relay_listen")
    other = Health("relay", HealthConfig())
    with pytest.raises(ConfigError) as error:
        other.serve(health.address, "health.relay_listen")
    assert str(error.value).startswith(f"config error: health.relay_listen = '{health.address}': cannot serve")
    assert 'set health.relay_listen = "" to turn them off' in str(error.value)


def test_empty_address_serves_nothing() -> None:
    assert Health("enphase", HealthConfig()).serve("", "health.enphase_listen").address == ""


def test_contacts_are_each_devices_newest_payload_in_the_store(data_dir: Path) -> None:
    path = data_dir / "relay.sqlite"

    def payload(protocol: str, device: str, at: float) -> RawPayload:
        return RawPayload(Origin(protocol, device, "c-1", UP), "frame", b"x", datetime.fromtimestamp(at, tz=UTC))

    assert list(StoreContacts(path)()) == []  # no store yet
    with LocalStore(path) as store:
        for i, (protocol, device) in enumerate([("alphaess", "B"), ("foxess", "A"), ("alphaess", "A"),
                                                ("alphaess", ""), ("alphaess", "B")]):
            store.add_raw(payload(protocol, device, 1_700_000_000 + i))
        contacts = StoreContacts(path)
        assert sorted(contacts()) == [Contact("alphaess", "A", 1_700_000_002.0),
                                      Contact("alphaess", "B", 1_700_000_004.0),
                                      Contact("foxess", "A", 1_700_000_001.0)]
        store.add_raw(payload("foxess", "A", 1_700_000_100))
        assert Contact("foxess", "A", 1_700_000_100.0) in list(contacts())
        assert len(list(StoreContacts(path, limit=3)())) == 2  # three pairs looked at ("" is one): cut short


def test_the_stats_record_sums_what_the_dashboard_reads(health: Health) -> None:
    health.providers.traffic.append(lambda: Traffic(closed=Counter({("foxess", "device_closed"): 2}),
                                                    bytes=Counter({("foxess", "up"): 10, ("foxess", "down"): 4})))
    health.providers.workers.append(lambda: workers(frames=9, channel_dropped=1, archive_dropped=2, payloads=7,
                                                    records=11, decode_errors=3, backlog=5, delivered=6,
                                                    delivery_failures=8, buffered_bytes=64, decode_backlog=1))
    record = health.stats_record()
    assert (record.measurement, dict(record.tags), record.origin.protocol) == \
        (STATS_MEASUREMENT, {"process": "relay"}, STATS_ORIGIN)
    assert dict(record.fields) == {
        "connections_open": 0, "connections": 2, "bytes_up": 10, "bytes_down": 4, "frames": 9, "framing_errors": 0,
        "decode_errors": 3, "dropped_copies": 3, "ingest_queue": 64, "decode_backlog": 1, "payloads": 7,
        "records": 11, "backlog": 5, "delivered": 6, "delivery_failures": 8}


def test_stats_are_handed_over_on_the_loop_periodically_and_once_more_on_stop() -> None:
    health = Health("relay", HealthConfig(stats_every_s=0.05))
    sent: list[tuple[Record, str]] = []
    scheduled: list[str] = []

    def schedule(callback, *args) -> None:  # as loop.call_soon_threadsafe would, but at once
        scheduled.append(threading.current_thread().name)
        callback(*args)

    health.record_stats(lambda raw: sent.append((raw, threading.current_thread().name)), schedule)
    wait_until(lambda: len(sent) >= 2, 10, what="two periodic stats hand-overs")
    health.stop()
    assert len(sent) >= 3 and all(r.measurement == STATS_MEASUREMENT for r, _ in sent)  # two ticks or more, one final
    assert set(scheduled) == {"pvtap-stats"} and len(scheduled) == len(sent) - 1
    assert sent[-1][1] == threading.current_thread().name  # the last one from stop(), on the caller's thread


def test_pvtap_stats_records_are_not_listed_as_devices(data_dir: Path) -> None:
    from pvtap.cli.devices import collect

    health = Health("relay", HealthConfig(stats_every_s=0))
    with LocalStore(data_dir / "relay.sqlite") as store:
        store.append([health.stats_record()])
        store.add_raw(RawPayload(Origin("alphaess", "ALSIM0000000001", "c-1", UP), "frame", b"x",
                                 datetime.fromtimestamp(1_700_000_000, tz=UTC)))
    assert [(d.vendor, d.serial) for d in collect([data_dir / "relay.sqlite"])] == [("alphaess", "ALSIM0000000001")]


def test_pvtap_health_asks_both_processes(health: Health, data_dir: Path, monkeypatch, capsys) -> None:
    from pvtap.cli import main

    health.serve("127.0.0.1:0", "health.relay_listen")
    health.attach([data_dir / "relay.sqlite"], workers)
    enphase = Health("enphase", HealthConfig(stats_every_s=0)).serve("127.0.0.1:0", "health.enphase_listen")
    gone = enphase.address
    try:
        monkeypatch.setenv("PVTAP_HEALTH_RELAY_LISTEN", health.address)
        monkeypatch.setenv("PVTAP_HEALTH_ENPHASE_LISTEN", enphase.address)
        assert main(["health"]) == 1  # neither is listening yet
        out = capsys.readouterr().out
        assert f"relay (http://{health.address}/readyz): relay NOT READY\n  FAIL listeners: starting" in out
        health.listening("1 listener(s) up")
        enphase.listening("mitmproxy listening")
        assert main(["health"]) == 0
        assert "enphase (http://" in capsys.readouterr().out
        assert main(["health", "--live"]) == 0
    finally:
        enphase.stop()
    assert main(["health"]) == 1
    assert f"enphase: no answer from http://{gone}/readyz" in capsys.readouterr().out  # stopped: nobody listens
    monkeypatch.setenv("PVTAP_HEALTH_ENPHASE_LISTEN", "")
    monkeypatch.setenv("PVTAP_HEALTH_RELAY_LISTEN", "")
    assert main(["health"]) == 0
    assert "both health endpoints are off" in capsys.readouterr().out


async def test_connections_refused_at_accept_are_counted_by_reason(data_dir: Path) -> None:
    refusing = listener(allow_from=["192.0.2.0/24"])  # not 127.0.0.1
    async with running_relay(refusing, store=LocalStore(data_dir / "relay.sqlite")) as (relay, port):
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(OSError):  # reset at accept
                assert await read_to_eof(reader) == b""
            writer.close()
        traffic = relay.stats.traffic(relay)
    assert traffic.closed == Counter({("alphaess", "refused_not_allowed"): 2})
    assert traffic.open == Counter({"alphaess": 0})
