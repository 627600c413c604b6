"""The MQTT publisher against a real broker (Debian's mosquitto), following a real local store
that the ingest engine fills with decoded AlphaESS frames: retained discovery and state, outages,
Home Assistant's birth message, silence, exclusion, --forget, refused passwords and TLS."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pvtap.certs import self_signed, write_pair
from pvtap.cli import main as cli
from pvtap.config import MqttConfig
from pvtap.decode.alphaess import REQUEST, encode_frame
from pvtap.ingest import Ingest
from pvtap.mqtt.follow import read_status
from pvtap.mqtt.publisher import Publisher
from pvtap.mqtt.thread import PublisherThread
from pvtap.records import UP, Origin, RawPayload, now_utc
from pvtap.store.local import LocalStore
from tests.mqtt_support import Mosquitto, Watcher, mqtt_cursor, wait_until

SERIAL = "AL0000000000001"
T0 = datetime(2024, 6, 21, 12, 0, tzinfo=UTC)
STATE = f"pvtap/alphaess/{SERIAL}/state"
AVAILABILITY = f"pvtap/alphaess/{SERIAL}/availability"
BRIDGE = "pvtap/bridge/relay/availability"
CONFIG = f"homeassistant/sensor/pvtap_alphaess_{SERIAL}/{{}}/config"


def frame(type_: int, **values: object) -> bytes:
    body = {"Time": "", "SN": SERIAL, **{k: str(v) for k, v in values.items()}}
    return encode_frame(REQUEST, type_, json.dumps(body, separators=(",", ":")).encode())


class Battery:
    """Stores decoded AlphaESS frames as the relay's ingest worker would (raw first, then decoded)."""

    def __init__(self, store_path: Path) -> None:
        self.store = LocalStore(store_path)
        self.ingest = Ingest(self.store)
        self.n = 0

    def send(self, type_: int = 16, at: datetime | None = None, **values: object) -> None:
        at = at or T0 + timedelta(seconds=10 * self.n)
        self.n += 1
        data = frame(type_, **values).replace(b'"Time":""', f'"Time":"{at:%Y/%m/%d %H:%M:%S}"'.encode())
        data = encode_frame(REQUEST, type_, data[7:-2])
        raw = RawPayload(Origin("alphaess", "", "conn-1", UP), "frame", data, now_utc(), {"clock_offset_s": 0})
        self.ingest.process(raw)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def battery(data_dir: Path) -> Iterator[Battery]:
    b = Battery(data_dir / "relay.sqlite")
    yield b
    b.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path) as b:
        yield b


def publisher(broker: Mosquitto, data_dir: Path, **settings: object) -> PublisherThread:
    config = MqttConfig(url=broker.url, min_interval_s=0, retry_max_s=2, **settings)  # type: ignore[arg-type]
    if broker.users:
        user, password = next(iter(broker.users.items()))
        config = MqttConfig(**{**config.__dict__, "username": user, "password": password})
    return PublisherThread(config, "relay", lambda: [data_dir / "relay.sqlite"]).start()


def states(watch: Watcher) -> list[dict]:
    return [m.json() for m in watch.on(STATE) if m.payload]


def test_retained_discovery_state_and_availability(broker, battery, data_dir, capsys):
    battery.send(16, Ppv1=1200, Ppv2=800, PrealL1=650, PmeterL1=-20, Pbat=-1330, SOC=55.5)
    battery.send(5, EpvTotal=1234.5, Einput=812.3, Eoutput=95.7, Echarge=640.2, EDischarge=601.9, Tinv=31.5)
    with Watcher(broker) as watch:
        pub = publisher(broker, data_dir)
        try:
            watch.wait_for(lambda: watch.last.get(STATE, b"").count(b"energy") == 5, what="the state")
        finally:
            assert pub.stop()
    held = broker.retained()
    state = json.loads(held[STATE])
    assert state == {"time": "2024-06-21T12:00:10Z", "pv_power": 2000.0, "load_power": 650.0, "grid_power": -20.0,
                     "battery_power": -1330.0, "soc": 55.5, "pv_energy": 1234.5, "grid_import_energy": 812.3,
                     "grid_export_energy": 95.7, "battery_charge_energy": 640.2, "battery_discharge_energy": 601.9,
                     "temperature": 31.5}
    for key in ("pv_power", "soc", "pv_energy", "temperature"):
        config = json.loads(held[CONFIG.format(key)])
        assert config["unique_id"] == f"pvtap_alphaess_{SERIAL}_{key}"
        assert config["state_topic"] == STATE
    assert json.loads(held[CONFIG.format("pv_energy")])["state_class"] == "total_increasing"
    assert held[AVAILABILITY] == b"online"
    assert held[BRIDGE] == b"offline"  # a clean stop says so before it disconnects
    status = read_status(data_dir / "relay.sqlite")
    assert status is not None and status.cursor == 2 and status.backlog == 0 and not status.running
    assert status.published == pub.snapshot().published == len(held) + 1  # + offline at the end, same topic
    assert cli(["--data-dir", str(data_dir), "status"]) == 0
    out = capsys.readouterr().out
    assert "  mqtt           stopped" in out and f"{status.published} published, 1 devices, 0 records not read" in out


