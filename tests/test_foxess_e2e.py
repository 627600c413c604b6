"""FoxESS end to end on 127.0.0.1, with the real relay, decoder, ingest worker and store:

- the M1 simulator → the relay terminating TLS on a `pvtap certs foxess` certificate → a TLS
  stand-in cloud with its own self-signed certificate, pinned by the relay: both sides see the
  same application bytes, the telemetry is stored; a wrong pin refuses the upstream and records
  why (fixed) or lets the relay answer the M1 itself (auto);
- the hub channel in local mode against the write-up's inverter behaviour (two logins, heartbeats);
- UDP presence broadcasts into two UDP listeners, and a 64 KB garbage datagram;
- the H-series in cleartext with a Modbus read from the cloud side;
plus the listener settings for TLS and UDP (checks, certificate generation, the defaults).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
from pathlib import Path

import pytest

from proxy_tcp import default_listeners, relay_running
from proxy_tcp.tls import in_data_dir
from pvtap.certs import foxess_pair, sha256_fingerprint
from pvtap.config import ConfigError, ListenerConfig, check_listener, load_config
from pvtap.decode.foxess import decode_m1_telemetry, parse_modbus
from pvtap.privacy import Privacy
from pvtap.simulate.foxess_cloud import FoxCloud
from pvtap.simulate.foxess_h1 import SERIAL as H1_SERIAL
from pvtap.simulate.foxess_h1 import H1Simulator
from pvtap.simulate.foxess_m1 import ACTIVE_POWER_LIMIT, SERIAL, M1Simulator, SimulatorError, join_me_req
from pvtap.store.local import LocalStore
from tests.waiting import until

pytestmark = pytest.mark.timeout(90)


class Stack:
    """The relay of one test with its real store, decoders and ingest worker (a thread here)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.store = LocalStore.for_process(data_dir, "relay")

    def running(self, *listeners: ListenerConfig):
        return relay_running(listeners, store=self.store, privacy=Privacy())

    def records(self, measurement: str) -> list:
        """After the relay stopped: its worker archived and decoded everything."""
        return [s.record for s in self.store.records(measurements=[measurement])]


@pytest.fixture
def stack(data_dir):
    s = Stack(data_dir)
    yield s
    s.store.close()


@pytest.fixture(scope="module")
def relay_cert(tmp_path_factory) -> tuple[Path, Path]:
    """The listener's pair, as `pvtap certs foxess` makes it (RSA, CN=monitor)."""
    return foxess_pair(tmp_path_factory.mktemp("certs"))


def m1_listener(cloud: FoxCloud, relay_cert, **settings) -> ListenerConfig:
    settings.setdefault("policy", "fixed")
    settings.setdefault("upstream_pin_sha256", cloud.fingerprint)
    return ListenerConfig(protocol="foxess", listen="127.0.0.1:0", upstream=f"127.0.0.1:{cloud.port}",
                          tls_cert=str(relay_cert[0]), tls_key=str(relay_cert[1]), upstream_tls=True, **settings)


async def ended(relay, timeout: float = 10.0) -> None:
    """Until the relay has ended (and recorded) every connection."""
    await until(lambda: not relay.connections, timeout, what="the relay to end every connection")


def port_of(relay, index: int = 0) -> int:
    return relay.listeners[index].endpoints[0].port


@pytest.mark.slow
async def test_m1_through_tls_pinned_byte_identical_and_stored(stack, relay_cert):
    async with FoxCloud(tls=True) as cloud:
        async with stack.running(m1_listener(cloud, relay_cert)) as relay:
            sim = M1Simulator(seed=7)
            run = asyncio.create_task(sim.run_cloud("127.0.0.1", port_of(relay), count=3, interval=0.05, linger=0.5))
            session = await cloud.wait_session()
            await session.wait_frame(lambda f: f.function == 0x02)
            assert parse_modbus(await session.modbus_read(ACTIVE_POWER_LIMIT)).values == (100,)
            assert await run == 3
            await session.closed.wait()
            await ended(relay)

    # the application bytes crossed unmodified, both ways, over TLS on both sides
    assert bytes(session.received) == bytes(sim.sent) and bytes(sim.received) == bytes(session.sent)
    assert [f.function for f in sim.frames_received][:3] == [0xAA, 0xAC, 0xAB]  # the cloud's acks, relayed
    assert session.tls is not None and session.tls[0] in ("TLSv1.2", "TLSv1.3")  # the relay's own TLS session
    assert sha256_fingerprint(relay_cert[0].read_bytes()) != cloud.fingerprint  # two different TLS sessions

    telemetry = stack.records("foxess_telemetry")
    assert len(telemetry) == 3
    for record, values, frame in zip(telemetry, sim.telemetry, [f for f in session.frames if f.function == 2]):
        assert record.tags == {"serial": SERIAL, "layout": "m1"}
        assert dict(record.fields) == decode_m1_telemetry(frame.payload)
        assert record.fields["ac_power_w"] == values.ac_power_w
    (registration,) = stack.records("foxess_registration")
    assert registration.tags["serial"] == SERIAL and registration.fields["datalogger_firmware"] == "v1.31"
    (register,) = stack.records("foxess_register")
    assert (register.tags["register"], register.fields["value"]) == (str(ACTIVE_POWER_LIMIT), 100)
    (connection,) = stack.records("pvtap_connection")
    assert (connection.tags["action"], connection.tags["outcome"]) == ("forward", "device_closed")
    assert connection.fields["bytes_up"] == len(sim.sent) and connection.fields["bytes_down"] == len(sim.received)
    assert connection.fields["rejected"] == 0 and connection.origin.device == SERIAL


