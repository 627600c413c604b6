"""Helpers for the relay tests: a tiny test protocol, a collecting sink, a stand-in cloud and a
stand-in DNS server, all real sockets on 127.0.0.1 (ephemeral ports), and network namespaces.

The test protocol (`test_codec`) is injected into the relay in place of `pvtap.decode.codec_for`
so the pumps and policies are tested apart from any real protocol: its Tap turns every chunk it
is fed into one payload (and can be told to raise or to be slow), its LocalAnswerer answers
`ACK:<data>` and ticks `TICK` once. The relay's ingest worker runs in a thread of the test (the
same worker as in production, over the same socket protocol), so what the Tap made is in the
store's raw archive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
import re
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from proxy_tcp import relay_running
from pvtap.config import ListenerConfig
from pvtap.decode.alphaess import REQUEST, encode_frame
from pvtap.records import UP, Origin, RawPayload
from pvtap.simulate.alphaess import CSV_HEADER, _Battery
from pvtap.store.local import LocalStore
from tests.waiting import until

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"


# -- the test protocol ------------------------------------------------------------------------

class ChunkTap:
    """Every chunk fed becomes one payload of kind "chunk"; a device stream starting like TLS
    makes the connection opaque. Class attributes set by `test_codec` change its behaviour."""

    raise_on_feed = False
    feed_delay = 0.0
    feed_gate: threading.Event | None = None  # feed waits until it is set
    raise_on_start = False

    def __init__(self, origin: Origin) -> None:
        if self.raise_on_start:
            raise RuntimeError("decoder bug at start (test)")
        self.origin = origin
        self.frames = 0
        self.rejected = 0
        self.opaque = False
        self._seen_up = False

    def feed(self, direction: str, data: bytes, received) -> list[RawPayload]:
        if self.feed_delay:
            time.sleep(self.feed_delay)  # a slow decoder: the delay is the behaviour under test
        if self.feed_gate is not None:
            self.feed_gate.wait(30)
        if self.raise_on_feed:
            raise RuntimeError("decoder bug (test)")
        if direction == UP and not self._seen_up:
            self._seen_up = True
            if data.startswith(b"\x16\x03"):
                self.opaque = True
                return [RawPayload(dataclasses.replace(self.origin, direction=UP), "opaque", data[:5], received)]
        self.frames += 1
        if data.startswith(b"SN="):
            self.origin = dataclasses.replace(self.origin, device=data[3:].split(b";")[0].decode())
        return [RawPayload(dataclasses.replace(self.origin, direction=direction), "chunk", data, received)]

    def finish(self, received) -> list[RawPayload]:
        return []


class EchoAnswerer:
    """Answers `ACK:<what the device sent>`; ticks `TICK` once."""

    def __init__(self) -> None:
        self.ticked = False

    def feed(self, data: bytes) -> bytes:
        return b"ACK:" + data

    def tick(self, now: float) -> bytes:
        if self.ticked:
            return b""
        self.ticked = True
        return b"TICK"


def test_codec(**behaviour) -> SimpleNamespace:
    """A protocol module for the relay: `test_codec(raise_on_feed=True)`, `feed_delay=0.05`,
    `feed_gate=event` (feed waits for it), ... Its payloads are archived as they are and decode to nothing."""
    tap = type("ChunkTap", (ChunkTap,), behaviour)
    return SimpleNamespace(Tap=tap, LocalAnswerer=EchoAnswerer, redact_raw=lambda raw, privacy: raw,
                           decode_raw=lambda raw: [])


# not a test function (pytest collects it where it is imported); mypy allows no attributes on functions
test_codec.__test__ = False  # type: ignore[attr-defined]


def archived(store: LocalStore) -> list[RawPayload]:
    """The payloads in the store's raw archive, in order."""
    return [stored.raw for stored in store.raw_payloads()]


def stream(store: LocalStore, direction: str) -> bytes:
    """The bytes of one direction as the Tap got them (the test protocol's "chunk" payloads)."""
    return b"".join(p.payload for p in archived(store) if p.origin.direction == direction and p.kind == "chunk")


def listener(upstream: str = "", **settings) -> ListenerConfig:
    settings.setdefault("protocol", "alphaess")
    settings.setdefault("listen", "127.0.0.1:0")
    settings.setdefault("policy", "fixed" if upstream else "local")
    return ListenerConfig(upstream=upstream, **settings)


@contextlib.asynccontextmanager
async def running_relay(*listeners: ListenerConfig, store: LocalStore, codec=None, **kwargs):
    """A relay in this event loop with the test protocol and an ingest worker (a thread) writing
    `store`; yields (relay, port of the first listener). On the way out everything the relay
    copied is archived and the connection records are stored."""
    codec = codec or test_codec()
    async with relay_running(listeners, store=store, codecs=lambda _name: codec, **kwargs) as relay:
        yield relay, relay.listeners[0].endpoints[0].port


async def settled(relay, timeout: float = 10.0) -> None:
    """Until every connection the relay accepted so far has ended and handed its record to the
    ingest worker: awaits the connection tasks themselves."""
    async with asyncio.timeout(timeout):
        while tasks := [task for listener in relay.listeners for task in listener.connections]:
            await asyncio.wait(tasks)