def test_restart_resumes_at_the_cursor_without_republishing_history(broker, battery, data_dir):
    for w in range(5):
        battery.send(16, Pbat=100 + w, SOC=50)
    pub = publisher(broker, data_dir)
    with Watcher(broker) as watch:
        watch.wait_for(lambda: b'"battery_power": 104.0' in watch.last.get(STATE, b""))
    configs = {t: p for t, p in broker.retained().items() if t.startswith("homeassistant/")}
    assert pub.stop()
    battery.send(16, Pbat=200, SOC=51)
    with Watcher(broker) as watch:
        pub = publisher(broker, data_dir)
        try:
            watch.wait_for(lambda: b'"battery_power": 200.0' in watch.last.get(STATE, b""))
        finally:
            assert pub.stop()
        published = [s["battery_power"] for s in states(watch)]
    # the retained one from before, then at most the saved state again (on connect) and the new record
    assert set(published) <= {104.0, 200.0} and published[-1] == 200.0
    again = {t: p for t, p in broker.retained().items() if t.startswith("homeassistant/")}
    assert again == configs  # same topics, same unique_ids, same payloads


def test_broker_outage_publishes_the_latest_state_not_the_backlog(tmp_path, battery, data_dir, caplog):
    caplog.set_level(logging.INFO, "pvtap.mqtt")
    broker = Mosquitto(tmp_path)  # not started yet: pvtap starts first
    battery.send(16, Pbat=1, SOC=40)
    pub = publisher(broker, data_dir)
    try:
        for w in range(2, 30):
            battery.send(16, Pbat=w, SOC=40 + w / 10)  # stored while there is no broker
        store = data_dir / "relay.sqlite"
        wait_until(lambda: mqtt_cursor(store)[0] == mqtt_cursor(store)[1], what="the publisher to read them")
        broker.start()
        with Watcher(broker) as watch:
            watch.wait_for(lambda: b'"battery_power": 29.0' in watch.last.get(STATE, b""), what="the latest state")
            assert [s["battery_power"] for s in states(watch)] == [29.0]  # only the latest
        broker.stop()  # a second outage, while records flow
        for w in range(30, 40):
            battery.send(16, Pbat=w, SOC=45)
        broker.start()
        with Watcher(broker) as watch:  # the restarted broker lost everything retained: published again
            watch.wait_for(lambda: b'"battery_power": 39.0' in watch.retained_at_subscribe.get(STATE, b"")
                           or b'"battery_power": 39.0' in watch.last.get(STATE, b""), what="the state after it")
        held = broker.retained()
        assert CONFIG.format("soc") in held and held[BRIDGE] == b"online"
    finally:
        assert pub.stop()
        broker.stop()
    snap = pub.snapshot()
    assert snap.backlog == 0
    connects = [r for r in caplog.records if "connected to" in r.getMessage()]
    assert len(connects) == 2


def test_a_stop_right_after_a_fold_still_publishes_it(broker, battery, data_dir, monkeypatch):
    """The follower commits state and cursor, then the publish follows: a stop in between (here: at
    once, on the same loop) publishes the folded state before `offline`, not only at the next start."""
    follow_once, armed = Publisher._follow_once, threading.Event()

    def then_stop(self: Publisher) -> bool:
        before = {path: f.cursor for path, f in self.followers.items()}
        more = follow_once(self)
        if armed.is_set() and {path: f.cursor for path, f in self.followers.items()} != before:
            self._stop_now()
        return more

    monkeypatch.setattr(Publisher, "_follow_once", then_stop)
    battery.send(16, Pbat=1, SOC=40)
    with Watcher(broker) as watch:
        pub = publisher(broker, data_dir)
        try:
            watch.wait_for(lambda: b'"battery_power": 1.0' in watch.last.get(STATE, b""), what="the first state")
            armed.set()
            battery.send(16, Pbat=2, SOC=41)
            watch.wait_for(lambda: watch.last.get(BRIDGE) == b"offline", what="the stop")
        finally:
            assert pub.stop()
    held = broker.retained()
    assert (json.loads(held[STATE])["battery_power"], held[BRIDGE]) == (2.0, b"offline")
    assert mqtt_cursor(data_dir / "relay.sqlite") == (2, 2)


