"""Bench: the MQTT publisher's throughput, and what it costs the relay's round trip.

    .venv/bin/python bench/mqtt.py [--devices 500] [--round-trips 2000]

Everything on 127.0.0.1 with Debian's mosquitto (started here, as the tests start it).

1. Publishing: a store holds `--devices` AlphaESS batteries with one realtime record each; a
   publisher (in this process) publishes discovery, state and availability for all of them, then
   the state again after one more record each. Messages per second of wall time and per second of
   this process's CPU time (≈ per core: the publisher runs on one event loop).
2. The relay: round trips of a realtime frame echoed by the upstream through `python -m proxy_tcp`,
   MQTT off and then on (every frame a state update, min_interval_s 0), in the same run.
Figures on a shared machine are indicative: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from relay import FRAME, Relay, round_trips, start_server  # noqa: E402  (bench/relay.py)

from pvtap.config import MqttConfig  # noqa: E402
from pvtap.mqtt.publisher import Publisher  # noqa: E402
from pvtap.records import Origin, Record  # noqa: E402
from pvtap.store.local import LocalStore  # noqa: E402
from tests.mqtt_support import Mosquitto  # noqa: E402

T0 = datetime(2024, 6, 21, 12, 0, tzinfo=UTC)


def fill(store: LocalStore, devices: int, at: datetime) -> None:
    store.append([Record("alphaess_realtime", at, {"serial": f"ALBENCH{i:08d}"},
                         {"Ppv1": 1000.0 + i, "Ppv2": 900.0, "PrealL1": 650.0, "PmeterL1": -20.0, "Pbat": -1330.0,
                          "SOC": 55.5}, Origin("alphaess", f"ALBENCH{i:08d}")) for i in range(devices)])


async def publish_until(publisher: Publisher, count: int, timeout: float = 300.0) -> tuple[float, float]:
    """(wall s, CPU s) until `count` messages are published in all."""
    wall, cpu = time.perf_counter(), time.process_time()
    deadline = time.monotonic() + timeout
    while publisher.published < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {publisher.published} of {count} messages published")
        await asyncio.sleep(0.005)
    return time.perf_counter() - wall, time.process_time() - cpu


async def throughput(broker: Mosquitto, data_dir: Path, devices: int) -> None:
    store = LocalStore(data_dir / "bench.sqlite")
    fill(store, devices, T0)
    publisher = Publisher(MqttConfig(url=broker.url, min_interval_s=0), "bench", lambda: [store.path])
    task = asyncio.create_task(publisher.run())
    first = 2 + devices * (5 + 1 + 1)  # online + bridge config; 5 configs, state, availability per device
    wall, cpu = await publish_until(publisher, first)
    print(f"first publish: {first} messages (discovery, state, availability) in {wall:.2f} s: "
          f"{first / wall:,.0f} msg/s wall, {first / max(cpu, 1e-9):,.0f} msg/s per CPU second")
    fill(store, devices, T0 + timedelta(seconds=10))
    wall, cpu = await publish_until(publisher, first + devices)
    print(f"state updates: {devices} messages in {wall:.2f} s (incl. reading and folding the records): "
          f"{devices / wall:,.0f} msg/s wall, {devices / max(cpu, 1e-9):,.0f} msg/s per CPU second")
    publisher.stop()
    await task
    store.close()


def latency(broker: Mosquitto, base: Path, count: int) -> None:
    server, port = start_server("echo")
    try:
        for label, env in (("MQTT off", {}), ("MQTT on", {"PVTAP_MQTT_URL": broker.url,
                                                           "PVTAP_MQTT_MIN_INTERVAL_S": "0"})):
            saved = dict(os.environ)
            os.environ.update(env)
            relay = Relay(label, base / label.replace(" ", "-"))
            try:
                entry = relay.start(port)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            try:
                p50, p99 = round_trips(entry, count, FRAME)
            finally:
                relay.stop()
            print(f"relay round trip, {label}: p50 {p50:,.0f} µs, p99 {p99:,.0f} µs ({count} frames)")
    finally:
        server.terminate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=500, help="devices published at once (default 500)")
    parser.add_argument("--round-trips", type=int, default=2000, help="frames through the relay per row (default 2000)")
    args = parser.parse_args()
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
    with tempfile.TemporaryDirectory(prefix="pvtap-bench-mqtt-") as tmp, Mosquitto(Path(tmp)) as broker:
        asyncio.run(throughput(broker, Path(tmp), args.devices))
        latency(broker, Path(tmp), args.round_trips)
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
