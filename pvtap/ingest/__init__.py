"""Ingest: what happens to a copy of the forwarded bytes, away from the forwarding path.

The engine (`engine`: redact, archive, decode; `Ingest(store, privacy).process(raw)` does all
three synchronously) and the worker process that drives it per store file (`worker`, its threads
`reader`, `archive`, `decoding` over `worker_state`, with `settings`, `outputs`, `framing`), the
messages between them (`wire`) and the forwarding process's end of the channel (`channel`, with
`channel_socket`, `outbox`, `lifecycle`; `pool` for N workers). Only the engine's names are
re-exported here: the worker is started as `python -m pvtap.ingest.worker`, so importing this
package must not import it.
"""

from pvtap.ingest.engine import Ingest, LiveReadings

__all__ = ["Ingest", "LiveReadings"]
