"""HTTP/1.x messages from one direction of a captured connection (Enphase reports over plain HTTP).

A passive splitter, not an HTTP implementation: it finds the start line and headers, takes the
body by Content-Length, chunked transfer coding, or (responses only) until the connection ends,
and hands back each message whole. h11 was the library to reach for, but it is built for an
endpoint: observing both directions would mean faking our half of every exchange to its state
machine. After a gap in the capture the message in progress is dropped and the splitter looks
for the next start line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024
_REQUEST_LINE = re.compile(rb"(?:GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH) \S+ HTTP/1\.[01]\r\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] \d{3}[^\r\n]*\r\n")


@dataclass(frozen=True, slots=True)
class Message:
    start_line: str
    headers: tuple[tuple[str, str], ...]
    body: bytes  # without the transfer coding (as mitmproxy's raw_content)
    time: float  # when its first byte was captured

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name.lower()), "")

    @property
    def method_and_target(self) -> tuple[str, str]:
        method, target, _ = self.start_line.split(" ", 2)
        return method, target

    @property
    def status(self) -> int:
        return int(self.start_line.split(" ", 2)[1])


class MessageSplitter:
    """Feed one direction's bytes; get whole messages. `responses` chooses the start line and
    the body rules. `dropped` counts messages lost to gaps or unparseable bytes."""

    def __init__(self, *, responses: bool) -> None:
        self.responses = responses
        self.dropped = 0
        self._buf = bytearray()
        self._time = 0.0
        self._lost = False  # after a gap or junk: skip to the next start line

    def feed(self, data: bytes, time: float) -> list[Message]:
        if not self._buf:
            self._time = time
        self._buf += data
        out: list[Message] = []
        try:
            while (message := self._next(final=False)) is not None:
                out.append(message)
                self._time = time  # what is left began in this chunk
        except ValueError:  # a chunk size that is not hex: not HTTP after all, or a gap hid it
            self.gap()
        return out

    def gap(self) -> None:
        """Bytes are missing here: whatever message was in progress cannot be completed."""
        if self._buf:
            self.dropped += 1
            self._buf.clear()
        self._lost = True

    def finish(self, time: float) -> list[Message]:
        """The connection ended: a response without a length ends here; anything else left is dropped."""
        message = self._next(final=True)
        if self._buf:
            self.dropped += 1
            self._buf.clear()
        return [message] if message is not None else []

    def _next(self, *, final: bool) -> Message | None:
        buf = self._buf
        start = _STATUS_LINE if self.responses else _REQUEST_LINE
        if self._lost or (buf and not start.match(buf)):
            found = start.search(buf)
            if found is None:
                if len(buf) > MAX_HEAD:
                    del buf[:-MAX_HEAD]
                self._lost = True
                return None
            del buf[:found.start()]
            self._lost = False
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self.gap()
            return None
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        headers = tuple((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
        message = Message(lines[0], headers, b"", self._time)
        body = self._body(message, end + 4, final)
        if body is None:
            return None
        content, consumed = body
        del buf[:consumed]
        return Message(message.start_line, headers, content, message.time)

    def _body(self, head: Message, at: int, final: bool) -> tuple[bytes, int] | None:
        """(body, bytes consumed through its end), or None while it is incomplete."""
        buf = self._buf
        if self.responses and (head.status < 200 or head.status in (204, 304)):
            return b"", at
        if "chunked" in head.header("Transfer-Encoding").lower():
            return _dechunk(buf, at)
        length = head.header("Content-Length")
        if length.isdigit():
            size = int(length)
            if size > MAX_BODY:
                self.gap()
                return None
            return (bytes(buf[at:at + size]), at + size) if len(buf) >= at + size else None
        if not self.responses:
            return b"", at
        return (bytes(buf[at:]), len(buf)) if final else None  # until the connection closes


def _dechunk(buf: bytearray, at: int) -> tuple[bytes, int] | None:
    body = bytearray()
    while True:
        line_end = buf.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(buf[at:line_end]).split(b";")[0].strip() or b"0", 16)
        at = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", at - 2)
            return (bytes(body), trailer_end + 4) if trailer_end >= 0 else None
        if len(buf) < at + size + 2:
            return None
        body += buf[at:at + size]
        at += size + 2
