"""The FoxESS T-series over MQTT: the simulated RS485-to-TCP bridge sends realtime frames through
the real relay (policy local), the relay's ingest worker decodes and stores them, and the MQTT
publisher follows that store into a real mosquitto. The curated T-series sensors' state equals
the newest stored record; their discovery configs name the device.

The T-series broadcast carries no serial, so its records have none: the catalog names the
device `T-series` (before, such records were dropped and no T-series ever reached MQTT).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy_tcp import relay_running
from pvtap.config import ListenerConfig, MqttConfig
from pvtap.decode import foxess
from pvtap.mqtt.catalog import T_SERIES_DEVICE
from pvtap.mqtt.thread import PublisherThread
from pvtap.privacy import Privacy
from pvtap.simulate.foxess_t import ThreePhaseSun, t_realtime_payload
from pvtap.store.local import LocalStore
from tests.mqtt_support import Mosquitto, Watcher, mqtt_cursor, wait_until

MIDDAY = 1718971200  # 2024-06-21 12:00 UTC: the simulated strings produce
STATE = f"pvtap/foxess/{T_SERIES_DEVICE}/state"
NODE = f"pvtap_foxess_{T_SERIES_DEVICE}"
#: the curated set (pvtap/mqtt/catalog.py FOXESS_LAYOUTS["foxess_t_realtime"]): state key -> record field
SENSORS = {"power": "generation_power_w", "grid_power": "grid_power_w", "load_power": "load_power_w",
           **{f"pv{n}_{q}": f"pv{n}_{q}_{u}" for n in range(1, 5) for q, u in (("power", "w"), ("voltage", "v"))},
           "temperature": "inverter_temperature_c", "energy": "total_yield_kwh"}


async def bridge(port: int, frames: int) -> None:
    """An RS485-to-TCP bridge (as `pvtap simulate foxess-t`) sending the simulated inverter's midday
    samples back to back. The lifetime yield holds still after the first: the simulator adds 100 s
    of generation per sample, which milliseconds apart the MQTT counter guard rightly refuses."""
    sun = ThreePhaseSun(seed=7)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    total = 0.0
    for n in range(frames):
        sample = sun.sample(MIDDAY + 100 * n)
        total = total or sample.total_yield_kwh
        sample.total_yield_kwh = total
        writer.write(foxess.build_frame(foxess.REALTIME, t_realtime_payload(sample), stamp=MIDDAY + 100 * n))
        await writer.drain()
    writer.close()
    await writer.wait_closed()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path) as b:
        yield b


async def test_t_series_records_through_the_relay_become_its_curated_sensors(broker, data_dir):
    store = LocalStore.for_process(data_dir, "relay")
    try:
        listener = ListenerConfig(protocol="foxess", listen="127.0.0.1:0", policy="local")
        async with relay_running([listener], store=store, privacy=Privacy()) as relay:
            port = relay.listeners[0].endpoints[0].port
            await bridge(port, frames=3)
            async with asyncio.timeout(10):
                while relay.connections:
                    await asyncio.sleep(0.01)
        records = [s.record for s in store.records(measurements=["foxess_t_realtime"])]
    finally:
        store.close()
    assert len(records) == 3 and all("serial" not in r.tags for r in records)
    newest = max(enumerate(records), key=lambda item: (item[1].time, item[0]))[1]
    assert float(newest.fields["pv1_power_w"]) > 0  # midday: a test of real values, not zeros

    path = data_dir / "relay.sqlite"
    publisher = PublisherThread(MqttConfig(url=broker.url, min_interval_s=0, retry_max_s=2), "relay",
                                lambda: [path]).start()
    try:
        with Watcher(broker) as watch:
            watch.wait_for(lambda: STATE in watch.last, what="the T-series state")
        wait_until(lambda: mqtt_cursor(path)[0] == mqtt_cursor(path)[1], what="the publisher to read every record")
    finally:
        assert publisher.stop()
    held = await asyncio.to_thread(broker.retained)

    state = json.loads(held[STATE])
    expected = {key: round(float(newest.fields[field]), 6) for key, field in SENSORS.items()}
    assert {key: state[key] for key in SENSORS} == expected
    assert state["time"] == newest.time.isoformat(timespec="seconds").replace("+00:00", "Z")
    assert set(state) == {"time", *SENSORS}  # the curated set, not every raw field

    configs = {t.split("/")[-2]: json.loads(p) for t, p in held.items()
               if t.startswith(f"homeassistant/sensor/{NODE}/")}
    assert set(configs) == set(SENSORS)
    energy = configs["energy"]
    assert (energy["device_class"], energy["state_class"], energy["unit_of_measurement"]) == \
        ("energy", "total_increasing", "kWh")
    assert configs["power"]["unique_id"] == f"{NODE}_power" and configs["power"]["unit_of_measurement"] == "W"
    device = configs["power"]["device"]
    assert (device["manufacturer"], device["model"], device["via_device"]) == ("FoxESS", "Inverter", "pvtap")
    assert held[f"pvtap/foxess/{T_SERIES_DEVICE}/availability"] == b"online"