# -- a stand-in cloud -------------------------------------------------------------------------

@dataclass
class CloudConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None


Handler = Callable[[CloudConnection], Awaitable[None]]


async def read_all(conn: CloudConnection) -> None:
    """Read until EOF into conn.received."""
    while data := await conn.reader.read(65536):
        conn.received += data


class StandInCloud:
    """A real TCP server on 127.0.0.1 standing in for a vendor cloud; `handler` decides what it
    does with each connection (default: read everything, then close)."""

    def __init__(self, handler: Handler = read_all, port: int = 0) -> None:
        self.handler = handler
        self.port = port
        self.connections: list[CloudConnection] = []
        self.accepted = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> StandInCloud:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.connections:
            conn.writer.transport.abort()
        await self._server.wait_closed()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = CloudConnection(reader, writer)
        self.connections.append(conn)
        self.accepted.set()
        try:
            await self.handler(conn)
        except (OSError, asyncio.IncompleteReadError) as exc:
            conn.error = exc
        finally:
            conn.done.set()
            writer.close()

    async def connection(self, index: int = 0, timeout: float = 5.0) -> CloudConnection:
        await until(lambda: len(self.connections) > index, timeout, what=f"the cloud to accept connection {index + 1}")
        return self.connections[index]


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    out = bytearray()
    async with asyncio.timeout(timeout):
        while data := await reader.read(65536):
            out += data
    return bytes(out)


async def closed_without_answer(reader: asyncio.StreamReader) -> bool:
    """The relay closed the connection and sent nothing: a FIN (an EOF with nothing before it)
    or a reset (the kernel resets a socket closed with unread data)."""
    try:
        return await read_to_eof(reader) == b""
    except ConnectionResetError:
        return True


# -- a stand-in DNS server --------------------------------------------------------------------

class StandInDNS(asyncio.DatagramProtocol):
    """A real DNS server on 127.0.0.1 (UDP, ephemeral port) answering A queries from `names`
    (NXDOMAIN for others), or nothing at all when `silent`."""

    def __init__(self, names: dict[str, str] | None = None, silent: bool = False) -> None:
        self.names = dict(names or {})
        self.silent = silent
        self.queries: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    async def __aenter__(self) -> StandInDNS:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.transport is not None
        self.transport.close()

    @property
    def address(self) -> str:
        assert self.transport is not None
        return f"127.0.0.1:{self.transport.get_extra_info('sockname')[1]:d}"

    def datagram_received(self, data: bytes, addr) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().rstrip(".")
        self.queries.append(name)
        if self.silent:
            return
        response = dns.message.make_response(query)
        if name not in self.names:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", self.names[name]))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


# -- processes --------------------------------------------------------------------------------

RELAY_READY = re.compile(r"relay listening: \S+ on (?P<endpoints>[^(]+) \(")


def acking_alpha_cloud(ack: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A stand-in AlphaESS cloud's connection handler (for asyncio.start_server): answers every frame
    with `ack` (frames are read by their length field)."""
    async def cloud(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(7)
                await reader.readexactly(int.from_bytes(head[3:7], "big") + 2)
                writer.write(ack)
        except (asyncio.IncompleteReadError, OSError):
            writer.close()
    return cloud


def alpha_backfill_frame(serial: str, n: int, rows: int) -> bytes:
    """The `n`-th CSV back-fill frame (1-1-12) of `rows` rows: quick to frame and archive, slow to
    decode (a record per row), so a decoder falls behind the archive on any machine."""
    battery = _Battery(serial)
    t0 = datetime(2024, 3, 3, tzinfo=UTC) + timedelta(minutes=rows * n)
    lines = [battery.csv_row(t0 + timedelta(minutes=i)) for i in range(rows)]
    return encode_frame(REQUEST, 12, ("\n".join([CSV_HEADER, *lines]) + "\n").encode())


#: every relay process a test started; conftest kills those still running when the test ends, so a
#: test that fails before its own stop leaves no relay behind
STARTED: list[subprocess.Popen] = []


class RelayProcess:
    """`python -m proxy_tcp ...` as a real process (optionally inside a network namespace);
    waits for its ready line and collects its log. A thread keeps reading the output, so a
    relay that logs a lot (thousands of connection lines) never blocks on a full pipe."""

    def __init__(self, args: list[str], data_dir: Path, netns: str | None = None, env: dict | None = None) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.argv = [*prefix, str(PYTHON), "-m", "proxy_tcp", "--data-dir", str(data_dir), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.endpoints: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> RelayProcess:
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        STARTED.append(self.proc)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.wait_for("relay ready:", timeout)
        except RuntimeError:
            self.stop()
            raise
        for line in self.log:
            if m := RELAY_READY.search(line):
                self.endpoints.append(m["endpoints"].strip())
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """The next line of the log containing `text`; RuntimeError when the relay exits first or
        after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"relay did not log {text!r} within {timeout:g} s:\n" + self.text) from None
            if line is None:
                self._lines.put(None)  # stays at the end for later callers
                raise RuntimeError(f"relay exited without logging {text!r}:\n" + self.text)
            self.log.append(line)
            if text in line:
                return line

    @property
    def port(self) -> int:
        return self.port_of(0)

    def port_of(self, index: int) -> int:
        """The port of the listener logged `index`-th (in config order)."""
        match = re.search(r":(\d+)(?:[\s,]|$)", self.endpoints[index])
        assert match, self.endpoints[index]
        return int(match[1])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait, collect the rest of the log; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(10)
        while (line := self._lines.get_nowait() if not self._lines.empty() else None) is not None:
            self.log.append(line)
        return self.proc.returncode

    @property
    def text(self) -> str:
        return "".join(self.log)

    def run_to_end(self, timeout: float = 20.0) -> tuple[int, str]:
        """For a relay expected to exit by itself (a start-up error)."""
        result = subprocess.run(self.argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout,
                                check=False)
        return result.returncode, result.stdout + result.stderr


