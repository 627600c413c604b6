"""The decode side of the relay's connections, run by the ingest worker: a Tap per connection.

The relay sends what it forwarded as it was read (OPEN, then CHUNKs in order, then CLOSE with
what only it knows: bytes, outcome, upstream, copies it had to drop). Here each connection's
Tap frames the copies into payloads, and on CLOSE its leftovers; the connection record is
completed with what only the Tap knows (frames, rejected bytes, the device, opaque) and logged,
one line per connection, and stored. A Tap that raises is logged once per connection and
counted; the relay never waits for any of it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from pvtap.decode import Tap, stream_codec
from pvtap.ingest.engine import Codecs
from pvtap.privacy import Privacy
from pvtap.records import DOWN, UP, Origin, RawPayload, Record, from_ns, now_utc, to_ns

log = logging.getLogger("proxy_tcp.connection")

MEASUREMENT = "pvtap_connection"


class Outcome(StrEnum):
    """How a relayed connection ended: its record's `outcome` tag (docs/relay.md lists them all)."""

    DEVICE_CLOSED = "device_closed"  # the device sent the first EOF
    CLOUD_CLOSED = "cloud_closed"  # the cloud did
    DEVICE_RESET = "device_reset"
    CLOUD_RESET = "cloud_reset"
    IDLE_TIMEOUT = "idle_timeout"
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    UPSTREAM_FAILED = "upstream_failed"
    REFUSED_NOT_REDIRECTED = "refused_not_redirected"
    REFUSED_SELF = "refused_self"
    DEVICE_TLS_FAILED = "device_tls_failed"
    SHUTDOWN = "shutdown"  # the relay stopped and closed it
    ERROR = "error"  # a relay bug ended it
    RELAY_GONE = "relay_gone"  # the relay process went away without closing it (the worker completes the record)


WARN_OUTCOMES = {Outcome.UPSTREAM_FAILED, Outcome.REFUSED_NOT_REDIRECTED, Outcome.REFUSED_SELF,
                 Outcome.DEVICE_TLS_FAILED, Outcome.FIRST_BYTE_TIMEOUT, Outcome.ERROR, Outcome.RELAY_GONE}


@dataclass
class ConnectionRecord:
    """What is known about a relayed connection when it ends: the relay fills in the first
    part, the Tap's side the counts after `frames`."""

    id: str
    protocol: str
    listener: str
    policy: str
    started: datetime
    peer: str
    upstream: str = ""  # where it was forwarded, or the cloud it could not reach
    action: str = ""  # forward, local or refused
    outcome: str = ""  # an Outcome's value once it ended
    detail: str = ""
    cloud_error: str = ""  # why auto answered locally
    bytes: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    dropped_copies: int = 0  # copies that never reached the Tap (the channel was full or down)
    answer_errors: int = 0
    duration: float = 0.0
    frames: int = 0
    rejected: int = 0
    decode_errors: int = 0
    opaque: bool = False
    device: str = ""  # the serial (or its pseudonym) once a frame revealed it

    def log_line(self) -> str:
        where = f" → {self.upstream}" if self.upstream else ""
        device = f" device {self.device}," if self.device else ""
        opaque = " OPAQUE (not this protocol; forwarded untouched)," if self.opaque else ""
        detail = f" ({self.detail})" if self.detail else ""
        if self.cloud_error:
            detail += f" [cloud unreachable: {self.cloud_error}]"
        return (f"{self.protocol} {self.id} {self.peer}{where} [{self.policy}: {self.action}] {self.outcome}{detail}"
                f" after {self.duration:.1f} s;{device}{opaque} up {self.bytes[UP]} B, down {self.bytes[DOWN]} B,"
                f" frames {self.frames}, rejected {self.rejected}, dropped copies {self.dropped_copies},"
                f" decode errors {self.decode_errors}")

    def to_record(self, store_peer: bool) -> Record:
        fields: dict[str, int | float | str | bool] = {
            "bytes_up": self.bytes[UP], "bytes_down": self.bytes[DOWN], "frames": self.frames,
            "rejected": self.rejected, "dropped_copies": self.dropped_copies, "decode_errors": self.decode_errors,
            "answer_errors": self.answer_errors, "opaque": self.opaque, "duration_s": round(self.duration, 3),
        }
        if self.upstream:
            fields["upstream"] = self.upstream
        if self.detail:
            fields["detail"] = self.detail
        if self.cloud_error:
            fields["cloud_error"] = self.cloud_error
        if store_peer:
            fields["peer"] = self.peer
        tags = {"protocol": self.protocol, "listener": self.listener, "policy": self.policy,
                "action": self.action, "outcome": self.outcome}
        return Record(MEASUREMENT, self.started, tags, fields,
                      Origin(protocol=self.protocol, device=self.device, connection=self.id))

    def to_wire(self) -> dict[str, Any]:
        # not dataclasses.asdict: its deep copy was a tenth of the relay's time per connection
        doc = {f.name: getattr(self, f.name) for f in _RECORD_FIELDS}
        doc["started"], doc["bytes"] = to_ns(self.started), dict(self.bytes)
        return doc

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> ConnectionRecord:
        return cls(**{**doc, "started": from_ns(doc["started"])})


