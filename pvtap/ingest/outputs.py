"""The worker's outputs: a supervised InfluxDB forwarder per store file (with [influx] url) and one
MQTT publisher for all of the worker's stores (with [mqtt] url).

They follow the stores with cursors of their own, so they are started after the archive and
decoder, supervised by the worker's ticker, and stopped together within OUTPUTS_STOP_S; their
clients (influxdb-client, aiomqtt) are imported only when configured.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvtap.config import InfluxConfig, MqttConfig
from pvtap.ingest.settings import OUTPUTS_STOP_S

if TYPE_CHECKING:
    from pvtap.mqtt.thread import PublisherThread
    from pvtap.store.supervisor import SupervisedForwarder

log = logging.getLogger("pvtap.ingest")


class Outputs:
    """The forwarders and the MQTT publisher of one worker's stores."""

    def __init__(self) -> None:
        self.forwarders: list[SupervisedForwarder] = []  # one per store, with [influx] url
        self.mqtt: PublisherThread | None = None  # with [mqtt] url: one connection for all the worker's stores

    def prepare(self, paths: list[Path], influx: InfluxConfig) -> None:
        """Make (not start) a forwarder per store when [influx] has a url."""
        if influx.url:
            from pvtap.store.supervisor import SupervisedForwarder  # influxdb-client: only when it is used

            self.forwarders = [SupervisedForwarder(path, influx) for path in paths]

    def start(self, paths: list[Path], mqtt: MqttConfig) -> None:
        """Start the forwarders, and the MQTT publisher named after the first store (relay, relay-1,
        enphase) when [mqtt] has a url."""
        for forwarder in self.forwarders:
            forwarder.start()
        if not mqtt.url:
            return
        from pvtap.mqtt.thread import PublisherThread  # aiomqtt: only when it is used

        self.mqtt = PublisherThread(mqtt, paths[0].stem, lambda: paths).start()

    def supervise(self) -> None:
        """Restart, with back-off, a forwarder whose thread ended (the worker's ticker calls this)."""
        for forwarder in self.forwarders:
            forwarder.supervise()

    def stop(self) -> None:
        """Tell them all to stop, then wait for them together, OUTPUTS_STOP_S at most."""
        for forwarder in self.forwarders:
            forwarder.stop_soon()
        if self.mqtt is not None:
            self.mqtt.publisher.stop()
        outputs_deadline = time.monotonic() + OUTPUTS_STOP_S  # they were all told above: they stop together
        for forwarder in self.forwarders:
            forwarder.stop(max(0.0, outputs_deadline - time.monotonic()))
        if self.mqtt is not None and not self.mqtt.stop(max(0.0, outputs_deadline - time.monotonic())):
            log.warning("ingest worker: the MQTT publisher did not stop in time")

    def state(self) -> dict[str, Any]:
        """The forwarders' and the publisher's state, flat, for the worker's snapshot."""
        return {**forwarder_state(self.forwarders), **mqtt_state(self.mqtt)}


def forwarder_state(forwarders: list[SupervisedForwarder]) -> dict[str, Any]:
    """The worst forwarder's state, for the snapshot and the status row."""
    if not forwarders:
        return {"forwarder": "off", "forwarder_error": None, "forwarder_backlog": 0, "forwarder_restarts": 0,
                "forwarder_delivered": 0, "forwarder_failures": 0}
    states = [f.state() for f in forwarders]
    worst = max(states, key=lambda s: forwarders[0].SEVERITY.index(s.state))
    running = [f.forwarder for f in forwarders if f.forwarder is not None]
    return {"forwarder": worst.state, "forwarder_error": worst.error,
            "forwarder_backlog": sum(s.backlog for s in states),
            "forwarder_restarts": sum(f.restarts for f in forwarders),
            # since the current forwarder threads started (for /metrics)
            "forwarder_delivered": sum(f.delivered for f in running),
            "forwarder_failures": sum(f.failed_attempts for f in running)}


def mqtt_state(publisher: PublisherThread | None) -> dict[str, Any]:
    """The MQTT publisher's state, for the snapshot (`mqtt`: off, connecting, connected, failing,
    stopped, dead)."""
    if publisher is None:
        return {"mqtt": "off"}
    snap = publisher.snapshot()
    return {"mqtt": snap.state if publisher.running else "dead", "mqtt_broker": snap.broker,
            "mqtt_published": snap.published,
            "mqtt_backlog": snap.backlog, "mqtt_devices": snap.devices, "mqtt_error": snap.last_error,
            "mqtt_refused": snap.refused}
