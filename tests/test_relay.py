"""The relay's pumps and policies, in this event loop on 127.0.0.1, with a test protocol.

Forwarding is checked byte for byte in both directions, including when the decoder raises, is
slow, or gives up on the stream (opaque); half-close, resets, the idle timeout, back-pressure,
the connection limit, cloud-down behaviour of fixed and auto, local answers, and the guards
against connecting back to the relay itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import threading
import time

import pytest

from proxy_tcp.listeners import LISTEN_BACKLOG
from pvtap.config import ConfigError
from pvtap.privacy import Privacy
from pvtap.records import DOWN, UP
from pvtap.store.local import LocalStore
from tests.conftest import free_port
from tests.relay_support import (
    StandInCloud,
    StandInDNS,
    archived,
    listener,
    read_all,
    read_to_eof,
    running_relay,
    stream,
    test_codec,
)
from tests.waiting import until

pytestmark = pytest.mark.timeout(60)


def connection_records(store: LocalStore) -> list:
    return [s.record for s in store.records(measurements=["pvtap_connection"])]


async def stored_record(store: LocalStore, index: int = 0, timeout: float = 5.0):
    await until(lambda: len(connection_records(store)) > index, timeout)
    return connection_records(store)[index]


@pytest.fixture
def store(tmp_path):
    with LocalStore.for_process(tmp_path, "relay") as s:
        yield s


# -- forwarding ------------------------------------------------------------------------------

async def test_forwards_both_directions_byte_identical_and_decodes_a_copy(store):
    up = os.urandom(3_000_000)
    down = os.urandom(2_000_000)

    async def cloud_talks_back(conn):
        conn.writer.write(down)
        await conn.writer.drain()
        conn.writer.write_eof()
        await read_all(conn)

    async with StandInCloud(cloud_talks_back) as cloud:
        async with running_relay(listener(cloud.address), store=store) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for i in range(0, len(up), 7919):  # odd segment sizes
                writer.write(up[i:i + 7919])
            received = await read_to_eof(reader)  # the cloud's answer and its EOF, while ours go up
            writer.write_eof()
            await writer.drain()
            writer.close()
            conn = await cloud.connection()
            await conn.done.wait()
            record = await stored_record(store)

    assert received == down
    assert bytes(conn.received) == up
    assert stream(store, UP) == up and stream(store, DOWN) == down  # every byte reached the decoder too
    assert record.measurement == "pvtap_connection"
    assert dict(record.tags) == {"protocol": "alphaess", "listener": "127.0.0.1:0", "policy": "fixed",
                                 "action": "forward", "outcome": "cloud_closed"}  # its EOF came first
    fields = dict(record.fields)
    assert (fields["bytes_up"], fields["bytes_down"]) == (len(up), len(down))
    assert fields["frames"] == len(archived(store)) > 0
    assert fields["dropped_copies"] == 0 and fields["decode_errors"] == 0 and fields["opaque"] is False
    assert fields["upstream"] == cloud.address
    assert "peer" not in fields  # privacy.store_network_identity is off
    assert record.origin.connection.startswith("c-")


async def test_a_decoder_raising_on_every_chunk_changes_nothing_forwarded(store, caplog):
    up, down = os.urandom(500_000), os.urandom(300_000)

    async def cloud(conn):
        conn.writer.write(down)
        await conn.writer.drain()
        await read_all(conn)

    async with StandInCloud(cloud) as server:
        async with running_relay(listener(server.address), codec=test_codec(raise_on_feed=True),
                                 store=store) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            got = await reader.readexactly(len(down))
            for i in range(0, len(up), 1000):
                writer.write(up[i:i + 1000])
                await writer.drain()
            writer.close()
            conn = await server.connection()
            await conn.done.wait()
            record = await stored_record(store)

    assert got == down and bytes(conn.received) == up
    assert archived(store) == []
    assert record.fields["decode_errors"] > 1
    assert record.tags["outcome"] == "device_closed"
    assert sum("the decoder raised" in r.message for r in caplog.records) == 1  # once per connection, then counted


async def test_a_stuck_decoder_costs_dropped_copies_never_forwarding(store):
    chunks = [os.urandom(1000) for _ in range(60)]
    stuck = threading.Event()  # the decoder waits on it: nothing is decoded until every byte went through
    async with StandInCloud() as cloud:
        async with running_relay(listener(cloud.address), codec=test_codec(feed_gate=stuck), store=store,
                                 queue_bytes=2000) as (_, port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            for i, chunk in enumerate(chunks):
                writer.write(chunk)
                conn = await cloud.connection()
                await until(lambda c=conn, n=(i + 1) * 1000: len(c.received) == n)  # forwarded: separate reads
            stuck.set()
            writer.close()
            record = await stored_record(store, timeout=15)

    assert bytes(conn.received) == b"".join(chunks)
    assert record.fields["dropped_copies"] > 0
    assert record.fields["frames"] + record.fields["dropped_copies"] <= 60


async def test_a_decoder_that_cannot_start_leaves_forwarding_alone(store):
    async with StandInCloud() as cloud:
        async with running_relay(listener(cloud.address), codec=test_codec(raise_on_start=True),
                                 store=store) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello cloud")
            writer.write_eof()
            await read_to_eof(reader)
            conn = await cloud.connection()
            await conn.done.wait()
            record = await stored_record(store)
    assert bytes(conn.received) == b"hello cloud"
    assert record.fields["decode_errors"] == 1 and record.tags["outcome"] == "device_closed"


async def test_a_stream_that_is_not_the_protocol_is_forwarded_untouched_and_noted_opaque(store):
    hello = bytes.fromhex("160301") + os.urandom(4000)  # what a TLS ClientHello starts with
    async with StandInCloud() as cloud:
        async with running_relay(listener(cloud.address), store=store) as (relay, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(hello)
            await writer.drain()
            await relay.copies.idle()  # the worker has seen it and said: opaque
            writer.write(b"more ciphertext")
            writer.write_eof()
            await read_to_eof(reader)
            conn = await cloud.connection()
            await conn.done.wait()
            record = await stored_record(store)
    assert bytes(conn.received) == hello + b"more ciphertext"
    assert [p.kind for p in archived(store)] == ["opaque"]  # copies stop once the Tap gave up
    assert record.fields["opaque"] is True
    assert relay.copies.stats()["copies_sent"] == 1  # the relay stopped copying: one chunk went over


async def test_the_device_serial_names_the_record_pseudonymised_when_asked(store):
    privacy = Privacy(pseudonym_key=b"k" * 32)
    async with StandInCloud() as cloud:
        async with running_relay(listener(cloud.address), store=store, privacy=privacy) as (_, port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"SN=SIM-SERIAL-0001;")
            await writer.drain()
            conn = await cloud.connection()
            await until(lambda: conn.received == b"SN=SIM-SERIAL-0001;")
            writer.close()
            record = await stored_record(store)
    assert record.origin.device == privacy.serial("SIM-SERIAL-0001") != "SIM-SERIAL-0001"


async def test_the_peer_address_is_stored_only_with_store_network_identity(store):
    async with StandInCloud() as cloud:
        async with running_relay(listener(cloud.address), store=store,
                                 privacy=Privacy(keep_network_identity=True)) as (_, port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            own = writer.get_extra_info("sockname")
            writer.close()
            record = await stored_record(store)
    assert record.fields["peer"] == f"127.0.0.1:{own[1]}"


# -- ends: half-close, reset, idle ------------------------------------------------------------

async def test_half_close_from_the_device_lets_the_cloud_finish_its_answer(store):
    async def answer_after_eof(conn):
        await read_all(conn)  # until the device's EOF arrives through the relay
        conn.writer.write(b"answer after your EOF: " + bytes(conn.received))
        await conn.writer.drain()

    async with StandInCloud(answer_after_eof) as cloud:
        async with running_relay(listener(cloud.address), store=store) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"question")
            writer.write_eof()
            assert await read_to_eof(reader) == b"answer after your EOF: question"
            writer.close()
            record = await stored_record(store)
    assert record.tags["outcome"] == "device_closed"


async def test_the_cloud_closing_first_is_passed_on(store):
    async def greet_and_close(conn):
        conn.writer.write(b"bye")
        await conn.writer.drain()

    async with StandInCloud(greet_and_close) as cloud:
        async with running_relay(listener(cloud.address), store=store) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await read_to_eof(reader) == b"bye"
            writer.close()
            record = await stored_record(store)
    assert record.tags["outcome"] == "cloud_closed"


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


async def test_a_device_reset_is_passed_on_to_the_cloud(store):
    async with StandInCloud() as cloud:
        async with running_relay(listener(cloud.address), store=store) as (_, port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x")
            await writer.drain()
            conn = await cloud.connection()
            await until(lambda: conn.received == b"x")
            reset(writer)
            await conn.done.wait()
            record = await stored_record(store)
    assert isinstance(conn.error, ConnectionResetError)
    assert record.tags["outcome"] == "device_reset"


async def test_a_cloud_reset_is_passed_on_to_the_device(store):
    async def reset_at_once(conn):
        await conn.reader.read(1)
        reset(conn.writer)

    async with StandInCloud(reset_at_once) as cloud:
        async with running_relay(listener(cloud.address), store=store) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x")
            with pytest.raises(ConnectionResetError):
                await read_to_eof(reader)
            record = await stored_record(store)
    assert record.tags["outcome"] == "cloud_reset"


async def test_a_connection_silent_both_ways_ends_at_the_idle_timeout(store):
    async with StandInCloud() as cloud:
        async with running_relay(listener(cloud.address, idle_timeout=0.4), store=store) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            writer.write(b"one chunk, then silence")
            assert await read_to_eof(reader) == b""
            waited = time.monotonic() - started
            record = await stored_record(store)
    assert waited > 0.35  # not before the timeout (how much later depends on the machine)
    assert record.tags["outcome"] == "idle_timeout"
    assert "idle_timeout" in record.fields["detail"]


async def test_back_pressure_holds_the_device_while_the_cloud_does_not_read(store):
    release = asyncio.Event()

    async def slow_reader(conn):
        await release.wait()
        await read_all(conn)

    def relay_holds_the_device(relay) -> bool:
        """The pump towards the cloud is blocked in drain() and the device's socket is no longer
        read: from now on nothing takes bytes off the device."""
        connection = next(iter(relay.listeners[0].connections.values()), None)
        if connection is None or connection.cloud_writer is None:
            return False
        cloud, device = connection.cloud_writer.transport, connection.device_writer.transport
        return cloud.get_write_buffer_size() > cloud.get_write_buffer_limits()[1] and not device.is_reading()

    def writable(sock: socket.socket) -> bool:
        return bool(select.select([], [sock], [], 0)[1])

    async with StandInCloud(slow_reader) as cloud:
        async with running_relay(listener(cloud.address), store=store) as (relay, port):
            device = socket.create_connection(("127.0.0.1", port))
            device.setblocking(False)
            sent, block = bytearray(), os.urandom(65536)
            while len(sent) < 64 * 1024 * 1024:  # what is in flight is bounded by buffers and high-water marks
                try:
                    sent += block[:device.send(block)]
                except BlockingIOError:
                    if relay_holds_the_device(relay):
                        break
                    await until(lambda: relay_holds_the_device(relay) or writable(device))
            assert len(sent) < 64 * 1024 * 1024, "the device was never held back"
            release.set()
            device.setblocking(True)
            device.shutdown(socket.SHUT_WR)
            conn = await cloud.connection()
            await conn.done.wait()
            device.close()
    assert bytes(conn.received) == bytes(sent)


# -- policies ---------------------------------------------------------------------------------

async def test_fixed_with_the_cloud_down_closes_the_device_cleanly_and_records_why(store):
    port_of_nothing = free_port()
    async with running_relay(listener(f"127.0.0.1:{port_of_nothing}"), store=store) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"anyone there?")
        assert await read_to_eof(reader) == b""  # a FIN, not a reset
        writer.close()
        record = await stored_record(store)
    assert record.tags["action"] == "refused" and record.tags["outcome"] == "upstream_failed"
    assert "refused" in record.fields["detail"].lower()
    assert record.fields["upstream"] == f"127.0.0.1:{port_of_nothing}"


async def test_auto_answers_locally_while_the_cloud_is_down_and_forwards_once_it_is_back(store):
    cloud_port = free_port()
    async with running_relay(listener(f"127.0.0.1:{cloud_port}", policy="auto"), store=store) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"data")
        assert await reader.readexactly(8) == b"ACK:data"
        writer.close()
        first = await stored_record(store, 0)

        async with StandInCloud(port=cloud_port) as cloud:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"data again")
            writer.write_eof()
            assert await read_to_eof(reader) == b""
            conn = await cloud.connection()
            await conn.done.wait()
            second = await stored_record(store, 1)

    assert first.tags["action"] == "local" and "Connection refused" in first.fields["cloud_error"]
    assert first.fields["bytes_up"] == 4 and first.fields["bytes_down"] == 8
    assert stream(store, UP).startswith(b"data") and stream(store, DOWN).startswith(b"ACK:data")
    assert second.tags["action"] == "forward" and bytes(conn.received) == b"data again"


async def test_auto_gives_up_on_a_silent_cloud_after_the_connect_timeout(store):
    async with StandInDNS(silent=True) as dns_server:
        config = listener("cloud.example:7777", policy="auto", resolver=dns_server.address, connect_timeout=0.5)
        async with running_relay(config, store=store) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            writer.write(b"hi")
            assert await reader.readexactly(6) == b"ACK:hi"
            waited = time.monotonic() - started
            writer.close()
            record = await stored_record(store)
    assert waited > 0.4  # not before the connect timeout
    assert record.tags["action"] == "local"


async def test_local_answers_and_ticks_without_any_cloud(store):
    async with running_relay(listener(policy="local"), store=store) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"login")
        assert await reader.readexactly(9) == b"ACK:login"
        assert await asyncio.wait_for(reader.readexactly(4), 3) == b"TICK"  # unprompted, from tick()
        writer.close()
        record = await stored_record(store)
    assert record.tags["action"] == "local" and record.tags["outcome"] == "device_closed"
    assert record.fields["bytes_down"] == 13


async def test_stopping_the_relay_ends_open_connections_and_records_them(store):
    async with StandInCloud() as cloud:
        async with running_relay(listener(cloud.address), store=store) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"still talking")
            await until(lambda: cloud.connections and cloud.connections[0].received)
        assert await read_to_eof(reader) == b""
        record = await stored_record(store)
    assert record.tags["outcome"] == "shutdown" and record.fields["bytes_up"] == 13


# -- never back to itself ---------------------------------------------------------------------

async def test_an_upstream_that_is_the_relay_itself_is_refused_at_start(store):
    port = free_port()
    config = listener(f"127.0.0.1:{port}", listen=f"127.0.0.1:{port}")
    with pytest.raises(ConfigError) as error:
        async with running_relay(config, store=store):
            pass
    assert error.value.key == "relay.listeners[0].upstream"
    assert "loop" in str(error.value) and "resolver" in error.value.fix


async def test_a_dns_override_seen_by_the_relay_is_refused_at_start(store):
    port = free_port()
    async with StandInDNS({"cloud.example": "127.0.0.1"}) as dns_server:
        config = listener(f"cloud.example:{port}", listen=f"0.0.0.0:{port}", resolver=dns_server.address)
        with pytest.raises(ConfigError) as error:
            async with running_relay(config, store=store):
                pass
    assert error.value.key == "relay.listeners[0].upstream"
    assert "resolves to 127.0.0.1" in str(error.value)
    with socket.create_server(("0.0.0.0", port)):  # nothing was left listening
        pass


async def test_a_named_resolver_gives_the_real_cloud(store):
    async with StandInCloud() as cloud, StandInDNS({"cloud.example": "127.0.0.1"}) as dns_server:
        config = listener(f"cloud.example:{cloud.port}", resolver=dns_server.address)
        async with running_relay(config, store=store) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"via a named resolver")
            writer.write_eof()
            await read_to_eof(reader)
            conn = await cloud.connection()
            await conn.done.wait()
            record = await stored_record(store)
    assert bytes(conn.received) == b"via a named resolver"
    assert "cloud.example" in dns_server.queries
    assert record.fields["upstream"] == cloud.address


async def test_a_name_that_starts_resolving_to_the_relay_is_refused_per_connection(store):
    port = free_port()
    async with StandInDNS() as dns_server:  # NXDOMAIN at start-up: a warning, not an error
        config = listener(f"cloud.example:{port}", listen=f"127.0.0.1:{port}", resolver=dns_server.address)
        async with running_relay(config, store=store):
            dns_server.names["cloud.example"] = "127.0.0.1"  # the override now points at the relay
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"loop?")
            assert await read_to_eof(reader) == b""
            writer.close()
            record = await stored_record(store)
    assert record.tags["outcome"] == "refused_self"
    assert "loop" in record.fields["detail"]


async def test_transparent_refuses_a_connection_that_was_not_redirected(store):
    async with running_relay(listener(policy="transparent"), store=store) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"direct")
        assert await read_to_eof(reader) == b""
        writer.close()
        record = await stored_record(store)
    assert record.tags["outcome"] == "refused_not_redirected"
    assert f"127.0.0.1:{port}" in record.fields["detail"]


async def test_a_busy_listen_address_is_a_config_error_naming_the_key(store):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[1]
        with pytest.raises(ConfigError) as error:
            async with running_relay(listener(policy="local", listen=f"127.0.0.1:{taken}"), store=store):
                pass
    assert error.value.key == "relay.listeners[0].listen" and "in use" in str(error.value)


async def test_the_listen_backlog_holds_a_fleet_reconnecting_at_once(store):
    """asyncio's default backlog is 100: a fleet reconnecting after a power cut would lose SYNs."""
    with open("/proc/sys/net/core/somaxconn") as limit:  # noqa: ASYNC230 (one line of /proc)
        somaxconn = int(limit.read())
    async with running_relay(listener(policy="local"), store=store) as (_, port):
        out = (await asyncio.to_thread(subprocess.run, ["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                       text=True, check=True)).stdout
    assert int(out.split()[2]) == min(LISTEN_BACKLOG, somaxconn) > 1000  # a listening socket's Send-Q is its backlog


async def test_records_are_json_safe_line_protocol_inputs(store):
    """The connection record goes through the same store and forwarder as decoded records."""
    from pvtap.store.lineprotocol import to_line

    async with running_relay(listener(policy="local"), store=store) as (_, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        record = await stored_record(store)
    line = to_line(record)
    assert line.startswith("pvtap_connection,action=local,") and line.endswith(f" {record.time_ns}")
    fields = dict(record.fields)
    assert fields and json.loads(json.dumps(fields)) == fields  # JSON-safe: every value survives the round trip
