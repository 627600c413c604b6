"""`pvtap status`: per local store, how delivery to InfluxDB is going."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from pvtap.cli._common import iso_utc
from pvtap.config import Config
from pvtap.records import Record, from_ns
from pvtap.store.delivery import DeliveryStatus, read_status
from pvtap.store.local import LocalStore, store_paths


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "status", help="alerts, and backlog, last success and error, delivery rate of each local store",
        description="Show, per local store in the data directory, the alerts that need you (e.g. a cloud "
                    "certificate that no longer matches its pin), what InfluxDB has not received yet (backlog "
                    "and its oldest record), the last accepted write, the last error, the delivery rate and "
                    "the dead letters. Reads the stores only; works while pvtap runs.")
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
    alerts = {p: active_alerts(p) for p in paths}
    if args.json:
        for path, s in zip(paths, states):
            print(json.dumps({**dataclasses.asdict(s), "alerts": [dataclasses.asdict(a) for a in alerts[path]]},
                             sort_keys=True))
        return 0
    target = (f"{config.influx.url} (org {config.influx.org}, bucket {config.influx.bucket})"
              if config.influx.url else "not configured (influx.url is empty): records stay in the local stores")
    print(f"InfluxDB: {target}")
    bound = f"{config.influx.max_store_mb} MiB each" if config.influx.max_store_mb else "none"
    print(f"data dir: {config.data_dir}  (store size bound: {bound})")
    for path, s in zip(paths, states):
        print()
        lines = describe(s)
        for alert in alerts[path]:
            lines.insert(1, f"  ALERT          since {alert.since}, last {alert.last}: {alert.message}")
        print("\n".join(lines))
    return 0


def describe(s: DeliveryStatus, now_ns: int | None = None) -> list[str]:
    now_ns = now_ns or time.time_ns()
    lines = [f"{s.store}  ({s.size_bytes / 2**20:.1f} MiB)"]
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
