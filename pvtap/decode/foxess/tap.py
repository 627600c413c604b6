"""The relay's side of FoxESS: the per-connection Tap and the local answerer.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

from pvtap.records import DOWN, UP, Origin, RawPayload

from ..sampling import RejectedSample
from .framing import (
    BOOTSTRAP_ACKS,
    HEARTBEAT,
    HUB_HEARTBEAT,
    HUB_LOGIN,
    HUB_LOGIN_ACK,
    MODBUS_READ,
    MODBUS_WRITE,
    MODULE_INFO,
    OPAQUE_SAMPLE,
    PRODUCT_INFO,
    REALTIME,
    REGISTRATION,
    REPLY,
    Frame,
    FrameError,
    FrameReading,
    FrameSplitter,
    build_frame,
    hub_channel,
    parse_frame,
)
from .payloads import decode_module_info, decode_product_info, hub_login, parse_modbus, parse_registration
from .records import DECODERS

# -- the relay's decode side -------------------------------------------------------------------

def serial_in(frame: Frame) -> str:
    """The device serial a frame reveals ("" if none): 0x2A registration, H1 0x06, hub login."""
    try:
        if frame.function == REGISTRATION:
            return parse_registration(frame.payload).serial
        if frame.function == MODULE_INFO:
            return decode_module_info(frame.payload)[1]
        if hub_channel(frame) and frame.stamp & 0xFF == HUB_LOGIN:
            return hub_login(frame.payload)[0]
    except FrameError:
        pass
    return ""


class Tap:
    """The decode side of one relayed FoxESS connection (interface: pvtap.decode docstring).

    Counts: `frames`, `rejected` (bytes in no frame), `unknown` (frames of undocumented
    function codes; per code in `unknown_functions`). Runs of rejected bytes are handed out as a
    bounded sample per connection (`pvtap.decode.sampling`); `rejected_sample.dropped` counts
    the runs beyond it. The model a product-info frame names goes into the meta of the frames
    after it (`model`), so an M1/Q1 telemetry block knows whether it has four strings.
    Modbus requests are remembered by their stamp so the reply that echoes it carries the
    register and count (meta), which the reply itself does not. A frame's payload carries the
    frame as the splitter read it (`FrameReading`, in `parsed`).
    """

    MAX_PENDING = 256

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.serial = ""
        self.frames = 0
        self.rejected = 0
        self.opaque = False
        self.unknown = 0
        self.unknown_functions: dict[int, int] = {}
        self.model = ""
        self.rejected_sample = RejectedSample()
        self._origins = {UP: dataclasses.replace(origin, direction=UP),
                         DOWN: dataclasses.replace(origin, direction=DOWN)}
        self._splitters = {UP: FrameSplitter(), DOWN: FrameSplitter()}
        self._started: set[str] = set()
        self._pending: OrderedDict[int, tuple[int, int | None, int | None]] = OrderedDict()

    @property
    def buffered(self) -> int:
        """Bytes held for reassembly, both directions (bounded by the framers)."""
        return sum(f.buffered for f in self._splitters.values())

    def feed(self, direction: str, data: bytes, received: datetime) -> list[RawPayload]:
        if self.opaque or not data:
            return []
        if direction not in self._started:
            self._started.add(direction)
            if data[0] == 0x16 and data[1:2] in (b"", b"\x03"):  # a TLS record: not ours to read
                self.opaque = True
                return [RawPayload(dataclasses.replace(self.origin, direction=direction), "opaque",
                                   bytes(data[:OPAQUE_SAMPLE]), received, {"reason": "TLS handshake"})]
        out = []
        splitter = self._splitters[direction]
        items = splitter.feed(data)
        frames = iter(splitter.parsed)
        for kind, chunk in items:
            if kind == "frame":
                out.append(self._payload(direction, kind, chunk, received, next(frames)))
            elif self._sampled(chunk):
                out.append(self._payload(direction, kind, chunk, received))
        return out

    def finish(self, received: datetime) -> list[RawPayload]:
        out = []
        for direction, splitter in self._splitters.items():
            for kind, chunk in splitter.finish():
                if kind == "partial" or self._sampled(chunk):
                    out.append(self._payload(direction, kind, chunk, received))
        return out

    def _sampled(self, chunk: bytes) -> bool:
        """Counts rejected bytes; True when this run is within the connection's sample."""
        self.rejected += len(chunk)
        return self.rejected_sample.take(len(chunk))

    def _payload(self, direction: str, kind: str, chunk: bytes, received: datetime,
                 frame: Frame | None = None) -> RawPayload:
        meta: dict[str, str | int | float | bool | None] = {}
        if frame is not None:
            self.frames += 1
            if frame.function != REALTIME:  # telemetry names no serial or model and answers no request
                meta.update(self._inspect(frame))
        elif kind == "partial":
            self.rejected += len(chunk)
        if self.serial:
            meta["serial"] = self.serial
        if self.model:
            meta["model"] = self.model
        return RawPayload(self._origins[direction], kind, chunk, received, meta,
                          None if frame is None else FrameReading(chunk, frame))

    def _inspect(self, frame: Frame) -> dict[str, int]:
        if frame.function not in DECODERS:
            self.unknown += 1
            self.unknown_functions[frame.function] = self.unknown_functions.get(frame.function, 0) + 1
        serial = serial_in(frame)
        # The first serial names the device, except that an H-series inverter serial (0x06)
        # wins over its dongle's own (0x2A).
        if serial and serial != self.serial and (not self.serial or frame.function == MODULE_INFO):
            self.serial = serial
            self.origin = dataclasses.replace(self.origin, device=serial)
            self._origins = {d: dataclasses.replace(self.origin, direction=d) for d in (UP, DOWN)}
        if frame.function == PRODUCT_INFO:
            model = decode_product_info(frame.payload).get("model")
            if isinstance(model, str) and model:
                self.model = model
        if frame.function in (MODBUS_READ, MODBUS_WRITE):
            try:
                request = parse_modbus(frame)
            except FrameError:
                return {}
            self._pending[frame.stamp] = (request.function, request.register, request.count)
            while len(self._pending) > self.MAX_PENDING:
                self._pending.popitem(last=False)
        elif frame.function in (MODBUS_READ | REPLY, MODBUS_WRITE | REPLY) and frame.stamp in self._pending:
            function, register, count = self._pending.pop(frame.stamp)
            if register is not None:
                return {"request_function": function, "request_register": register, "request_count": count or 0}
        return {}


