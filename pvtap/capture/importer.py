"""Decoding a capture as if it had come through pvtap live.

Packets come in file order. TCP segments are put back into per-direction byte streams
(`tcp.HalfStream`); each connection's protocol is chosen by the server's port, else by its first
bytes; the streams then go through the same Tap (AlphaESS, FoxESS) the relay uses, or, for
Enphase reports over plain HTTP, are split into the request and response payloads the mitmproxy
addon would have made. Each payload is redacted, decoded and stored by the in-process ingest
(`IngestBatches`), with the capture's own timestamps. UDP datagrams to the FoxESS M1's ports
become the relay's "datagram" payloads. Each TCP connection ends with a `pvtap_connection`
record, as in the relay (listener "capture", policy "import"), with its gaps.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pvtap.capture.http import Message, MessageSplitter
from pvtap.capture.packets import ACK, FIN, RST, SYN, Datagram, Endpoint, Parsed, Segment
from pvtap.capture.tcp import Gap, HalfStream, Piece
from pvtap.decode import codec_for, stream_codec
from pvtap.decode.enphase import report_kind
from pvtap.ingest import Ingest
from pvtap.privacy import Privacy
from pvtap.records import DOWN, UP, Origin, RawPayload, Record, utc_from_unix

PROTOCOLS = ("alphaess", "foxess", "enphase")
#: server ports pvtap knows (TCP): the devices' cloud ports; 443 and 14431 are TLS (reported, not read)
TCP_PORTS = {7777: "alphaess", 10001: "foxess", 6666: "foxess", 14431: "foxess", 80: "enphase", 443: "enphase"}
#: the FoxESS M1's LAN broadcasts (ESP-MESH join_me_req, heartbeat)
UDP_PORTS = {6364: "foxess", 3334: "foxess"}
MEASUREMENT = "pvtap_connection"
BATCH = 500  # payloads per commit
MAX_OPEN = 256  # connections held before those that ended are finished


class IngestBatches:
    """Redacts each payload at once and archives and decodes them in batches: one commit for many
    payloads (the ingest engine's group commit), as the live ingest worker does. The one place
    here that knows the ingest engine. `flush()` at the end, and before reading the store."""

    def __init__(self, ingest: Ingest, size: int = BATCH) -> None:
        self.ingest = ingest
        self.size = size
        self._payloads: list[RawPayload] = []
        self._records: list[Record] = []

    def payload(self, raw: RawPayload) -> None:
        self._payloads.append(self.ingest.redact(raw))  # in order: a reply learns its connection's device
        if len(self._payloads) >= self.size:
            self.flush()

    def record(self, record: Record) -> None:
        """A record that needs no decoding (a connection record)."""
        self._records.append(record)

    def flush(self) -> None:
        if self._payloads or self._records:
            self.ingest.archive(self._payloads, self._records)
            self._payloads, self._records = [], []
        while self.ingest.decode_pending():
            pass


def endpoint(e: Endpoint) -> str:
    return f"[{e[0]}]:{e[1]}" if ":" in e[0] else f"{e[0]}:{e[1]}"


@dataclass
class Summary:
    packets: int = 0
    bytes: int = 0
    first: float | None = None
    last: float | None = None
    streams: Counter[str] = field(default_factory=Counter)  # decoded TCP connections by protocol
    skipped_streams: Counter[str] = field(default_factory=Counter)  # TCP connections not decoded, by reason
    datagrams: Counter[str] = field(default_factory=Counter)  # decoded UDP datagrams by protocol
    skipped_packets: Counter[str] = field(default_factory=Counter)  # by reason
    messages: int = 0  # Enphase HTTP requests and responses
    http_dropped: int = 0
    gaps: int = 0
    gap_bytes: int = 0
    retransmitted: int = 0
    out_of_order: int = 0


class Connection:
    """One TCP connection of the capture and its decode side."""

    def __init__(self, importer: Importer, number: int, client: Endpoint, server: Endpoint, time: float) -> None:
        self.importer = importer
        self.id = f"cap-{number}"
        self.client, self.server = client, server
        self.first = self.last = time
        self.halves = {UP: HalfStream(), DOWN: HalfStream()}
        self.bytes = {UP: 0, DOWN: 0}
        self.protocol: str | None = None
        self.skipped = ""  # why it is not decoded
        self.tap: Any = None
        self.http: dict[str, MessageSplitter] = {}
        self.requests: list[Message] = []
        self.messages = 0
        self.outcome = "capture_ended"
        self.fins: set[str] = set()
        self.client_isn: int | None = None
        privacy = importer.privacy
        self.initial_device = client[0] if privacy.keep_network_identity else ""

    @property
    def ended(self) -> bool:
        return self.outcome == "reset" or len(self.fins) == 2

    def direction(self, segment: Segment) -> str:
        return UP if segment.src == self.client else DOWN

    def segment(self, segment: Segment, time: float) -> None:
        self.last = time
        direction = self.direction(segment)
        other = DOWN if direction == UP else UP
        if segment.flags & RST:
            self.outcome = "reset"
        elif segment.flags & FIN and self.outcome != "reset":
            self.outcome = "closed"
            self.fins.add(direction)
        if segment.flags & ACK:  # what the other side sent and this one acknowledged
            self._deliver(other, self.halves[other].acknowledged(segment.ack, time))
        pieces = self.halves[direction].segment(segment.seq, segment.payload, time, syn=bool(segment.flags & SYN),
                                                fin=bool(segment.flags & FIN), missing=segment.missing)
        self._deliver(direction, pieces)

    def finish(self) -> None:
        for direction, half in self.halves.items():
            self._deliver(direction, half.finish(self.last))
        received = utc_from_unix(self.last)
        if self.tap is not None:
            self._submit(self.tap.finish(received))
        for direction, splitter in self.http.items():
            self._messages(direction, splitter.finish(self.last))
        self._record()

    # -- the decode side -------------------------------------------------------------------

    def _deliver(self, direction: str, pieces: list[Piece]) -> None:
        for piece in pieces:
            if isinstance(piece, Gap):
                if direction in self.http:
                    self.http[direction].gap()
                continue  # the framers resync on their own; a frame cut by the gap fails its CRC
            self.bytes[direction] += len(piece.data)
            if self.protocol is None and not self.skipped:
                self._choose(direction, piece.data)
            if self.skipped or (self.tap is not None and self.tap.opaque):
                continue
            if self.tap is not None:
                self._submit(self.tap.feed(direction, piece.data, utc_from_unix(piece.time)))
            elif direction in self.http:
                self._messages(direction, self.http[direction].feed(piece.data, piece.time))

    def _choose(self, direction: str, first: bytes) -> None:
        port = self.server[1]
        protocol = self.importer.tcp_ports.get(port)
        if first[:2] == b"\x16\x03":
            self.skipped = f"TLS on port {port}: encrypted, cannot be read from a capture (pvtap decodes it live)"
            return
        if protocol is None:
            protocol = _by_content(first)
        if protocol == "enphase" and not (direction == UP and first.split(b" ", 1)[0].isalpha()):
            self.skipped = f"port {port}: not plain HTTP"
            return
        if protocol is None:
            self.skipped = f"unknown protocol on port {port} (first bytes {first[:8].hex()})"
            return
        self.protocol = protocol
        if protocol == "enphase":
            self.http = {UP: MessageSplitter(responses=False), DOWN: MessageSplitter(responses=True)}
        else:
            stream = stream_codec(codec_for(protocol))
            if stream is None:
                self.skipped = f"the {protocol} decoder frames no streams"
                return
            self.tap = stream.Tap(Origin(protocol, device=self.initial_device, connection=self.id))

    def _submit(self, payloads: list[RawPayload]) -> None:
        for raw in payloads:
            self.importer.store(raw)

    def _messages(self, direction: str, messages: list[Message]) -> None:
        for message in messages:
            if direction == UP:
                self.requests.append(message)
                raw = self._enphase_payload(message, message, UP)
            else:
                request = self.requests.pop(0) if self.requests else None
                raw = self._enphase_payload(request, message, DOWN) if request else None
            if raw is not None:  # a report or its answer; other HTTP traffic is not stored
                self.messages += 1
                self.importer.store(raw)

    def _enphase_payload(self, request: Message, message: Message, direction: str) -> RawPayload | None:
        """The payload the mitmproxy addon makes of a POST to /emu_reports/ (None for other traffic)."""
        method, target = request.method_and_target
        path, _, query = target.partition("?")
        kind = report_kind(path)
        if method != "POST" or kind is None:
            return None
        meta: dict[str, str | int | bool] = {"method": method, "host": request.header("Host").rpartition(":")[0]
                                             or request.header("Host"), "path": path, "query": query,
                                             "content_type": message.header("Content-Type")}
        if direction == DOWN:
            meta["status_code"] = message.status
            kind = f"{kind}_response"
        return RawPayload(Origin("enphase", device="", connection=self.id, direction=direction), kind, message.body,
                          utc_from_unix(message.time), meta)

    def _record(self) -> None:
        summary = self.importer.summary
        for half in self.halves.values():
            summary.gaps += half.gaps
            summary.gap_bytes += half.gap_bytes
            summary.retransmitted += half.retransmitted
            summary.out_of_order += half.out_of_order
        summary.messages += self.messages
        summary.http_dropped += sum(s.dropped for s in self.http.values())
        if self.protocol and not (self.tap is not None and self.tap.opaque):
            summary.streams[self.protocol] += 1
        else:
            reason = self.skipped or (f"{self.protocol} on port {self.server[1]} is not {self.protocol} framing"
                                      if self.protocol else "no payload")
            summary.skipped_streams[reason.partition(" (first bytes")[0]] += 1
        self.importer.store_record(self._connection_record())

    def _connection_record(self) -> Record:
        privacy = self.importer.privacy
        tap_device = getattr(getattr(self.tap, "origin", None), "device", "")
        device = privacy.serial(tap_device) if tap_device and tap_device != self.initial_device else ""
        up, down = self.halves[UP], self.halves[DOWN]
        fields: dict[str, int | float | str | bool] = {
            "bytes_up": self.bytes[UP], "bytes_down": self.bytes[DOWN],
            "frames": int(getattr(self.tap, "frames", 0)) + self.messages,
            "rejected": int(getattr(self.tap, "rejected", 0)),
            "gaps": up.gaps + down.gaps, "gap_bytes": up.gap_bytes + down.gap_bytes,
            "retransmitted_bytes": up.retransmitted + down.retransmitted,
            "out_of_order": up.out_of_order + down.out_of_order,
            "opaque": bool(getattr(self.tap, "opaque", False)), "duration_s": round(self.last - self.first, 6),
            "upstream": endpoint(self.server), "capture": self.importer.name,
        }
        if self.skipped:
            fields["detail"] = self.skipped
        if privacy.keep_network_identity:
            fields["peer"] = endpoint(self.client)
        tags = {"protocol": self.protocol or "unknown", "listener": "capture", "policy": "import",
                "action": "import" if self.protocol and not self.skipped else "skipped", "outcome": self.outcome}
        return Record(MEASUREMENT, utc_from_unix(self.first), tags, fields,
                      Origin(protocol=self.protocol or "unknown", device=device, connection=self.id))


class Importer:
    """Feeds a capture's packets (`packet`), then `finish()`; counts in `summary`.

    `store` takes each payload (redact, decode, store), `store_record` each connection record;
    `tcp_ports`/`udp_ports` map server ports to protocols (the defaults plus --port)."""

    def __init__(self, *, store: Callable[[RawPayload], object], store_record: Callable[[Record], object],
                 privacy: Privacy, name: str = "", ports: dict[int, str] | None = None) -> None:
        self.store = store
        self.store_record = store_record
        self.privacy = privacy
        self.name = name
        self.tcp_ports = {**TCP_PORTS, **(ports or {})}
        self.udp_ports = {**UDP_PORTS, **{p: proto for p, proto in (ports or {}).items() if proto == "foxess"}}
        self.summary = Summary()
        self._connections: dict[tuple[Endpoint, Endpoint], Connection] = {}
        self._finished: OrderedDict[tuple[Endpoint, Endpoint], None] = OrderedDict()  # recently, by sweep
        self._opened = 0

    def packet(self, time: float, size: int, parsed: Parsed) -> None:
        s = self.summary
        s.packets += 1
        s.bytes += size
        s.first = time if s.first is None else min(s.first, time)
        s.last = time if s.last is None else max(s.last, time)
        if isinstance(parsed, Segment):
            self._segment(parsed, time)
        elif isinstance(parsed, Datagram):
            self._datagram(parsed, time)
        else:
            s.skipped_packets[parsed.reason] += 1

    def finish(self) -> Summary:
        for connection in self._connections.values():
            connection.finish()
        self._connections.clear()
        return self.summary

    def _segment(self, segment: Segment, time: float) -> None:
        key = (min(segment.src, segment.dst), max(segment.src, segment.dst))
        connection = self._connections.get(key)
        opening = segment.flags & (SYN | ACK) == SYN
        if connection is not None and opening and connection.client_isn != segment.seq:
            connection.finish()  # the ports were used again: a new connection
            connection = None
        if connection is None and not opening and not segment.payload and key in self._finished:
            return  # the last ACK of a connection already finished
        if connection is None:
            client, server = self._roles(segment)
            self._opened += 1
            connection = Connection(self, self._opened, client, server, time)
            if opening:
                connection.client_isn = segment.seq
            self._connections[key] = connection
        connection.segment(segment, time)
        if connection.ended and len(self._connections) > MAX_OPEN:
            self._sweep()

    def _sweep(self) -> None:
        """Finish the connections that ended (their last ACKs, if any, have come by now), so a
        capture of many connections needs memory for the open ones only."""
        for key, connection in list(self._connections.items()):
            if connection.ended:
                connection.finish()
                del self._connections[key]
                self._finished[key] = None
                while len(self._finished) > 4 * MAX_OPEN:
                    self._finished.popitem(last=False)

    def _roles(self, segment: Segment) -> tuple[Endpoint, Endpoint]:
        """(client, server): who sent the SYN; else the side on a known port; else the lower port."""
        if segment.flags & SYN:
            return (segment.src, segment.dst) if not segment.flags & ACK else (segment.dst, segment.src)
        if segment.dst[1] in self.tcp_ports and segment.src[1] not in self.tcp_ports:
            return segment.src, segment.dst
        if segment.src[1] in self.tcp_ports and segment.dst[1] not in self.tcp_ports:
            return segment.dst, segment.src
        return (segment.src, segment.dst) if segment.dst[1] <= segment.src[1] else (segment.dst, segment.src)

    def _datagram(self, datagram: Datagram, time: float) -> None:
        port = datagram.dst[1]
        protocol = self.udp_ports.get(port)
        if protocol is None:
            self.summary.skipped_packets[f"UDP to port {port} (no decoder for it)"] += 1
            return
        device = datagram.src[0] if self.privacy.keep_network_identity else ""
        origin = Origin(protocol=protocol, device=device, connection=f"udp-{port}", direction=UP)
        self.summary.datagrams[protocol] += 1
        self.store(RawPayload(origin, "datagram", datagram.payload, utc_from_unix(time), {"port": port}))


def _by_content(first: bytes) -> str | None:
    if first[:2] in (b"\x01\x01", b"\x01\x02"):
        return "alphaess"
    if first[:2] in (b"\x7e\x7e", b"\x7f\x7f"):
        return "foxess"
    if b" /emu_reports/" in first[:64]:
        return "enphase"
    return None
