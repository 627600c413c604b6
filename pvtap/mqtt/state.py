"""The latest state of each device, folded from readings, as it is published and persisted.

Readings are folded by their record time, not by the order they were stored: a back-filled or
late record never replaces a newer value. Lifetime energy counters (`total_increasing`) are
guarded, because Home Assistant takes any decrease as a meter reset and adds the whole counter
again: a value below the last one published, or above what 200 kW could have produced since,
is refused and logged. Only when CONFIRMATIONS refused values in a row agree with each other
(rising, plausible) is the counter taken to have really been reset (a replaced device). The
Enphase energy total is pvtap's own running sum of the intervals' energy: an interval counts
once, and only if it does not overlap one already counted.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pvtap.mqtt.catalog import DeviceRef, Facts, Reading, Sensor, number
from pvtap.records import FieldValue

log = logging.getLogger("pvtap.mqtt")

#: the most power any one home device produces or takes, to tell a plausible counter step
MAX_POWER_W = 200_000.0
#: refused counter values in a row that, agreeing with each other, are taken as a real reset
CONFIRMATIONS = 3
#: an Enphase interval may start this much before the end of the last one counted (clock jitter)
OVERLAP_SLACK_NS = 30 * 10**9
#: a refusal of the same sensor is logged at most this often
REFUSAL_LOG_S = 600.0


@dataclass
class Value:
    value: FieldValue
    time_ns: int
    last_end_ns: int = 0  # running totals: the end of the last interval counted
    suspects: list[tuple[float, int]] = field(default_factory=list)  # counters: refused (value, time_ns)

    def to_json(self) -> list[Any]:
        return [self.value, self.time_ns, self.last_end_ns, self.suspects]

    @classmethod
    def from_json(cls, doc: list[Any]) -> Value:
        return cls(doc[0], doc[1], doc[2], [(v, t) for v, t in doc[3]])


@dataclass
class DeviceState:
    device: DeviceRef
    kind: str = ""
    model: str = ""
    firmware: str = ""
    parent: DeviceRef | None = None
    sensors: dict[str, Sensor] = field(default_factory=dict)
    values: dict[str, Value] = field(default_factory=dict)
    heard_ns: int = 0  # when pvtap last received something from it (its raw payload's receive time)
    version: int = 0  # bumped whenever the state payload changes
    refused: int = 0  # counter values refused since the process started

    # -- folding ----------------------------------------------------------------------------------

    def learn(self, facts: Facts) -> bool:
        """Take what a record says about the device; True when something new was learnt."""
        before = (self.kind, self.model, self.firmware, self.parent)
        self.kind = facts.kind or self.kind
        self.model = facts.model or self.model
        self.firmware = facts.firmware or self.firmware
        self.parent = facts.parent or self.parent
        return before != (self.kind, self.model, self.firmware, self.parent)

    def heard(self, received_ns: int | None) -> None:
        if received_ns is not None and received_ns > self.heard_ns:
            self.heard_ns = received_ns

    def apply(self, reading: Reading) -> bool:
        """Fold one reading in; True when the published state changes."""
        sensor = reading.sensor
        current = self.values.get(sensor.key)
        if reading.span_s is not None:
            changed = self._add(sensor, current, reading)
        elif sensor.counter:
            changed = self._count(sensor, current, reading)
        else:
            if current is not None and reading.time_ns < current.time_ns:
                return False
            changed = current is None or current.value != reading.value or current.time_ns != reading.time_ns
            self.values[sensor.key] = Value(reading.value, reading.time_ns)
        if changed:
            self.sensors.setdefault(sensor.key, sensor)
            self.version += 1
        return changed

    def _count(self, sensor: Sensor, current: Value | None, reading: Reading) -> bool:
        value = number(reading.value)
        if value is None or value < 0:
            return self._refuse(sensor, current, reading, "not a count")
        if current is None:
            self.values[sensor.key] = Value(value, reading.time_ns)
            return True
        if reading.time_ns <= current.time_ns:
            return False
        last = number(current.value) or 0.0
        if value >= last and _plausible(sensor, value - last, reading.time_ns - current.time_ns):
            self.values[sensor.key] = Value(value, reading.time_ns)
            return True
        current.suspects.append((value, reading.time_ns))
        if _confirmed(sensor, current.suspects):
            log.warning("mqtt: %s %s %s went from %g to %g and stayed there for %d readings: published as a "
                        "meter reset", self.device.vendor, self.device.serial, sensor.key, last, value, CONFIRMATIONS)
            self.values[sensor.key] = Value(value, reading.time_ns)
            return True
        del current.suspects[:-CONFIRMATIONS]
        why = "lower than the last value" if value < last else "more than any home device could produce since"
        return self._refuse(sensor, current, reading, f"{why} ({last:g})")

    def _add(self, sensor: Sensor, current: Value | None, reading: Reading) -> bool:
        """A span's energy into the running total: once, only if it does not overlap one counted."""
        energy, span_ns = number(reading.value), int((reading.span_s or 0) * 1e9)
        end, start = reading.time_ns, reading.time_ns - span_ns
        if current is not None and (end <= current.last_end_ns or start < current.last_end_ns - OVERLAP_SLACK_NS):
            return False  # counted already, or overlapping what was
        if energy is None or energy < 0 or not _plausible(sensor, energy, span_ns):
            return self._refuse(sensor, current, reading, "not a plausible energy for its interval")
        total = (number(current.value) or 0.0) if current is not None else 0.0
        self.values[sensor.key] = Value(total + energy, max(end, current.time_ns if current else 0), end)
        return True

    def _refuse(self, sensor: Sensor, current: Value | None, reading: Reading, why: str) -> bool:
        self.refused += 1
        now = time.monotonic()
        key = (self.device, sensor.key)
        if now - _last_refusal.get(key, -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
            _last_refusal[key] = now
            log.warning("mqtt: %s %s: %s = %r at %s not published: %s (a counter that goes down is a meter reset "
                        "to Home Assistant)", self.device.vendor, self.device.serial, sensor.key, reading.value,
                        _iso(reading.time_ns), why)
        return False

    # -- publishing -------------------------------------------------------------------------------

    @property
    def time_ns(self) -> int:
        return max((v.time_ns for v in self.values.values()), default=0)

    def payload(self) -> dict[str, Any]:
        """The state topic's JSON: every sensor's newest value and the newest record time."""
        out: dict[str, Any] = {"time": _iso(self.time_ns)}
        for key in sorted(self.values):
            value = self.values[key].value
            out[key] = round(value, 6) if isinstance(value, float) else value
        return out

    def signature(self) -> tuple:
        """What the discovery configs depend on: a change means they are published again."""
        return (tuple(sorted(self.sensors)), self.kind, self.model, self.firmware, self.parent)

    def online(self, now_ns: int, offline_after_s: float) -> bool:
        return now_ns - self.heard_ns < offline_after_s * 1e9

    # -- persisting -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "firmware": self.firmware,
                "parent": [self.parent.vendor, self.parent.serial] if self.parent else None,
                "sensors": {k: [s.name, s.device_class, s.unit, s.state_class] for k, s in self.sensors.items()},
                "values": {k: v.to_json() for k, v in self.values.items()}, "heard_ns": self.heard_ns}

    @classmethod
    def from_json(cls, device: DeviceRef, doc: dict[str, Any]) -> DeviceState:
        parent = DeviceRef(*doc["parent"]) if doc.get("parent") else None
        return cls(device, doc.get("kind", ""), doc.get("model", ""), doc.get("firmware", ""), parent,
                   {k: Sensor(k, *s) for k, s in doc.get("sensors", {}).items()},
                   {k: Value.from_json(v) for k, v in doc.get("values", {}).items()}, doc.get("heard_ns", 0))

    def merge(self, other: DeviceState) -> None:
        """Take what `other` (the same device, from another store) knows newer."""
        for key, value in other.values.items():
            mine = self.values.get(key)
            if mine is None or value.time_ns > mine.time_ns:
                self.values[key] = value
                self.sensors[key] = other.sensors[key]
        self.heard_ns = max(self.heard_ns, other.heard_ns)
        self.learn(Facts(self.device, other.kind, other.model, other.firmware, other.parent))


