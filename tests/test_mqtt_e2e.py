"""MQTT end to end: simulated Enphase, AlphaESS, FoxESS M1 and H1 devices through the real addon
(mitmdump) and the real relay (a process), their ingest workers publishing to a real mosquitto.

The broker must hold retained discovery configs and state for every device, each config with
what Home Assistant requires, the state equal to the records in the stores; unique_ids stay the
same across a restart. kill -9 of the relay and its worker makes the broker publish the last
will; the restarted relay says online again and resumes at its cursor without publishing
history. A broker that is down while devices send holds up neither forwarding nor storing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pvtap.certs import foxess_pair
from pvtap.privacy import pseudonym, pseudonym_key
from pvtap.simulate.alphaess import PLACEHOLDER_SERIAL as ALPHA_SERIAL
from pvtap.simulate.alphaess import run_simulator
from pvtap.simulate.alphaess_cloud import AlphaCloud
from pvtap.simulate.enphase import Simulator, encode_body, post_report
from pvtap.simulate.enphase_cloud import EnphaseCloud
from pvtap.simulate.foxess_cloud import FoxCloud
from pvtap.simulate.foxess_h1 import SERIAL as H1_SERIAL
from pvtap.simulate.foxess_h1 import H1Simulator
from pvtap.simulate.foxess_m1 import SERIAL as M1_SERIAL
from pvtap.simulate.foxess_m1 import M1Simulator
from pvtap.store.local import LocalStore
from tests.conftest import free_port
from tests.mitm_support import Mitmdump
from tests.mqtt_support import Mosquitto, Watcher, mqtt_cursor, wait_until
from tests.relay_support import RelayProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HOST = "reports.enphaseenergy.com"
REPORT = f"https://{HOST}/emu_reports/performance_report?webcomm_version=3.0"
DAYTIME = 1699956000  # 2023-11-14 10:00 UTC: the simulated micros produce
ENVOY = "999900000000"
REQUIRED = {"name", "unique_id", "state_topic", "value_template", "availability", "device"}


def state_topic(vendor: str, serial: str) -> str:
    return f"pvtap/{vendor}/{serial}/state"


@dataclass
class Clouds:
    alpha: AlphaCloud
    m1: FoxCloud
    h1: FoxCloud


def relay_config(path: Path, broker: Mosquitto, clouds: Clouds | None, cert: tuple[Path, Path] | None) -> Path:
    lines = ["[mqtt]", f'url = "{broker.url}"', "min_interval_s = 0", "retry_max_s = 2", "", "[ingest]",
             "workers = 1"]
    if clouds is not None:
        assert cert is not None
        lines += ["[[relay.listeners]]", 'protocol = "alphaess"', f'listen = "127.0.0.1:{free_port()}"',
                  f'upstream = "127.0.0.1:{clouds.alpha.port}"',
                  "[[relay.listeners]]", 'protocol = "foxess"', f'listen = "127.0.0.1:{free_port()}"',
                  f'upstream = "127.0.0.1:{clouds.m1.port}"', f'tls_cert = "{cert[0]}"', f'tls_key = "{cert[1]}"',
                  "upstream_tls = true", f'upstream_pin_sha256 = "{clouds.m1.fingerprint}"',
                  "[[relay.listeners]]", 'protocol = "foxess"', f'listen = "127.0.0.1:{free_port()}"',
                  f'upstream = "127.0.0.1:{clouds.h1.port}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def ports(config: Path) -> list[int]:
    """The relay listeners' ports, in the order of the file."""
    return [int(p) for p in re.findall(r'listen = "127.0.0.1:(\d+)"', config.read_text())]


def records(store: Path, *measurements: str) -> list:
    with LocalStore(store, readonly=True) as s:
        return [r.record for r in s.records(measurements=list(measurements))]


def newest(recs: list, field: str):
    """The value of `field` in the newest-timed record that has it, the last stored of those with the
    same time (the publisher's rule; devices send several samples within one second of their clock)."""
    having = [r for r in recs if field in r.fields]  # in id order
    return max(enumerate(having), key=lambda item: (item[1].time, item[0]))[1].fields[field]


