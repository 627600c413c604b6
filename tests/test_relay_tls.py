"""The device-side TLS termination on both of the relay's event loops (relay.event_loop): a TLS
listener accepts raw sockets, admits or resets them, and the connection hands each to the TLS
layer unread (proxy_tcp/accept.py), so a ClientHello that is already waiting at accept is the
TLS layer's, not cleartext in a stream (what broke on uvloop). Every test runs once per loop.

The resource side (descriptors after many failed handshakes, in a relay process) is in
tests/test_relay_hostile_process.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct

import pytest

from proxy_tcp.connection import Connection
from pvtap.certs import foxess_pair
from pvtap.store.local import LocalStore
from tests.conftest import RELAY_LOOPS
from tests.relay_support import (
    CloudConnection,
    StandInCloud,
    closed_without_answer,
    listener,
    read_to_eof,
    running_relay,
    settled,
    stream,
)
from tests.test_relay_hostile import connect, refused_at_once, until_connections

pytestmark = [pytest.mark.asyncio(loop_factories=RELAY_LOOPS), pytest.mark.timeout(60)]

DEVICE, HOSTILE = "127.0.0.2", "127.0.0.3"


@pytest.fixture
def store(tmp_path):
    with LocalStore.for_process(tmp_path, "relay") as s:
        yield s


@pytest.fixture
def pair(tmp_path):
    return foxess_pair(tmp_path / "certs")


def tls_listener(pair, upstream: str = "", **settings):
    cert, key = pair
    return listener(upstream, tls_cert=str(cert), tls_key=str(key), **settings)


def device_context() -> ssl.SSLContext:
    """A device that does not check the relay's certificate (as the FoxESS M1 does not)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def connections(store: LocalStore) -> list:
    return [s.record for s in store.records(measurements=["pvtap_connection"])]


def answering(reply: bytes, after: int):
    """A cloud that reads `after` bytes, sends `reply` and closes (TLS has no half-close, so the
    device cannot say it is done by an EOF)."""
    async def handler(conn: CloudConnection) -> None:
        conn.received += await conn.reader.readexactly(after)
        conn.writer.write(reply)
        await conn.writer.drain()
    return handler


async def test_a_tls_device_reaches_the_cloud_with_its_exact_bytes_and_gets_the_answer(store, pair):
    sent = os.urandom(200_000)
    async with StandInCloud(answering(b"the cloud's answer", after=len(sent))) as cloud:
        async with running_relay(tls_listener(pair, cloud.address), store=store) as (relay, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=device_context())
            writer.write(sent)
            answer = await read_to_eof(reader)
            writer.close()
            conn = await cloud.connection()
            await conn.done.wait()
            await settled(relay)
    assert bytes(conn.received) == sent  # application bytes, unmodified
    assert answer == b"the cloud's answer"
    assert stream(store, "up") == sent  # the decoder's copy is cleartext too
    (record,) = connections(store)
    assert (record.tags["action"], record.tags["outcome"]) == ("forward", "cloud_closed")
    assert (record.fields["bytes_up"], record.fields["bytes_down"]) == (len(sent), len(answer))


class BufferedHandshake:
    """A TLS client on a memory BIO, so that its ClientHello can be written in full before the
    relay has accepted the connection, and the handshake continued over a stream afterwards."""

    def __init__(self) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = device_context().wrap_bio(self.incoming, self.outgoing)

    def hello(self) -> bytes:
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    async def finish(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(self.outgoing.read())
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the relay closed during the handshake") from None
                self.incoming.write(data)
        writer.write(self.outgoing.read())

    def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        self.tls.write(data)
        writer.write(self.outgoing.read())


async def test_a_client_hello_waiting_at_accept_is_handshaken_not_read_as_cleartext(store, pair):
    """The case that broke on uvloop: the whole ClientHello is in the socket before the relay
    accepts it. The blocking connect and send run while this event loop — the relay's — is held,
    so the relay can only accept after the hello has arrived."""
    async with StandInCloud(answering(b"ok", after=len(b"after the handshake"))) as cloud:
        async with running_relay(tls_listener(pair, cloud.address), store=store) as (relay, port):
            client = BufferedHandshake()
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)  # in the backlog, not yet accepted
            raw.sendall(client.hello())
            raw.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=raw)
            await client.finish(reader, writer)
            client.send(writer, b"after the handshake")
            conn = await cloud.connection()
            await conn.done.wait()
            writer.close()
            await settled(relay)
    assert client.tls.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(pair[0].read_text())
    assert bytes(conn.received) == b"after the handshake"
    (record,) = connections(store)
    assert (record.tags["action"], record.fields["bytes_up"]) == ("forward", len(b"after the handshake"))


