"""The relay's side of AlphaESS: the per-connection Tap and the local answerer.
"""

from __future__ import annotations

import dataclasses
import math
import re
from datetime import UTC, datetime
from typing import Any

from pvtap.records import DOWN, UP, Origin, RawPayload

from ..sampling import RejectedSample
from .bodies import FrameReading
from .framing import KNOWN_TYPES, PROTOCOL, REQUEST, SYNC, AlphaFrame, Framer, Garbage, ack_frame, frame_name
from .records import csv_rows, device_clock, first_device_time

# -- the relay's side -------------------------------------------------------------------------

_TLS_RECORD = re.compile(rb"\x16\x03[\x00-\x04]")


class Tap:
    """Decode side of one relayed connection (interface: `pvtap.decode` docstring).

    `feed(direction, data, received)` returns one RawPayload per complete frame (kind "frame",
    meta `frame` = "1-1-16" etc., `length`, and for frames carrying device times
    `clock_offset_s` / `clock`; the frame as read, a `FrameReading`, in `parsed`) or per run
    of rejected bytes (kind "garbage", meta `reason`).
    If the device's first two bytes are not `01 01` / `01 02` (e.g. a TLS ClientHello) the
    connection is `opaque`: one "opaque" payload holding the first 5 bytes (which `redact_raw`
    withholds), then nothing.
    `origin.device` becomes the real serial once a frame shows it (`redact_raw` pseudonymises
    it; apply `privacy.serial()` before logging it). Counts: `frames`, `unknown` (frames of
    undocumented types), `rejected` (bytes in no frame), `opaque_bytes`. Garbage runs are handed
    out as a bounded sample per connection (`pvtap.decode.sampling`; `rejected_sample.dropped`
    counts the runs beyond it).
    """

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.frames = 0
        self.unknown = 0
        self.rejected = 0
        self.opaque = False
        self.opaque_bytes = 0
        self._framers = {UP: Framer(), DOWN: Framer()}
        self._first: bytearray | None = bytearray()  # the device's first bytes, until two are seen
        self._min_lag: float | None = None
        self.rejected_sample = RejectedSample()
        self._origins: dict[str, Origin] = {}

    @property
    def buffered(self) -> int:
        """Bytes held for reassembly, both directions (bounded by the framers)."""
        return sum(f.buffered for f in self._framers.values())

    def feed(self, direction: str, data: bytes, received: datetime) -> list[RawPayload]:
        if self.opaque:
            self.opaque_bytes += len(data)
            return []
        if direction == UP and self._first is not None:  # is this AlphaESS at all?
            self._first += data
            if len(self._first) < 2:
                return []
            data, self._first = bytes(self._first), None
            if not SYNC.match(data):
                return [self._go_opaque(data[:5], len(data), received)]
        out = []
        framer = self._framers[direction]
        items = framer.feed(data)
        wires = iter(framer.wire)
        for item in items:
            if isinstance(item, Garbage):
                self.rejected += len(item.data)
                if self.rejected_sample.take(len(item.data)):
                    out.append(self._raw(direction, "garbage", item.data, received, {"reason": item.reason}))
            else:
                out.append(self._frame(direction, item, next(wires), received))
        return out

    def finish(self, received: datetime) -> list[RawPayload]:
        out = []
        if self._first:  # a single byte was all the device sent
            self.rejected += len(self._first)
            out.append(self._raw(UP, "partial", bytes(self._first), received, {"reason": "connection ended"}))
            self._first = None
        for direction, framer in self._framers.items():
            rest = framer.flush()
            if rest and not self.opaque:
                self.rejected += len(rest)
                out.append(self._raw(direction, "partial", rest, received,
                                     {"reason": "connection ended inside a frame"}))
        return out

    def _go_opaque(self, head: bytes, size: int, received: datetime) -> RawPayload:
        self.opaque = True
        self.opaque_bytes += size
        reason = "TLS handshake" if _TLS_RECORD.match(head) else "not AlphaESS framing"
        return self._raw(UP, "opaque", head, received, {"reason": reason})

    def _frame(self, direction: str, frame: AlphaFrame, wire: bytes, received: datetime) -> RawPayload:
        self.frames += 1
        type_ = frame.type
        if type_ not in KNOWN_TYPES:
            self.unknown += 1
        reading = FrameReading(wire, frame)
        meta: dict[str, Any] = {"frame": frame_name(frame.b1, type_), "length": len(frame.body)}
        try:  # a frame is kept whatever its body holds; serial and clock are extras
            body = None
            if type_ == 12:
                self._learn_serial(next((row.get("SN", "") for row in csv_rows(frame.body)), ""))
            elif (body := reading.json) is not None:  # the body's one parse, handed on in `reading`
                self._learn_serial(body.first.get("SN") or body.first.get("UserName"))
            if body is not None and (type_ == 16 or type_ == 5) and frame.b1 == REQUEST:
                self._learn_clock(body.first.get("Time"), received, meta)  # a realtime/extended sample
            elif (naive := first_device_time(reading)) is not None:
                meta.update(self._clock(naive))
        except (ValueError, OverflowError, OSError) as exc:  # absurd device dates
            meta["clock_error"] = str(exc)
        return self._raw(direction, "frame", wire, received, meta, reading)

    def _learn_clock(self, text: object, received: datetime, meta: dict[str, Any]) -> None:
        """A realtime or extended sample's lag counts towards the connection's clock offset."""
        clock = device_clock(text) if type(text) is str else None
        if clock is not None:
            lag = (received - clock[1]).total_seconds()
            if self._min_lag is None or lag < self._min_lag:
                self._min_lag = lag
            meta["clock_offset_s"] = math.floor(self._min_lag)
            meta["clock"] = "learned"

    def _clock(self, naive: datetime) -> dict[str, Any]:
        """The device-clock offset for a frame whose clock reading does not count towards it."""
        if self._min_lag is not None:
            return {"clock_offset_s": math.floor(self._min_lag), "clock": "learned"}
        host_utc = naive.astimezone(UTC).replace(tzinfo=None)  # naive = host local time
        return {"clock_offset_s": round((host_utc - naive).total_seconds()), "clock": "host-timezone"}

    def _learn_serial(self, serial: object) -> None:
        if type(serial) is str and serial and serial != self.origin.device:
            self.origin = dataclasses.replace(self.origin, device=serial)

    def _raw(self, direction: str, kind: str, payload: bytes, received: datetime, meta: dict[str, Any],
             reading: FrameReading | None = None) -> RawPayload:
        origin = self._origins.get(direction)
        if origin is None or origin.device != self.origin.device:  # made once per direction and device
            origin = self._origins[direction] = Origin(PROTOCOL, self.origin.device, self.origin.connection,
                                                       direction)
        return RawPayload(origin, kind, payload, received, meta, reading)


class LocalAnswerer:
    """Answers the device as the cloud would (policies `local` and `auto`): every device request
    (B1 = 1) gets `01 02 <B2> … {"Status":"Success"}`, like the fake AlphaESS server did, so the
    battery keeps streaming. Responses from the device (its 1-2-8 command acks) and garbage get
    no answer. The cloud's unprompted traffic (Resume, SetConfig) is not imitated: nothing needs
    back-filling when pvtap stores everything itself."""

    def __init__(self) -> None:
        self._framer = Framer()
        self.answered = 0

    def feed(self, data: bytes) -> bytes:
        answers = [ack_frame(item.type) for item in self._framer.feed(data)
                   if isinstance(item, AlphaFrame) and item.b1 == REQUEST]
        self.answered += len(answers)
        return b"".join(answers)

    def tick(self, now: float) -> bytes:
        return b""