@pytest.mark.slow
async def test_a_wrong_pin_refuses_the_upstream_and_records_why(stack, relay_cert):
    wrong = "ab" * 32
    async with FoxCloud(tls=True) as cloud:
        async with stack.running(m1_listener(cloud, relay_cert, upstream_pin_sha256=wrong)) as relay:
            with pytest.raises(SimulatorError):
                await M1Simulator(ack_timeout=5).run_cloud("127.0.0.1", port_of(relay), count=1, interval=0)
            await ended(relay)
        session = await cloud.wait_session()
        await session.closed.wait()
    assert session.received == b""  # not one application byte reached the impostor
    (connection,) = stack.records("pvtap_connection")
    assert (connection.tags["action"], connection.tags["outcome"]) == ("refused", "upstream_failed")
    assert f"SHA-256 {cloud.fingerprint}, not the pinned {wrong}" in connection.fields["detail"]


@pytest.mark.slow
async def test_upstream_checked_by_a_ca_file_or_explicitly_not_at_all(stack, relay_cert):
    async with FoxCloud(tls=True) as cloud:
        # The cloud's self-signed certificate as the CA: the chain holds, its name does not (it
        # is for "monitor", not 127.0.0.1), so the CA check refuses it.
        by_ca = m1_listener(cloud, relay_cert, upstream_pin_sha256="", upstream_ca_file=str(cloud.cert_path))
        insecure = m1_listener(cloud, relay_cert, upstream_pin_sha256="", upstream_insecure=True)
        async with stack.running(by_ca, insecure) as relay:
            with pytest.raises(SimulatorError):
                await M1Simulator(ack_timeout=5).run_cloud("127.0.0.1", port_of(relay, 0), count=1, interval=0)
            assert await M1Simulator().run_cloud("127.0.0.1", port_of(relay, 1), count=1, interval=0) == 1
            await ended(relay)
    refused, forwarded = sorted(stack.records("pvtap_connection"), key=lambda r: r.tags["action"], reverse=True)
    assert (refused.tags["action"], refused.tags["outcome"]) == ("refused", "upstream_failed")
    assert "TLS handshake failed: IP address mismatch" in refused.fields["detail"]
    assert (forwarded.tags["action"], forwarded.tags["outcome"]) == ("forward", "device_closed")


@pytest.mark.slow
async def test_auto_with_a_wrong_pin_answers_the_m1_itself(stack, relay_cert):
    async with FoxCloud(tls=True) as cloud:
        listener = m1_listener(cloud, relay_cert, policy="auto", upstream_pin_sha256="cd" * 32)
        async with stack.running(listener) as relay:
            sim = M1Simulator()
            assert await sim.run_cloud("127.0.0.1", port_of(relay), count=2, interval=0.05) == 2
            await ended(relay)
    assert [f.function for f in sim.frames_received] == [0xAA, 0xAC, 0xAB]  # the relay's own acks
    assert len(stack.records("foxess_telemetry")) == 2
    (connection,) = stack.records("pvtap_connection")
    assert connection.tags["action"] == "local" and "not the pinned" in connection.fields["cloud_error"]


@pytest.mark.slow
async def test_a_device_that_fails_the_tls_handshake_is_recorded(stack, relay_cert):
    async with FoxCloud(tls=True) as cloud:
        async with stack.running(m1_listener(cloud, relay_cert)) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(relay))
            writer.write(b"\x7e\x7e not a TLS client hello\r\n" * 4)
            await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await ended(relay)
    (connection,) = stack.records("pvtap_connection")
    assert (connection.tags["action"], connection.tags["outcome"]) == ("refused", "device_tls_failed")
    assert not cloud.sessions  # no upstream for a device that never got through