_RECORD_FIELDS = dataclasses.fields(ConnectionRecord)


@dataclass
class _Connection:
    record: ConnectionRecord
    tap: Tap | None  # the protocol's Tap; None when it could not be made
    initial_device: str  # the device label the Tap started with (the peer address, when kept)
    tap_errors: int = 0
    seen: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})


class Connections:
    """The Taps of one channel's open connections (numbered by the relay)."""

    def __init__(self, privacy: Privacy, codecs: Codecs, on_opaque: Callable[[int], None]) -> None:
        self.privacy = privacy
        self.codecs = codecs
        self.on_opaque = on_opaque
        self.frames = 0
        self.tap_errors = 0
        self._open: dict[int, _Connection] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open(self, conn: int, record: ConnectionRecord, initial_device: str) -> None:
        try:
            codec = stream_codec(self.codecs(record.protocol))
            if codec is None:
                raise TypeError(f"the {record.protocol} decoder has no Tap")
            tap: Tap | None = codec.Tap(Origin(protocol=record.protocol, device=initial_device, connection=record.id))
        except Exception:
            log.exception("%s: the decoder could not start; its copies are not decoded (forwarding is unaffected)",
                          _label(record))
            tap = None
        state = _Connection(record, tap, initial_device, tap_errors=0 if tap is not None else 1)
        self._open[conn] = state

    def chunk(self, conn: int, direction: str, time_ns: int, data: bytes) -> list[RawPayload]:
        state = self._open.get(conn)
        if state is None:  # opened before this worker started: its copies cannot be framed from here
            return []
        state.seen[direction] += len(data)
        tap = state.tap
        if tap is None or getattr(tap, "opaque", False):
            return []
        try:
            payloads = tap.feed(direction, data, from_ns(time_ns))
        except Exception:
            self._tap_failed(state, "feed")
            return []
        self.frames += len(payloads)
        if getattr(tap, "opaque", False):
            self.on_opaque(conn)
        return payloads

    def close(self, conn: int, summary: ConnectionRecord | None) -> tuple[list[RawPayload], Record]:
        """The Tap's leftovers and the completed connection record (also logged). `summary` is
        the relay's part; None when the relay went away without saying how the connection ended."""
        state = self._open.pop(conn, None)
        if state is None:  # opened before this worker started (a restart): no Tap saw its copies
            assert summary is not None  # close_all() closes only open connections
            state = _Connection(summary, None, "")
        payloads: list[RawPayload] = []
        if state.tap is not None:
            try:
                payloads = state.tap.finish(now_utc())
            except Exception:
                self._tap_failed(state, "finish")
        r = summary or dataclasses.replace(state.record, outcome=Outcome.RELAY_GONE.value, bytes=dict(state.seen),
                                           detail="the relay stopped without closing it")
        tap = state.tap
        r.frames = int(getattr(tap, "frames", 0))
        r.rejected = int(getattr(tap, "rejected", 0))
        r.opaque = bool(getattr(tap, "opaque", False))
        r.decode_errors = state.tap_errors
        device = getattr(getattr(tap, "origin", None), "device", "")
        r.device = self.privacy.serial(device) if device and device != state.initial_device else ""
        log.log(logging.WARNING if r.outcome in WARN_OUTCOMES else logging.INFO, "%s", r.log_line())
        return payloads, r.to_record(store_peer=self.privacy.keep_network_identity)

    def close_all(self) -> tuple[list[RawPayload], list[Record]]:
        """The channel ended with connections still open (the relay died): finish them all."""
        payloads, records = [], []
        for conn in list(self._open):
            more, record = self.close(conn, None)
            payloads += more
            records.append(record)
        return payloads, records

    def _tap_failed(self, state: _Connection, what: str) -> None:
        state.tap_errors += 1
        self.tap_errors += 1
        if state.tap_errors == 1:
            log.exception("%s: the decoder raised in %s (forwarding is unaffected; later errors are counted)",
                          _label(state.record), what)
        else:
            log.debug("%s: the decoder raised again in %s", _label(state.record), what, exc_info=True)


def _label(record: ConnectionRecord) -> str:
    return f"{record.protocol} {record.id} {record.peer}"