@dataclass(frozen=True)
class Resources:
    """A process's open file descriptors and resident memory, from /proc."""

    fds: int
    rss_kib: int

    @classmethod
    def of(cls, pid: int) -> Resources:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return cls(len(os.listdir(f"/proc/{pid}/fd")), rss)

    def __str__(self) -> str:
        return f"{self.fds} fds, RSS {self.rss_kib / 1024:.1f} MiB"


# -- network namespaces -----------------------------------------------------------------------

def sh(*argv: str, netns: str | None = None, check: bool = True, input: str | None = None) -> str:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    result = subprocess.run([*prefix, *argv], capture_output=True, text=True, input=input, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block's socket calls in network namespace `name` (this thread only): sockets made
    here stay in that namespace after the block."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        os.setns(target, os.CLONE_NEWNET)
        try:
            yield
        finally:
            os.setns(own, os.CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(target)


@dataclass
class Topology:
    """device ─ relay ─ cloud, three namespaces; the relay namespace routes between the two."""

    device: str
    relay: str
    cloud: str
    device_ip: str = "192.0.2.2"
    relay_device_side_ip: str = "192.0.2.1"
    relay_cloud_side_ip: str = "198.51.100.1"
    cloud_ip: str = "198.51.100.2"
    device_ip6: str = "2001:db8:1::2"
    relay_device_side_ip6: str = "2001:db8:1::1"
    relay_cloud_side_ip6: str = "2001:db8:2::1"
    cloud_ip6: str = "2001:db8:2::2"
    relay_device_if: str = ""


@contextlib.contextmanager
def three_namespaces() -> Iterator[Topology]:
    """Create pvr-<tag>-{dev,rel,cld} with veth links and routes; always removed afterwards."""
    tag = secrets.token_hex(3)
    topo = Topology(device=f"pvr-{tag}-dev", relay=f"pvr-{tag}-rel", cloud=f"pvr-{tag}-cld",
                    relay_device_if=f"pvr{tag}rd")
    created: list[str] = []
    try:
        for ns in (topo.device, topo.relay, topo.cloud):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        links = ((topo.device, f"pvr{tag}d", topo.relay, topo.relay_device_if),
                 (topo.cloud, f"pvr{tag}c", topo.relay, f"pvr{tag}rc"))
        for ns_a, if_a, ns_b, if_b in links:
            sh("ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        addresses = (
            (topo.device, f"pvr{tag}d", topo.device_ip, topo.device_ip6),
            (topo.relay, topo.relay_device_if, topo.relay_device_side_ip, topo.relay_device_side_ip6),
            (topo.relay, f"pvr{tag}rc", topo.relay_cloud_side_ip, topo.relay_cloud_side_ip6),
            (topo.cloud, f"pvr{tag}c", topo.cloud_ip, topo.cloud_ip6),
        )
        for ns, ifname, ip4, ip6 in addresses:
            sh("ip", "addr", "add", f"{ip4}/24", "dev", ifname, netns=ns)
            sh("ip", "-6", "addr", "add", f"{ip6}/64", "dev", ifname, "nodad", netns=ns)
            sh("ip", "link", "set", ifname, "up", netns=ns)
            sh("ip", "link", "set", "lo", "up", netns=ns)
        for ns, via4, via6 in ((topo.device, topo.relay_device_side_ip, topo.relay_device_side_ip6),
                               (topo.cloud, topo.relay_cloud_side_ip, topo.relay_cloud_side_ip6)):
            sh("ip", "route", "add", "default", "via", via4, netns=ns)
            sh("ip", "-6", "route", "add", "default", "via", via6, netns=ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", netns=topo.relay)
        yield topo
    finally:
        for ns in reversed(created):
            sh("ip", "netns", "del", ns, check=False)


def connect_from(netns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made inside `netns` (blocking socket with a timeout)."""
    with in_netns(netns):
        return socket.create_connection((host, port), timeout=timeout)


def listen_in(netns: str, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with in_netns(netns):
        server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen()
    return server


def recv_to_eof(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(65536):
        out += data
    return bytes(out)
