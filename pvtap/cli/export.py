"""`pvtap export`: records from every local store as line protocol, CSV or JSON lines.

Records are streamed in time order (a merge over the stores), never loaded all at once, so an
export of years of data needs no more memory than one of an hour.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

from pvtap.cli._common import (
    NoStores,
    Progress,
    TimedFilters,
    add_record_filters,
    find_stores,
    iso_utc,
    parse_when,
    record_filters,
    unknown_names,
)
from pvtap.config import Config
from pvtap.records import FieldValue, Record, to_ns
from pvtap.store.lineprotocol import to_line
from pvtap.store.local import LocalStore

FORMATS = ("lp", "csv", "json")

EXAMPLES = """\
examples:
  pvtap export > all.lp                                  everything, InfluxDB line protocol
  pvtap export --since 7d --format csv -o week.csv       the last 7 days as CSV
  pvtap export --since 2024-06-01 --until 2024-07-01 --measurement enphase_interval --format json
  pvtap export --device 60MSIMULATED001 --vendor foxess --format csv     one device (names as in `pvtap devices`)
  pvtap export --since 2h | curl --data-binary @- 'http://localhost:8086/write?db=pvtap&precision=ns'

formats:
  lp    InfluxDB line protocol, nanosecond timestamps (what the InfluxDB forwarder writes)
  csv   one row per record: time, measurement, one column per tag key, one per field key
        (a field named like a tag gets the suffix _field); empty when a record lacks it
  json  one JSON object per line: time (UTC ISO), time_ns, measurement, tags, fields

times (--since is inclusive, --until exclusive):
  ISO 8601    2024-06-01, 2024-06-01T12:00:00Z, 2024-06-01T14:00+02:00 (no offset: UTC)
  an age      30m, 2h, 7d, 1w (before now)

A --measurement, --device or --vendor that no store holds is an error that lists the names there
are (exit status 2), so a typo does not pass for "no data". The record count, and progress on a
terminal, go to stderr."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="write stored records as line protocol, CSV or JSON lines",
        description="Export decoded records from every local store in the data directory, in time\n"
                    "order, to stdout or a file. Records are streamed, so any size fits in memory.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=FORMATS, default="lp", help="output format (default: lp)")
    parser.add_argument("--since", type=parse_when, metavar="TIME", help="only records at or after TIME")
    parser.add_argument("--until", type=parse_when, metavar="TIME", help="only records before TIME")
    add_record_filters(parser)
    parser.add_argument("-o", "--output", type=Path, metavar="FILE",
                        help="write to FILE (complete or not at all) instead of stdout")
    parser.add_argument("--progress", action="store_true",
                        help="show progress on stderr even when it is not a terminal")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        paths = find_stores(config.data_dir)
    except NoStores as exc:
        print(f"pvtap export: {exc}", file=sys.stderr)
        return 1
    if args.since and args.until and args.since >= args.until:
        print(f"pvtap export: --since {iso_utc(args.since)} is not before --until {iso_utc(args.until)}",
              file=sys.stderr)
        return 2
    filters: TimedFilters = {"since_ns": to_ns(args.since) if args.since else None,
                             "until_ns": to_ns(args.until) if args.until else None, **record_filters(args)}
    with ExitStack() as stack:
        stores = [stack.enter_context(LocalStore(p, readonly=True)) for p in paths]
        total = sum(store.count_records(**filters) for store in stores)
        if total == 0 and (unknown := unknown_names(stores, record_filters(args))):
            print(f"pvtap export: {unknown}", file=sys.stderr)
            return 2
        progress = Progress("exporting", total, enabled=Progress.wanted(args.progress))
        if args.output is None:
            write_export(stores, args.format, filters, sys.stdout, progress.advance)
            sys.stdout.flush()
        else:
            try:
                _write_file(args.output, lambda out: write_export(stores, args.format, filters, out, progress.advance))
            except OSError as exc:
                print(f"pvtap export: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
                return 1
        progress.finish()
    where = args.output or "stdout"
    print(f"exported {progress.done:,} records ({args.format}) to {where} in {progress.elapsed:.1f} s",
          file=sys.stderr)
    return 0


def write_export(stores: list[LocalStore], fmt: str, filters: Mapping[str, Any], out: TextIO,
                 advance: Callable[[], None] = lambda: None) -> None:
    """Write the records of `stores` matching `filters` (keyword arguments of LocalStore.records:
    since_ns, until_ns, measurements, devices, vendors; TimedFilters from the command line) to
    `out` in time order, in `fmt` (one of FORMATS); `pvtap web`'s download link uses it too."""
    records = heapq.merge(*(store.records(by_time=True, **filters) for store in stores),
                          key=lambda stored: (stored.record.time_ns, stored.id))
    write = _write_csv(stores, filters) if fmt == "csv" else _WRITERS[fmt]
    write(out, (s.record for s in records), advance)


Writer = Callable[[TextIO, Iterator[Record], Callable[[], None]], None]


def _write_lp(out: TextIO, records: Iterator[Record], advance: Callable[[], None]) -> None:
    for record in records:
        out.write(to_line(record) + "\n")
        advance()


def _write_json(out: TextIO, records: Iterator[Record], advance: Callable[[], None]) -> None:
    for record in records:
        out.write(json.dumps({"time": iso_utc(record.time), "time_ns": record.time_ns,
                              "measurement": record.measurement, "tags": dict(record.tags),
                              "fields": dict(record.fields)}, ensure_ascii=False) + "\n")
        advance()


_WRITERS: dict[str, Writer] = {"lp": _write_lp, "json": _write_json}


def _write_csv(stores: list[LocalStore], filters: Mapping[str, Any]) -> Writer:
    """A CSV writer whose columns are every tag and field key the export will contain."""
    tag_keys: set[str] = set()
    field_keys: set[str] = set()
    for store in stores:
        tags, fields = store.keys(**filters)
        tag_keys.update(tags)
        field_keys.update(fields)
    header = ["time", "measurement"]
    tag_columns = {k: _unique(k, "_tag", header) for k in sorted(tag_keys)}
    field_columns = {k: _unique(k, "_field", header) for k in sorted(field_keys)}

    def write(out: TextIO, records: Iterator[Record], advance: Callable[[], None]) -> None:
        writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        for record in records:
            row = {"time": iso_utc(record.time), "measurement": record.measurement}
            row.update((tag_columns[k], v) for k, v in record.tags.items())
            row.update((field_columns[k], _csv_value(v)) for k, v in record.fields.items())
            writer.writerow(row)
            advance()
    return write


def _unique(key: str, suffix: str, header: list[str]) -> str:
    name = key if key not in header else key + suffix
    header.append(name)
    return name


def _csv_value(value: FieldValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _write_file(path: Path, write: Callable[[TextIO], None]) -> None:
    """Write next to `path`, then rename: an interrupted export leaves no half file behind."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "w", encoding="utf-8", newline="") as out:
            write(out)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
