"""The messages waiting for the ingest worker's socket, on the forwarding process's side.

Back-pressure lives here: copies are held within a budget in bytes and refused beyond it (the
channel drops and counts them; forwarding never waits), control messages within CONTROL_BYTES.
Sending takes as much as one non-blocking `sendmsg` does, without copying the chunks' bytes, and
remembers how far into the first message it got. When a worker dies, what it had not read is
sorted: the control messages wait for the next worker, the copies are dropped.
"""

from __future__ import annotations

import itertools
import socket
from collections import deque
from dataclasses import dataclass

from pvtap.ingest import wire
from pvtap.ingest.wire import Kind

#: control messages may go beyond the copies' budget by this much (a dead worker and many connections)
CONTROL_BYTES = 4 * 2**20
_IOV_MAX = 512


@dataclass
class Message:
    parts: list[bytes]
    size: int  # a copy: what the budget counts of it (its payload's bytes); control: the whole message
    control: bool

    @classmethod
    def of_control(cls, parts: list[bytes]) -> Message:
        return cls(parts, sum(len(p) for p in parts), True)

    @property
    def kind(self) -> int:
        return wire.HEADER.unpack_from(self.parts[0])[1]


class Outbox:
    """Messages in order, the first perhaps partly sent; copies bounded by `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.messages: deque[Message] = deque()
        self.offset = 0  # bytes of the first message already sent
        self.buffered = 0  # copies' bytes waiting
        self.control = 0  # control bytes waiting

    def __len__(self) -> int:
        return len(self.messages)

    def add_copy(self, parts: list[bytes], size: int) -> bool:
        """Queue a copy of `size` bytes; False when over the budget. A copy larger than the whole
        budget (not copied here: the caller holds it anyway) is taken when nothing else waits, and
        counts as half the budget, so the next ones pass."""
        budget = min(size, self.limit // 2) if size > self.limit else size
        if self.buffered + budget > self.limit and (self.buffered or budget == size):
            return False
        self.buffered += budget
        self.messages.append(Message(parts, budget, False))
        return True

    def add_control(self, parts: list[bytes], always: bool = False) -> bool:
        """Queue a control message; False when CONTROL_BYTES wait already (unless `always`)."""
        message = Message.of_control(parts)
        if not always and self.control + message.size > CONTROL_BYTES:
            return False
        self.control += message.size
        self.messages.append(message)
        return True

    def put_first(self, messages: list[Message]) -> None:
        """Control messages a new worker must read before anything else (SETTINGS, the OPENs)."""
        self.messages.extendleft(reversed(messages))
        self.control += sum(m.size for m in messages)
        self.offset = 0

    def send(self, sock: socket.socket) -> list[Message]:
        """One `sendmsg` of what waits; the messages it completed. Raises what `sendmsg` raises."""
        buffers: list[bytes | memoryview] = []
        for message in itertools.islice(self.messages, 0, _IOV_MAX // 4):
            buffers += message.parts
        skip = self.offset  # of the first message, already sent
        while skip:
            if skip >= len(buffers[0]):
                skip -= len(buffers.pop(0))
            else:
                buffers[0] = memoryview(buffers[0])[skip:]
                skip = 0
        return self._consume(sock.sendmsg(buffers[:_IOV_MAX]))

    def _consume(self, sent: int) -> list[Message]:
        done: list[Message] = []
        sent += self.offset
        while self.messages:
            message = self.messages[0]
            length = sum(len(p) for p in message.parts)
            if sent < length:
                self.offset = sent
                return done
            sent -= length
            done.append(self._pop())
        self.offset = 0
        return done

    def _pop(self) -> Message:
        message = self.messages.popleft()
        if message.control:
            self.control -= message.size
        else:
            self.buffered -= message.size
        return message

    def pop_half_sent(self) -> Message | None:
        """The first message when part of it was sent (to a worker that is gone: the next one
        cannot read the rest)."""
        if not (self.offset and self.messages):
            return None
        self.offset = 0
        return self._pop()

    def keep_for_next_worker(self) -> list[Message]:
        """The worker died: keep the control messages but SETTINGS and the OPENs (sent again to the
        next worker for the connections still open); the copies that are dropped are returned."""
        kept: deque[Message] = deque()
        dropped = []
        for message in self.messages:
            if message.control and message.kind not in (Kind.OPEN, Kind.SETTINGS):
                kept.append(message)
            elif message.control:
                self.control -= message.size
            else:
                self.buffered -= message.size
                dropped.append(message)
        self.messages = kept
        return dropped

    def clear(self) -> list[Message]:
        """At the end: everything goes; the copies among it are returned (a half-sent one too)."""
        dropped = [m for m in self.messages if not m.control]
        self.offset = 0
        self.messages.clear()
        self.buffered = self.control = 0
        return dropped
