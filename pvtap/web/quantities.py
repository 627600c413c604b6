"""Which decoded fields are the quantities the web view shows, per device family.

A `Source` names a measurement and the fields whose sum is one quantity (AlphaESS PV power is
`Ppv1 + Ppv2 + … + PmeterDC`). A device's records of one measurement at one time are combined in
two steps: readings of the same part (two frames in one second, a report sent twice) are
averaged; then the parts (an Envoy's microinverters, named by `part_tag`) are combined: power
adds up (`sum`), temperatures do not (`max`). Signs are the devices' own: battery power > 0
discharging, grid power > 0 importing (AlphaESS).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pvtap.mqtt.catalog import T_SERIES_DEVICE
from pvtap.records import FieldValue

#: what the page shows, in its order, with units
QUANTITIES: dict[str, str] = {
    "pv_w": "W", "battery_w": "W", "grid_w": "W", "house_w": "W", "soc_pct": "%", "temperature_c": "°C"}
POWER = ("pv_w", "battery_w", "grid_w", "house_w")


@dataclass(frozen=True, slots=True)
class Source:
    measurement: str
    quantity: str
    fields: tuple[str, ...]  # summed; the first one must be present for the record to count
    combine: str = "sum"  # how the parts of one device at one time combine: sum or max
    part_tag: str = ""  # the tag naming a part (an Envoy's microinverter channel) shown one by one

    def value(self, fields: Mapping[str, FieldValue]) -> float | None:
        """The quantity in one record's fields; None when the record does not carry it."""
        if not _number(fields.get(self.fields[0])):
            return None
        return float(sum(v for name in self.fields if _number(v := fields.get(name))))  # type: ignore[misc]

    def sql(self) -> tuple[str, str]:
        """(value expression, presence condition) over the records table's JSON `fields`."""
        terms = [f"COALESCE(json_extract(fields, '$.{name}'), 0)" for name in self.fields]
        return " + ".join(terms), f"json_type(fields, '$.{self.fields[0]}') IN ('integer', 'real')"

    def part_sql(self) -> str:
        return f"json_extract(tags, '$.{self.part_tag}')" if self.part_tag else "''"


_ALPHA_PV = ("Ppv1", "Ppv2", "Ppv3", "Ppv4", "PmeterDC")
_ALPHA_GRID = ("PmeterL1", "PmeterL2", "PmeterL3")
_ALPHA_INVERTER = ("PrealL1", "PrealL2", "PrealL3")

SOURCES: tuple[Source, ...] = (
    *(s for m in ("alphaess_realtime", "alphaess_extended", "alphaess_backfill") for s in (
        Source(m, "pv_w", _ALPHA_PV),
        Source(m, "battery_w", ("Pbat",)),
        Source(m, "grid_w", _ALPHA_GRID),
        Source(m, "house_w", _ALPHA_INVERTER + _ALPHA_GRID),  # what the inverter gives plus what the grid gives
        Source(m, "soc_pct", ("SOC",)),
    )),
    Source("alphaess_extended", "temperature_c", ("Tinv",), combine="max"),
    Source("enphase_interval", "pv_w", ("avg_power_w",), part_tag="eqid"),
    Source("enphase_reading", "temperature_c", ("temperature_c",), combine="max", part_tag="eqid"),
    Source("foxess_telemetry", "pv_w", ("ac_power_w",)),
    Source("foxess_telemetry", "temperature_c", ("temperature_c",), combine="max"),
    Source("foxess_h1_realtime", "pv_w", ("pv1_power_w", "pv2_power_w")),
    Source("foxess_h1_realtime", "grid_w", ("grid_power_w",)),
    Source("foxess_t_realtime", "pv_w", ("generation_power_w",)),  # the AC it makes, as the M1's ac_power_w
    Source("foxess_t_realtime", "grid_w", ("grid_power_w",)),
    Source("foxess_t_realtime", "house_w", ("load_power_w",)),
    Source("foxess_t_realtime", "temperature_c", ("inverter_temperature_c",), combine="max"),
)

#: the device name of a measurement whose records carry no serial: a T-series' broadcast has none
#: (docs/foxess.md), so its records are the device MQTT also calls `T-series`
UNNAMED_DEVICES: dict[str, str] = {"foxess_t_realtime": T_SERIES_DEVICE}

MEASUREMENTS: tuple[str, ...] = tuple(dict.fromkeys(s.measurement for s in SOURCES))


def device_name(measurement: str, device: str) -> str:
    """The name the page shows for the device of a record: its serial, or for a measurement that
    carries none, the name in UNNAMED_DEVICES."""
    return device or UNNAMED_DEVICES.get(measurement, "")


def sources_for(quantities: tuple[str, ...] | None = None) -> list[Source]:
    return [s for s in SOURCES if quantities is None or s.quantity in quantities]


def combine(source: Source, readings: list[tuple[str, float]]) -> float:
    """One value from (part, value) readings at one time: each part's readings averaged, then
    the parts summed (or the highest taken)."""
    by_part: dict[str, list[float]] = {}
    for part, value in readings:
        by_part.setdefault(part, []).append(value)
    means = [sum(values) / len(values) for values in by_part.values()]
    return max(means) if source.combine == "max" else sum(means)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
