"""The decode-and-store worker that keeps decoding off the forwarding path.

The addon's hooks and the relay's taps call `Ingest.submit`, which never blocks: it puts the
copy on a bounded queue and returns. One background thread then redacts the payload, commits it
to the local store, decodes it and commits the records. A decoder exception is logged with the
payload's origin and counted; the raw payload stays in the store with the error, for a later
`pvtap replay`. When the queue is full the copy is dropped and counted, never waited for.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

from pvtap.decode import codec_for
from pvtap.privacy import REDACTED, Privacy
from pvtap.records import RawPayload
from pvtap.store.local import LocalStore

log = logging.getLogger("pvtap.ingest")

_STOP = object()


@dataclass
class IngestCounts:
    submitted: int = 0
    dropped: int = 0  # queue full: the copy was not stored (forwarding was not affected)
    stored_raw: int = 0
    records: int = 0
    decode_errors: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class Ingest:
    """One background thread that redacts, stores and decodes submitted payloads."""

    def __init__(self, store: LocalStore, privacy: Privacy | None = None, *, max_queue: int = 10_000) -> None:
        self.store = store
        self.privacy = privacy or Privacy()
        self.counts = IngestCounts()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None

    def start(self) -> "Ingest":
        self._thread = threading.Thread(target=self._run, name=f"pvtap-ingest-{self.store.path.stem}", daemon=True)
        self._thread.start()
        return self

    def submit(self, raw: RawPayload) -> bool:
        """Queue a copy for storing and decoding. Never blocks; False when it had to be dropped."""
        self.counts.submitted += 1
        try:
            self._queue.put_nowait(raw)
            return True
        except queue.Full:
            self.counts.dropped += 1
            log.error("ingest queue full (%d): dropped a %s %s copy; forwarding is unaffected",
                      self._queue.maxsize, raw.origin.protocol, raw.kind)
            return False

    def join(self) -> None:
        """Wait until everything submitted so far is stored."""
        self._queue.join()

    def stop(self, timeout: float = 10.0) -> None:
        """Store what is queued, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("ingest did not finish within %.0f s; %d copies still queued", timeout, self._queue.qsize())
        self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self.process(item)  # type: ignore[arg-type]
            except Exception:  # a bug here must not end the worker
                log.exception("ingest failed on a payload")
            finally:
                self._queue.task_done()

    def process(self, raw: RawPayload) -> int:
        """Redact, store, decode, store. Returns the raw payload's id. Runs on the worker thread
        (and directly from tests and `pvtap replay`)."""
        codec = codec_for(raw.origin.protocol)
        try:
            safe = codec.redact_raw(raw, self.privacy)
        except Exception as exc:  # never store what could not be redacted
            log.error("could not redact a %s %s payload (%s); storing it without its bytes",
                      raw.origin.protocol, raw.kind, exc)
            safe = RawPayload(raw.origin, raw.kind, b"", raw.received, {**raw.meta, "payload": REDACTED})
        raw_id = self.store.add_raw(safe)
        self.counts.stored_raw += 1
        self.counts.by_kind[safe.kind] = self.counts.by_kind.get(safe.kind, 0) + 1
        try:
            records = codec.decode_raw(safe)
        except Exception as exc:
            self.counts.decode_errors += 1
            message = f"{type(exc).__name__}: {exc}"
            self.store.set_decode_error(raw_id, message)
            log.warning("decode failed: %s %s from %s (connection %s, raw #%d kept): %s",
                        safe.origin.protocol, safe.kind, safe.origin.device or "?", safe.origin.connection or "-",
                        raw_id, message)
            return raw_id
        self.counts.records += self.store.append(records, raw_id=raw_id)
        return raw_id
