"""Helpers for the forwarder tests: records with every field type, configs, expected lines."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pvtap.config import InfluxConfig
from pvtap.records import Origin, Record
from pvtap.store.delivery import DeliveryLog
from pvtap.store.forwarder import Forwarder
from pvtap.store.local import LocalStore
from pvtap.store.writable import influx_line
from tests.waiting import wait_until as wait_until  # re-exported: the name its tests import

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def recent_t0() -> datetime:
    """A start time a day ago, for VictoriaMetrics (it refuses points far in the future)."""
    return (datetime.now(UTC) - timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
SERIAL = "SN-TEST-0001"  # placeholder, never a real serial


def make_records(n: int, start: int = 0, *, measurement: str = "inverter", serial: str = SERIAL,
                 tags: dict[str, str] | None = None, t0: datetime = T0) -> list[Record]:
    """`n` records one second apart (microseconds in the time, so ns precision matters), with a
    float, an integer, a boolean and a string field."""
    out = []
    for i in range(start, start + n):
        out.append(Record(
            measurement=measurement,
            time=t0 + timedelta(seconds=i, microseconds=123_456),
            tags={"serial": serial, "phase": "L1", **(tags or {})},
            fields={"p_w": 1000.0 + i / 4, "e_wh": 50_000 + i, "online": i % 3 != 0, "state": f"run {i % 5}"},
            origin=Origin("alphaess", serial),
        ))
    return out


def config(url: str, **overrides) -> InfluxConfig:
    """Fast settings for tests: small batches, short ages, short back-off."""
    base: dict[str, Any] = dict(url=url, token="test-token", org="-", bucket="pvtap", batch_size=100, batch_age_s=0.05,
                retry_initial_s=0.05, retry_max_s=0.2, timeout_s=2.0)
    base.update(overrides)
    return InfluxConfig(**base)


def expected_lines(records: list[Record]) -> list[str]:
    """The lines the forwarder must write for these records (fresh field-type memory)."""
    types: dict = {}
    new: dict = {}
    return [influx_line(r, types, new) for r in records]


def vm_expected(records: list[Record]) -> dict[tuple[str, tuple[tuple[str, str], ...], int], float]:
    """What VictoriaMetrics must hold for the numeric fields: {(measurement_field, tags, ms): value}."""
    out = {}
    for r in records:
        tags = tuple(sorted(r.tags.items()))
        for name, value in r.fields.items():
            if isinstance(value, str):
                continue
            out[(f"{r.measurement}_{name}", tags, r.time_ns // 1_000_000)] = float(value)
    return out


def vm_numeric(samples: dict, records: list[Record]) -> dict:
    """Only the numeric-field series of an export (strings arrive in VictoriaMetrics as 0)."""
    numeric = {f"{r.measurement}_{k}" for r in records for k, v in r.fields.items() if not isinstance(v, str)}
    return {k: v for k, v in samples.items() if k[0] in numeric}


@contextmanager
def forwarding(store: LocalStore | Path, cfg: InfluxConfig) -> Iterator[Forwarder]:
    forwarder = Forwarder(store, cfg).start()
    try:
        yield forwarder
    finally:
        forwarder.stop(4.0)


class Producer:
    """Appends records to a store from a thread, like the ingest worker, until stopped."""

    def __init__(self, store: LocalStore, per_tick: int = 10, tick_s: float = 0.05, start: int = 0,
                 t0: datetime = T0) -> None:
        self.store, self.per_tick, self.tick_s, self.t0 = store, per_tick, tick_s, t0
        self.next = start
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = make_records(self.per_tick, self.next, t0=self.t0)
            self.store.append(batch)
            self.records.extend(batch)
            self.next += self.per_tick
            self._stop.wait(self.tick_s)


def mark_delivered(path: Path, upto: int) -> None:
    """Move the cursor as if the server had accepted everything up to `upto`."""
    from pvtap.store.delivery import Item
    delivery = DeliveryLog(path)
    try:
        delivery.commit_records([Item.of(upto, make_records(1)[0])], [], "test")
    finally:
        delivery.close()
