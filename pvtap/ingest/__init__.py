"""Ingest: what happens to a copy of the forwarded bytes, away from the forwarding path.

The engine (`engine`: redact, archive, decode; `Ingest(store, privacy).process(raw)` does all
three synchronously) and the worker process that drives it per store file, with the forwarding
process's end of its channel (`channel`, `pool`), the messages on it (`wire`) and the
connection framing (`framing`). Only the engine's names are re-exported here: the worker is
started as `python -m pvtap.ingest.worker`, so importing this package must not import it.
"""

from pvtap.ingest.engine import Codecs, Ingest, LiveReadings

__all__ = ["Codecs", "Ingest", "LiveReadings"]
