"""What the data commands (tail, devices, export, replay) share: finding the stores, reading
times given on the command line, writing times and values for people, and a progress line."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO, TypedDict

from pvtap.records import FieldValue, now_utc
from pvtap.store.local import SUFFIX, LocalStore, store_paths

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86_400, "w": 604_800}

TIME_HELP = ("ISO 8601 (2024-06-01, 2024-06-01T12:00:00Z, 2024-06-01T14:00+02:00; no offset means UTC) "
             "or an age such as 30m, 2h, 7d, 1w")


def add_record_filters(parser: argparse.ArgumentParser) -> None:
    """--measurement, --device and --vendor, each repeatable; `record_filters(args)` reads them."""
    parser.add_argument("--measurement", action="append", default=[], metavar="NAME",
                        help="only this measurement (repeat for several)")
    parser.add_argument("--device", action="append", default=[], metavar="SERIAL",
                        help="only records of this device, as `pvtap devices` names it (repeat for several)")
    parser.add_argument("--vendor", action="append", default=[], metavar="NAME",
                        help="only records of this vendor: alphaess, enphase, foxess (repeat for several)")


class RecordFilters(TypedDict):
    """Keyword arguments of LocalStore.records(), count_records() and keys()."""

    measurements: list[str]
    devices: list[str]
    vendors: list[str]


class TimedFilters(RecordFilters):
    since_ns: int | None
    until_ns: int | None


def record_filters(args: argparse.Namespace) -> RecordFilters:
    """The filters of add_record_filters."""
    return {"measurements": args.measurement, "devices": args.device, "vendors": args.vendor}


def unknown_names(stores: Iterable[LocalStore], filters: RecordFilters) -> str | None:
    """When a filter names something no store holds: which, and what there is instead (a typo
    must not look like "no data")."""
    wanted = {key: values for key, values in (("measurements", filters["measurements"]),
                                              ("devices", filters["devices"]), ("vendors", filters["vendors"]))
              if values}
    if not wanted:
        return None
    known: dict[str, set[str]] = {"measurements": set(), "devices": set(), "vendors": set()}
    for store in stores:
        known["measurements"].update(store.measurements())
        for summary in store.devices():
            known["vendors"].add(summary.protocol)
            if summary.device:
                known["devices"].add(summary.device)
    problems = []
    for key, values in wanted.items():
        missing = [v for v in values if v not in known[key]]
        if missing:
            singular = key.removesuffix("s")
            there = ", ".join(sorted(known[key])) or "none"
            problems.append(f"no record of {singular} {', '.join(map(repr, missing))}; {key} in the stores: {there}")
    return "; ".join(problems) or None


class NoStores(Exception):
    """The data directory holds no local store (or none of the requested ones)."""


def find_stores(data_dir: Path, names: list[str] | None = None) -> list[Path]:
    """The store files in `data_dir`, or only those named (`enphase` or `enphase.sqlite`)."""
    paths = store_paths(data_dir)
    if not paths:
        raise NoStores(f"no local store (*{SUFFIX}) in {data_dir}: nothing has been recorded there yet. "
                       "Point data_dir / PVTAP_DATA_DIR / --data-dir at the directory `pvtap run` writes to")
    if not names:
        return paths
    by_name = {p.stem: p for p in paths}
    wanted = [n.removesuffix(SUFFIX) for n in names]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise NoStores(f"no store named {', '.join(unknown)} in {data_dir}; stores there: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """A moment given on the command line: ISO 8601 or an age before `now` (`2h`, `7d`)."""
    match = _RELATIVE.match(text)
    if match:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
        return (now or now_utc()) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: use {TIME_HELP}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def iso_utc(moment: datetime) -> str:
    """`2024-06-01T12:00:00Z`, with fractions only when there are any."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def ago(seconds: float) -> str:
    """How long ago, in the unit a person would use."""
    if seconds < 0:
        return "in the future"
    if seconds < 60:
        return f"{int(seconds)} s ago"
    if seconds < 120 * 60:
        return f"{int(seconds // 60)} min ago"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86_400)} d ago"


def show_value(value: FieldValue) -> str:
    """A field value as a person reads it: strings quoted, so "12" and 12 differ."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


class Progress:
    """A throttled `done/total (pct) rate/s` line on stderr, redrawn in place; silent unless
    enabled (stderr is a terminal, or --progress)."""

    def __init__(self, label: str, total: int, *, enabled: bool, stream: TextIO | None = None,
                 every: float = 0.25) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.every = every
        self.done = 0
        self.started = time.monotonic()
        self._last_draw = self.started  # first draw after `every`: no rate from one sample

    @staticmethod
    def wanted(forced: bool) -> bool:
        return forced or sys.stderr.isatty()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and time.monotonic() - self._last_draw >= self.every:
            self._draw()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def finish(self) -> None:
        """Draw the final state and end the line, so the summary starts on a fresh one."""
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        self.stream.write(f"\r{self.label}: {self.done:,}/{self.total:,}{pct} {self.rate():,.0f}/s ")
        self.stream.flush()
