"""`pvtap tail`: the latest decoded records across every local store, and new ones as they come.

Each store is followed with its own id cursor (record ids only grow), so nothing is shown twice
or skipped while the producers keep writing.
"""

from __future__ import annotations

import argparse
import heapq
import sqlite3
import sys
import time
from pathlib import Path

from pvtap.cli._common import (
    NoStores,
    RecordFilters,
    add_record_filters,
    find_stores,
    iso_utc,
    record_filters,
    show_value,
    unknown_names,
)
from pvtap.config import Config
from pvtap.records import Record
from pvtap.store.local import LocalStore, StoredRecord, store_paths

EXAMPLES = """\
examples:
  pvtap tail                          the 20 latest records
  pvtap tail -n 100 --measurement enphase_interval
  pvtap tail --follow                 keep printing new records until Ctrl-C
  pvtap tail --vendor foxess --device 60MSIMULATED001     one device (names as in `pvtap devices`)

Each line is: time (UTC)  measurement  tag=value,...  field=value ...
(string fields are quoted, so "12" is a string and 12 a number)."""

_BATCH = 1000


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "tail", help="show the latest decoded records, optionally following new ones",
        description="Show the latest decoded records (by record time) from every local store in the\n"
                    "data directory, oldest first, one per line. With --follow, keep polling the stores\n"
                    "and print each record as it is stored.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--lines", type=_count, default=20, metavar="N",
                        help="how many of the latest records to show first (default: 20)")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep printing new records until interrupted (Ctrl-C)")
    add_record_filters(parser)
    parser.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS",
                        help="with --follow: seconds between polls (default: 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        paths = find_stores(config.data_dir)
    except NoStores as exc:
        if not args.follow:
            print(f"pvtap tail: {exc}", file=sys.stderr)
            return 1
        print(f"pvtap tail: waiting for records in {config.data_dir} (Ctrl-C to stop)", file=sys.stderr)
        paths = []
    stores: dict[Path, LocalStore] = {p: store for p in paths if (store := _open_when_ready(p)) is not None}
    filters = record_filters(args)
    try:
        cursors, shown, printed = _show_latest(stores, args.lines, filters)
        if not printed and (unknown := unknown_names(stores.values(), filters)):
            if not args.follow:
                print(f"pvtap tail: {unknown}", file=sys.stderr)
                return 2
            print(f"pvtap tail: {unknown} (yet); waiting", file=sys.stderr)
        if args.follow:
            _follow(config.data_dir, stores, cursors, shown, filters, args.interval)
    except KeyboardInterrupt:  # the way --follow ends
        pass
    finally:
        for store in stores.values():
            store.close()
    return 0


def _show_latest(stores: dict[Path, LocalStore], lines: int,
                 filters: RecordFilters) -> tuple[dict[Path, int], set[tuple[Path, int]], int]:
    """Print the `lines` latest records by record time over all stores. Returns each store's
    cursor (its last record id before the query), the records shown that lie beyond it,
    which arrived while querying (--follow must not print those again), and how many it printed."""
    cursors: dict[Path, int] = {}
    latest: list[tuple[int, str, int, Path, StoredRecord]] = []
    for path, store in stores.items():
        newest = next(store.records(limit=1, newest_first=True), None)
        cursors[path] = newest.id if newest else 0
        if lines:
            for stored in store.records(**filters, limit=lines, newest_first=True, by_time=True):
                latest.append((stored.record.time_ns, path.name, stored.id, path, stored))
    shown = heapq.nlargest(lines, latest, key=lambda entry: entry[:3]) if lines else []
    for *_, stored in reversed(shown):
        print(format_record(stored.record), flush=True)
    beyond = {(path, stored.id) for *_, path, stored in shown if stored.id > cursors[path]}
    return cursors, beyond, len(shown)


def _follow(data_dir: Path, stores: dict[Path, LocalStore], cursors: dict[Path, int],
            shown: set[tuple[Path, int]], filters: RecordFilters, interval: float) -> None:
    while True:
        time.sleep(interval)
        for path in store_paths(data_dir):  # a producer started since: all its records are new
            if path not in stores and (store := _open_when_ready(path)) is not None:
                stores[path] = store
                cursors[path] = 0
        for path, store in stores.items():
            while True:
                batch = list(store.records(after_id=cursors[path], **filters, limit=_BATCH))
                for stored in batch:
                    if (path, stored.id) not in shown:
                        print(format_record(stored.record), flush=True)
                if batch:
                    cursors[path] = batch[-1].id
                if len(batch) < _BATCH:
                    break


def _open_when_ready(path: Path) -> LocalStore | None:
    """A store file that just appeared, or None while its producer is still creating the tables."""
    store = LocalStore(path, readonly=True)
    try:
        store.count_records()
    except sqlite3.OperationalError:  # no such table (yet)
        store.close()
        return None
    return store


def format_record(record: Record) -> str:
    """`2024-06-01T12:00:00Z  measurement  tag=v,tag=v  field=v field=v`"""
    tags = ",".join(f"{k}={v}" for k, v in sorted(record.tags.items())) or "-"
    fields = " ".join(f"{k}={show_value(v)}" for k, v in record.fields.items())
    return f"{iso_utc(record.time)}  {record.measurement}  {tags}  {fields}"


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: give a whole number, 0 or more")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds greater than 0")
    return value
