"""One direction of a captured TCP connection, put back in order.

A capture holds segments as they crossed the wire: retransmitted, overlapping, out of order, or
not at all (dropped by the capturing host, cut by the snap length, or begun before the capture
started). `HalfStream` turns them into the byte stream the receiver saw, as `Data` pieces (each
with the time of the packet that carried it) and `Gap` pieces where bytes are missing. Bytes are
never invented: a gap stays a gap, and what comes after it is delivered after it.

A gap is declared as soon as the capture proves the bytes will not come: the receiver
acknowledged past them, more than `MAX_PENDING` bytes wait behind them, or the stream ends.
Sequence numbers are 32-bit and wrap; offsets are taken modulo 2**32 around the next expected
byte, so streams longer than 4 GiB work as long as no segment is 2 GiB out of place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MOD = 1 << 32
HALF = 1 << 31
MAX_PENDING = 4 * 1024 * 1024  # out-of-order bytes kept waiting for a hole to fill


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes
    time: float


@dataclass(frozen=True, slots=True)
class Gap:
    size: int
    time: float


Piece = Data | Gap


def _delta(a: int, b: int) -> int:
    """a - b in sequence space: negative when a is before b."""
    d = (a - b) % MOD
    return d - MOD if d >= HALF else d


@dataclass
class HalfStream:
    """Reassembles one direction. Counts: `delivered`, `retransmitted` (bytes seen again),
    `out_of_order` (segments that came early), `gaps` and `gap_bytes`."""

    next_seq: int | None = None
    fin_seq: int | None = None
    delivered: int = 0
    retransmitted: int = 0
    out_of_order: int = 0
    gaps: int = 0
    gap_bytes: int = 0
    _pending: dict[int, Data] = field(default_factory=dict)  # seq → data that came early
    _pending_bytes: int = 0

    def segment(self, seq: int, payload: bytes, time: float, *, syn: bool = False, fin: bool = False,
                missing: int = 0) -> list[Piece]:
        """A captured segment; `missing`: payload bytes after `payload` that were not captured."""
        start = (seq + 1) % MOD if syn else seq
        if self.next_seq is None:
            self.next_seq = start  # the capture began here (or at the SYN)
        out: list[Piece] = []
        if fin:
            self.fin_seq = (start + len(payload) + missing) % MOD
        if payload:
            out += self._add(start, payload, time)
        if missing:  # cut by the snap length: the receiver got them, the capture did not
            out += self.acknowledged((start + len(payload) + missing) % MOD, time)
        return out

    def acknowledged(self, ack: int, time: float) -> list[Piece]:
        """The receiver acknowledged every byte before `ack`: what the capture lacks of them is a gap."""
        if self.next_seq is None:
            return []
        if self.fin_seq is not None and ack == (self.fin_seq + 1) % MOD:
            ack = self.fin_seq  # the FIN takes a sequence number, but no byte
        out: list[Piece] = []
        while _delta(ack, self.next_seq) > 0:
            following = self._first_pending()
            end = following if following is not None and _delta(following, ack) < 0 else ack
            if _delta(end, self.next_seq) > 0:
                out.append(self._gap(_delta(end, self.next_seq), time))
            out += self._drain()
        return out

    def finish(self, time: float) -> list[Piece]:
        """The end of the capture or connection: what still waits behind a hole comes after a gap."""
        out: list[Piece] = []
        while (following := self._first_pending()) is not None:
            assert self.next_seq is not None  # pending data implies a start
            if _delta(following, self.next_seq) > 0:
                out.append(self._gap(_delta(following, self.next_seq), self._pending[following].time))
            out += self._drain()
        return out

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    # -- internals ---------------------------------------------------------------------------

    def _add(self, start: int, payload: bytes, time: float) -> list[Piece]:
        assert self.next_seq is not None
        offset = _delta(start, self.next_seq)
        if offset < 0:  # (partly) seen before: keep only what is new
            old = min(-offset, len(payload))
            self.retransmitted += old
            payload, start = payload[old:], (start + old) % MOD
            if not payload:
                return []
            offset = 0
        if offset > 0:
            self.out_of_order += 1
            known = self._pending.get(start)
            if known is None or len(known.data) < len(payload):
                self._pending_bytes += len(payload) - (len(known.data) if known else 0)
                self._pending[start] = Data(payload, time)
            if self._pending_bytes <= MAX_PENDING:
                return []
            following = self._first_pending()
            assert following is not None
            return [self._gap(_delta(following, self.next_seq), time), *self._drain()]
        return [self._deliver(Data(payload, time)), *self._drain()]

    def _deliver(self, piece: Data) -> Data:
        assert self.next_seq is not None
        self.next_seq = (self.next_seq + len(piece.data)) % MOD
        self.delivered += len(piece.data)
        return piece

    def _gap(self, size: int, time: float) -> Gap:
        assert self.next_seq is not None
        self.next_seq = (self.next_seq + size) % MOD
        self.gaps += 1
        self.gap_bytes += size
        return Gap(size, time)

    def _drain(self) -> list[Piece]:
        """Deliver pending data that now starts at (or before) the next expected byte."""
        out: list[Piece] = []
        progress = True
        while progress and self._pending:
            progress = False
            assert self.next_seq is not None
            for start in list(self._pending):
                offset = _delta(start, self.next_seq)
                if offset > 0:
                    continue
                piece = self._pending.pop(start)
                self._pending_bytes -= len(piece.data)
                if -offset < len(piece.data):
                    if offset < 0:
                        self.retransmitted += -offset
                    out.append(self._deliver(Data(piece.data[-offset:], piece.time)))
                else:
                    self.retransmitted += len(piece.data)
                progress = True
        return out

    def _first_pending(self) -> int | None:
        if not self._pending or self.next_seq is None:
            return None
        base = self.next_seq
        return min(self._pending, key=lambda s: _delta(s, base))
