"""A stand-in for www.alphaess.com:7777: a real local TCP server speaking the AlphaESS protocol.

Tests and `pvtap demo` put the relay in front of this server instead of the real cloud, which is
never contacted. It answers like the cloud (`shared/reference/alphaess.md` §3): every device
request gets `01 02 <B2> … {"Status":"Success"}`, except the serial request 1-1-3, which gets the
full configuration 1-2-3 (with placeholder licence, address and phone, as the real one carries
real ones); the device's own answers (1-2-8) get none. After the login ack it sends a `Resume`
command (unless `resume=False`); `send_command()` sends any command on request. It records
every byte each connection received and sent, so a test can prove the relay forwarded both
directions unchanged.

    async with AlphaCloud() as cloud:          # binds 127.0.0.1, port 0
        ... connect to cloud.port ...
        await cloud.wait_for(lambda: len(cloud.frames("1-1-16")) >= 3)
        cloud.received, cloud.sent              # all connections joined, in order of connection
        cloud.sessions[0].received              # per connection (CloudSession)
        await cloud.send_command("SetConfig")   # to the newest open connection
        await cloud.disconnect_all()            # break every connection (the device reconnects)

Run it on its own: `python -m pvtap.simulate.alphaess_cloud --port 7777`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pvtap.decode.alphaess import REQUEST, RESPONSE, AlphaFrame, Framer, Garbage, ack_frame, encode_frame
from pvtap.simulate.alphaess import config_body


@dataclass
class CloudSession:
    """One accepted connection, with exactly the bytes that crossed it."""

    peer: str
    received: bytearray = field(default_factory=bytearray)
    sent: bytearray = field(default_factory=bytearray)
    frames: list[AlphaFrame] = field(default_factory=list)  # complete frames received, in order
    garbage: list[Garbage] = field(default_factory=list)
    open: bool = True
    writer: asyncio.StreamWriter | None = field(default=None, repr=False)


class AlphaCloud:
    """The stand-in cloud; an async context manager (or `await start()` / `await close()`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, resume: bool = True, resume_count: str = "5",
                 log: Callable[[str], None] | None = None) -> None:
        self.host, self.port = host, port
        self.resume, self.resume_count = resume, resume_count
        self.log = log or (lambda line: None)
        self.sessions: list[CloudSession] = []
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Condition()
        self._cmd_index = 10_000_001

    async def start(self) -> AlphaCloud:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.log(f"stand-in AlphaESS cloud listening on {self.host}:{self.port}")
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self.disconnect_all()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> AlphaCloud:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what happened --------------------------------------------------------------------

    @property
    def received(self) -> bytes:
        return b"".join(bytes(s.received) for s in self.sessions)

    @property
    def sent(self) -> bytes:
        return b"".join(bytes(s.sent) for s in self.sessions)

    def frames(self, name: str | None = None) -> list[AlphaFrame]:
        """Frames received over all connections, optionally only those named like `1-1-16`."""
        return [f for s in self.sessions for f in s.frames if name is None or f.name == name]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Until `predicate()` holds (checked whenever a frame arrives or a connection opens or
        closes); TimeoutError after `timeout` seconds."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    # -- acting ---------------------------------------------------------------------------

    async def send_command(self, command: str, **parameters: str) -> bytes:
        """Send a 1-1-8 command (e.g. `Resume`, Parameter1=..., Parameter2=...) on the newest open
        connection; returns the frame sent."""
        session = next((s for s in reversed(self.sessions) if s.open), None)
        if session is None:
            raise RuntimeError("no device is connected")
        body = {"CmdIndex": str(self._cmd_index), "Command": command, **parameters}
        self._cmd_index += 1
        frame = encode_frame(REQUEST, 8, json.dumps(body, separators=(",", ":")).encode())
        await self._send(session, frame)
        return frame

    async def disconnect_all(self) -> None:
        """Break every open connection (RST), as a cloud outage or network break would."""
        for session in self.sessions:
            if session.open and session.writer is not None:
                session.writer.transport.abort()

    # -- serving --------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        session = CloudSession(peer=f"{peer[0]}:{peer[1]}" if peer else "?", writer=writer)
        self.sessions.append(session)
        self.log(f"connection {len(self.sessions)} from {session.peer}")
        await self._notify()
        framer = Framer()
        try:
            while data := await reader.read(65536):
                session.received += data
                for item in framer.feed(data):
                    if isinstance(item, Garbage):
                        session.garbage.append(item)
                        self.log(f"← {len(item.data)} bytes of garbage ({item.reason})")
                        continue
                    session.frames.append(item)
                    self.log(f"← {item.name} ({len(item.body)} B)")
                    await self._answer(session, item)
                await self._notify()
        except (ConnectionError, OSError):
            pass
        finally:
            session.open = False
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self.log(f"connection from {session.peer} closed: {len(session.received)} bytes in, "
                     f"{len(session.sent)} out, {len(session.frames)} frames")
            await self._notify()

    async def _answer(self, session: CloudSession, frame: AlphaFrame) -> None:
        if frame.b1 == RESPONSE:  # the device answering a command
            return
        if frame.type == 3:
            try:
                serial = json.loads(frame.body).get("SN", "")
            except (ValueError, AttributeError):
                serial = ""
            body = {"Status": "Success", **config_body(serial), "GridCharge": False, "EmsLanguage": 0}
            await self._send(session, encode_frame(RESPONSE, 3, json.dumps(body, separators=(",", ":")).encode()))
            return
        await self._send(session, ack_frame(frame.type))
        if frame.type == 2 and self.resume:
            since = (datetime.now() - timedelta(minutes=10)).strftime("%Y/%m/%d %H:%M:%S")
            await self.send_command("Resume", Parameter1=since, Parameter2=self.resume_count)

    async def _send(self, session: CloudSession, frame: bytes) -> None:
        assert session.writer is not None
        session.writer.write(frame)
        session.sent += frame
        self.log(f"→ 1-{frame[1]}-{frame[2]} ({len(frame) - 9} B)")
        try:
            await session.writer.drain()
        except (ConnectionError, OSError):
            pass

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


async def _main(host: str, port: int, resume: bool) -> None:
    async with AlphaCloud(host, port, resume=resume, log=lambda line: print(f"alphaess-cloud: {line}", flush=True)):
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pvtap.simulate.alphaess_cloud",
                                     description="A stand-in AlphaESS cloud on a local port (acks, config, Resume).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7777, help="port (default 7777; 0 = any free port)")
    parser.add_argument("--no-resume", action="store_true", help="do not send Resume after a login")
    args = parser.parse_args()
    try:
        asyncio.run(_main(args.host, args.port, not args.no_resume))
    except KeyboardInterrupt:
        pass
