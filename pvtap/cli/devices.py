"""`pvtap devices`: every device the stores have heard from, when last, and how much it sent."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pvtap.cli._common import NoStores, ago, find_stores, iso_utc
from pvtap.config import Config
from pvtap.health import STATS_ORIGIN
from pvtap.records import from_ns, now_utc, to_ns
from pvtap.store.local import LocalStore

EXAMPLES = """\
examples:
  pvtap devices
  pvtap devices --json | jq '.[] | select(.vendor == "enphase")'

Last contact is when pvtap last received a payload from or for the device (proxy clock, UTC).
What a connection sent before it named its device (an H1's version frame comes before its
serial) counts for that device: one row per device. Payloads of connections that never named one
(UDP broadcasts, say) are listed as "(unknown)". --device of `tail` and `export` takes the SERIAL
shown here."""


@dataclass
class Device:
    vendor: str
    serial: str
    last_contact_ns: int
    records: int = 0
    raw_payloads: int = 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "devices", help="list the devices seen, with last contact and counts",
        description="List every device seen in the local stores: vendor (protocol), serial, last\n"
                    "contact (UTC and how long ago), decoded record count and raw payload count.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        paths = find_stores(config.data_dir)
    except NoStores as exc:
        print(f"pvtap devices: {exc}", file=sys.stderr)
        return 1
    devices = collect(paths)
    now_ns = to_ns(now_utc())
    if args.json:
        print(json.dumps([_as_json(d, now_ns) for d in devices], indent=2, ensure_ascii=False))
    elif not devices:
        print(f"no devices seen yet in {config.data_dir}")
    else:
        print(_table(devices, now_ns))
    return 0


def collect(paths: list[Path]) -> list[Device]:
    """One entry per (vendor, serial) over all stores, sorted by vendor then serial."""
    merged: dict[tuple[str, str], Device] = {}
    for path in paths:
        with LocalStore(path, readonly=True) as store:
            for summary in store.devices():
                if summary.protocol == STATS_ORIGIN:  # pvtap's own pvtap_stats records: not a device
                    continue
                key = (summary.protocol, summary.device)
                device = merged.setdefault(key, Device(summary.protocol, summary.device, summary.last_contact_ns))
                device.last_contact_ns = max(device.last_contact_ns, summary.last_contact_ns)
                device.records += summary.records
                device.raw_payloads += summary.raw_payloads
    return [merged[key] for key in sorted(merged)]


def _as_json(device: Device, now_ns: int) -> dict:
    return {"vendor": device.vendor, "serial": device.serial,
            "last_contact": iso_utc(from_ns(device.last_contact_ns)),
            "seconds_since_contact": round((now_ns - device.last_contact_ns) / 1e9, 3),
            "records": device.records, "raw_payloads": device.raw_payloads}


def _table(devices: list[Device], now_ns: int) -> str:
    rows = [("VENDOR", "SERIAL", "LAST CONTACT (UTC)", "", "RECORDS", "RAW PAYLOADS")]
    for d in devices:
        contact = from_ns(d.last_contact_ns).replace(microsecond=0)
        rows.append((d.vendor, d.serial or "(unknown)", iso_utc(contact),
                     ago((now_ns - d.last_contact_ns) / 1e9), f"{d.records:,}", f"{d.raw_payloads:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {4, 5}  # counts line up on the right
    return "\n".join(
        "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                  for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows)