async def test_plain_bytes_to_a_tls_listener_end_as_a_failed_handshake_with_its_record(store, pair, caplog):
    caplog.set_level(logging.INFO)
    async with StandInCloud() as cloud:
        async with running_relay(tls_listener(pair, cloud.address), store=store) as (relay, port):
            reader, writer = await connect(port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")  # cleartext where a ClientHello belongs
            assert await closed_without_answer(reader)
            writer.close()
            await settled(relay)
    assert cloud.connections == []  # no upstream for a device that never got through
    (record,) = connections(store)
    assert (record.tags["action"], record.tags["outcome"]) == ("refused", "device_tls_failed")
    assert record.fields["detail"].startswith("TLS handshake with the device failed: ")
    assert record.fields["bytes_up"] == 0  # the handshake's bytes are the TLS layer's, not the device's data
    lines = [r.getMessage() for r in caplog.records if "device_tls_failed" in r.getMessage()]
    assert len(lines) == 1 and "[fixed: refused]" in lines[0]


async def test_a_silent_client_of_a_tls_listener_ends_at_the_first_byte_deadline(store, pair):
    async with running_relay(tls_listener(pair, first_byte_timeout=0.3), store=store) as (relay, port):
        reader, writer = await connect(port)  # connects and says nothing, not even a ClientHello
        assert await closed_without_answer(reader)
        writer.close()
        await settled(relay)
    (record,) = connections(store)
    assert (record.tags["action"], record.tags["outcome"]) == ("refused", "first_byte_timeout")
    assert record.fields["detail"] == "no TLS handshake from the device within 0.3 s (first_byte_timeout)"


async def test_a_tls_listener_refuses_sources_outside_allow_from_before_any_tls_work(store, pair):
    async with running_relay(tls_listener(pair, allow_from=[f"{DEVICE}/32"]), store=store) as (relay, port):
        # a source outside allow_from is reset at once, though it has not sent a byte
        assert all([await refused_at_once(port, HOSTILE) for _ in range(3)])
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=device_context(),
                                                  local_addr=(DEVICE, 0))
        assert writer.get_extra_info("ssl_object").version() is not None  # the device is served
        writer.close()
        await settled(relay)
        counted = dict(relay.listeners[0].refusals.total)
    assert counted == {"refused_not_allowed": 3}
    assert [r.tags["action"] for r in connections(store)] == ["local"]  # refused ones get no record


async def test_stopping_the_relay_during_a_handshake_closes_the_device_and_records_it(store, pair):
    async with running_relay(tls_listener(pair, first_byte_timeout=30), store=store) as (relay, port):
        reader, writer = await connect(port)
        await until_connections(relay, 1)
    # the relay has stopped: the device's socket is closed, and the connection has its record
    assert await closed_without_answer(reader)
    writer.close()
    (record,) = connections(store)
    assert record.tags["outcome"] == "shutdown"


async def test_a_connection_stopped_before_its_handshake_began_closes_its_socket(store, pair):
    """The relay stopping between accept and the connection's first step: the socket the TLS
    layer never got is closed by the connection itself, and the connection is recorded."""
    async with running_relay(tls_listener(pair), store=store) as (relay, _):
        ours, device = socket.socketpair()
        with device:
            connection = Connection(relay.listeners[0], ("127.0.0.1", 40000), ours)
            connection.stop()
            await connection.run()
            assert ours.fileno() == -1
            assert device.recv(1) == b""  # the device sees the close
    assert connection.record.outcome == "shutdown"
    (record,) = connections(store)
    assert record.tags["outcome"] == "shutdown"


async def test_a_tls_device_that_resets_is_recorded_as_such(store, pair, caplog):
    """Passing a reset on needs the device's socket, which uvloop's TLS transport no longer
    gives once its connection is lost."""
    async with running_relay(tls_listener(pair), store=store) as (relay, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=device_context())
        writer.write(b"then a reset")
        await writer.drain()
        await until_connections(relay, 1)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await settled(relay)
    (record,) = connections(store)
    assert record.tags["outcome"] == "device_reset"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
