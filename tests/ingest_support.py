"""The one place tests push payloads through "redact + decode + store" in-process.

The `core` branch is changing the ingest engine (raw first, a worker process); its synchronous
entry point `Ingest(store, privacy).process(raw)` stays, and this helper is the one call site to
adapt if it moves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from pvtap.ingest import Ingest
from pvtap.privacy import Privacy
from pvtap.records import RawPayload
from pvtap.store.local import LocalStore


@contextlib.contextmanager
def ingested(data_dir: Path, privacy: Privacy, payloads: Iterable[RawPayload]) -> Iterator[LocalStore]:
    """A real store in `data_dir` holding `payloads`, redacted, decoded and committed; open (its
    WAL still on disk) until the block ends."""
    store = LocalStore.for_process(data_dir, "test")
    try:
        ingest = Ingest(store, privacy)
        for raw in payloads:
            ingest.process(raw)
        yield store
    finally:
        store.close()
