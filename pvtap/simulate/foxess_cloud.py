"""Stand-ins for the FoxESS cloud: real local servers speaking the 7E7E/7F7F protocol.

- `FoxCloud(tls=True)`: the M1 data channel (TCP 14431) — TLS with its own self-signed RSA
  certificate (`CN=monitor`, like the real cloud's); it acknowledges the M1 bootstrap with its
  own clock in the stamp, as the cloud does.
- `FoxCloud(tls=False, ack_bootstrap=False)`: the H-series endpoint (cleartext TCP 10001),
  which acknowledges nothing.

Either can send a tunnelled Modbus request (`CloudSession.modbus_read/modbus_write`) and wait
for the reply that echoes its stamp. Every application byte received and sent is kept per
session, so a test can prove the relay in between changed nothing. The real cloud is never
contacted. Run one on its own (the bench does, to keep it out of the measuring process):

    python -m pvtap.simulate.foxess_cloud --port 14431 [--plain] [--cert-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pvtap.certs import foxess_pair, sha256_fingerprint
from pvtap.decode import foxess
from pvtap.decode.foxess import Frame, FrameSplitter, build_frame, parse_frame

log = logging.getLogger("pvtap.simulate.foxess_cloud")


class CloudSession:
    """One device connection as the stand-in saw it."""

    def __init__(self, cloud: FoxCloud, writer: asyncio.StreamWriter) -> None:
        self.cloud = cloud
        self.writer = writer
        tls = writer.get_extra_info("ssl_object")
        self.tls = (tls.version(), tls.cipher()[0]) if tls is not None else None  # (version, cipher) or None
        self.received = bytearray()
        self.sent = bytearray()
        self.frames: list[Frame] = []
        self.closed = asyncio.Event()
        self._changed = asyncio.Condition()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        self.sent += data
        await self.writer.drain()

    async def wait_frame(self, match: Callable[[Frame], bool], timeout: float = 10.0) -> Frame:
        """The first received frame (so far or later) that `match`es."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                while True:
                    found = next((f for f in self.frames if match(f)), None)
                    if found is not None:
                        return found
                    if self.closed.is_set():
                        raise ConnectionError("the device closed the connection")
                    await self._changed.wait()

    async def wait_received(self, size: int, timeout: float = 10.0) -> None:
        """Until `size` bytes in total have arrived from the device."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                while len(self.received) < size:
                    if self.closed.is_set():
                        raise ConnectionError("the device closed the connection")
                    await self._changed.wait()

    async def modbus_read(self, register: int, count: int = 1, *, unit: int = 1, function: int = 0x03,
                          timeout: float = 10.0) -> Frame:
        """Send a 0x11 read request; return the 0x91 reply carrying the same stamp."""
        payload = bytes([unit, function]) + register.to_bytes(2, "big") + count.to_bytes(2, "big")
        return await self._modbus(foxess.MODBUS_READ, payload, timeout)

    async def modbus_write(self, register: int, value: int, *, unit: int = 1, timeout: float = 10.0) -> Frame:
        """Send a 0x12 write-single request; return the 0x92 echo."""
        payload = bytes([unit, 0x06]) + register.to_bytes(2, "big") + value.to_bytes(2, "big")
        return await self._modbus(foxess.MODBUS_WRITE, payload, timeout)

    async def _modbus(self, function: int, payload: bytes, timeout: float) -> Frame:
        stamp = next(self.cloud.stamps)
        await self.send(build_frame(function, payload, stamp=stamp, family=0x7F))
        return await self.wait_frame(lambda f: f.function == function | foxess.REPLY and f.stamp == stamp, timeout)

    async def _received(self, data: bytes, splitter: FrameSplitter) -> None:
        self.received += data
        async with self._changed:
            for kind, chunk in splitter.feed(data):
                if kind != "frame":
                    continue
                frame = parse_frame(chunk)
                self.frames.append(frame)
                if self.cloud.ack_bootstrap and frame.function in foxess.BOOTSTRAP_ACKS:
                    stamp = int(self.cloud.clock()) & 0xFFFFFFFF
                    await self.send(build_frame(frame.function | foxess.REPLY, foxess.BOOTSTRAP_ACKS[frame.function],
                                                stamp=stamp, family=frame.family))
            self._changed.notify_all()

    async def _ended(self) -> None:
        self.closed.set()
        async with self._changed:
            self._changed.notify_all()


class FoxCloud:
    """The stand-in server (`async with FoxCloud() as cloud`, or start()/close()); `sessions`
    fill as devices connect."""

    def __init__(self, *, tls: bool = True, ack_bootstrap: bool = True, cert_dir: str | Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.tls = tls
        self.ack_bootstrap = ack_bootstrap
        self.clock = clock
        self.sessions: list[CloudSession] = []
        self.stamps = itertools.count(0xE2000001)  # request stamps, each one answered by its echo
        self.fingerprint = ""
        self._context: ssl.SSLContext | None = None
        #: the temporary directory made here (and removed on close) when TLS needs one and none was given
        self._own_dir = Path(tempfile.mkdtemp(prefix="pvtap-foxess-cloud-")) if tls and cert_dir is None else None
        self.cert_dir = self._own_dir or cert_dir
        if tls:
            assert self.cert_dir is not None  # given, or made above
            cert, key = foxess_pair(self.cert_dir, "foxess-cloud")
            self.cert_path = cert
            self.fingerprint = sha256_fingerprint(cert.read_bytes())
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(cert, key)
        self._server: asyncio.Server | None = None
        self._new_session = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FoxCloud:
        self._server = await asyncio.start_server(self._serve, host, port, ssl=self._context)
        return self

    async def __aenter__(self) -> FoxCloud:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_session(self, index: int = 0, timeout: float = 10.0) -> CloudSession:
        async with asyncio.timeout(timeout):
            while len(self.sessions) <= index:
                self._new_session.clear()
                await self._new_session.wait()
        return self.sessions[index]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for session in self.sessions:
                session.writer.close()
            await self._server.wait_closed()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = CloudSession(self, writer)
        self.sessions.append(session)
        self._new_session.set()
        splitter = FrameSplitter()
        try:
            while data := await reader.read(65536):
                await session._received(data, splitter)
        except (OSError, ssl.SSLError) as exc:
            log.debug("stand-in cloud: session ended: %s", exc)
        finally:
            await session._ended()
            writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pvtap.simulate.foxess_cloud",
        description="Serve a stand-in for the FoxESS cloud until interrupted: TLS with a self-signed CN=monitor "
                    "certificate (the M1's port 14431) or cleartext (--plain, the H-series' port 10001). It "
                    "acknowledges the M1 bootstrap; it is never the real cloud.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    parser.add_argument("--plain", action="store_true", help="cleartext, and no bootstrap acknowledgements (H-series)")
    parser.add_argument("--cert-dir", type=Path,
                        help="where to write foxess-cloud.crt/.key (default: a temporary directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        cloud = await FoxCloud(tls=not args.plain, ack_bootstrap=not args.plain, cert_dir=args.cert_dir).start(
            args.host, args.port)
        # The first line is machine-readable: the bench and scripts wait for it.
        print(f"listening {args.host}:{cloud.port} sha256 {cloud.fingerprint or '-'}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await cloud.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