def test_home_assistant_birth_republishes_discovery_and_state(broker, battery, data_dir):
    battery.send(16, Pbat=5, SOC=60)
    pub = publisher(broker, data_dir)
    try:
        with Watcher(broker) as watch:
            watch.wait_for(lambda: STATE in watch.retained_at_subscribe or STATE in watch.last)
        with Watcher(broker) as watch:
            watch.client.publish("homeassistant/status", b"online", qos=1)
            watch.wait_for(lambda: len(watch.on(CONFIG.format("soc"))) == 2 and len(watch.on(STATE)) == 2,
                           what="configs and state again")
    finally:
        assert pub.stop()


def test_a_silent_device_turns_offline_and_back_online(broker, battery, data_dir):
    battery.send(16, Pbat=5, SOC=60)
    with Watcher(broker) as watch:
        pub = publisher(broker, data_dir, offline_after_s=1.0)
        try:
            watch.wait_for(lambda: [m.payload for m in watch.on(AVAILABILITY)] == [b"online", b"offline"],
                           what="online, then offline after the silence")
            battery.send(16, Pbat=6, SOC=60)
            watch.wait_for(lambda: [m.payload for m in watch.on(AVAILABILITY)][-1:] == [b"online"])
        finally:
            assert pub.stop()


def test_excluded_devices_are_cleared_and_forget_clears_a_device(broker, battery, data_dir, monkeypatch):
    battery.send(16, Pbat=5, SOC=60)
    pub = publisher(broker, data_dir)
    with Watcher(broker) as watch:
        watch.wait_for(lambda: STATE in watch.retained_at_subscribe or STATE in watch.last)
    assert pub.stop()
    assert CONFIG.format("soc") in broker.retained()
    pub = publisher(broker, data_dir, exclude=[SERIAL])
    try:
        with Watcher(broker) as watch:
            watch.wait_for(lambda: watch.last.get(CONFIG.format("soc")) == b"", what="the config cleared")
        battery.send(16, Pbat=7, SOC=61)  # still excluded: never published
    finally:
        assert pub.stop()
    assert not [t for t in broker.retained() if SERIAL in t]

    pub = publisher(broker, data_dir)  # included again: it comes back with the next record
    try:
        battery.send(16, Pbat=8, SOC=62)
        with Watcher(broker) as watch:
            watch.wait_for(lambda: b'"battery_power": 8.0' in watch.last.get(STATE, b"")
                           or b'"battery_power": 8.0' in watch.retained_at_subscribe.get(STATE, b""))
        monkeypatch.setenv("PVTAP_MQTT_URL", broker.url)
        assert cli(["--data-dir", str(data_dir), "mqtt", "--forget", SERIAL]) == 0
    finally:
        assert pub.stop()
    held = broker.retained()
    assert not [t for t in held if SERIAL in t], held.keys()


def test_wrong_password_is_one_loud_error_not_a_tight_loop(tmp_path, battery, data_dir, caplog):
    caplog.set_level(logging.INFO, "pvtap.mqtt")
    with Mosquitto(tmp_path, users={"pvtap": "right"}) as broker:
        config = MqttConfig(url=broker.url, username="pvtap", password="wrong", retry_max_s=1.0)
        pub = PublisherThread(config, "relay", lambda: [data_dir / "relay.sqlite"]).start()
        try:
            with Watcher(broker) as watch:
                watch.wait_for(lambda: len(broker.refused()) >= 4, what="four attempts")
        finally:
            assert pub.stop()
        attempts = broker.refused()
    # at least 0.8 s apart (retry_max_s with jitter); the broker logs whole seconds
    assert attempts[-1] - attempts[0] >= 0.8 * (len(attempts) - 1) - 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "REFUSED" in errors[0].getMessage() and "mqtt.password" in errors[0].getMessage()
    assert "wrong" not in errors[0].getMessage()
    assert pub.snapshot().last_error is not None


def test_tls_with_a_ca_file_and_password(tmp_path, battery, data_dir):
    cert, key = write_pair(tmp_path / "broker", "broker", *self_signed("localhost", ["localhost"]))
    battery.send(16, Pbat=5, SOC=60)
    with Mosquitto(tmp_path, users={"pvtap": "s3cret"}, tls=(cert, cert, key)) as broker:
        assert broker.url.startswith("mqtts://localhost:")
        pub = publisher(broker, data_dir, ca_file=str(cert))
        try:
            with Watcher(broker) as watch:
                watch.wait_for(lambda: STATE in watch.retained_at_subscribe or STATE in watch.last)
        finally:
            assert pub.stop()
        assert json.loads(broker.retained()[STATE])["battery_power"] == 5.0


