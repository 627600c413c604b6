"""The charts' data: power and SoC over a time range, per device and summed, and energy per day.

Ranges up to `FINE_RANGE_S` are read from the records themselves: every stored point when there
are at most `MAX_POINTS` per series, else averages over equal buckets. Longer ranges are built
from hourly averages kept by `HourlyCache`: a year of one-minute data is half a million records,
which SQLite's JSON functions take tens of seconds to read, but only 8,760 hours. The cache
reads an hour again only when it changed: when records arrive for it (new, back-filled, or
re-decoded by `pvtap replay`), found by the ids above the highest one seen, or when the store was
pruned or replaced (its lowest id moved, its highest went back).

An hour's average of a quantity is over the device's timestamps in it: the records of one
device at one time are first combined (quantities.combine: an Envoy's microinverters summed),
then averaged.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvtap.web.quantities import POWER, SOURCES, Source, device_name
from pvtap.web.stores import read_only

NS = 1_000_000_000
HOUR_NS = 3600 * NS
FINE_RANGE_S = 2 * 86_400
MAX_POINTS = 1000
CHART_QUANTITIES = (*POWER, "soc_pct")

Key = tuple[str, str, str]  # (vendor, device, quantity)


def _by_measurement(quantities: Sequence[str]) -> dict[str, list[Source]]:
    grouped: dict[str, list[Source]] = defaultdict(list)
    for source in SOURCES:
        if source.quantity in quantities:
            grouped[source.measurement].append(source)
    return grouped


def _per_time(sources: list[Source]) -> str:
    """A query of one value per source (columns v0, v1, …; NULL when no record has it) per
    protocol, device and time_ns of one measurement (parameters: measurement, since, until):
    each part's readings averaged, then the parts combined (quantities.combine)."""
    part = sources[0].part_sql()  # the sources of one measurement name their parts alike
    averaged = ", ".join(f"AVG(CASE WHEN {present} THEN {value} END) AS v{i}"
                         for i, (value, present) in enumerate(s.sql() for s in sources))
    combined = ", ".join(f"{'MAX' if s.combine == 'max' else 'SUM'}(v{i}) AS v{i}" for i, s in enumerate(sources))
    return (f"SELECT protocol, device, time_ns, {combined} FROM ("
            f" SELECT protocol, device, time_ns, {averaged} FROM records"
            f" WHERE measurement=? AND time_ns >= ? AND time_ns < ? GROUP BY time_ns, protocol, device, {part}"
            ") GROUP BY time_ns, protocol, device")


def points(db: sqlite3.Connection, since_ns: int, until_ns: int,
           quantities: Sequence[str] = CHART_QUANTITIES) -> dict[Key, dict[int, list[float]]]:
    """Every (vendor, device, quantity) → {time_ns: [sum, count]} in [since, until), one point
    per stored timestamp (records of several measurements at one time averaged)."""
    out: dict[Key, dict[int, list[float]]] = defaultdict(dict)
    for measurement, sources in _by_measurement(quantities).items():
        rows = db.execute(_per_time(sources), (measurement, since_ns, until_ns))
        for protocol, stored, time_ns, *values in rows:
            device = device_name(measurement, stored)
            for source, value in zip(sources, values):
                if value is not None:
                    acc = out[(protocol, device, source.quantity)].setdefault(time_ns, [0.0, 0])
                    acc[0] += value
                    acc[1] += 1
    return out


def hourly(db: sqlite3.Connection, since_ns: int, until_ns: int,
           quantities: Sequence[str] = CHART_QUANTITIES) -> dict[int, dict[Key, list[float]]]:
    """hour → (vendor, device, quantity) → [sum over the device's timestamps, timestamps], summed
    in SQLite (the JSON is read there, once per record and field)."""
    out: dict[int, dict[Key, list[float]]] = defaultdict(dict)
    for measurement, sources in _by_measurement(quantities).items():
        sums = ", ".join(f"SUM(v{i}), COUNT(v{i})" for i in range(len(sources)))
        rows = db.execute(f"SELECT protocol, device, time_ns / {HOUR_NS}, {sums} FROM ({_per_time(sources)})"
                          f" GROUP BY protocol, device, time_ns / {HOUR_NS}", (measurement, since_ns, until_ns))
        for protocol, stored, hour, *values in rows:
            device = device_name(measurement, stored)
            for i, source in enumerate(sources):
                total, n = values[2 * i], values[2 * i + 1]
                if n:
                    acc = out[hour].setdefault((protocol, device, source.quantity), [0.0, 0])
                    acc[0] += total
                    acc[1] += n
    return out


