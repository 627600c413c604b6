"""What the page shows besides charts: the devices, their current values, and health.

Every function takes the store paths and reads them read-only (`stores.read_only`); the server
calls them in a thread, never on its event loop. Queries use the stores' indexes (the newest raw
id of a device, the newest record of a measurement), so their cost does not grow with the
store's age.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvtap.cli.status import describe, describe_mqtt
from pvtap.config import Config
from pvtap.ingest.framing import MEASUREMENT as CONNECTION_MEASUREMENT
from pvtap.mqtt.follow import read_status as read_mqtt
from pvtap.store.delivery import read_status
from pvtap.store.local import LocalStore
from pvtap.web.quantities import QUANTITIES, SOURCES, UNNAMED_DEVICES, Source, combine
from pvtap.web.stores import read_only

#: where a family keeps its model and firmware: (measurement, model fields, firmware fields)
IDENTITY: dict[str, list[tuple[str, tuple[str, ...], tuple[str, ...]]]] = {
    "enphase": [("enphase_envoy", ("part_num",), ("sw_version",))],
    "alphaess": [("alphaess_device", ("Minv", "Mbat"), ("EMSVersion", "InvVersion", "BMSVersion"))],
    "foxess": [("foxess_product_info", ("model",), ("firmware", "master_version")),
               ("foxess_hub_login", (), ("firmware",)), ("foxess_registration", (), ("datalogger_firmware",))],
}


@dataclass
class Device:
    vendor: str
    serial: str
    store: str
    last_contact_ns: int
    silent_for_s: float
    silent: bool
    records_today: int = 0
    model: str = ""
    firmware: str = ""
    path: str = ""
    cloud: str = ""
    now: dict[str, dict[str, Any]] = field(default_factory=dict)


class DeviceIndex:
    """The devices (protocol, label) of each store's raw archive, read as it grows: only payloads
    above the highest id seen are looked at again, so a refresh does not scan years of payloads.
    A store whose ids went back (another file) is read whole again."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[int, frozenset[tuple[str, str]]]] = {}
        self._lock = threading.Lock()

    def devices(self, path: Path, db: sqlite3.Connection) -> list[tuple[str, str]]:
        with self._lock:
            newest = db.execute("SELECT MAX(id) FROM raw").fetchone()[0] or 0
            last, found = self._seen.get(path, (0, frozenset()))
            if newest < last:
                last, found = 0, frozenset()
            if newest > last:
                found = found | frozenset(db.execute(
                    "SELECT DISTINCT protocol, device FROM raw WHERE id > ? AND id <= ? AND device != ''",
                    (last, newest)).fetchall())
            self._seen[path] = (newest, found)
            return sorted(found)


def devices(paths: Sequence[Path], config: Config, day_start_ns: int, now_ns: int | None = None,
            index: DeviceIndex | None = None) -> list[Device]:
    """Every device with a payload in the stores, by vendor and serial; a device whose records
    carry no serial (a T-series) by the name quantities.UNNAMED_DEVICES gives it."""
    now_ns = now_ns or time.time_ns()
    index = index or DeviceIndex()
    found: list[Device] = []
    for path in paths:
        with read_only(path) as db:
            today = dict(db.execute("SELECT device, COUNT(*) FROM records WHERE time_ns >= ? GROUP BY device",
                                    (day_start_ns,)).fetchall())
            for protocol, serial in index.devices(path, db):
                row = db.execute("SELECT received_ns FROM raw WHERE id = (SELECT MAX(id) FROM raw"
                                 " WHERE protocol=? AND device=?)", (protocol, serial)).fetchone()
                if row is None:  # its payloads were pruned
                    continue
                last = row[0]
                silent_for = max(0.0, (now_ns - last) / 1e9)
                device = Device(protocol, serial, path.name, last, round(silent_for, 1),
                                silent_for > config.web.silent_after_s, today.get(serial, 0))
                device.model, device.firmware = _identity(db, protocol, serial)
                device.path, device.cloud = _path(db, device, config)
                device.now = current_values(db, protocol, serial)
                found.append(device)
            found.extend(_unnamed_devices(db, path, config, day_start_ns, now_ns))
    return sorted(found, key=lambda d: (d.vendor, d.serial))


