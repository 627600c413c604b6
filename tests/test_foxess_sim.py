"""The FoxESS simulators against the stand-in clouds and the local answerer, over real sockets
and real TLS on loopback (no relay in between), plus the `pvtap certs` and `pvtap simulate`
commands."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import sys
import time

import pytest

from pvtap.cli import main as pvtap_main
from pvtap.config import load_config
from pvtap.decode import foxess
from pvtap.decode.foxess import LocalAnswerer, decode_m1_telemetry, parse_frame, parse_modbus, presence_records
from pvtap.records import Origin, now_utc
from pvtap.simulate.foxess_cloud import FoxCloud
from pvtap.simulate.foxess_h1 import H1Simulator
from pvtap.simulate.foxess_m1 import ACTIVE_POWER_LIMIT, M1Simulator, SimulatorError
from tests.conftest import number

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def cloud(**kwargs):
    server = await FoxCloud(**kwargs).start()
    try:
        yield server
    finally:
        await server.close()


async def test_m1_bootstraps_sends_telemetry_and_answers_modbus_over_tls():
    async with cloud(tls=True) as fox:
        sim = M1Simulator(seed=3)
        run = asyncio.create_task(sim.run_cloud("127.0.0.1", fox.port, count=3, interval=0.05, linger=0.3))
        session = await fox.wait_session()
        await session.wait_frame(lambda f: f.function == foxess.REALTIME)
        assert session.tls[0] == "TLSv1.2" and session.tls[1].startswith("ECDHE-RSA-AES")  # as the M1 offers
        assert parse_modbus(await session.modbus_read(ACTIVE_POWER_LIMIT)).values == (100,)
        assert parse_modbus(await session.modbus_write(ACTIVE_POWER_LIMIT, 50)).values == (50,)
        assert parse_modbus(await session.modbus_read(ACTIVE_POWER_LIMIT)).values == (50,)
        assert await run == 3
        await session.closed.wait()
    functions = [f.function for f in session.frames]
    assert functions[:5] == [0x2A, 0x2C, 0x2B, 0x01, 0x06]
    assert functions.count(0x02) == 3 and functions.count(0x91) == 2 and functions.count(0x92) == 1
    assert [f.function for f in sim.frames_received if f.function & 0x80 and f.function < 0xB0] == [0xAA, 0xAC, 0xAB]
    assert bytes(session.received) == bytes(sim.sent) and bytes(sim.received) == bytes(session.sent)
    telemetry = [decode_m1_telemetry(f.payload) for f in session.frames if f.function == 0x02]
    for fields, values in zip(telemetry, sim.telemetry, strict=True):
        assert fields["ac_power_w"] == values.ac_power_w
        assert abs(number(fields["ac_voltage_v"]) - values.ac_voltage_v) <= 1 / 64
        assert abs(number(fields["generation_total_kwh"]) - values.generation_total_kwh) <= 1 / 256
        assert 49.9 < number(fields["frequency_hz"]) < 50.1
    assert sim.modbus_answered == 3


async def test_m1_gives_up_when_the_cloud_does_not_acknowledge():
    async with cloud(tls=True, ack_bootstrap=False) as fox:
        sim = M1Simulator(ack_timeout=0.3)
        with pytest.raises(SimulatorError, match="no 0xaa acknowledgement"):
            await sim.run_cloud("127.0.0.1", fox.port, count=1, interval=0)
        assert [f.function for f in (await fox.wait_session()).frames] == [0x2A]


async def test_h1_announces_streams_realtime_and_answers_a_modbus_read_in_cleartext():
    async with cloud(tls=False, ack_bootstrap=False) as fox:
        sim = H1Simulator(seed=5)
        run = asyncio.create_task(sim.run("127.0.0.1", fox.port, count=2, interval=0.05, linger=0.3))
        session = await fox.wait_session()
        await session.wait_frame(lambda f: f.function == foxess.REALTIME)
        reply = parse_modbus(await session.modbus_read(11000, 13, function=0x04))
        assert await run == 2
        await session.closed.wait()
    assert [f.function for f in session.frames][:4] == [0x01, 0x06, 0x03, 0x02]
    assert session.sent[:2] == b"\x7f\x7f" and not any(f.function & 0x80 for f in sim.frames_received)
    latest = sim.realtime[0]
    assert reply.values == tuple(w & 0xFFFF for w in latest.words())
    assert bytes(session.received) == bytes(sim.sent) and bytes(sim.received) == bytes(session.sent)


async def serve_answerer() -> asyncio.Server:
    """The relay's local mode reduced to its core: whatever the device sends goes to the
    LocalAnswerer, whatever it returns goes back."""
    async def handle(reader, writer):
        answerer = LocalAnswerer()
        while data := await reader.read(4096):
            writer.write(answerer.feed(data))
            await writer.drain()
        writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_hub_session_holds_against_the_local_answerer():
    server = await serve_answerer()
    async with server:
        port = server.sockets[0].getsockname()[1]
        result = await M1Simulator().run_hub("127.0.0.1", port, heartbeats=4, interval=0.05)
    assert set(result.acks) == {"A", "B"}
    assert [parse_frame(a).stamp for a in result.acks.values()] == [0xFFFFFF03, 0xFEFEFE03]
    assert (result.heartbeats_sent, result.heartbeats_mirrored) == (4, 4)


async def test_hub_client_fails_when_nothing_answers():
    async def silent(reader, writer):
        await reader.read()
        writer.close()
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        with pytest.raises(SimulatorError, match="did not answer"):
            await M1Simulator(ack_timeout=0.3).run_hub("127.0.0.1", server.sockets[0].getsockname()[1],
                                                       heartbeats=1, interval=0)


async def test_udp_broadcasts_decode_to_presence():
    received: list[tuple[bytes, int]] = []
    socks = []
    for _ in range(2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        socks.append(sock)
    mesh_port, heartbeat_port = (s.getsockname()[1] for s in socks)
    counts = await M1Simulator(seed=1).broadcast("127.0.0.1", mesh_port=mesh_port, heartbeat_port=heartbeat_port,
                                                 mesh_interval=0.05, heartbeat_interval=0.1, duration=0.32)
    for sock in socks:
        while True:
            try:
                received.append((sock.recv(65536), sock.getsockname()[1]))
            except BlockingIOError:
                break
        sock.close()
    assert len(received) == sum(counts) and counts[0] > counts[1] > 1
    records = [r for data, port in received for r in presence_records(data, port, Origin("foxess"), now_utc())]
    mesh = [r for r in records if r.tags["source"] == "mesh"]
    beats = [r for r in records if r.tags["source"] == "heartbeat"]
    assert [r.fields["seq"] for r in mesh] == list(range(counts[0]))
    assert {r.fields["vendor_id"] for r in mesh} == {45324} and {r.tags["port"] for r in mesh} == {str(mesh_port)}
    clocks = [number(r.fields["device_clock"]) for r in beats]
    assert len(clocks) == counts[1] and all(abs(c - time.time()) < 5 for c in clocks) and clocks == sorted(clocks)


def run_cli(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pvtap_main(args)
    return code, out.getvalue()


def test_certs_foxess_writes_a_private_key_and_prints_its_pin(tmp_path):
    code, out = run_cli(["--data-dir", str(tmp_path / "data"), "certs", "foxess"])
    assert code == 0
    cert, key = tmp_path / "data/certs/foxess-monitor.crt", tmp_path / "data/certs/foxess-monitor.key"
    assert key.stat().st_mode & 0o777 == 0o600
    from pvtap.certs import sha256_fingerprint
    pin = sha256_fingerprint(cert.read_bytes())
    assert f"sha256       {pin}" in out and "CN=monitor,O=FoxESS,L=Wuxi,ST=JiangSu,C=CN" in out
    snippet = "\n".join(line.strip() for line in out[out.index("[[relay.listeners]]"):].splitlines())
    (tmp_path / "relay.toml").write_text(snippet.replace("<the cloud's SHA-256>", "ab" * 32))
    (listener,) = load_config(tmp_path / "relay.toml", env={}).relay.listeners  # the printed settings load
    assert (listener.tls_cert, listener.tls_key) == (str(cert), str(key))
    code, again = run_cli(["--data-dir", str(tmp_path / "data"), "certs", "foxess"])
    assert "kept the existing pair" in again and pin in again
    code, forced = run_cli(["--data-dir", str(tmp_path / "data"), "certs", "foxess", "--force"])
    assert pin not in forced and key.stat().st_mode & 0o777 == 0o600


async def test_certs_fingerprint_of_a_server_and_a_file(tmp_path):
    async with cloud(tls=True) as fox:
        code, out = await asyncio.to_thread(run_cli, ["certs", "fingerprint", f"127.0.0.1:{fox.port}"])
        assert code == 0 and out.splitlines()[0] == f"sha256   {fox.fingerprint}"
        code, out = await asyncio.to_thread(run_cli, ["certs", "fingerprint", str(fox.cert_path)])
        assert code == 0 and fox.fingerprint in out


async def test_simulate_foxess_m1_command_against_the_stand_in():
    async with cloud(tls=True) as fox:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pvtap", "simulate", "foxess-m1", "--cloud", f"127.0.0.1:{fox.port}",
            "--count", "2", "--interval", "0.1", "--seed", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        session = await fox.wait_session()
        await session.closed.wait()
    assert [f.function for f in session.frames].count(0x02) == 2
    assert "2 telemetry frames" in err.decode()


async def test_simulate_foxess_h1_command_against_the_stand_in():
    async with cloud(tls=False, ack_bootstrap=False) as fox:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pvtap", "simulate", "foxess-h1", "--cloud", f"127.0.0.1:{fox.port}",
            "--count", "1", "--interval", "0.1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        session = await fox.wait_session()
        await session.closed.wait()
    assert [f.function for f in session.frames] == [0x01, 0x06, 0x03, 0x02]