@pytest.mark.slow
async def test_hub_channel_in_local_mode_holds_the_session_and_mirrors_heartbeats(stack):
    hub = ListenerConfig(protocol="foxess", listen="127.0.0.1:0", policy="local")
    async with stack.running(hub) as relay:
        result = await M1Simulator().run_hub("127.0.0.1", port_of(relay), heartbeats=5, interval=0.05)
        await ended(relay)
    assert set(result.acks) == {"A", "B"}
    assert (result.heartbeats_sent, result.heartbeats_mirrored) == (5, 5)
    logins = stack.records("foxess_hub_login")
    assert sorted((r.tags["channel"], r.tags["serial"], r.fields["firmware"]) for r in logins) == [
        ("A", SERIAL, "v1.31"), ("B", SERIAL, "")]
    assert [r.tags["channel"] for r in stack.records("foxess_hub_ack")] == ["A", "B"]
    beats = stack.records("foxess_hub_heartbeat")
    assert sorted(r.origin.direction for r in beats) == ["down"] * 5 + ["up"] * 5
    (connection,) = stack.records("pvtap_connection")
    assert (connection.tags["action"], connection.tags["outcome"]) == ("local", "device_closed")
    assert connection.origin.device == SERIAL


@pytest.mark.slow
async def test_udp_broadcasts_become_presence_and_garbage_is_counted(stack):
    udp = [ListenerConfig(protocol="foxess", listen="127.0.0.1:0", transport="udp", policy="local") for _ in range(2)]
    async with stack.running(*udp) as relay:
        mesh_port, heartbeat_port = port_of(relay, 0), port_of(relay, 1)
        counts = [listener.datagrams for listener in relay.listeners]
        mesh, beats = await M1Simulator(seed=2).broadcast(
            "127.0.0.1", mesh_port=mesh_port, heartbeat_port=heartbeat_port, mesh_interval=0.05,
            heartbeat_interval=0.1, duration=0.3)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(bytes(range(256)) * 250 + b"\xff" * 1000, ("127.0.0.1", heartbeat_port))  # 65 000 B
            sock.sendto(join_me_req(999, 1), ("127.0.0.1", mesh_port))  # still listening after it
        await until(lambda: counts[0].datagrams >= mesh + 1 and counts[1].datagrams >= beats + 1,
                    what="every datagram, the oversized one and the one after it, to be counted")
    presence = stack.records("foxess_presence")
    assert sum(r.tags["source"] == "mesh" for r in presence) == mesh + 1
    assert sum(r.tags["source"] == "heartbeat" for r in presence) == beats
    assert {r.tags["mac"] for r in presence if r.tags["source"] == "mesh"} == {"REDACTED"}  # no network identity kept
    assert {r.tags["port"] for r in presence} == {str(mesh_port), str(heartbeat_port)}
    (garbage,) = [s for s in stack.store.raw_payloads() if s.decode_error]  # the one decode error
    assert garbage.raw.meta["withheld_size"] == 65_000 and garbage.raw.payload == b""
    assert counts[1].bytes == beats * 14 + 65_000 and counts[1].dropped == 0


@pytest.mark.slow
async def test_h_series_in_cleartext_with_a_modbus_read_from_the_cloud(stack):
    async with FoxCloud(tls=False, ack_bootstrap=False) as cloud:
        listener = ListenerConfig(protocol="foxess", listen="127.0.0.1:0", policy="fixed",
                                  upstream=f"127.0.0.1:{cloud.port}")
        async with stack.running(listener) as relay:
            sim = H1Simulator(seed=4)
            run = asyncio.create_task(sim.run("127.0.0.1", port_of(relay), count=2, interval=0.05, linger=0.5))
            session = await cloud.wait_session()
            await session.wait_frame(lambda f: f.function == 0x02)
            reply = await session.modbus_read(11000, 13, function=0x04)
            assert await run == 2
            await session.closed.wait()
            await ended(relay)
    assert bytes(session.received) == bytes(sim.sent) and bytes(sim.received) == bytes(session.sent)
    words = tuple(w & 0xFFFF for w in sim.realtime[0].words())
    assert parse_modbus(reply).values == words
    (modbus_reply,) = [r for r in stack.records("foxess_modbus") if r.tags["message"] == "reply"]
    assert modbus_reply.tags["serial"] == H1_SERIAL
    assert (modbus_reply.fields["register"], modbus_reply.fields["count"]) == (11000, 13)
    registers = {int(r.tags["register"]): r.fields["value"] for r in stack.records("foxess_register")}
    assert registers == {11000 + i: w for i, w in enumerate(words)}
    realtime = stack.records("foxess_h1_realtime")
    assert len(realtime) == 2 and realtime[0].fields["pv1_power_w"] == sim.realtime[0].pv1_power_w
    (info,) = stack.records("foxess_product_info")
    assert info.fields["model"] == "H1-3.7-E"
    (batteries,) = stack.records("foxess_battery_serials")
    assert batteries.fields["battery_count"] == 2


