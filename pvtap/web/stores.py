"""Read-only connections to the local stores for the web view.

Each request opens the store files afresh (`mode=ro`), so a store that appears, is replaced or
grows while the page is open is simply read as it is now; SQLite's WAL lets the ingest worker
write meanwhile. Nothing here writes.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from pvtap.store.local import store_paths
from pvtap.store.schema import check_readable, has_table


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout=10000")
        check_readable(db, path)
        yield db
    finally:
        db.close()


def readable_stores(data_dir: Path) -> list[Path]:
    """The store files of a data directory that have a records table (a store being created
    appears whole, but a foreign *.sqlite file may not)."""
    found = []
    for path in store_paths(data_dir):
        try:
            with read_only(path) as db:
                if has_table(db, "records") and has_table(db, "raw"):
                    found.append(path)
        except sqlite3.Error:
            continue
    return found