def expected_states(data: Path, micros: list[str], reports: int) -> dict[str, dict[str, object]] | None:
    """Each device's state topic and the values its store's records give it, by the publisher's rules:
    the newest sample per field; an Enphase micro's energy summed over its intervals (one a report).
    None while that is not final: a payload not decoded yet, a report missing, a publisher behind."""
    relay_store, enphase_store = data / "relay.sqlite", data / "enphase.sqlite"
    for path in (relay_store, enphase_store):
        with LocalStore(path, readonly=True) as store:
            if store.decode_backlog():
                return None
        cursor, newest_id = mqtt_cursor(path)
        if cursor != newest_id:
            return None
    samples = records(relay_store, "alphaess_realtime", "alphaess_extended", "alphaess_backfill")
    telemetry = records(relay_store, "foxess_telemetry")
    intervals = records(enphase_store, "enphase_interval")
    states: dict[str, dict[str, object]] = {
        state_topic("alphaess", ALPHA_SERIAL): {"battery_power": newest(samples, "Pbat"), "soc": newest(samples, "SOC"),
                                                "pv_energy": newest(samples, "EpvTotal")},
        state_topic("foxess", M1_SERIAL): {"energy": newest(telemetry, "generation_total_kwh"),
                                           "power": newest(telemetry, "ac_power_w")},
        state_topic("foxess", H1_SERIAL): {"pv1_power": newest(records(relay_store, "foxess_h1_realtime"),
                                                               "pv1_power_w")},
    }
    for micro in micros:
        mine = [r for r in intervals if r.tags["eqid"] == f"{micro}.1"]
        if len(mine) != reports:
            return None
        states[state_topic("enphase", micro)] = {
            "energy": pytest.approx(sum(r.fields["energy_wh"] for r in mine), abs=1e-5),
            "power": round(newest(mine, "avg_power_w"), 6)}
    return states


def published(states: dict[str, dict[str, object]] | None, held: dict[str, bytes]) -> bool:
    """Whether the stores are final and every device's state on the broker carries their values."""
    return states is not None and all(holds(held.get(topic), values) for topic, values in states.items())


def holds(payload: bytes | None, want: dict[str, object]) -> bool:
    """Whether a state payload carries every wanted value."""
    if not payload:
        return False
    state = json.loads(payload)
    return all(key in state and state[key] == value for key, value in want.items())


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path) as b:
        yield b