@dataclass
class _StoreHours:
    min_id: int | None
    max_id: int
    covered: set[int] = field(default_factory=set)  # hours computed (with or without data)
    sums: dict[int, dict[Key, list[float]]] = field(default_factory=dict)


class HourlyCache:
    """Hourly sums of each quantity per store file, each hour read once and again only when it
    changes. Records only ever get higher ids, so the hours of records above the last id seen are
    the ones that changed (new, back-filled, or re-decoded by `pvtap replay`, which deletes and
    adds); a changed lowest id (pruning) or a lower highest one (another file) starts afresh."""

    def __init__(self) -> None:
        self._stores: dict[Path, _StoreHours] = {}
        self._lock = threading.Lock()  # one refresh at a time

    def hours(self, path: Path, db: sqlite3.Connection, since_ns: int,
              until_ns: int) -> dict[int, dict[Key, list[float]]]:
        """The store's hour sums in [since, until) (hours since the epoch), brought up to date."""
        first, last = since_ns // HOUR_NS, -(-until_ns // HOUR_NS)
        with self._lock:
            # two statements: SQLite answers MIN(id) or MAX(id) alone from the b-tree's ends, not both at once
            min_id = db.execute("SELECT MIN(id) FROM records").fetchone()[0]
            max_id = db.execute("SELECT MAX(id) FROM records").fetchone()[0] or 0
            state = self._stores.get(path)
            if state is None or state.min_id != min_id or max_id < state.max_id:
                state = self._stores[path] = _StoreHours(min_id, max_id)
            elif max_id > state.max_id:
                changed = {hour for (hour,) in db.execute(
                    "SELECT DISTINCT time_ns / ? FROM records WHERE id > ? AND id <= ?",
                    (HOUR_NS, state.max_id, max_id))}
                state.covered -= changed
                state.max_id = max_id
            missing = sorted(h for h in range(first, last) if h not in state.covered)
            for start, end in _runs(missing):
                fresh = hourly(db, start * HOUR_NS, end * HOUR_NS)
                for hour in range(start, end):
                    state.sums.pop(hour, None)
                    if hour in fresh:
                        state.sums[hour] = fresh[hour]
                state.covered.update(range(start, end))
            return {h: state.sums[h] for h in range(first, last) if h in state.sums}


def _runs(hours: list[int]) -> list[tuple[int, int]]:
    """Sorted hour numbers as [start, end) runs of consecutive hours."""
    runs: list[tuple[int, int]] = []
    for hour in hours:
        if runs and runs[-1][1] == hour:
            runs[-1] = (runs[-1][0], hour + 1)
        else:
            runs.append((hour, hour + 1))
    return runs


def _nice_bucket(span_s: float, points: int) -> int:
    """A bucket in whole seconds (1, 2, 5, 10, 15, 30 s, 1, 2, 5, 10, 15, 30 min, 1, 2, 3, 6, 12 h, 1 d)
    giving at most `points` buckets over the span."""
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span_s / step <= points:
            return step
    return math.ceil(span_s / points / 86400) * 86400


def chart(paths: Sequence[Path], cache: HourlyCache, since_ns: int, until_ns: int) -> dict[str, Any]:
    """The charts' data for [since, until): a shared time axis (unix seconds) and one series per
    device and quantity, plus `total` series (the devices summed) where several devices report one.

    Fine ranges keep every stored point unless a series has more than MAX_POINTS; then every
    series is averaged over equal buckets (`bucket_s`), as are long ranges (from the hourly cache)."""
    span_s = (until_ns - since_ns) / NS
    merged: dict[Key, dict[int, list[float]]] = defaultdict(dict)
    bucket_ns = 0
    if span_s <= FINE_RANGE_S:
        for path in paths:
            with read_only(path) as db:
                for key, by_time in points(db, since_ns, until_ns).items():
                    _add(merged[key], by_time)
        if any(len(by_time) > MAX_POINTS for by_time in merged.values()):
            bucket_ns = _nice_bucket(span_s, MAX_POINTS) * NS
            merged = {key: _bucketed(by_time, since_ns, bucket_ns) for key, by_time in merged.items()}
    else:
        bucket_ns = max(HOUR_NS, _nice_bucket(span_s, MAX_POINTS) * NS)
        for path in paths:
            with read_only(path) as db:
                for hour, sums in cache.hours(path, db, since_ns, until_ns).items():
                    start = since_ns + (hour * HOUR_NS - since_ns) // bucket_ns * bucket_ns
                    for key, (total, n) in sums.items():
                        acc = merged[key].setdefault(start, [0.0, 0])
                        acc[0] += total
                        acc[1] += n
    return _layout(merged, since_ns, until_ns, bucket_ns)


