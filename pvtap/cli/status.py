"""`pvtap status`: per local store, the alerts that need a person (proxy_tcp.alerts), and how ingest
(archive, decoding, dropped copies) and delivery to InfluxDB and MQTT are going."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from pvtap.cli._common import iso_utc
from pvtap.config import Config, mask_url
from pvtap.mqtt.follow import MqttStatus
from pvtap.mqtt.follow import read_status as read_mqtt
from pvtap.records import Record, from_ns
from pvtap.store.delivery import DeliveryStatus, read_status
from pvtap.store.local import IngestStatus, LocalStore, store_paths

#: a running worker writes its status row every few seconds; older than this, it is not running
STALE_S = 30.0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "status", help="alerts, decode backlog, dropped copies, delivery to InfluxDB and MQTT of each local store",
        description="Show, per local store in the data directory, the alerts that need you (e.g. a cloud "
                    "certificate that no longer matches its pin), its ingest worker (running or not, payloads "
                    "archived but not decoded yet, copies dropped because it was busy or down) and what InfluxDB "
                    "has not received yet (backlog and its oldest record), the last accepted write, the last "
                    "error, the delivery rate, the forwarder's state and the dead letters, and the MQTT "
                    "publisher (connected or not, messages published, records not read yet, its last error). Reads "
                    "the stores only; works while pvtap runs.")
    parser.add_argument("--json", action="store_true", help="one JSON object per store, one per line")
    parser.set_defaults(func=run)


@dataclasses.dataclass(frozen=True)
class Alert:
    """A condition the relay reported as needing a person (proxy_tcp.alerts), still on at its last report."""

    alert: str
    listener: str
    since: str  # when it started (UTC), as far as the store remembers
    last: str  # when it was last reported
    message: str


def active_alerts(path: Path) -> list[Alert]:
    """The alerts of one store whose latest record says they are still on."""
    from proxy_tcp.alerts import MEASUREMENT

    latest: dict[tuple[str, str], list[Record]] = {}  # newest first, while still active
    done: set[tuple[str, str]] = set()
    with LocalStore(path, readonly=True) as store:
        for stored in store.records(measurements=[MEASUREMENT], newest_first=True, by_time=True):
            record = stored.record
            key = (record.tags.get("alert", ""), record.tags.get("listener", ""))
            if key in done:
                continue
            if record.fields.get("active") is True:
                latest.setdefault(key, []).append(record)
            else:
                done.add(key)

    def second(record: Record) -> str:
        return iso_utc(record.time.replace(microsecond=0))

    return [Alert(key[0], key[1], second(records[-1]), second(records[0]),
                  str(records[0].fields.get("message", ""))) for key, records in sorted(latest.items())]


def run(args: argparse.Namespace, config: Config) -> int:
    paths = store_paths(config.data_dir)
    if not paths:
        print(f"no local stores in {config.data_dir}")
        return 0
    states = [read_status(p) for p in paths]
    ingests = [read_ingest(p) for p in paths]
    alerts = [active_alerts(p) for p in paths]
    mqtts = [read_mqtt(p) for p in paths]
    if args.json:
        for s, (backlog, row), active, mqtt in zip(states, ingests, alerts, mqtts):
            doc = dataclasses.asdict(s)
            doc["ingest"] = {"decode_backlog": backlog, **(dataclasses.asdict(row) if row else {})}
            doc["alerts"] = [dataclasses.asdict(a) for a in active]
            doc["mqtt"] = dataclasses.asdict(mqtt) if mqtt else None
            print(mask_url(json.dumps(doc, sort_keys=True)))
        return 0
    target = (f"{mask_url(config.influx.url)} (org {config.influx.org}, bucket {config.influx.bucket})"
              if config.influx.url else "not configured (influx.url is empty): records stay in the local stores")
    print(f"InfluxDB: {target}")
    bound = f"{config.influx.max_store_mb} MiB each" if config.influx.max_store_mb else "none"
    print(f"data dir: {config.data_dir}  (store size bound: {bound})")
    print(f"MQTT: {mask_url(config.mqtt.url) or 'not configured (mqtt.url is empty)'}")
    for s, (backlog, row), active, mqtt in zip(states, ingests, alerts, mqtts):
        print()
        lines = describe(s, ingest=(backlog, row)) + describe_mqtt(mqtt)
        lines[1:1] = [f"  ALERT          since {a.since}, last {a.last}: {a.message}" for a in active]
        print(mask_url("\n".join(lines)))  # an error the forwarder noted may quote a URL with its password
    return 0


def read_ingest(path) -> tuple[int, IngestStatus | None]:
    """(payloads archived but not decoded, the worker's last status row)."""
    with LocalStore(path, readonly=True) as store:
        return store.decode_backlog(), store.status()


def describe(s: DeliveryStatus, now_ns: int | None = None,
             ingest: tuple[int, IngestStatus | None] = (0, None)) -> list[str]:
    now_ns = now_ns or time.time_ns()
    lines = [f"{s.store}  ({s.size_bytes / 2**20:.1f} MiB)"]
    lines += describe_ingest(*ingest, now_ns=now_ns)
    if not s.forwarded:
        lines.append(f"  backlog        {s.backlog} records (never forwarded)")
    else:
        lines.append(f"  destination    {s.destination or '-'}")
        lines.append(f"  backlog        {s.backlog} records" + (f", oldest #{s.oldest_id} from "
                     f"{_when(s.oldest_time_ns, now_ns)}" if s.backlog else ""))
        lines.append(f"  delivered      {s.delivered} records in all")
        lines.append(f"  last success   {_when(s.last_success_ns, now_ns)}")
        error = s.last_error if s.last_error_ns and (s.last_success_ns or 0) < s.last_error_ns else None
        lines.append(f"  last error     {_when(s.last_error_ns, now_ns)}"
                     + (f": {s.last_error}" if s.last_error else "")
                     + ("" if error or not s.last_error_ns else " (since recovered)"))
        lines.append(f"  rate           {s.rate_1m:.1f} records/s over 1 min, {s.rate_10m:.1f} over 10 min")
        lines.append(f"  dead letters   {s.deadletters}" + (f" ({s.requeued} requeued)" if s.requeued else "")
                     + ("  -> pvtap deadletters" if s.deadletters else ""))
    if s.dropped:
        lines.append(f"  DROPPED        {s.dropped} undelivered records to stay under the size bound")
    return lines


def describe_ingest(backlog: int, row: IngestStatus | None, now_ns: int) -> list[str]:
    if row is None:
        return [f"  decode backlog {backlog} payloads"]
    stale = (now_ns - row.updated_ns) / 1e9 > STALE_S
    if row.running and not stale:
        worker = f"running (pid {row.pid}), status from {_when(row.updated_ns, now_ns)}"
    elif row.running:
        worker = f"NOT RUNNING? its last status is from {_when(row.updated_ns, now_ns)} (killed, or a full disk)"
    else:
        worker = f"stopped {_when(row.updated_ns, now_ns)}"
    lines = [f"  ingest worker  {worker}",
             f"  decode backlog {backlog} payloads" + (" (decoded when pvtap runs again)" if backlog and
                                                          not (row.running and not stale) else ""),
             f"  dropped copies {row.dropped_copies}" + (" (ingest was busy or down; forwarding was not affected)"
                                                         if row.dropped_copies else "")]
    behind = int(row.counts.get("parent_copies_dropped_behind", 0))
    if behind:
        lines[-1] += (f"; {behind} of them because the worker was as far behind as it can archive within its "
                      "stop grace")
    lost, at_stop = int(row.counts.get("parent_copies_lost", 0)), int(row.counts.get("lost_at_stop", 0))
    if lost:
        lines.append(f"  LOST COPIES    {lost}" + (f", {at_stop} at the last stop" if at_stop else "")
                     + " (the worker ended before archiving them: killed at a stop, or crashed)")
    counts = row.counts
    if counts.get("connections"):
        lines.append(f"  connections    {counts['connections']} relayed, {counts.get('connections_open', 0)} open")
    if "decode_errors" in counts:
        errors = counts["decode_errors"]
        lines.append(f"  decode errors  {errors}" + (" (their payloads are kept: pvtap replay decodes them again)"
                                                     if errors else ""))
    if row.forwarder != "off":
        loud = row.forwarder.upper() if row.forwarder in ("stuck", "failing", "restarting") else row.forwarder
        restarts = int(row.counts.get("forwarder_restarts", 0))
        lines.append(f"  forwarder      {loud}" + (f": {row.forwarder_error}" if row.forwarder_error else "")
                     + (f" (restarted {restarts} time{'s' * (restarts != 1)})" if restarts else ""))
    return lines


def describe_mqtt(m: MqttStatus | None, now_ns: int | None = None) -> list[str]:
    """The MQTT publisher of a store: connected or why not, messages, devices, records not read yet."""
    if m is None:
        return []
    now_ns = now_ns or time.time_ns()
    stale = (now_ns - m.updated_ns) / 1e9 > STALE_S
    if not m.running:
        state = f"stopped {_when(m.updated_ns, now_ns)}"
    elif stale:
        state = f"NOT RUNNING? its last status is from {_when(m.updated_ns, now_ns)}"
    elif m.connected:
        state = f"connected to {m.broker}"
    else:
        state = f"NOT CONNECTED to {m.broker}"
    lines = [f"  mqtt           {state} ({m.publisher}, pid {m.pid})",
             f"  mqtt messages  {m.published} published, {m.devices} devices, {m.backlog} records not read yet"]
    if m.last_error and m.last_error_ns:
        lines.append(f"  mqtt error     {_when(m.last_error_ns, now_ns)}: {m.last_error}"
                     + (" (since recovered)" if m.connected else ""))
    return lines


def _when(ns: int | None, now_ns: int) -> str:
    if ns is None:
        return "never"
    ago = max(0, (now_ns - ns) / 1e9)
    if ago < 120:
        span = f"{ago:.0f} s ago"
    elif ago < 7200:
        span = f"{ago / 60:.0f} min ago"
    elif ago < 172800:
        span = f"{ago / 3600:.1f} h ago"
    else:
        span = f"{ago / 86400:.1f} days ago"
    return f"{from_ns(ns).isoformat(timespec='seconds').replace('+00:00', 'Z')} ({span})"