async def test_every_device_through_the_addon_and_the_relay(tmp_path, broker):
    data = tmp_path / "data"
    cert = foxess_pair(tmp_path / "certs")
    with EnphaseCloud(cert_dir=tmp_path / "enphase-cloud") as enphase_cloud:
        async with AlphaCloud() as alpha, FoxCloud(tls=True) as m1_cloud, FoxCloud(tls=False, ack_bootstrap=False) \
                as h1_cloud:
            clouds = Clouds(alpha, m1_cloud, h1_cloud)
            config = relay_config(tmp_path / "pvtap.toml", broker, clouds, cert)
            relay = RelayProcess(["--config", str(config)], data)
            await asyncio.to_thread(relay.start)
            proxy = Mitmdump.reverse(tmp_path, enphase_cloud, data_dir=data, extra=["--set", f"pvtap_config={config}"])
            await asyncio.to_thread(proxy.start)
            try:
                alpha_port, m1_port, h1_port = ports(config)
                alpha_run = await run_simulator("127.0.0.1", alpha_port, interval=0.05, extended_every=0.2, count=5,
                                                backfill_rows=3)
                m1 = M1Simulator(seed=3)
                assert await m1.run_cloud("127.0.0.1", m1_port, count=2, interval=0.05, linger=0.3) == 2
                h1 = H1Simulator(seed=4)
                assert await h1.run("127.0.0.1", h1_port, count=2, interval=0.05, linger=0.3) == 2
                sim = Simulator(micros=2, start=DAYTIME)
                bodies = [encode_body(sim.next_report().xml) for _ in range(2)]
                for body in bodies:
                    response = await asyncio.to_thread(post_report, REPORT, body, connect=("127.0.0.1", proxy.port),
                                                       cafile=str(proxy.ca_cert))
                    assert response.status == 200
                micros = [f"{ENVOY[:-1]}{i + 1}" for i in range(2)]
                devices = [("alphaess", ALPHA_SERIAL), ("foxess", M1_SERIAL), ("foxess", H1_SERIAL),
                           ("enphase", ENVOY), *[("enphase", m) for m in micros]]
                # forwarding was untouched
                assert alpha_run.sent == alpha.received and alpha_run.received == alpha.sent
                assert [r.body for r in enphase_cloud.received()] == bodies
                with Watcher(broker) as watch:
                    watch.wait_for(lambda: all(state_topic(*d) in {**watch.retained_at_subscribe, **watch.last}
                                               for d in devices), 60, "every device's state")
                    # decoding and the publishers follow the archive, and the publish follows the cursor:
                    # wait until the stores are final and the broker holds what they give
                    watch.wait_for(lambda: published(expected_states(data, micros, len(bodies)),
                                                     {**watch.retained_at_subscribe, **watch.last}),
                                   60, "every device's newest state")
                first = await asyncio.to_thread(settled, broker, devices)
            finally:
                await asyncio.to_thread(proxy.stop)
                assert await asyncio.to_thread(relay.stop) == 0, relay.text

    relay_store, enphase_store = data / "relay.sqlite", data / "enphase.sqlite"
    # -- discovery: what Home Assistant requires, energy sensors for the Energy dashboard
    configs = {t: json.loads(p) for t, p in first.items() if t.startswith("homeassistant/sensor/")}
    assert len({c["unique_id"] for c in configs.values()}) == len(configs)
    for topic, c in configs.items():
        assert set(c) >= REQUIRED, topic
        assert c["state_topic"] in first and c["availability"][1]["topic"] in first
        if c.get("device_class") == "energy":
            assert c["state_class"] == "total_increasing" and c["unit_of_measurement"] in ("Wh", "kWh")
    energy = {c["unique_id"] for c in configs.values() if c.get("device_class") == "energy"}
    assert {f"pvtap_alphaess_{ALPHA_SERIAL}_pv_energy", f"pvtap_foxess_{M1_SERIAL}_energy",
            *(f"pvtap_enphase_{m}_energy" for m in micros)} <= energy
    assert first["pvtap/bridge/relay/availability"] == first["pvtap/bridge/enphase/availability"] == b"online"

    # -- the device blocks: manufacturer, model and firmware as the stores have them, via_device
    blocks = {t.split("/")[2]: c["device"] for t, c in configs.items()}
    for node, block in blocks.items():  # every sensor of a device carries the same block
        assert all(c["device"] == block for t, c in configs.items() if t.split("/")[2] == node)
    alpha_device = [r for r in records(relay_store, "alphaess_device") if r.tags.get("source") == "device"][-1]
    m1_info = [r for r in records(relay_store, "foxess_product_info") if r.tags.get("serial") == M1_SERIAL][-1]
    (envoy,) = {(r.fields["part_num"], r.fields["sw_version"]) for r in records(enphase_store, "enphase_envoy")}
    micro_parts = {r.tags["eqid"].partition(".")[0]: r.fields["part_num"] for r in records(enphase_store,
                                                                                          "enphase_device")}
    want = {
        ("alphaess", ALPHA_SERIAL): ("AlphaESS", alpha_device.fields["Minv"], alpha_device.fields["EMSVersion"],
                                     "pvtap"),
        ("foxess", M1_SERIAL): ("FoxESS", m1_info.fields["model"], m1_info.fields["firmware"], "pvtap"),
        ("foxess", H1_SERIAL): ("FoxESS", "Hybrid inverter", None, "pvtap"),  # the H1 tells no model or firmware
        ("enphase", ENVOY): ("Enphase", envoy[0], envoy[1], "pvtap"),
        **{("enphase", m): ("Enphase", micro_parts[m], None, f"pvtap_enphase_{ENVOY}") for m in micros},
    }
    for (vendor, serial), (manufacturer, model, firmware, via) in want.items():
        block = blocks[f"pvtap_{vendor}_{serial}"]
        assert model and (block["manufacturer"], block["model"], block.get("sw_version"), block["via_device"]) \
            == (manufacturer, model, firmware, via), block
        assert block["serial_number"] == serial and block["identifiers"] == [f"pvtap_{vendor}_{serial}"]
    assert set(blocks) == {f"pvtap_{v}_{s}" for v, s in want}
    stopped = broker.retained()  # both stopped: each said so
    assert stopped["pvtap/bridge/relay/availability"] == stopped["pvtap/bridge/enphase/availability"] == b"offline"

    # -- state: equal to the stores' records
    states = expected_states(data, micros, len(bodies))
    assert states is not None
    for topic, values in states.items():
        assert holds(first[topic], values), (topic, first[topic], values)

    # -- a restart publishes the same configs (unique_ids stable)
    config = relay_config(tmp_path / "pvtap.toml", broker, None, None)
    relay = RelayProcess(["--config", str(config), "--protocol", "alphaess", "--listen", "127.0.0.1:0",
                          "--policy", "local"], data)
    await asyncio.to_thread(relay.start)
    try:
        with Watcher(broker) as watch:
            watch.wait_for(lambda: watch.last.get("pvtap/bridge/relay/availability") == b"online")
        again = await asyncio.to_thread(broker.retained)
    finally:
        assert await asyncio.to_thread(relay.stop) == 0
    assert {t: p for t, p in again.items() if t in configs} == {t: p for t, p in first.items() if t in configs}


