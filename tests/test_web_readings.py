"""The web view's devices, current values and health, read from real stores (read-only)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime, timedelta

from proxy_tcp import relay_running
from pvtap.cli.status import describe, describe_mqtt
from pvtap.config import Config, Duration, EnphaseConfig, ListenerConfig, WebConfig
from pvtap.decode import foxess
from pvtap.health import STATS_MEASUREMENT, STATS_ORIGIN
from pvtap.mqtt.follow import Follower
from pvtap.mqtt.follow import read_status as read_mqtt
from pvtap.privacy import Privacy
from pvtap.records import Origin, RawPayload, Record
from pvtap.simulate.foxess_t import TRealtime, t_realtime_payload
from pvtap.store.delivery import read_status
from pvtap.store.local import IngestStatus, LocalStore
from pvtap.web import readings, series
from pvtap.web.stores import read_only, readable_stores
from tests.waiting import until

from .web_support import ALPHA, ENVOY, MICROS, add_alpha, add_alpha_identity, add_connection, add_envoy, ns, stores

T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)
#: a T-series' two frames (foxess.md §3.5 layout, built by the simulator): the newest is the one shown
T_NEWEST = TRealtime(
    grid_power_w=-1234, generation_power_w=8765, load_power_w=4321,
    phases=[(231.4, 12.7, 50.01, 2921), (229.8, 12.6, 49.99, 2900), (232.0, 12.9, 50.02, 2944)],
    pv=[(612.3, 4.1), (598.7, 4.0), (577.5, 3.2), (0.0, 0.0)],
    boost_temperature_c=41, inverter_temperature_c=-3, ambient_temperature_c=24,
    today_yield_kwh=23.4, total_yield_kwh=123_456.7)
T_FIRST = dataclasses.replace(T_NEWEST, grid_power_w=500, generation_power_w=2000, load_power_w=1500,
                              inverter_temperature_c=30)


def test_devices_with_identity_contact_records_today_and_path(data_dir):
    relay, enphase = stores(data_dir)
    with relay, enphase:
        add_alpha(relay, T0 - timedelta(hours=1), 3)  # before the day starts (day_start = T0 below)
        add_alpha_identity(relay, T0)
        add_alpha(relay, T0, 4, first=3)
        add_connection(relay, T0, "forward")
        add_envoy(enphase, T0, (180.0, 200.0), (38.0, 41.0))
    config = Config(web=WebConfig(silent_after_s=60))
    now = ns(T0 + timedelta(seconds=59))
    found = {d.serial: d for d in readings.devices(readable_stores(data_dir), config, ns(T0), now)}
    alpha, envoy = found[ALPHA], found[ENVOY]
    assert (alpha.vendor, alpha.store, alpha.model) == ("alphaess", "relay.sqlite", "SMILE5-INV / SMILE5-BAT")
    assert alpha.firmware == "EMSVersion SIM-EMS-1.0, InvVersion SIM-INV-1.0"
    assert alpha.last_contact_ns == ns(T0 + timedelta(seconds=60))  # the last frame: 3 + 3 × 10 s after T0
    assert alpha.silent is False
    assert alpha.records_today == 4 + 1 + 1  # the frames from T0 on, the identity and the connection record
    assert (alpha.path, alpha.cloud) == ("relay, policy auto (listener 0.0.0.0:7777)", "cloud reached (192.0.2.1:7777)")
    assert (envoy.vendor, envoy.model, envoy.firmware) == ("enphase", "800-00069-r05", "R3.12.34 (sim)")
    assert (envoy.path, envoy.cloud) == ("mitmproxy addon, transparent mode", "cloud reached (last answer HTTP 200)")
    assert envoy.last_contact_ns == ns(T0) and envoy.silent_for_s == 59.0 and envoy.silent is False
    later = {d.serial: d for d in readings.devices(readable_stores(data_dir), config, ns(T0), now + 2 * 10**9)}
    assert later[ENVOY].silent is True and later[ALPHA].silent is False  # 61 s against 1 s


def test_local_answers_are_said(data_dir):
    relay, enphase = stores(data_dir)
    with relay, enphase:
        add_alpha(relay, T0, 1)
        add_connection(relay, T0, "local", cloud_error="connection refused")
        add_envoy(enphase, T0, (1.0, 2.0), (3.0, 4.0), answered_locally=True)
    config = Config(enphase=EnphaseConfig(mode="reverse", local_mode=True))
    found = {d.serial: d for d in readings.devices(readable_stores(data_dir), config, 0, ns(T0))}
    assert found[ALPHA].cloud == "answered locally: cloud unreachable (connection refused)"
    assert found[ENVOY].path == "mitmproxy addon, reverse mode, local mode"
    assert found[ENVOY].cloud == "answered locally (local mode)"


def test_an_envoy_answered_locally_because_the_cloud_is_gone(data_dir):
    with LocalStore.for_process(data_dir, "enphase") as enphase:
        add_envoy(enphase, T0, (1.0, 2.0), (3.0, 4.0), answered_locally=True,
                  cloud_unreachable="no TLS handshake within 30 s")
    config = Config(enphase=EnphaseConfig(fallback_after=Duration(900)))
    (envoy,) = readings.devices(readable_stores(data_dir), config, 0, ns(T0))
    assert envoy.path == "mitmproxy addon, transparent mode, local answers after 900 s without the cloud"
    assert envoy.cloud == "answered locally: cloud unreachable (no TLS handshake within 30 s)"


def test_a_first_relay_connection_still_open_is_said_so(data_dir):
    with LocalStore.for_process(data_dir, "relay") as relay:
        add_alpha(relay, T0, 1)
    (device,) = readings.devices(readable_stores(data_dir), Config(), 0, ns(T0))
    assert (device.path, device.cloud) == ("relay (its first connection is still open)",
                                           "known when the connection ends")


def test_current_values_are_the_newest_stored_and_an_envoy_adds_its_micros(data_dir):
    relay, enphase = stores(data_dir)
    with relay, enphase:
        add_alpha(relay, T0, 5)  # frame 4 is the newest: PV 1040, SoC 52.0, Pbat -304
        add_envoy(enphase, T0, (100.0, 110.0), (30.0, 31.0))
        add_envoy(enphase, T0 + timedelta(minutes=5), (180.5, 200.25), (38.0, 41.5))
    found = {d.serial: d.now for d in readings.devices(readable_stores(data_dir), Config(), 0, ns(T0))}
    alpha = found[ALPHA]
    newest = ns(T0 + timedelta(seconds=40))
    assert {q: (v["value"], v["time_ns"]) for q, v in alpha.items()} == {
        "pv_w": (1040.0, newest), "battery_w": (-304.0, newest), "grid_w": (100.0, newest),
        "house_w": (600.0, newest), "soc_pct": (52.0, newest)}
    envoy = found[ENVOY]
    assert envoy["pv_w"]["value"] == 380.75 and envoy["pv_w"]["unit"] == "W"
    assert envoy["pv_w"]["parts"] == [{"part": MICROS[0], "value": 180.5}, {"part": MICROS[1], "value": 200.25}]
    assert envoy["temperature_c"]["value"] == 41.5  # the hottest, not a sum
    assert list(envoy) == ["pv_w", "temperature_c"]


def test_health_uses_the_words_of_pvtap_status(data_dir):
    with LocalStore.for_process(data_dir, "relay") as relay:
        add_alpha(relay, T0, 2)
        relay.write_status(IngestStatus(running=True, pid=4242, dropped_copies=17, decode_backlog=0, forwarder="stuck",
                                        forwarder_error="no progress for 301 s",
                                        counts={"connections": 5, "connections_open": 1, "decode_errors": 2}))
    path = data_dir / "relay.sqlite"
    now = ns(T0)
    (store,) = readings.health([path], now)
    with LocalStore(path, readonly=True) as s:
        expected = describe(read_status(path), now, ingest=(s.decode_backlog(), s.status()))
    assert store["title"] == expected[0]
    shown = [f"  {label:<15}{value}".rstrip() for label, value in store["rows"]]
    assert shown == [line.rstrip() for line in expected[1:]]
    rows = dict(store["rows"])
    assert rows["dropped copies"] == "17 (ingest was busy or down; forwarding was not affected)"
    assert rows["connections"] == "5 relayed, 1 open"
    assert rows["forwarder"] == "STUCK: no progress for 301 s"
    assert rows["backlog"] == "2 records (never forwarded)"  # the acks carry no record
    assert store["numbers"] == {"decode_backlog": 0, "dropped_copies": 17, "connections": 5, "decode_errors": 2,
                                "influx_backlog": 2, "influx_forwarded": False, "influx_last_error": None,
                                "mqtt_backlog": None, "mqtt_last_error": None}


def test_as_json_has_every_field(data_dir):
    with LocalStore.for_process(data_dir, "relay") as relay:
        add_alpha(relay, T0, 1)
    (device,) = readings.devices(readable_stores(data_dir), Config(), 0, ns(T0))
    assert set(readings.as_json(device)) == {f.name for f in dataclasses.fields(device)}


def test_the_device_index_reads_only_new_payloads(data_dir):
    index = readings.DeviceIndex()
    path = data_dir / "relay.sqlite"
    with LocalStore.for_process(data_dir, "relay") as relay:
        add_alpha(relay, T0, 1)
        assert [d.serial for d in readings.devices([path], Config(), 0, ns(T0), index)] == [ALPHA]
        add_alpha(relay, T0, 1, serial="ALSIM0000000002", first=1)
        assert [d.serial for d in readings.devices([path], Config(), 0, ns(T0), index)] == [ALPHA, "ALSIM0000000002"]
        relay._db.execute("DELETE FROM raw WHERE device = ?", (ALPHA,))  # pruned: no payload, no contact
        assert [d.serial for d in readings.devices([path], Config(), 0, ns(T0), index)] == ["ALSIM0000000002"]


def test_health_shows_the_mqtt_publisher_as_pvtap_status_does(data_dir):
    with LocalStore.for_process(data_dir, "relay") as relay:
        add_alpha(relay, T0, 3)
    path = data_dir / "relay.sqlite"
    follower = Follower(path)
    try:
        follower.write_status("pvtap-relay", "mqtt://192.0.2.5:1883", running=True, connected=False, published=7,
                              devices=1, last_error="connection refused", last_error_ns=ns(T0))
    finally:
        follower.close()
    now = time.time_ns()
    (store,) = readings.health([path], now)
    expected = describe_mqtt(read_mqtt(path), now)
    assert len(expected) == 3 and store["rows"][-3:] == [(line[2:17].strip(), line[17:].strip()) for line in expected]
    rows = dict(store["rows"])
    assert rows["mqtt messages"] == "7 published, 1 devices, 3 records not read yet"
    assert rows["mqtt error"].endswith(": connection refused")
    assert rows["mqtt"].startswith("NOT CONNECTED to mqtt://192.0.2.5:1883")
    assert (store["numbers"]["mqtt_backlog"], store["numbers"]["mqtt_last_error"]) == (3, "connection refused")


def test_foxess_m1_and_h1_values(data_dir):
    with LocalStore.for_process(data_dir, "relay") as relay:
        for serial, measurement, fields in (
                ("SIMM1000000001", "foxess_telemetry",
                 {"ac_power_w": 312.0, "temperature_c": 44.5, "pv1_power_w": 160.0}),
                ("SIMH1000000001", "foxess_h1_realtime", {"pv1_power_w": 1500.0, "pv2_power_w": 700.0,
                                                          "grid_power_w": -350.0})):
            origin = Origin("foxess", serial, "c1", "up")
            relay.add_raw(RawPayload(origin, "frame", b"\x7e\x7e", T0),
                          records=[Record(measurement, T0, {"serial": serial}, fields, origin)])
    found = {d.serial: d.now for d in readings.devices(readable_stores(data_dir), Config(), 0, ns(T0))}
    assert {q: v["value"] for q, v in found["SIMM1000000001"].items()} == {"pv_w": 312.0, "temperature_c": 44.5}
    assert {q: v["value"] for q, v in found["SIMH1000000001"].items()} == {"pv_w": 2200.0, "grid_w": -350.0}


def test_pvtaps_own_stats_records_are_not_a_device(data_dir):
    with LocalStore.for_process(data_dir, "relay") as relay:
        add_alpha(relay, T0, 1)
        relay.append([Record(STATS_MEASUREMENT, T0, {"process": "relay"}, {"connections_open": 1},
                             Origin(STATS_ORIGIN))])
    assert [d.serial for d in readings.devices(readable_stores(data_dir), Config(), 0, ns(T0))] == [ALPHA]


async def test_a_t_series_without_serial_is_the_device_t_series_with_its_contact_and_values(data_dir):
    """A T-series' bridge through the real relay into the real store: the page lists it as
    `T-series` (the MQTT name), with the contact and values of its newest frame; a connection
    that revealed nothing (garbage) is no device."""
    frames = [foxess.build_frame(foxess.REALTIME, t_realtime_payload(values), stamp=n)
              for n, values in enumerate((T_FIRST, T_NEWEST))]
    store = LocalStore.for_process(data_dir, "relay")
    path = data_dir / "relay.sqlite"
    try:
        listener = ListenerConfig(protocol="foxess", listen="127.0.0.1:0", policy="local")
        async with relay_running([listener], store=store, privacy=Privacy()) as relay:
            port = relay.listeners[0].endpoints[0].port
            _reader, noise = await asyncio.open_connection("127.0.0.1", port)
            noise.write(b"not a frame at all")
            await noise.drain()
            noise.close()
            _reader, bridge = await asyncio.open_connection("127.0.0.1", port)
            bridge.write(frames[0])
            await bridge.drain()
            await until(lambda: store.count_records(measurements=["foxess_t_realtime"]) == 1, what="the first frame")
            (device,) = readings.devices([path], Config(), 0)
            assert (device.serial, device.path, device.cloud) == (
                "T-series", "relay (its connection is open)", "known when the connection ends")
            bridge.write(frames[1])
            await bridge.drain()
            bridge.close()
            await until(lambda: not relay.connections, what="the relay to end both connections")
        newest = next(store.records(measurements=["foxess_t_realtime"], newest_first=True, limit=1))
        (received,) = store._db.execute("SELECT raw.received_ns FROM records JOIN raw ON raw.id = records.raw_id"
                                        " WHERE records.id = ?", (newest.id,)).fetchone()
    finally:
        store.close()
    now = received + 5 * 10**9
    (device,) = readings.devices(readable_stores(data_dir), Config(web=WebConfig(silent_after_s=60)), 0, now)
    assert (device.vendor, device.serial, device.store, device.model) == ("foxess", "T-series", "relay.sqlite", "")
    assert (device.last_contact_ns, device.silent_for_s, device.silent) == (received, 5.0, False)
    assert device.records_today == 2
    assert (device.path, device.cloud) == ("relay, policy local (listener 127.0.0.1:0)",  # the listener as configured
                                           "answered locally (policy local)")
    assert {q: (v["value"], v["unit"], v["time_ns"]) for q, v in device.now.items()} == {
        "pv_w": (8765.0, "W", newest.record.time_ns), "grid_w": (-1234.0, "W", newest.record.time_ns),
        "house_w": (4321.0, "W", newest.record.time_ns), "temperature_c": (-3.0, "°C", newest.record.time_ns)}
    # the charts name it alike: its power under `T-series`, not under an empty device
    with read_only(path) as db:
        charted = series.points(db, 0, now)
    assert sorted(k for k in charted if k[2] == "pv_w") == [("foxess", "T-series", "pv_w")]
    assert sorted(v[0] for v in charted[("foxess", "T-series", "pv_w")].values()) == [2000.0, 8765.0]
