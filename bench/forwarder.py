"""Bench: the durable path (local store, then the forwarder) against influxdb-client's batching API.

    .venv/bin/python bench/forwarder.py [--records 50000] [--batch-size 1000]

Starts a real VictoriaMetrics (an /api/v2/write server) and, in one run, measures records per
second for:
  1. appending to the local store (SQLite, WAL, synchronous=FULL), 10 records per payload as the
     ingest worker commits them, and in one transaction of all records;
  2. the forwarder draining that store to the server (read, line protocol, POST, cursor commit);
  3. influxdb-client's batching WriteApi writing the same points straight to the server (memory
     only: what a crash loses), timed until close() returns with everything flushed;
  4. influxdb-client's synchronous API, one POST per batch, without a store (the forwarder's floor).
Counts in the server are checked after each phase, so a number is never from a lost write.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from influxdb_client import InfluxDBClient, WriteOptions, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS

from pvtap.config import InfluxConfig
from pvtap.records import Origin, Record
from pvtap.store.forwarder import Forwarder
from pvtap.store.lineprotocol import to_line
from pvtap.store.local import LocalStore
from tests.servers import VictoriaMetrics

FIELDS_PER_RECORD = 4  # numeric series per record in VictoriaMetrics


def records(n: int, measurement: str, t0: datetime) -> list[Record]:
    origin = Origin("alphaess", "SN-BENCH-0001")
    return [Record(measurement, t0 + timedelta(milliseconds=10 * i), {"serial": "SN-BENCH-0001", "phase": "L1"},
                   {"p_w": 1000.0 + i / 8, "e_wh": 50_000 + i, "soc": 40.5 + (i % 50) / 10, "online": i % 7 != 0},
                   origin) for i in range(n)]


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f} records/s  ({n} in {seconds:.2f} s)"


def wait_count(vm: VictoriaMetrics, measurement: str, expected: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = vm.count(f'{{__name__=~"{measurement}_.*"}}')
        if got >= expected or time.monotonic() > deadline:
            return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=50_000, help="records per phase (default 50000)")
    parser.add_argument("--batch-size", type=int, default=1000, help="records per write (default 1000)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (bench/all.py reads it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n, size = args.records, args.batch_size
    t0 = (datetime.now(UTC) - timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
    results: list[tuple[str, str]] = []
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pvtap-bench-") as tmp, VictoriaMetrics(tmp) as vm:
        tmp_path = Path(tmp)
        # 1. appends to the local store
        data = records(n, "bench_store", t0)
        store = LocalStore(tmp_path / "data" / "bench.sqlite")
        start = time.perf_counter()
        for i in range(0, n, 10):
            store.append(data[i:i + 10])
        figures["append_10"] = n / (time.perf_counter() - start)
        results.append(("append to local store, 10 records per commit", rate(n, time.perf_counter() - start)))
        one_tx = LocalStore(tmp_path / "data" / "one-tx.sqlite")
        start = time.perf_counter()
        one_tx.append(data)
        results.append(("append to local store, one commit", rate(n, time.perf_counter() - start)))
        one_tx.close()

        # 2. the forwarder drains the store
        config = InfluxConfig(url=vm.url, token="bench", org="-", bucket="pvtap", batch_size=size, batch_age_s=0.0)
        start = time.perf_counter()
        forwarder = Forwarder(store, config).start()
        assert forwarder.drain(600), "the forwarder did not drain"
        elapsed = time.perf_counter() - start
        forwarder.stop()
        got = wait_count(vm, "bench_store", n * FIELDS_PER_RECORD)
        assert got == n * FIELDS_PER_RECORD, f"server holds {got} samples, expected {n * FIELDS_PER_RECORD}"
        figures["forwarder"] = n / elapsed
        results.append((f"forwarder: store -> server, batches of {size}", rate(n, elapsed)))
        store.close()

        # 3. influxdb-client batching WriteApi, the same points straight to the server
        points = [{"measurement": "bench_batching", "tags": dict(r.tags), "fields": dict(r.fields),
                   "time": r.time_ns} for r in records(n, "bench_batching", t0)]
        with InfluxDBClient(url=vm.url, token="bench", org="-") as client:
            start = time.perf_counter()
            write_api = client.write_api(write_options=WriteOptions(batch_size=size, flush_interval=1000))
            for i in range(0, n, 10):
                write_api.write(bucket="pvtap", record=points[i:i + 10], write_precision=WritePrecision.NS)
            write_api.close()  # waits until every batch is written
            elapsed = time.perf_counter() - start
        got = wait_count(vm, "bench_batching", n * FIELDS_PER_RECORD)
        assert got == n * FIELDS_PER_RECORD, f"server holds {got} samples, expected {n * FIELDS_PER_RECORD}"
        figures["batching_write_api"] = n / elapsed
        results.append((f"influxdb-client batching WriteApi, batches of {size} (memory only)", rate(n, elapsed)))

        # 4. influxdb-client synchronous, one POST per batch, no store
        lines = [to_line(r) for r in records(n, "bench_sync", t0)]
        with InfluxDBClient(url=vm.url, token="bench", org="-") as client:
            write_api = client.write_api(write_options=SYNCHRONOUS)
            start = time.perf_counter()
            for i in range(0, n, size):
                write_api.write(bucket="pvtap", record="\n".join(lines[i:i + size]), write_precision=WritePrecision.NS)
            elapsed = time.perf_counter() - start
        got = wait_count(vm, "bench_sync", n * FIELDS_PER_RECORD)
        assert got == n * FIELDS_PER_RECORD
        figures["synchronous_prebuilt"] = n / elapsed
        results.append((f"influxdb-client synchronous, pre-built lines, batches of {size}", rate(n, elapsed)))

    width = max(len(name) for name, _ in results)
    print(f"{n} records, {FIELDS_PER_RECORD} numeric fields each, VictoriaMetrics {vm.url} on this machine")
    for name, figure in results:
        print(f"  {name:<{width}}  {figure}")
    if args.json:
        args.json.write_text(json.dumps({"records": n, "batch_size": size, **figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