class LocalAnswerer:
    """Answers a FoxESS device as its cloud or hub would, when there is none.

    - M1 bootstrap: 0x2A → 0xAA `01 01 01 00 00`, 0x2C → 0xAC (empty), 0x2B → 0xAB `01`, stamped
      with the answerer's clock as the cloud does. Nothing else is needed for telemetry to flow.
    - Hub channel (TCP 6666): both logins are acknowledged with op 0x03 `05 00 00` on the same
      channel marker; heartbeats are mirrored byte for byte (the write-up's server).
    - H1/H3/KH dongles: no acknowledgement is documented; nothing is sent (a registration frame,
      if one comes, is acknowledged like the M1's) and the connection simply stays open.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._splitter = FrameSplitter()
        self._clock = clock

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for kind, chunk in self._splitter.feed(data):
            if kind == "frame":
                out += self._answer(parse_frame(chunk), chunk)
        return bytes(out)

    def tick(self, now: float) -> bytes:
        return b""

    def _answer(self, frame: Frame, raw: bytes) -> bytes:
        channel = hub_channel(frame)
        if channel and frame.stamp & 0xFF == HUB_LOGIN:
            return build_frame(HEARTBEAT, HUB_LOGIN_ACK, stamp=frame.stamp & ~0xFF | HUB_HEARTBEAT, family=frame.family)
        if channel and frame.stamp & 0xFF == HUB_HEARTBEAT:
            return raw
        if frame.function in BOOTSTRAP_ACKS:
            return build_frame(frame.function | REPLY, BOOTSTRAP_ACKS[frame.function],
                               stamp=int(self._clock()) & 0xFFFFFFFF, family=frame.family)
        return b""

