"""Bench: the local store's append rate at the ingest worker's group-commit sizes.

    .venv/bin/python bench/store.py [--records 50000] [--batches 100 500 2000]

Per batch size, in a temporary directory on the data disk (WAL, synchronous=FULL: every commit
is durable): records per second through `LocalStore.append` (what decoding commits: rows built
from Records, JSON tags and fields, the table's indexes) and raw payloads per second through
`LocalStore.archive` (what raw-first commits). The reference, measured in the same run, is bare
sqlite3 `executemany` of the same rows already encoded, into a table without indexes, with the
same durability: what SQLite itself costs. Records are AlphaESS realtime records (15 fields).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pvtap.records import Origin, RawPayload, Record
from pvtap.store.local import LocalStore
from pvtap.store.rows import RECORD_COLUMNS, record_row

ORIGIN = Origin("alphaess", "ALSIM0000000001", "c-1234abcd", "up")
INSERT = f"INSERT INTO records (raw_id, {RECORD_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)"


def records(n: int) -> list[Record]:
    t0 = datetime(2024, 3, 3, tzinfo=UTC)
    return [Record("alphaess_realtime", t0 + timedelta(seconds=10 * i), {"serial": "ALSIM0000000001"},
                   {"Ppv1": 100.0 + i, "Ppv2": 0.0, "PrealL1": 420.0, "PrealL2": 0.0, "PrealL3": 0.0, "PmeterL1": -4.0,
                    "PmeterL2": 0.0, "PmeterL3": 0.0, "PmeterDC": 0.0, "Pbat": 539.44, "Sva": 405.0, "VarAC": -669.0,
                    "VarDC": 96.0, "SOC": 38.0 + (i % 50) / 10, "device_time": "2024-03-03T22:05:21"}, ORIGIN)
            for i in range(n)]


def payloads(data: list[Record]) -> list[RawPayload]:
    meta: dict[str, str | int | float | bool | None] = {"frame": "1-1-16", "length": 250, "clock_offset_s": 0,
                                                        "clock": "learned"}
    return [RawPayload(r.origin, "frame", bytes(264), r.time, meta) for r in data]


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=50_000, help="records per measurement (default 50000)")
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 500, 2000],
                        help="records (payloads) per commit (default 100 500 2000)")
    parser.add_argument("--dir", type=Path, help="where the stores go (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (bench/all.py reads it)")
    args = parser.parse_args()
    n = args.records
    data = records(n)
    raws = payloads(data)
    rows = [(None, *record_row(r)) for r in data]
    out = []
    with tempfile.TemporaryDirectory(prefix="pvtap-store-", dir=args.dir) as tmp:
        for batch in args.batches:
            with LocalStore(Path(tmp) / f"append-{batch}.sqlite") as store:
                append = timed(lambda s=store, b=batch: [s.append(data[i:i + b]) for i in range(0, n, b)], n)
            with LocalStore(Path(tmp) / f"archive-{batch}.sqlite") as store:
                archive = timed(lambda s=store, b=batch: [s.archive(raws[i:i + b]) for i in range(0, n, b)], n)
            db = sqlite3.connect(Path(tmp) / f"bare-{batch}.sqlite", isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"CREATE TABLE records (id INTEGER PRIMARY KEY, raw_id INTEGER, {RECORD_COLUMNS})")

            def bare(db=db, b=batch) -> None:
                for i in range(0, n, b):
                    db.execute("BEGIN")
                    db.executemany(INSERT, rows[i:i + b])
                    db.execute("COMMIT")
            reference = timed(bare, n)
            db.close()
            out.append({"batch": batch, "append_records_s": append, "archive_payloads_s": archive,
                        "bare_sqlite_rows_s": reference})
            print(f"  {batch:>5} per commit: append {append:>9,.0f} records/s, archive {archive:>9,.0f} payloads/s, "
                  f"bare sqlite3 {reference:>9,.0f} rows/s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"records": n, "batches": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