def _unnamed_devices(db: sqlite3.Connection, path: Path, config: Config, day_start_ns: int,
                     now_ns: int) -> list[Device]:
    """The devices whose records carry no serial (a T-series): named by their measurement
    (quantities.UNNAMED_DEVICES), last heard from when the payload behind their newest record came."""
    found = []
    for measurement, name in UNNAMED_DEVICES.items():
        row = db.execute("SELECT rec.protocol, rec.connection, raw.received_ns FROM records AS rec"
                         " JOIN raw ON raw.id = rec.raw_id WHERE rec.measurement=? AND rec.device=''"
                         " ORDER BY rec.time_ns DESC, rec.id DESC LIMIT 1", (measurement,)).fetchone()
        if row is None:  # none stored, or their payloads were pruned
            continue
        protocol, connection, last = row
        (today,) = db.execute("SELECT COUNT(*) FROM records WHERE measurement=? AND device='' AND time_ns >= ?",
                              (measurement, day_start_ns)).fetchone()
        silent_for = max(0.0, (now_ns - last) / 1e9)
        device = Device(protocol, name, path.name, last, round(silent_for, 1),
                        silent_for > config.web.silent_after_s, today)
        ended = db.execute("SELECT tags, fields FROM records WHERE measurement=? AND connection=?"
                           " ORDER BY time_ns DESC, id DESC LIMIT 1", (CONNECTION_MEASUREMENT, connection)).fetchone()
        device.path, device.cloud = (_relay_path(ended) if ended else
                                     ("relay (its connection is open)", "known when the connection ends"))
        device.now = current_values(db, protocol, "", measurements=(measurement,))
        found.append(device)
    return found


def _newest(db: sqlite3.Connection, measurement: str, device: str, columns: str = "tags, fields") -> tuple | None:
    return db.execute(f"SELECT {columns} FROM records WHERE measurement=? AND device=? ORDER BY time_ns DESC, id DESC"
                      " LIMIT 1", (measurement, device)).fetchone()


def _identity(db: sqlite3.Connection, protocol: str, serial: str) -> tuple[str, str]:
    model = firmware = ""
    for measurement, model_fields, firmware_fields in IDENTITY.get(protocol, []):
        row = _newest(db, measurement, serial, "fields")
        if row is None:
            continue
        fields = json.loads(row[0])
        model = model or " / ".join(str(fields[k]) for k in model_fields if fields.get(k) not in (None, ""))
        firmware = firmware or ", ".join(f"{k} {fields[k]}" if len(firmware_fields) > 1 else str(fields[k])
                                         for k in firmware_fields if fields.get(k) not in (None, ""))
    return model, firmware


def _path(db: sqlite3.Connection, device: Device, config: Config) -> tuple[str, str]:
    """(how the device's traffic passes pvtap, whether the cloud is reached or answered here)."""
    if device.vendor == "enphase":
        mode = f"mitmproxy addon, {config.enphase.mode} mode" + (", local mode" if config.enphase.local_mode else "")
        if config.enphase.fallback_after:
            mode += f", local answers after {config.enphase.fallback_after:g} s without the cloud"
        row = db.execute("SELECT meta FROM raw WHERE protocol='enphase' AND device=? AND direction='down'"
                         " ORDER BY id DESC LIMIT 1", (device.serial,)).fetchone()
        if row is None:
            return mode, "no answer seen yet"
        meta = json.loads(row[0])
        if meta.get("cloud_unreachable"):
            return mode, f"answered locally: cloud unreachable ({meta['cloud_unreachable']})"
        if meta.get("answered_locally"):
            return mode, "answered locally (local mode)"
        return mode, f"cloud reached (last answer HTTP {meta.get('status_code', '?')})"
    row = _newest(db, CONNECTION_MEASUREMENT, device.serial)
    if row is None:  # the relay records a connection's policy and outcome when it ends
        return "relay (its first connection is still open)", "known when the connection ends"
    return _relay_path(row)