def _add(into: dict[int, list[float]], more: dict[int, list[float]]) -> None:
    for time_ns, (total, n) in more.items():
        acc = into.setdefault(time_ns, [0.0, 0])
        acc[0] += total
        acc[1] += n


def _bucketed(by_time: dict[int, list[float]], origin_ns: int, bucket_ns: int) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for time_ns, (total, n) in by_time.items():
        start = origin_ns + (time_ns - origin_ns) // bucket_ns * bucket_ns
        acc = out.setdefault(start, [0.0, 0])
        acc[0] += total
        acc[1] += n
    return out


def _layout(merged: dict[Key, dict[int, list[float]]], since_ns: int, until_ns: int,
            bucket_ns: int) -> dict[str, Any]:
    times = sorted({t for by_time in merged.values() for t in by_time})
    series = []
    for (vendor, device, quantity) in sorted(merged, key=lambda k: (CHART_QUANTITIES.index(k[2]), k[0], k[1])):
        by_time = merged[(vendor, device, quantity)]
        series.append({"vendor": vendor, "device": device, "quantity": quantity,
                       "values": [_mean(by_time.get(t)) for t in times]})
    totals = []
    for quantity in POWER:
        mine = [s for s in series if s["quantity"] == quantity]
        if len(mine) > 1:
            totals.append({"quantity": quantity, "devices": len(mine), "values": _held_sum(times, mine, bucket_ns)})
    return {"since": since_ns / NS, "until": until_ns / NS, "bucket_s": bucket_ns / NS,
            "times": [t / NS for t in times], "series": series, "totals": totals}


def _mean(acc: list[float] | None) -> float | None:
    return None if acc is None else round(acc[0] / acc[1], 3)


#: in a summed series, a device's last value counts for this long after it was reported
HOLD_NS = 15 * 60 * NS


def _held_sum(times: list[int], series: list[dict[str, Any]], bucket_ns: int) -> list[float | None]:
    """The devices' values added up at every time, each device's last value held (devices report
    at different times: an Envoy every 5 min, a battery every 10 s) for HOLD_NS or a bucket."""
    hold = max(HOLD_NS, 2 * bucket_ns)
    out: list[float | None] = []
    last: list[tuple[int, float] | None] = [None] * len(series)
    for i, t in enumerate(times):
        for j, s in enumerate(series):
            if s["values"][i] is not None:
                last[j] = (t, s["values"][i])
        held = [v for entry in last if entry is not None for when, v in [entry] if t - when <= hold]
        out.append(round(sum(held), 3) if held else None)
    return out


def energy_per_day(paths: Sequence[Path], cache: HourlyCache, since_ns: int, until_ns: int, now_ns: int,
                   utc_offset_s: int = 0) -> dict[str, Any]:
    """kWh per local day (UTC offset given) of PV, house, grid import and export, summed over the
    devices: each hour's average power times the part of the hour that has passed."""
    day_ns = 86_400 * NS
    offset_ns = utc_offset_s * NS
    first_day = (since_ns + offset_ns) // day_ns
    days: dict[int, dict[str, float]] = {}
    for path in paths:
        with read_only(path) as db:
            for hour, sums in cache.hours(path, db, since_ns, until_ns).items():
                start = hour * HOUR_NS
                hours = max(0.0, min(HOUR_NS, now_ns - start) / HOUR_NS)
                day = days.setdefault((start + offset_ns) // day_ns, defaultdict(float))
                for (_, _, quantity), (total, n) in sums.items():
                    watts = total / n
                    if quantity == "grid_w":
                        day["grid_import_kwh" if watts > 0 else "grid_export_kwh"] += abs(watts) * hours / 1000
                    elif quantity in ("pv_w", "house_w"):
                        day[quantity.replace("_w", "_kwh")] += watts * hours / 1000
    last_day = (until_ns - 1 + offset_ns) // day_ns
    keys = ("pv_kwh", "house_kwh", "grid_import_kwh", "grid_export_kwh")
    ordered = range(first_day, last_day + 1)
    return {"days": [d * 86_400 - utc_offset_s for d in ordered],
            **{k: [round(days[d][k], 3) if d in days and k in days[d] else None for d in ordered] for k in keys}}


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"))