_last_refusal: dict[tuple[DeviceRef, str], float] = {}


def _plausible(sensor: Sensor, increase: float, elapsed_ns: int) -> bool:
    """Whether a counter step fits in MAX_POWER_W over the time (plus 0.1 of the unit: rounding)."""
    scale = 1000.0 if sensor.unit == "kWh" else 1.0
    return increase * scale <= MAX_POWER_W * max(elapsed_ns, 0) / 3.6e12 + 0.1 * scale


def _confirmed(sensor: Sensor, suspects: list[tuple[float, int]]) -> bool:
    """The last CONFIRMATIONS refused values rise plausibly from one to the next: a real reset."""
    if len(suspects) < CONFIRMATIONS:
        return False
    run = suspects[-CONFIRMATIONS:]
    return all(b >= a and _plausible(sensor, b - a, tb - ta) for (a, ta), (b, tb) in itertools.pairwise(run))


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def fold(devices: dict[DeviceRef, DeviceState], readings: Iterable[Reading]) -> set[DeviceRef]:
    """Apply readings in record-time order (for equal times, a longer span first: a day's roll-up
    and the 5-minute interval ending with it count as the roll-up; then as given);
    returns the devices whose state changed."""
    changed = set()
    for reading in sorted(readings, key=lambda r: (r.time_ns, -(r.span_s or 0))):
        state = devices.get(reading.device)
        if state is None:
            state = devices[reading.device] = DeviceState(reading.device)
        if state.apply(reading):
            changed.add(reading.device)
    return changed
