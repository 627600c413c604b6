"""pvtap's topics and Home Assistant's discovery payloads. Pure: names and dicts, no I/O.

    <prefix>/<vendor>/<serial>/state            retained JSON: every sensor's newest value, "time"
    <prefix>/<vendor>/<serial>/availability     retained online / offline (silent too long)
    <prefix>/bridge/<publisher>/availability    retained online; offline as the MQTT last will
    <discovery>/sensor/pvtap_<vendor>_<serial>/<sensor>/config        retained, one per sensor
    <discovery>/binary_sensor/<bridge id>/<publisher>_connection/config   pvtap's own connection

A publisher is one MQTT connection: the ingest worker of the relay (`relay`, `relay-1`, ...) or
of the Envoy addon (`enphase`), or `pvtap mqtt` (`mqtt`). Every sensor is available only while
both its device's and its publisher's availability say online, so a killed pvtap shows its
devices unavailable instead of their last values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pvtap import __version__
from pvtap.mqtt.catalog import VENDORS, DeviceRef, Sensor, sensors_of
from pvtap.mqtt.state import DeviceState

ONLINE, OFFLINE = "online", "offline"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe(text: str) -> str:
    """A serial as a topic level and id part: letters, digits, _ and - (others become _)."""
    return _UNSAFE.sub("_", text) or "_"


@dataclass(frozen=True)
class Topics:
    prefix: str  # mqtt.topic_prefix
    discovery_prefix: str  # mqtt.discovery_prefix
    publisher: str  # relay, enphase, mqtt, ...

    def node(self, device: DeviceRef) -> str:
        return f"pvtap_{device.vendor}_{safe(device.serial)}"

    def state(self, device: DeviceRef) -> str:
        return f"{self.prefix}/{device.vendor}/{safe(device.serial)}/state"

    def availability(self, device: DeviceRef) -> str:
        return f"{self.prefix}/{device.vendor}/{safe(device.serial)}/availability"

    def config(self, device: DeviceRef, sensor_key: str) -> str:
        return f"{self.discovery_prefix}/sensor/{self.node(device)}/{sensor_key}/config"

    @property
    def bridge(self) -> str:
        """This publisher's availability: the last will."""
        return f"{self.prefix}/bridge/{self.publisher}/availability"

    @property
    def bridge_id(self) -> str:
        """The `identifiers` of pvtap's own device in Home Assistant (all publishers share it)."""
        return "pvtap" if self.prefix == "pvtap" else f"pvtap_{safe(self.prefix)}"

    @property
    def bridge_config(self) -> str:
        return f"{self.discovery_prefix}/binary_sensor/{self.bridge_id}/{safe(self.publisher)}_connection/config"

    @property
    def homeassistant_status(self) -> str:
        """Where Home Assistant announces itself (its birth message `online`)."""
        return f"{self.discovery_prefix}/status"


ORIGIN = {"name": "pvtap", "sw_version": __version__}


def device_block(topics: Topics, state: DeviceState) -> dict[str, Any]:
    device = state.device
    vendor = VENDORS.get(device.vendor, device.vendor)
    block: dict[str, Any] = {
        "identifiers": [topics.node(device)],
        "name": " ".join(part for part in (vendor, state.kind, device.serial) if part),
        "manufacturer": vendor,
        "model": state.model or state.kind or vendor,
        "serial_number": device.serial,
        "via_device": topics.node(state.parent) if state.parent else topics.bridge_id,
    }
    if state.firmware:
        block["sw_version"] = state.firmware
    return block


def sensor_config(topics: Topics, state: DeviceState, sensor: Sensor) -> dict[str, Any]:
    """One sensor's discovery payload: everything Home Assistant's MQTT sensor needs, and what its
    Energy dashboard asks of an energy sensor (device_class energy, total_increasing, Wh/kWh)."""
    config: dict[str, Any] = {
        "name": sensor.name,
        "unique_id": f"{topics.node(state.device)}_{sensor.key}",
        "state_topic": topics.state(state.device),
        "value_template": f"{{{{ value_json.{sensor.key} }}}}",
        "availability": [
            {"topic": topics.bridge, "payload_available": ONLINE, "payload_not_available": OFFLINE},
            {"topic": topics.availability(state.device), "payload_available": ONLINE,
             "payload_not_available": OFFLINE},
        ],
        "availability_mode": "all",
        "device": device_block(topics, state),
        "origin": ORIGIN,
    }
    if sensor.device_class:
        config["device_class"] = sensor.device_class
    if sensor.unit:
        config["unit_of_measurement"] = sensor.unit
    if sensor.state_class:
        config["state_class"] = sensor.state_class
    return config


def bridge_config(topics: Topics) -> dict[str, Any]:
    """pvtap's own device, with one connectivity sensor per publisher (its last will)."""
    return {
        "name": f"Connection ({topics.publisher})",
        "unique_id": f"{topics.bridge_id}_{safe(topics.publisher)}_connection",
        "state_topic": topics.bridge,
        "payload_on": ONLINE,
        "payload_off": OFFLINE,
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "device": {"identifiers": [topics.bridge_id], "name": "pvtap", "manufacturer": "pvtap",
                   "model": "Transparent logging proxy", "sw_version": __version__},
        "origin": ORIGIN,
    }


def clearing(topics: Topics, device: DeviceRef, keys: set[str]) -> list[tuple[str, str | None]]:
    """Empty retained payloads on every topic of a device (`keys`, and every sensor its vendor
    may have): Home Assistant removes its entities, and the broker forgets the state."""
    keys = keys | {s.key for s in sensors_of(device.vendor)}
    out: list[tuple[str, str | None]] = [(topics.config(device, key), None) for key in sorted(keys)]
    return [*out, (topics.state(device), None), (topics.availability(device), None)]