def settled(broker: Mosquitto, devices: list[tuple[str, str]]) -> dict[str, bytes]:
    """What the broker holds retained once every device's state is there."""
    held = broker.retained()
    assert all(state_topic(*d) in held for d in devices), sorted(held)
    return held


def worker_pid(relay: RelayProcess) -> int:
    assert relay.proc is not None
    children = Path(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").read_text().split()
    (pid,) = [int(c) for c in children if "pvtap.ingest.worker" in Path(f"/proc/{c}/cmdline").read_text()]
    return pid


async def test_kill_9_gives_the_last_will_and_a_restart_resumes_without_history(tmp_path, broker):
    data = tmp_path / "data"
    async with AlphaCloud() as alpha:
        config = relay_config(tmp_path / "pvtap.toml", broker, None, None)
        argv = ["--config", str(config), "--protocol", "alphaess", "--listen", "127.0.0.1:0", "--upstream",
                f"127.0.0.1:{alpha.port}"]
        relay = RelayProcess(argv, data)
        await asyncio.to_thread(relay.start)
        store = data / "relay.sqlite"
        with Watcher(broker) as watch:
            await run_simulator("127.0.0.1", relay.port, interval=0.05, extended_every=0.2, count=4, backfill_rows=2)
            wait_until(lambda: 0 < mqtt_cursor(store)[0] == mqtt_cursor(store)[1], what="the publisher to catch up")
            watch.wait_for(lambda: watch.last.get("pvtap/bridge/relay/availability") == b"online")
            # the cursor commits with the folded state; the publish follows it: wait for the newest values
            topic = state_topic("alphaess", ALPHA_SERIAL)
            samples = records(store, "alphaess_realtime", "alphaess_extended", "alphaess_backfill")
            expected = {"battery_power": newest(samples, "Pbat"), "soc": newest(samples, "SOC"),
                        "pv_energy": newest(samples, "EpvTotal")}
            watch.wait_for(lambda: topic in watch.last
                           and {k: json.loads(watch.last[topic]).get(k) for k in expected} == expected,
                           what="the battery's newest state published")
            last_state = json.loads(await asyncio.to_thread(lambda: broker.retained()[topic]))
            cursor = mqtt_cursor(store)[0]
            os.kill(worker_pid(relay), signal.SIGKILL)  # the MQTT connection's process, then the relay
            assert relay.proc is not None
            relay.proc.kill()
            await asyncio.to_thread(relay.proc.wait)
            watch.wait_for(lambda: watch.last.get("pvtap/bridge/relay/availability") == b"offline",
                           what="the last will")
            before_restart = len(watch.messages)

            relay = RelayProcess(argv, data)
            await asyncio.to_thread(relay.start)
            try:
                watch.wait_for(lambda: watch.last.get("pvtap/bridge/relay/availability") == b"online",
                               what="online again")
                wait_until(lambda: mqtt_cursor(store)[0] == mqtt_cursor(store)[1])
                assert mqtt_cursor(store)[0] >= cursor
                await run_simulator("127.0.0.1", relay.port, interval=0.05, extended_every=0.2, count=2,
                                    backfill_rows=0)
                watch.wait_for(lambda: json.loads(watch.last[state_topic("alphaess", ALPHA_SERIAL)])["time"]
                               > last_state["time"], what="the new state")
            finally:
                assert await asyncio.to_thread(relay.stop) == 0
            after = [m.json() for m in watch.messages[before_restart:]
                     if m.topic == state_topic("alphaess", ALPHA_SERIAL) and m.payload]
    # no history: the first state after the restart is the one it had, then only newer ones
    assert after[0] == last_state
    assert all(s["time"] > last_state["time"] for s in after[1:])


async def test_broker_down_holds_up_neither_forwarding_nor_storing(tmp_path):
    data = tmp_path / "data"
    broker = Mosquitto(tmp_path)  # down while the battery sends
    async with AlphaCloud() as alpha:
        config = relay_config(tmp_path / "pvtap.toml", broker, None, None)
        relay = RelayProcess(["--config", str(config), "--protocol", "alphaess", "--listen", "127.0.0.1:0",
                              "--upstream", f"127.0.0.1:{alpha.port}"], data)
        await asyncio.to_thread(relay.start)
        try:
            result = await run_simulator("127.0.0.1", relay.port, interval=0.02, extended_every=0.1, count=20,
                                         backfill_rows=0)
            assert result.sent == alpha.received and result.received == alpha.sent  # forwarded byte for byte
            store = data / "relay.sqlite"
            wait_until(lambda: len(records(store, "alphaess_realtime")) == 20, what="20 realtime records stored")
            await asyncio.to_thread(broker.start)
            with Watcher(broker) as watch:
                realtime = records(store, "alphaess_realtime")
                want = newest(realtime, "Pbat")
                watch.wait_for(lambda: state_topic("alphaess", ALPHA_SERIAL) in {**watch.retained_at_subscribe,
                                                                                  **watch.last}, 60, "the state")
                states = [m.json() for m in watch.on(state_topic("alphaess", ALPHA_SERIAL))]
                held = json.loads({**watch.retained_at_subscribe, **watch.last}[state_topic("alphaess",
                                                                                          ALPHA_SERIAL)])
            assert held["battery_power"] == want
            assert len(states) <= 1  # the latest only, not the 20 stored meanwhile
        finally:
            assert await asyncio.to_thread(relay.stop) == 0
            broker.stop()
    assert "mqtt: connected to" in relay.text and "cannot connect" in relay.text



async def test_pvtap_mqtt_on_its_own_follows_what_a_relay_stores(tmp_path, broker):
    """`pvtap mqtt` as its own process over a data directory that a relay (without MQTT) fills:
    retained discovery and state for the battery, its bridge online, records stored while it runs
    published too; SIGTERM ends it with exit 0 and its bridge offline (said before it disconnects)."""
    data = tmp_path / "data"
    store = data / "relay.sqlite"
    topic, bridge = state_topic("alphaess", ALPHA_SERIAL), "pvtap/bridge/mqtt/availability"
    node = f"homeassistant/sensor/pvtap_alphaess_{ALPHA_SERIAL}"
    async with AlphaCloud() as alpha:
        relay = RelayProcess(["--protocol", "alphaess", "--listen", "127.0.0.1:0", "--upstream",
                              f"127.0.0.1:{alpha.port}"], data)
        await asyncio.to_thread(relay.start)
        mqtt = None
        try:
            await run_simulator("127.0.0.1", relay.port, interval=0.05, extended_every=0.2, count=3, backfill_rows=0)
            wait_until(lambda: len(records(store, "alphaess_realtime")) == 3, what="3 realtime records stored")
            env = {k: v for k, v in os.environ.items() if not k.startswith("PVTAP_")}
            env.update(PVTAP_MQTT_URL=broker.url, PVTAP_MQTT_MIN_INTERVAL_S="0", PYTHONUNBUFFERED="1")
            with Watcher(broker) as watch:
                mqtt = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "pvtap", "--data-dir", str(data), "mqtt", env=env,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
                first = records(store, "alphaess_realtime", "alphaess_extended")
                await asyncio.to_thread(watch.wait_for, lambda: topic in watch.last and f"{node}/soc/config"
                                        in watch.last and watch.last.get(bridge) == b"online", 60,
                                        "state, discovery and online")
                held = await asyncio.to_thread(broker.retained)
                assert json.loads(held[topic])["soc"] == newest(first, "SOC")
                assert json.loads(held[topic])["battery_power"] == newest(first, "Pbat")
                # stored while it runs: published as well
                await run_simulator("127.0.0.1", relay.port, interval=0.05, extended_every=0.2, count=2,
                                    backfill_rows=0)
                wait_until(lambda: len(records(store, "alphaess_realtime")) == 5, what="2 more records stored")
                wait_until(lambda: mqtt_cursor(store)[0] == mqtt_cursor(store)[1], what="pvtap mqtt to catch up")
                later = records(store, "alphaess_realtime", "alphaess_extended")
                want = {"soc": newest(later, "SOC"), "battery_power": newest(later, "Pbat")}
                await asyncio.to_thread(watch.wait_for, lambda: {k: json.loads(watch.last[topic]).get(k)
                                                                 for k in want} == want, 30, "the newer state")
                mqtt.send_signal(signal.SIGTERM)
                async with asyncio.timeout(30):
                    output, _ = await mqtt.communicate()
                assert mqtt.returncode == 0, output.decode()
                await asyncio.to_thread(watch.wait_for, lambda: watch.last.get(bridge) == b"offline", 10,
                                        "offline on the bridge")
        finally:
            if mqtt is not None and mqtt.returncode is None:
                mqtt.kill()
                await mqtt.wait()
            assert await asyncio.to_thread(relay.stop) == 0
    text = output.decode()
    assert "mqtt: following relay.sqlite" in text and "mqtt: connected to" in text
    assert "mqtt: disconnecting from" in text and "Traceback" not in text
    held = await asyncio.to_thread(broker.retained)
    assert held[bridge] == b"offline"
    assert held[f"pvtap/alphaess/{ALPHA_SERIAL}/availability"] == b"online"  # the device was not silent
    configs = {t: json.loads(p) for t, p in held.items() if t.startswith(node)}
    assert {f"{node}/{key}/config" for key in ("soc", "battery_power", "pv_power", "grid_power")} <= set(configs)
    for config in configs.values():
        assert config["availability"][0]["topic"] == bridge  # the standalone publisher's own bridge
        assert config["state_topic"] == topic


async def test_pseudonymised_serials_are_all_the_broker_sees(tmp_path, broker):
    """privacy.pseudonymize_serials on: a battery through the relay and an Envoy with its micros
    through the addon. Topics, unique_ids and device blocks (serial_number, identifiers, the micros'
    via_device) carry the pseudonyms; no real serial is in any topic or payload the broker saw."""
    data = tmp_path / "data"
    config = relay_config(tmp_path / "pvtap.toml", broker, None, None)
    config.write_text(config.read_text() + "\n[privacy]\npseudonymize_serials = true\n")
    micros = [f"{ENVOY[:-1]}{i + 1}" for i in range(2)]
    real = [ALPHA_SERIAL, ENVOY, *micros]
    with EnphaseCloud(cert_dir=tmp_path / "enphase-cloud") as enphase_cloud:
        async with AlphaCloud() as alpha:
            relay = RelayProcess(["--config", str(config), "--protocol", "alphaess", "--listen", "127.0.0.1:0",
                                  "--upstream", f"127.0.0.1:{alpha.port}"], data)
            await asyncio.to_thread(relay.start)
            proxy = Mitmdump.reverse(tmp_path, enphase_cloud, data_dir=data,
                                     extra=["--set", f"pvtap_config={config}"])
            await asyncio.to_thread(proxy.start)
            try:
                key = pseudonym_key(data)
                alias = {serial: pseudonym(serial, key) for serial in real}
                devices = [("alphaess", alias[ALPHA_SERIAL]), ("enphase", alias[ENVOY]),
                           *[("enphase", alias[m]) for m in micros]]
                with Watcher(broker) as watch:
                    await run_simulator("127.0.0.1", relay.port, interval=0.05, extended_every=0.2, count=4,
                                        backfill_rows=2)
                    sim = Simulator(micros=2, start=DAYTIME)
                    response = await asyncio.to_thread(post_report, REPORT, encode_body(sim.next_report().xml),
                                                       connect=("127.0.0.1", proxy.port), cafile=str(proxy.ca_cert))
                    assert response.status == 200
                    await asyncio.to_thread(watch.wait_for, lambda: all(state_topic(*d) in watch.last
                                                                        for d in devices), 60, "every device's state")
                    held = await asyncio.to_thread(broker.retained)
                    seen = list(watch.messages)
            finally:
                await asyncio.to_thread(proxy.stop)
                assert await asyncio.to_thread(relay.stop) == 0, relay.text
    everything = [(m.topic, m.payload) for m in seen] + list(held.items())
    for serial in real:
        leaks = [topic for topic, payload in everything if serial in topic or serial.encode() in payload]
        assert not leaks, f"{serial} in {leaks[:5]}"
    configs = {t: json.loads(p) for t, p in held.items() if t.startswith("homeassistant/sensor/")}
    blocks = {c["device"]["serial_number"]: c["device"] for c in configs.values()}
    assert set(blocks) == {alias[s] for s in real}
    for serial in real:
        node = f"pvtap_{'alphaess' if serial == ALPHA_SERIAL else 'enphase'}_{alias[serial]}"
        assert blocks[alias[serial]]["identifiers"] == [node]
        assert alias[serial] in blocks[alias[serial]]["name"]
    for micro in micros:
        assert blocks[alias[micro]]["via_device"] == f"pvtap_enphase_{alias[ENVOY]}"
    assert {c["unique_id"] for c in configs.values()} >= {f"pvtap_alphaess_{alias[ALPHA_SERIAL]}_soc",
                                                          *(f"pvtap_enphase_{alias[m]}_power" for m in micros)}
