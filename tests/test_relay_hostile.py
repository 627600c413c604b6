"""Hostile clients against a real relay in this event loop (127.0.0.x sources, the test protocol
or the real TLS termination): limits apply in accept, silent and trickling clients lose their
slot at the first-byte deadline, the real device still gets in when it is allow-listed, and UDP
senders are held to their rate. Timeouts are shortened in the listener settings; nothing here
waits for time to pass except through the relay's own timers.

The resource side (fds, RSS, back-pressure against a relay process) is in
tests/test_relay_hostile_process.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import pytest

from proxy_tcp.admission import AllowList
from proxy_tcp.udp import SourceRates
from pvtap.certs import foxess_pair
from pvtap.store.local import LocalStore
from tests.conftest import RELAY_LOOPS
from tests.relay_support import (
    StandInCloud,
    archived,
    closed_without_answer,
    listener,
    read_to_eof,
    running_relay,
    settled,
    test_codec,
)
from tests.waiting import until

pytestmark = pytest.mark.timeout(60)

DEVICE, HOSTILE, ALSO_ALLOWED = "127.0.0.2", "127.0.0.3", "127.0.0.4"


@pytest.fixture
def store(tmp_path):
    with LocalStore.for_process(tmp_path, "relay") as s:
        yield s


def records(store: LocalStore, measurement: str) -> list:
    return [s.record for s in store.records(measurements=[measurement])]


async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def refused_at_once(port: int, source: str = "127.0.0.1") -> bool:
    """Connect and send nothing: True when the relay resets the connection without waiting for
    anything from us (before a TLS handshake, before a first byte)."""
    try:
        reader, writer = await connect(port, source)
    except ConnectionResetError:  # reset before the loop had even seen the connect complete
        return True
    try:
        await read_to_eof(reader, timeout=10)
    except ConnectionResetError:
        return True
    finally:
        writer.close()
    return False


# -- in accept: the limit and the allow-list --------------------------------------------------------

async def test_beyond_max_connections_is_reset_in_accept_counted_and_logged_rate_limited(store, caplog):
    async with StandInCloud() as cloud:
        async with running_relay(listener(cloud.address, max_connections=2), store=store) as (relay, port):
            held = [await connect(port) for _ in range(2)]
            for _, writer in held:
                writer.write(b"x")
            await cloud.connection(1)  # both are being served
            assert all([await refused_at_once(port) for _ in range(20)])
            assert relay.connections == 2
            for _, writer in held:
                writer.close()
            await settled(relay)
    warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    # the first at once, the other 19 together when the listener closed (the window had not passed)
    assert len(warnings) == 2
    assert "refused 1 over max_connections (2 open)" in warnings[0]
    assert "refused 19 over max_connections" in warnings[1]
    assert len(records(store, "pvtap_connection")) == 2  # a refused connection gets no record of its own
    assert len(cloud.connections) == 2


@pytest.mark.asyncio(loop_factories=RELAY_LOOPS)  # the relay's TLS: on both of its loops
async def test_a_tls_listener_refuses_before_any_handshake(store, tmp_path):
    cert, key = foxess_pair(tmp_path / "certs")
    config = listener(policy="local", tls_cert=str(cert), tls_key=str(key), max_connections=1)
    async with running_relay(config, store=store) as (relay, port):
        _, holder = await connect(port)  # says nothing, not even a ClientHello
        await until_connections(relay, 1)
        # refused while the first still has its whole handshake time: not after a handshake
        assert await refused_at_once(port)
        holder.close()


async def until_connections(relay, count: int) -> None:
    await until(lambda: relay.connections == count, what=f"the relay to hold {count} connection(s)")


async def test_sources_outside_allow_from_are_refused_and_the_device_gets_in(store, caplog):
    async with StandInCloud() as cloud:
        config = listener(cloud.address, max_connections=2, allow_from=[f"{DEVICE}/32", "2001:db8::/64"])
        async with running_relay(config, store=store) as (relay, port):
            flood = [await refused_at_once(port, HOSTILE) for _ in range(3 * config.max_connections)]
            assert all(flood) and relay.connections == 0  # not one slot used
            reader, writer = await connect(port, DEVICE)
            writer.write(b"the real device")
            writer.write_eof()
            assert await read_to_eof(reader) == b""
            conn = await cloud.connection()
            await conn.done.wait()
            writer.close()
            await settled(relay)
            counted = dict(relay.listeners[0].refusals.total)
    assert bytes(conn.received) == b"the real device"
    assert counted == {"refused_not_allowed": 6}
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert ["refused 1 not in allow_from" in refused[0], "refused 5 not in allow_from" in refused[1]] == [True, True]
    (served,) = records(store, "pvtap_connection")
    assert served.tags["outcome"] == "device_closed"


async def test_allowed_squatters_lose_their_slots_at_the_first_byte_deadline(store):
    """Allowed hosts hold every slot and say nothing: new connections are refused at once, until
    the first-byte deadline frees the slots and the real device gets in."""
    config = dict(max_connections=3, first_byte_timeout=0.5, allow_from=["127.0.0.0/24"])
    async with StandInCloud() as cloud:
        async with running_relay(listener(cloud.address, **config), store=store) as (relay, port):
            squatters = [await connect(port, ALSO_ALLOWED) for _ in range(3)]
            await until_connections(relay, 3)
            assert await refused_at_once(port, DEVICE)
            for reader, _ in squatters:  # the relay closes them: EOF, not a reset
                assert await read_to_eof(reader) == b""
            reader, writer = await connect(port, DEVICE)
            writer.write(b"in at last")
            writer.write_eof()
            await read_to_eof(reader)
            conn = await cloud.connection(3)
            await conn.done.wait()
            for _, squatter in squatters:
                squatter.close()
            writer.close()
            await settled(relay)
    assert bytes(conn.received) == b"in at last"
    outcomes = sorted(r.tags["outcome"] for r in records(store, "pvtap_connection"))
    assert outcomes == ["device_closed"] + ["first_byte_timeout"] * 3
    late = next(r for r in records(store, "pvtap_connection") if r.tags["outcome"] == "first_byte_timeout")
    assert late.fields["detail"] == "nothing from the device within 0.5 s (first_byte_timeout)"


async def test_a_closed_connection_still_decoding_holds_no_slot(store):
    """Both sockets closed, the decoder (in the ingest worker) still busy with what was queued:
    the next device gets in."""
    release = threading.Event()
    codec = test_codec(feed_gate=release)
    async with StandInCloud() as cloud:
        async with running_relay(listener(cloud.address, max_connections=1), codec=codec,
                                 store=store) as (relay, port):
            reader, writer = await connect(port)
            writer.write(b"decoded late")
            writer.write_eof()
            await read_to_eof(reader)
            writer.close()
            await (await cloud.connection()).done.wait()
            await settled(relay)  # the connection has ended; its decoding waits for the gate
            reader, writer = await connect(port)
            writer.write(b"next")
            writer.write_eof()
            await read_to_eof(reader)
            writer.close()
            second = await cloud.connection(1)
            await second.done.wait()
            release.set()
            await settled(relay)
            refused = relay.listeners[0].refusals.total
    assert bytes(second.received) == b"next"
    assert not refused


# -- silent and slow clients --------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["fixed", "local"])
async def test_connect_and_send_nothing_ends_at_the_first_byte_deadline(store, policy):
    async with StandInCloud() as cloud:
        upstream = cloud.address if policy == "fixed" else ""
        async with running_relay(listener(upstream, first_byte_timeout=0.3, idle_timeout=600),
                                 store=store) as (relay, port):
            reader, writer = await connect(port)
            assert await read_to_eof(reader) == b""  # closed before the local answerer's first tick (1 s)
            writer.close()
            await settled(relay)
    (record,) = records(store, "pvtap_connection")
    assert record.tags["outcome"] == "first_byte_timeout" and record.fields["bytes_up"] == 0


async def test_one_byte_at_a_time_is_forwarded_in_order_and_holds_one_slot_only(store):
    """A drip within idle_timeout is legitimate traffic: each byte is forwarded as it comes, and
    the drip costs one slot — another client is served meanwhile. Slower than idle_timeout, the
    connection is closed."""
    async with StandInCloud() as cloud:
        config = listener(cloud.address, max_connections=2, first_byte_timeout=5, idle_timeout=0.4)
        async with running_relay(config, store=store) as (relay, port):
            reader, writer = await connect(port)
            for i in range(5):
                writer.write(bytes([65 + i]))
                conn = await cloud.connection()
                await until(lambda c=conn, n=i + 1: len(c.received) >= n, 5,  # forwarded before the next byte is sent
                            what=f"byte {i + 1} of the drip to be forwarded")
                if i == 2:
                    other_reader, other = await connect(port)
                    other.write(b"meanwhile")
                    other.write_eof()
                    await read_to_eof(other_reader)
                    other.close()
            assert bytes(conn.received) == b"ABCDE"
            assert await read_to_eof(reader) == b""  # then silence: the idle timeout ends it
            writer.close()
            await settled(relay)
    outcomes = sorted(r.tags["outcome"] for r in records(store, "pvtap_connection"))
    assert outcomes == ["device_closed", "idle_timeout"]


@pytest.mark.asyncio(loop_factories=RELAY_LOOPS)  # the relay's TLS: on both of its loops
async def test_a_trickled_tls_hello_loses_its_slot_at_the_first_byte_deadline(store, tmp_path):
    cert, key = foxess_pair(tmp_path / "certs")
    config = listener(policy="local", tls_cert=str(cert), tls_key=str(key), first_byte_timeout=0.5)
    hello = bytes.fromhex("16030100c8010000c40303") + bytes(200)  # the start of a ClientHello
    async with running_relay(config, store=store) as (relay, port):
        reader, writer = await connect(port)
        for byte in hello:  # a byte whenever the relay has not closed yet: never a whole hello
            if reader.at_eof() or writer.is_closing():
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.02)  # the pace of the drip, not a synchronisation
        assert await closed_without_answer(reader)  # closed with our trickle unread
        writer.close()
        await settled(relay)
    (record,) = records(store, "pvtap_connection")
    assert (record.tags["action"], record.tags["outcome"]) == ("refused", "first_byte_timeout")
    assert "no TLS handshake from the device within 0.5 s" in record.fields["detail"]


# -- UDP ----------------------------------------------------------------------------------------

def test_the_udp_token_bucket_limits_each_source_and_forgets_the_oldest():
    rates = SourceRates(rate=2, capacity=100)
    assert [rates.allow("a", 0.0) for _ in range(3)] == [True, True, False]  # a burst of one second's worth
    assert rates.allow("b", 0.0)  # another source has its own bucket
    assert not rates.allow("a", 0.2) and rates.allow("a", 0.5)  # refills at 2 a second
    for i in range(10_000):
        rates.allow(f"spoofed-{i}", 1.0)
    assert len(rates) == 100


async def test_a_udp_flood_from_one_source_is_cut_to_its_rate_others_unaffected(store, caplog):
    caplog.set_level(logging.INFO)
    config = listener(policy="local", transport="udp", udp_max_rate=5)
    async with running_relay(config, store=store) as (relay, port):
        counts = relay.listeners[0].datagrams
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as device:
            flood.bind((HOSTILE, 0))
            device.bind((DEVICE, 0))
            for _ in range(200):
                flood.sendto(b"flood", ("127.0.0.1", port))
            device.sendto(b"heartbeat", ("127.0.0.1", port))
            await until(lambda: counts.datagrams >= 201, what="all 201 datagrams to be counted")
    passed = [p.payload for p in archived(store)]
    assert passed.count(b"heartbeat") == 1
    assert 5 <= passed.count(b"flood") < 200 and counts.over_rate == 200 - passed.count(b"flood")
    summary = next(r.getMessage() for r in caplog.records if "datagrams," in r.getMessage())
    assert f"{counts.over_rate} over udp_max_rate" in summary
    assert sum("udp_max_rate" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1


async def test_udp_datagrams_from_outside_allow_from_are_dropped_and_counted(store, caplog):
    caplog.set_level(logging.INFO)
    config = listener(policy="local", transport="udp", allow_from=[DEVICE])
    async with running_relay(config, store=store) as (relay, port):
        counts = relay.listeners[0].datagrams
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as device:
            other.bind((HOSTILE, 0))
            device.bind((DEVICE, 0))
            for _ in range(5):
                other.sendto(b"not yours", ("127.0.0.1", port))
            device.sendto(b"heartbeat", ("127.0.0.1", port))
            await until(lambda: counts.datagrams >= 6, what="all 6 datagrams to be counted")
    assert [p.payload for p in archived(store)] == [b"heartbeat"]
    assert counts.not_allowed == 5
    assert any("0 over udp_max_rate, 5 not in allow_from" in r.getMessage() for r in caplog.records)


def test_the_allow_list_matches_networks_and_single_addresses_of_both_families():
    allow = AllowList(["192.0.2.0/24", "198.51.100.7", "2001:db8:1::/64"])
    assert [allow.allows(host) for host in ("192.0.2.200", "198.51.100.7", "198.51.100.8", "2001:db8:1::10",
                                            "2001:db8:2::10", "fe80::1%eth0", "not an address")] == [
        True, True, False, True, False, False, False]
    assert AllowList([]).allows("203.0.113.1")  # empty: everyone
