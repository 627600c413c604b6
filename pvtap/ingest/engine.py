"""The ingest engine: redaction, the raw archive and decoding, the same for every producer.

Raw first. A payload is redacted and archived (`archive`, one group commit for many payloads),
and decoding follows the archive with its own cursor (`decode_pending`: records, decode errors
and the cursor in one transaction). So an overload or a stop costs decode latency, never data:
what is archived and not decoded yet is decoded by the next `decode_pending`, in this process
or after a restart.

The engine has no threads and no transport. The ingest worker (pvtap/ingest/worker.py) drives
it from its archive and decode threads (archive.py, decoding.py), fed by the relay and the addon
through a channel; `Ingest(store, privacy).process(raw)` does all of it for one payload,
synchronously (replay, import, tests). A decoder exception is logged with the payload's origin and kept with the
payload for a later `pvtap replay`; a payload that cannot be redacted is withheld like any bytes
a codec cannot vouch for (pvtap/decode/withhold.py: size, SHA-256 and the reason only, unless
privacy.keep_unredacted).

What the live path read of a payload (`RawPayload.parsed`: the Tap's frame, the redacted
report's tree) is kept by raw id from archiving until decoding (`LiveReadings`, bounded), so
the decoder, which reads the payload back from the archive, need not parse its bytes again;
a payload whose reading is not kept (over the bound, or archived before a restart) is decoded
from its bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from pvtap.decode import Codec, codec_for
from pvtap.decode.withhold import is_withheld, withhold
from pvtap.privacy import Privacy
from pvtap.records import Origin, Parsed, RawPayload, Record
from pvtap.store.local import Decoded, LocalStore, StoredRaw

log = logging.getLogger("pvtap.ingest")

#: payloads decoded per transaction, at most; and at most this long (a group commit by count and age)
DECODE_BATCH = 500
DECODE_BUDGET_S = 0.25
_KNOWN_CONNECTIONS = 4096  # connections whose device is remembered for their later payloads

Codecs = Callable[[str], Codec]

#: readings kept for payloads archived and not decoded yet: at most this many, of this many
#: payload bytes (a reading takes a few times its payload's memory; a report's tree some ten)
LIVE_READINGS = 8192
LIVE_READINGS_BYTES = 4 * 2**20


class LiveReadings:
    """The live path's readings of archived payloads, by raw id, until the decoder takes them.
    Bounded: past the bound the oldest go (their payloads are decoded from their bytes). The
    archiver thread keeps, the decoder thread takes."""

    def __init__(self, limit: int = LIVE_READINGS, limit_bytes: int = LIVE_READINGS_BYTES) -> None:
        self.limit, self.limit_bytes = limit, limit_bytes
        self.bytes = 0
        self._by_id: OrderedDict[int, Parsed] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, ids: Sequence[int], raws: Sequence[RawPayload]) -> None:
        with self._lock:
            for raw_id, raw in zip(ids, raws):
                if raw.parsed is not None and raw.parsed.source == raw.payload:
                    self._by_id[raw_id] = raw.parsed
                    self.bytes += len(raw.payload)
            while self._by_id and (len(self._by_id) > self.limit or self.bytes > self.limit_bytes):
                self.bytes -= len(self._by_id.popitem(last=False)[1].source)

    def take(self, raw: RawPayload, raw_id: int) -> RawPayload:
        """`raw` (read back from the archive) with its live reading, when one is kept."""
        with self._lock:
            parsed = self._by_id.pop(raw_id, None)
            if parsed is None:
                return raw
            self.bytes -= len(parsed.source)
        return RawPayload(raw.origin, raw.kind, raw.payload, raw.received, raw.meta, parsed)

    def forget(self, upto_id: int) -> None:
        """Drop the readings of payloads up to `upto_id` (decoded, or skipped)."""
        with self._lock:
            while self._by_id:
                raw_id, parsed = next(iter(self._by_id.items()))
                if raw_id > upto_id:
                    return
                del self._by_id[raw_id]
                self.bytes -= len(parsed.source)

    def __len__(self) -> int:
        return len(self._by_id)


@dataclass
class IngestCounts:
    stored_raw: int = 0  # payloads archived
    records: int = 0  # records decoded (connection records not included)
    decoded: int = 0  # payloads decoded
    decode_errors: int = 0
    redact_errors: int = 0  # payloads kept as size + hash because redaction failed
    by_kind: dict[str, int] = field(default_factory=dict)


class Ingest:
    """Redacts and archives payloads, and decodes the archive after its cursor, into one store."""

    def __init__(self, store: LocalStore, privacy: Privacy | None = None, *, codecs: Codecs | None = None) -> None:
        self.store = store
        self.privacy = privacy or Privacy()
        self.codecs = codecs or codec_for
        self.counts = IngestCounts()
        self.readings = LiveReadings()
        self._devices: OrderedDict[tuple[str, str], str] = OrderedDict()

    def process(self, raw: RawPayload) -> int:
        """Redact, archive and decode one payload now; returns its raw id. Anything archived
        before it and not decoded yet is decoded too (the cursor moves in order)."""
        (raw_id,) = self.archive([self.redact(raw)])
        while self.store.decode_cursor() < raw_id and self.decode_pending():
            pass
        return raw_id

    # -- archiving ---------------------------------------------------------------------------

    def redact(self, raw: RawPayload) -> RawPayload:
        """The payload as it may be stored. A payload that cannot name its device itself (a
        cloud reply) takes the device an earlier payload of its connection revealed."""
        raw = self._with_known_device(raw)
        try:
            safe = self.codecs(raw.origin.protocol).redact_raw(raw, self.privacy)
        except Exception as exc:  # never store (or log) what could not be redacted
            # Only the exception's type: its message may quote the unredacted bytes. The device may
            # be an unredacted serial and the meta may quote the bytes too (a query string): neither is
            # kept, unless privacy.keep_unredacted keeps everything in clear.
            self.counts.redact_errors += 1
            reason = f"redaction failed ({type(exc).__name__})"
            keep = self.privacy.keep_unredacted
            log.error("could not redact a %s %s payload (%s); %s", raw.origin.protocol, raw.kind, type(exc).__name__,
                      "keeping it in clear (privacy.keep_unredacted)" if keep else "storing only its size and SHA-256")
            return withhold(raw, reason, self.privacy, origin=replace(raw.origin, device=""),
                            meta=raw.meta if keep or is_withheld(raw) else {})  # a withheld one's is redacted
        self._remember_device(safe.origin)
        return safe

    def archive(self, safe: Sequence[RawPayload], records: Iterable[Record] = ()) -> list[int]:
        """Commit redacted payloads (and records that need no decoding) in one transaction."""
        ids = self.store.archive(safe, records)
        self.readings.keep(ids, safe)
        self.counts.stored_raw += len(ids)
        for raw in safe:
            self.counts.by_kind[raw.kind] = self.counts.by_kind.get(raw.kind, 0) + 1
        return ids

    # -- decoding ----------------------------------------------------------------------------

    def decode_pending(self, limit: int = DECODE_BATCH, budget_s: float = DECODE_BUDGET_S) -> int:
        """Decode archived payloads after the cursor, up to `limit` of them or `budget_s` seconds
        of decoding, and commit their records with the cursor in one transaction; returns how
        many payloads were decoded (0: nothing was waiting)."""
        pending = self.store.pending(limit)
        if not pending:
            return 0
        deadline = time.monotonic() + budget_s
        decoded = []
        for stored in pending:
            decoded.append(self.decode(stored))
            if time.monotonic() > deadline:
                break
        self.counts.records += self.store.commit_decoded(decoded, cursor=decoded[-1].raw_id)
        self.readings.forget(decoded[-1].raw_id)
        self.counts.decoded += len(decoded)
        return len(decoded)

    def decode(self, stored: StoredRaw) -> Decoded:
        raw = self.readings.take(stored.raw, stored.id)
        try:
            return Decoded(stored.id, self.codecs(raw.origin.protocol).decode_raw(raw))
        except Exception as exc:
            self.counts.decode_errors += 1
            error = f"{type(exc).__name__}: {exc}"
            log.warning("decode failed: %s %s from %s (connection %s, raw #%d kept): %s", raw.origin.protocol,
                        raw.kind, raw.origin.device or "?", raw.origin.connection or "-", stored.id, error)
            return Decoded(stored.id, [], error)

    # -- devices per connection ----------------------------------------------------------------

    def _with_known_device(self, raw: RawPayload) -> RawPayload:
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
