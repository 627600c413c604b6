"""What the relay costs an M1 connection: TLS handshake and steady state, through the relay
against a direct TLS connection, side by side in one run.

Three processes on 127.0.0.1: the stand-in cloud (`python -m pvtap.simulate.foxess_cloud`, TLS,
self-signed CN=monitor), the relay (`python -m proxy_tcp`, one foxess listener terminating TLS
with a `pvtap certs foxess`-style certificate and re-encrypting to the cloud, pinned), and this
client, which speaks like the M1 (TLS 1.2, ECDHE-RSA-AES-GCM, no certificate check).

Per connection it measures
- handshake: TCP connect + TLS handshake, as the device sees it;
- first answer: the registration (0x2A) until its 0xAA acknowledgement — through the relay this
  includes the relay's own connect and TLS handshake to the cloud;
- steady state: round trips of a bootstrap step (0x2B → 0xAB, 14-byte frames) and the time to
  push telemetry frames (251 bytes each) and get an answer behind them;
and the relay process's CPU time (from /proc; it idles during the direct connections) per
connection and per frame. The direct side runs the same client against the same cloud,
alternating with the relayed side connection by connection.

    .venv/bin/python bench/foxess_tls.py [--connections 40] [--exchanges 200] [--telemetry 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pvtap.certs import foxess_pair  # noqa: E402
from pvtap.decode import foxess  # noqa: E402
from pvtap.decode.foxess import FrameSplitter, build_frame  # noqa: E402
from pvtap.simulate.foxess_m1 import client_context, registration_payload  # noqa: E402

PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    handshake: list[float] = field(default_factory=list)
    first_answer: list[float] = field(default_factory=list)
    round_trip: list[float] = field(default_factory=list)
    telemetry: list[float] = field(default_factory=list)  # seconds per telemetry frame, per connection


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


async def wait_for(reader: asyncio.StreamReader, splitter: FrameSplitter, function: int) -> None:
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("closed before the answer")
        if any(kind == "frame" and chunk[2] == function for kind, chunk in splitter.feed(data)):
            return


async def one_connection(port: int, exchanges: int, telemetry: int, sample: Sample) -> None:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(), server_hostname="")
    t1 = time.perf_counter()
    splitter = FrameSplitter()
    writer.write(build_frame(foxess.REGISTRATION, registration_payload("60MSIMULATED001"), stamp=1))
    await wait_for(reader, splitter, 0xAA)
    t2 = time.perf_counter()
    sample.handshake.append(t1 - t0)
    sample.first_answer.append(t2 - t1)
    step = build_frame(foxess.BOOTSTRAP_STEP3, b"\x00", stamp=2)
    for _ in range(exchanges):
        t = time.perf_counter()
        writer.write(step)
        await wait_for(reader, splitter, 0xAB)
        sample.round_trip.append(time.perf_counter() - t)
    frame = build_frame(foxess.REALTIME, bytes(foxess.M1_TELEMETRY_LENGTH), stamp=3)
    t = time.perf_counter()
    writer.write(frame * telemetry + step)  # the ack behind them proves they all went through
    await wait_for(reader, splitter, 0xAB)
    sample.telemetry.append((time.perf_counter() - t) / max(telemetry, 1))
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def run_sides(ports: dict[str, int], connections: int, exchanges: int, telemetry: int) -> dict[str, Sample]:
    """One connection at a time (per-connection cost, not contention), alternating between the
    sides so that drift on a shared machine hits both alike."""
    samples = {name: Sample() for name in ports}
    for _ in range(connections):
        for name, port in ports.items():
            await one_connection(port, exchanges, telemetry, samples[name])
    return samples


def start(cmd: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=log.open("w") if log else subprocess.DEVNULL, text=True)


def wait_line(proc: subprocess.Popen, prefix: str, timeout: float = 30.0) -> str:
    assert proc.stdout is not None and isinstance(proc.args, list)  # as start() makes them
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"{proc.args[2] if len(proc.args) > 2 else proc.args}: no {prefix!r} line")


def wait_port(port: int, timeout: float = 30.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ms(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    return f"{statistics.median(values) * 1000:7.2f} / {p95 * 1000:7.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=40, help="M1 connections per side (default 40)")
    parser.add_argument("--exchanges", type=int, default=200, help="0x2B/0xAB round trips per connection (200)")
    parser.add_argument("--telemetry", type=int, default=200, help="telemetry frames pushed per connection (200)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pvtap-bench-foxess-") as tmp:
        tmp_path = Path(tmp)
        cloud = start([PYTHON, "-m", "pvtap.simulate.foxess_cloud", "--port", "0",
                       "--cert-dir", str(tmp_path / "cloud")])
        relay = None
        try:
            line = wait_line(cloud, "listening ").split()
            cloud_port, pin = int(line[1].rpartition(":")[2]), line[3]
            cert, key = foxess_pair(tmp_path / "certs")
            relay_port = free_port()
            config = tmp_path / "relay.toml"
            config.write_text(
                f'data_dir = "{tmp_path / "data"}"\nlog_level = "warning"\n\n[[relay.listeners]]\nprotocol = "foxess"\n'
                f'listen = "127.0.0.1:{relay_port}"\npolicy = "fixed"\nupstream = "127.0.0.1:{cloud_port}"\n'
                f'tls_cert = "{cert}"\ntls_key = "{key}"\nupstream_tls = true\nupstream_pin_sha256 = "{pin}"\n')
            relay = start([PYTHON, "-m", "proxy_tcp", "--config", str(config)], log=tmp_path / "relay.log")
            wait_port(relay_port)

            relay_cpu = cpu_seconds(relay.pid)
            started = time.perf_counter()
            results = asyncio.run(run_sides({"direct": cloud_port, "relay": relay_port}, args.connections,
                                            args.exchanges, args.telemetry))
            elapsed = time.perf_counter() - started
            relay_cpu = cpu_seconds(relay.pid) - relay_cpu
        finally:
            for proc in (relay, cloud):
                if proc is not None:
                    proc.terminate()
                    proc.wait(10)

    frames = args.connections * (2 + args.exchanges + args.telemetry)
    print(f"FoxESS M1 over TLS: {args.connections} connections per side, each: TLS handshake, registration, "
          f"{args.exchanges} round trips, {args.telemetry} telemetry frames")
    print(f"{'':28}{'direct':>20}{'through relay':>20}{'relay adds':>14}")
    print(f"{'(ms, median / p95)':28}")
    rows = [("TLS handshake", "handshake"), ("first answer (0x2A→0xAA)", "first_answer"),
            ("round trip 0x2B→0xAB", "round_trip"), ("per telemetry frame", "telemetry")]
    for label, attr in rows:
        d, r = getattr(results["direct"], attr), getattr(results["relay"], attr)
        print(f"{label:28}{ms(d):>20}{ms(r):>20}{(statistics.median(r) - statistics.median(d)) * 1000:>11.2f} ms")
    print()
    print(f"relay process CPU (decoding and storing included): {relay_cpu:.2f} s for {args.connections} connections "
          f"= {relay_cpu / args.connections * 1000:.1f} ms per connection, {relay_cpu / frames * 1e6:.0f} µs per frame "
          f"({elapsed:.1f} s wall for both sides)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
