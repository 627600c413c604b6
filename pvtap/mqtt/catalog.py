"""Which stored records become which Home Assistant sensors: a curated set per device, not every
raw field. Pure: a record in, the readings and device facts it holds out.

A *reading* is one sensor's value at the record's time. Devices are named by vendor and serial
as the store has them (a pseudonym when privacy.pseudonymize_serials is on), so nothing here
sees a serial the store does not already hold.

- Enphase, per microinverter (the `eqid` of a channel is `serial.N`): power (the interval's
  average, 5- and 15-minute intervals only, not a day's roll-up), energy (a running total pvtap
  adds up from the intervals' joules: the reports carry no lifetime counter), AC and DC
  voltage, temperature. The Envoy itself: the time of its last report.
- AlphaESS: PV power (sum of the strings), battery power (positive: discharging), grid power
  (sum of the phases; positive: import), load power (sum of PrealL1..3, the house load as the
  simulator and peer projects read it: an inference), state of charge, inverter temperature,
  and the lifetime energy counters EpvTotal, Einput, Eoutput, Echarge, EDischarge (kWh).
- FoxESS M1/Q1, H1 and T-series: power, each PV string's power and voltage, temperature and
  the lifetime energy counter, as far as each layout carries them. A T-series sends no serial
  (its RS485 broadcast has none): its records are the device `T-series`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pvtap.records import FieldValue, Record

MEASUREMENT = "measurement"
TOTAL_INCREASING = "total_increasing"


@dataclass(frozen=True, slots=True)
class Sensor:
    key: str  # the state JSON's key, the discovery object id and part of the unique_id
    name: str
    device_class: str | None
    unit: str | None
    state_class: str | None

    @property
    def counter(self) -> bool:
        """A lifetime counter: Home Assistant takes any decrease as a meter reset."""
        return self.state_class == TOTAL_INCREASING

    def on_channel(self, channel: str) -> Sensor:
        """The same sensor for channel N > 1 of a multi-channel microinverter."""
        if channel in ("", "1"):
            return self
        return Sensor(f"{self.key}_ch{channel}", f"{self.name} (channel {channel})", self.device_class, self.unit,
                      self.state_class)


def _power(key: str, name: str) -> Sensor:
    return Sensor(key, name, "power", "W", MEASUREMENT)


def _voltage(key: str, name: str) -> Sensor:
    return Sensor(key, name, "voltage", "V", MEASUREMENT)


def _energy(key: str, name: str, unit: str = "kWh") -> Sensor:
    return Sensor(key, name, "energy", unit, TOTAL_INCREASING)


TEMPERATURE = Sensor("temperature", "Temperature", "temperature", "°C", MEASUREMENT)
POWER = _power("power", "Power")
ENERGY_KWH = _energy("energy", "Energy")
ENPHASE_ENERGY = _energy("energy", "Energy", "Wh")
LAST_REPORT = Sensor("last_report", "Last report", "timestamp", None, None)
SOC = Sensor("soc", "Battery state of charge", "battery", "%", MEASUREMENT)


@dataclass(frozen=True, slots=True)
class DeviceRef:
    vendor: str  # enphase, alphaess, foxess
    serial: str


@dataclass(frozen=True, slots=True)
class Reading:
    device: DeviceRef
    sensor: Sensor
    value: FieldValue
    time_ns: int
    span_s: float | None = None  # set: energy over the span ending at time_ns, added to a running total


@dataclass(frozen=True, slots=True)
class Facts:
    """What a record says about its device, for the discovery `device` block."""

    device: DeviceRef
    kind: str = ""  # Microinverter, Envoy, ...
    model: str = ""
    firmware: str = ""
    parent: DeviceRef | None = None  # the Envoy of a microinverter


@dataclass(frozen=True, slots=True)
class Extract:
    readings: list[Reading]
    facts: list[Facts]


NOTHING = Extract([], [])


def number(value: FieldValue | None) -> float | None:
    """A finite number, never a bool or a text (a field that did not parse is kept as `<name>_text`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _sum(fields: Mapping[str, FieldValue], names: tuple[str, ...]) -> float | None:
    """The sum of the fields present, when the first one is; None when one of them did not parse
    (the decoder kept it as `<name>_text`): a partial sum is a wrong value."""
    if number(fields.get(names[0])) is None:
        return None
    total = 0.0
    for name in names:
        if name in fields:
            value = number(fields[name])
            if value is None:
                return None
            total += value
        elif f"{name}_text" in fields:
            return None
    return total


# -- Enphase --------------------------------------------------------------------------------------

ENPHASE_READING = {"ac_voltage_v": _voltage("ac_voltage", "AC voltage"),
                   "dc_voltage_v": _voltage("dc_voltage", "DC voltage"), "temperature_c": TEMPERATURE}
#: longer intervals are catch-up roll-ups: their average power is a day's, not the current one
ENPHASE_POWER_MAX_INTERVAL_S = 900


def _enphase(record: Record) -> Extract:
    envoy_serial = record.tags.get("envoy", "")
    envoy = DeviceRef("enphase", envoy_serial) if envoy_serial else None
    t, f = record.time_ns, record.fields
    if record.measurement == "enphase_envoy":
        if envoy is None:
            return NOTHING
        envoy_facts = Facts(envoy, "Envoy", _text(f.get("part_num")), _text(f.get("sw_version")))
        return Extract([Reading(envoy, LAST_REPORT, _iso(record), t)], [envoy_facts])
    serial, _, channel = record.tags.get("eqid", "").partition(".")
    if not serial or serial == envoy_serial:
        return NOTHING
    micro = DeviceRef("enphase", serial)
    facts = Facts(micro, "Microinverter", parent=envoy)
    readings = []
    if record.measurement == "enphase_device":
        facts = Facts(micro, "Microinverter", _text(f.get("part_num")), parent=envoy)
    elif record.measurement == "enphase_interval":
        duration = number(f.get("interval_duration_s"))
        power, energy = number(f.get("avg_power_w")), number(f.get("energy_wh"))
        if power is not None and duration is not None and 0 < duration <= ENPHASE_POWER_MAX_INTERVAL_S:
            readings.append(Reading(micro, POWER.on_channel(channel), power, t))
        if energy is not None and duration is not None and duration > 0:
            readings.append(Reading(micro, ENPHASE_ENERGY.on_channel(channel), energy, t, span_s=duration))
    elif record.measurement == "enphase_reading":
        for name, sensor in ENPHASE_READING.items():
            value = number(f.get(name))
            if value is not None:
                readings.append(Reading(micro, sensor.on_channel(channel), value, t))
    else:
        return NOTHING
    return Extract(readings, [facts])


# -- AlphaESS -------------------------------------------------------------------------------------

ALPHAESS_SUMS = {
    _power("pv_power", "PV power"): ("Ppv1", "Ppv2", "Ppv3", "Ppv4"),
    _power("grid_power", "Grid power"): ("PmeterL1", "PmeterL2", "PmeterL3"),
    _power("load_power", "Load power"): ("PrealL1", "PrealL2", "PrealL3"),
}
ALPHAESS_FIELDS = {
    "Pbat": _power("battery_power", "Battery power"),
    "SOC": SOC,
    "Tinv": TEMPERATURE,
    "EpvTotal": _energy("pv_energy", "PV energy"),
    "Einput": _energy("grid_import_energy", "Grid import energy"),
    "Eoutput": _energy("grid_export_energy", "Grid export energy"),
    "Echarge": _energy("battery_charge_energy", "Battery charge energy"),
    "EDischarge": _energy("battery_discharge_energy", "Battery discharge energy"),
}
ALPHAESS_SAMPLES = ("alphaess_realtime", "alphaess_extended", "alphaess_backfill")


def _alphaess(record: Record) -> Extract:
    serial = record.tags.get("serial", "")
    if not serial:
        return NOTHING
    device = DeviceRef("alphaess", serial)
    f, t = record.fields, record.time_ns
    if record.measurement == "alphaess_device" and record.tags.get("source") == "device":
        return Extract([], [Facts(device, "Storage system", _text(f.get("Minv")), _text(f.get("EMSVersion")))])
    if record.measurement not in ALPHAESS_SAMPLES:
        return Extract([], [Facts(device, "Storage system")])
    readings = []
    for sensor, names in ALPHAESS_SUMS.items():
        total = _sum(f, names)
        if total is not None:
            readings.append(Reading(device, sensor, total, t))
    for name, sensor in ALPHAESS_FIELDS.items():
        value = number(f.get(name))
        if value is not None:
            readings.append(Reading(device, sensor, value, t))
    return Extract(readings, [Facts(device, "Storage system")])


# -- FoxESS ---------------------------------------------------------------------------------------

def _strings(count: int) -> dict[str, Sensor]:
    out = {}
    for n in range(1, count + 1):
        out[f"pv{n}_power_w"] = _power(f"pv{n}_power", f"PV{n} power")
        out[f"pv{n}_voltage_v"] = _voltage(f"pv{n}_voltage", f"PV{n} voltage")
    return out


FOXESS_LAYOUTS: dict[str, dict[str, Sensor]] = {
    "foxess_telemetry": {"ac_power_w": POWER, **_strings(4), "temperature_c": TEMPERATURE,
                         "ac_voltage_v": _voltage("ac_voltage", "AC voltage"), "generation_total_kwh": ENERGY_KWH},
    "foxess_h1_realtime": {"grid_power_w": _power("grid_power", "Grid power"), **_strings(2),
                           "grid_voltage_v": _voltage("grid_voltage", "Grid voltage"),
                           "battery_voltage_v": _voltage("battery_voltage", "Battery voltage")},
    "foxess_t_realtime": {"generation_power_w": POWER, "grid_power_w": _power("grid_power", "Grid power"),
                          "load_power_w": _power("load_power", "Load power"), **_strings(4),
                          "inverter_temperature_c": TEMPERATURE, "total_yield_kwh": ENERGY_KWH},
}
FOXESS_KINDS = {"foxess_telemetry": "Microinverter", "foxess_h1_realtime": "Hybrid inverter",
                "foxess_t_realtime": "Inverter"}


#: a T-series' broadcast carries no serial (docs/foxess.md): its records name this device instead
T_SERIES_DEVICE = "T-series"


def _foxess(record: Record) -> Extract:
    serial = record.tags.get("serial", "")
    if not serial and record.measurement == "foxess_t_realtime":
        serial = T_SERIES_DEVICE
    if not serial:
        return NOTHING
    device = DeviceRef("foxess", serial)
    f, t = record.fields, record.time_ns
    layout = FOXESS_LAYOUTS.get(record.measurement)
    if layout is None:
        if record.measurement == "foxess_product_info":
            firmware = _text(f.get("firmware")) or _text(f.get("master_version"))
            return Extract([], [Facts(device, model=_text(f.get("model")), firmware=firmware)])
        return Extract([], [Facts(device)])
    readings = [Reading(device, sensor, value, t) for name, sensor in layout.items()
                if (value := number(f.get(name))) is not None]
    return Extract(readings, [Facts(device, FOXESS_KINDS[record.measurement])])


EXTRACTORS: dict[str, Callable[[Record], Extract]] = {"enphase": _enphase, "alphaess": _alphaess, "foxess": _foxess}
VENDORS = {"enphase": "Enphase", "alphaess": "AlphaESS", "foxess": "FoxESS"}


def extract(record: Record) -> Extract:
    """The readings and device facts of one stored record (none for what is not curated)."""
    extractor = EXTRACTORS.get(record.measurement.partition("_")[0])
    return extractor(record) if extractor is not None else NOTHING


def sensors_of(vendor: str) -> list[Sensor]:
    """Every sensor a vendor's devices may have (channel 1), to clear a forgotten device's configs."""
    if vendor == "enphase":
        return [POWER, ENPHASE_ENERGY, *ENPHASE_READING.values(), LAST_REPORT]
    if vendor == "alphaess":
        return [*ALPHAESS_SUMS, *ALPHAESS_FIELDS.values()]
    if vendor == "foxess":
        return list({s.key: s for layout in FOXESS_LAYOUTS.values() for s in layout.values()}.values())
    return []


def _text(value: FieldValue | None) -> str:
    return value.strip() if isinstance(value, str) else ""


def _iso(record: Record) -> str:
    return record.time.isoformat().replace("+00:00", "Z")