def _relay_path(row: tuple[str, str]) -> tuple[str, str]:
    """(path, cloud) from a relay connection record's tags and fields (JSON)."""
    tags, fields = json.loads(row[0]), json.loads(row[1])
    path = f"relay, policy {tags.get('policy', '?')} (listener {tags.get('listener', '?')})"
    action = tags.get("action")
    if action == "forward":
        return path, f"cloud reached ({fields.get('upstream', 'upstream')})"
    if action == "local":
        if fields.get("cloud_error"):
            return path, f"answered locally: cloud unreachable ({fields['cloud_error']})"
        return path, "answered locally (policy local)"
    return path, f"refused ({tags.get('outcome', '?')}{': ' + str(fields['detail']) if fields.get('detail') else ''})"


def current_values(db: sqlite3.Connection, protocol: str, device: str,
                   measurements: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The newest value of each quantity the device reports (from `measurements` only, when
    given): {quantity: {value, unit, time_ns, parts}}; `parts` lists an Envoy's microinverters
    one by one."""
    out: dict[str, dict[str, Any]] = {}
    for source in SOURCES:
        if not source.measurement.startswith(protocol + "_"):
            continue
        if measurements and source.measurement not in measurements:
            continue
        found = _newest_value(db, source, device)
        if found is not None and (source.quantity not in out or found["time_ns"] > out[source.quantity]["time_ns"]):
            out[source.quantity] = found
    return {q: out[q] for q in QUANTITIES if q in out}


def _newest_value(db: sqlite3.Connection, source: Source, device: str) -> dict[str, Any] | None:
    rows = db.execute(
        "SELECT time_ns, tags, fields FROM records WHERE measurement=? AND device=? AND time_ns = "
        "(SELECT MAX(time_ns) FROM records WHERE measurement=? AND device=?) ORDER BY id",
        (source.measurement, device, source.measurement, device)).fetchall()
    values: list[tuple[str, float]] = []
    for _, tags, fields in rows:
        value = source.value(json.loads(fields))
        if value is not None:
            values.append((json.loads(tags).get(source.part_tag, "") if source.part_tag else "", value))
    if not values:
        return None
    found: dict[str, Any] = {"value": combine(source, values),
                             "unit": QUANTITIES[source.quantity], "time_ns": rows[0][0]}
    if source.part_tag:
        found["parts"] = [{"part": part, "value": value} for part, value in values]
    return found


def health(paths: Sequence[Path], now_ns: int | None = None) -> list[dict[str, Any]]:
    """Per store, the lines `pvtap status` prints (as label and value) and the numbers behind them."""
    now_ns = now_ns or time.time_ns()
    out = []
    for path in paths:
        delivery = read_status(path)
        with LocalStore(path, readonly=True) as store:
            backlog, row = store.decode_backlog(), store.status()
        mqtt = read_mqtt(path)
        lines = describe(delivery, now_ns, ingest=(backlog, row)) + describe_mqtt(mqtt, now_ns)
        counts = row.counts if row else {}
        out.append({"store": path.name, "title": lines[0], "rows": [_split(line) for line in lines[1:]],
                    "numbers": {"decode_backlog": backlog, "dropped_copies": row.dropped_copies if row else 0,
                                "connections": counts.get("connections", 0),
                                "decode_errors": counts.get("decode_errors", 0),
                                "influx_backlog": delivery.backlog, "influx_forwarded": delivery.forwarded,
                                "influx_last_error": delivery.last_error,
                                "mqtt_backlog": mqtt.backlog if mqtt else None,
                                "mqtt_last_error": mqtt.last_error if mqtt else None}})
    return out


def _split(line: str) -> tuple[str, str]:
    """`pvtap status` prints `  label` padded to 15 characters, then the value."""
    return line[2:17].strip(), line[17:].strip()


def as_json(device: Device) -> dict[str, Any]:
    return dataclasses.asdict(device)


__all__ = ["Device", "DeviceIndex", "as_json", "current_values", "devices", "health"]