# -- listener settings ---------------------------------------------------------------------------

def check(**settings) -> None:
    settings.setdefault("protocol", "foxess")
    settings.setdefault("listen", "127.0.0.1:14431")
    check_listener(ListenerConfig(**settings), lambda name: f"relay.listeners[0].{name}")


@pytest.mark.parametrize("settings, key, words", [
    (dict(policy="fixed", upstream="127.0.0.1:1", upstream_tls=True), "upstream_tls", "nothing says how"),
    (dict(policy="fixed", upstream="127.0.0.1:1", upstream_tls=True, upstream_insecure=True,
          upstream_pin_sha256="ab" * 32), "upstream_tls", "choose one"),
    (dict(policy="fixed", upstream="127.0.0.1:1", upstream_insecure=True), "upstream_insecure", "upstream_tls = true"),
    (dict(policy="local", upstream_tls=True, upstream_insecure=True), "upstream_tls", "no upstream"),
    (dict(policy="fixed", upstream="127.0.0.1:1", upstream_tls=True, upstream_ca_file="/nonexistent.pem"),
     "upstream_ca_file", "no such file"),
    (dict(policy="local", tls_cert="a.crt"), "tls_key", "both"),
    (dict(policy="fixed", upstream="127.0.0.1:1", transport="udp"), "policy", "only listens"),
    (dict(policy="local", transport="udp", tls_cert="a.crt", tls_key="a.key"), "transport", "TCP listener"),
])
def test_listener_tls_and_udp_settings_are_checked(settings, key, words):
    with pytest.raises(ConfigError) as error:
        check(**settings)
    assert error.value.key == f"relay.listeners[0].{key}" and words in str(error.value)


def test_a_malformed_pin_is_a_config_error_naming_the_key(tmp_path):
    path = tmp_path / "pvtap.toml"
    path.write_text('[[relay.listeners]]\nprotocol = "foxess"\nlisten = "127.0.0.1:14431"\npolicy = "fixed"\n'
                    'upstream = "127.0.0.1:1"\nupstream_tls = true\nupstream_pin_sha256 = "xyz"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    assert error.value.key == "relay.listeners[0].upstream_pin_sha256"
    path.write_text(path.read_text().replace('"xyz"', '"' + ":".join(["AB"] * 32) + '"'))
    assert load_config(path, env={}).relay.listeners[0].upstream_pin_sha256.count(":") == 31


def test_default_listeners_carry_every_foxess_channel_and_resolve_certs_in_the_data_dir(tmp_path):
    listeners = default_listeners()
    for listener in listeners:
        check_listener(listener, lambda name: name)
    foxess = {(lst.transport, lst.listen.rpartition(":")[2]): lst for lst in listeners if lst.protocol == "foxess"}
    assert set(foxess) == {("tcp", "10001"), ("tcp", "14431"), ("tcp", "6666"), ("udp", "6364"), ("udp", "3334")}
    m1 = foxess[("tcp", "14431")]
    assert m1.upstream_tls and len(m1.upstream_pin_sha256) == 64 and not m1.upstream_insecure
    placed = in_data_dir(m1, tmp_path)
    assert (placed.tls_cert, placed.tls_key) == (str(tmp_path / "certs/foxess-monitor.crt"),
                                                 str(tmp_path / "certs/foxess-monitor.key"))
    absolute = dataclasses.replace(m1, tls_cert="/abs/c.crt", tls_key="/abs/c.key")
    assert in_data_dir(absolute, tmp_path).tls_cert == "/abs/c.crt"
    assert foxess[("tcp", "6666")].policy == "local"


async def test_a_missing_pair_is_generated_with_the_configured_subject(tmp_path):
    listener = ListenerConfig(protocol="foxess", listen="127.0.0.1:0", policy="local",
                              tls_cert=str(tmp_path / "tls/relay.crt"), tls_key=str(tmp_path / "keys/relay.key"),
                              tls_subject="/C=CN/ST=JiangSu/L=Wuxi/O=FoxESS/CN=monitor")
    async with relay_running([listener], store=tmp_path / "r.sqlite") as relay:
        port = port_of(relay)
        pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", port))
    assert (tmp_path / "keys/relay.key").stat().st_mode & 0o777 == 0o600
    assert sha256_fingerprint(pem.encode()) == sha256_fingerprint((tmp_path / "tls/relay.crt").read_bytes())
    from cryptography import x509
    subject = x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()
    assert subject == "CN=monitor,O=FoxESS,L=Wuxi,ST=JiangSu,C=CN"
    # half a pair is refused at start, naming the missing file
    (tmp_path / "keys/relay.key").unlink()
    with pytest.raises(ConfigError) as error:
        async with relay_running([listener], store=tmp_path / "r.sqlite"):
            pass
    assert error.value.key == "relay.listeners[0].tls_key"
