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
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from pvtap.decode import codec_for
from pvtap.privacy import REDACTED, Privacy
from pvtap.records import Origin, RawPayload
from pvtap.store.local import LocalStore

log = logging.getLogger("pvtap.ingest")

_STOP = object()
_KNOWN_CONNECTIONS = 4096  # connections whose device is remembered for their later payloads


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
        self._devices: OrderedDict[tuple[str, str], str] = OrderedDict()

    def start(self) -> Ingest:
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
            if self.counts.dropped in (1, 10) or self.counts.dropped % 1000 == 0:  # no flood under overload
                log.error("ingest queue full (%d): %d copies dropped so far (latest: %s %s); forwarding is "
                          "unaffected", self._queue.maxsize, self.counts.dropped, raw.origin.protocol, raw.kind)
            return False

    def join(self) -> None:
        """Wait until everything submitted so far is stored."""
        self._queue.join()

    def stop(self, timeout: float = 10.0) -> bool:
        """Store what is queued, then end the thread. False when it is still working after
        `timeout`: the caller must then leave the store open (the thread still writes to it)."""
        if self._thread is None:
            return True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("ingest did not finish within %.0f s; %d copies still queued", timeout, self._queue.qsize())
            return False
        self._thread = None
        return True

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
        """Redact, decode, then store the payload and its records together. Returns the raw
        payload's id. Runs on the worker thread (and directly from tests)."""
        codec = codec_for(raw.origin.protocol)
        raw = self._with_known_device(raw)
        try:
            safe = codec.redact_raw(raw, self.privacy)
        except Exception as exc:  # never store (or log) what could not be redacted
            # Only the exception's type: its message may quote the unredacted bytes. The origin's
            # device may be an unredacted serial too.
            log.error("could not redact a %s %s payload (%s); storing it without its bytes",
                      raw.origin.protocol, raw.kind, type(exc).__name__)
            origin = replace(raw.origin, device="")
            safe = RawPayload(origin, raw.kind, b"", raw.received, {"payload": REDACTED})
        self._remember_device(safe.origin)
        records: list = []
        error = None
        try:
            records = codec.decode_raw(safe)
        except Exception as exc:
            self.counts.decode_errors += 1
            error = f"{type(exc).__name__}: {exc}"
        raw_id = self.store.add_raw(safe, error, records)
        self.counts.stored_raw += 1
        self.counts.by_kind[safe.kind] = self.counts.by_kind.get(safe.kind, 0) + 1
        self.counts.records += len(records)
        if error is not None:
            log.warning("decode failed: %s %s from %s (connection %s, raw #%d kept): %s",
                        safe.origin.protocol, safe.kind, safe.origin.device or "?", safe.origin.connection or "-",
                        raw_id, error)
        return raw_id

    def _with_known_device(self, raw: RawPayload) -> RawPayload:
        """A payload that cannot name its device itself (a cloud reply) takes the device an
        earlier payload of the same connection revealed (already redacted or pseudonymised)."""
        if raw.origin.device or not raw.origin.connection:
            return raw
        device = self._devices.get((raw.origin.protocol, raw.origin.connection))
        return replace(raw, origin=replace(raw.origin, device=device)) if device else raw

    def _remember_device(self, origin: Origin) -> None:
        if origin.device and origin.connection:
            self._devices[(origin.protocol, origin.connection)] = origin.device
            self._devices.move_to_end((origin.protocol, origin.connection))
            while len(self._devices) > _KNOWN_CONNECTIONS:
                self._devices.popitem(last=False)