def test_min_interval_holds_back_states_and_the_newest_value_wins(broker, battery, data_dir):
    """min_interval_s = 2: after the first state, 8 records, each folded by the publisher before
    the next is stored (each one a state change of its own). The broker gets at most one state per
    interval, counted against the whole run's length (the publisher spaces its states by at least
    the interval, however late they arrive), and the last state is the newest record's."""
    interval, count = 2.0, 5
    store = data_dir / "relay.sqlite"
    battery.send(16, Pbat=0, SOC=50)
    started = time.monotonic()
    config = MqttConfig(url=broker.url, min_interval_s=interval, retry_max_s=2)
    with Watcher(broker) as watch:
        pub = PublisherThread(config, "relay", lambda: [store]).start()
        try:
            watch.wait_for(lambda: bool(states(watch)), what="the first state")
            for w in range(1, count + 1):
                battery.send(16, Pbat=w, SOC=50)
                wait_until(lambda: mqtt_cursor(store)[0] == mqtt_cursor(store)[1], what=f"record {w} folded")
            watch.wait_for(lambda: states(watch)[-1]["battery_power"] == count, what="the newest state")
            elapsed = time.monotonic() - started
        finally:
            assert pub.stop()
        published = [s["battery_power"] for s in states(watch)]
    assert published[0] == 0.0 and published[-1] == count
    assert published == sorted(published)  # held-back updates merge into the next: never an older value
    assert len(published) <= 1 + int(elapsed // interval), (published, elapsed)
    assert json.loads(broker.retained()[STATE])["battery_power"] == count


def test_discovery_off_publishes_state_but_no_configs(broker, battery, data_dir):
    battery.send(16, Pbat=5, SOC=60)
    battery.send(5, EpvTotal=10.5, Tinv=30)
    config = MqttConfig(url=broker.url, min_interval_s=0, retry_max_s=2, discovery=False)
    with Watcher(broker) as watch:
        pub = PublisherThread(config, "relay", lambda: [data_dir / "relay.sqlite"]).start()
        try:
            watch.wait_for(lambda: watch.last.get(AVAILABILITY) == b"online" and STATE in watch.last
                           and b"pv_energy" in watch.last[STATE], what="state and availability")
            # Home Assistant's birth message: without discovery there is nothing to announce again
            watch.client.publish("homeassistant/status", b"online", qos=1)
            battery.send(16, Pbat=6, SOC=61)
            watch.wait_for(lambda: b'"battery_power": 6.0' in watch.last.get(STATE, b""), what="the next state")
        finally:
            assert pub.stop()
        topics = {m.topic for m in watch.messages}
    assert json.loads(broker.retained()[STATE])["soc"] == 61.0
    assert {STATE, AVAILABILITY, BRIDGE} <= topics
    assert not [t for t in topics if t.startswith("homeassistant/") and t != "homeassistant/status"], topics
    assert not [t for t in broker.retained() if t.startswith("homeassistant/")]


def test_a_custom_discovery_prefix_is_used(broker, battery, data_dir):
    battery.send(16, Pbat=5, SOC=60)
    config = MqttConfig(url=broker.url, min_interval_s=0, retry_max_s=2, discovery_prefix="ha-custom")
    pub = PublisherThread(config, "relay", lambda: [data_dir / "relay.sqlite"]).start()
    custom = f"ha-custom/sensor/pvtap_alphaess_{SERIAL}/soc/config"
    try:
        with Watcher(broker) as watch:
            watch.wait_for(lambda: custom in {**watch.retained_at_subscribe, **watch.last}, what="the config")
        with Watcher(broker) as watch:  # Home Assistant announces itself under its own prefix
            watch.client.publish("ha-custom/status", b"online", qos=1)
            watch.wait_for(lambda: len(watch.on(custom)) == 2, what="the config again after the birth message")
    finally:
        assert pub.stop()
    held = broker.retained()
    assert json.loads(held[custom])["unique_id"] == f"pvtap_alphaess_{SERIAL}_soc"
    assert json.loads(held[custom])["state_topic"] == STATE
    assert "ha-custom/binary_sensor/pvtap/relay_connection/config" in held
    assert not [t for t in held if t.startswith("homeassistant/")], sorted(held)
