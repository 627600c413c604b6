"""Bench: what the relay costs, side by side with a direct connection and with socat.

    .venv/bin/python bench/relay.py [--megabytes 256] [--runs 3] [--round-trips 2000] [--loops uvloop asyncio]

Everything runs on 127.0.0.1 with ephemeral ports: a sink (and echo) server in its own process,
socat (`socat -b1048576 TCP-LISTEN … TCP:…`), and `python -m proxy_tcp` with a fixed upstream, as
a user would start it, once per event loop (relay.event_loop). Relay rows: bulk AlphaESS frames
(every chunk copied to the ingest worker, which archives every frame and decodes after) and an
opaque stream (a TLS-like start: the worker gives up at once, so that row is the bare pump).

Bulk: MB/s to send N MiB one way until the sink has all of it (best of the runs). Latency: round
trip of one 263-byte realtime frame echoed back, median and 99th percentile over many round trips.
Ratios are against the direct connection and against socat, in one table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pvtap.decode.alphaess import REQUEST, encode_frame  # noqa: E402

FRAME = encode_frame(REQUEST, 16, (
    b'{"Time":"2024/03/03 22:05:21","SN":"ALSIM0000000001","Ppv1":"0","Ppv2":"0","PrealL1":"420",'
    b'"PrealL2":"0.0","PrealL3":"0.0","PmeterL1":"-4","PmeterL2":"0","PmeterL3":"0","PmeterDC":"0",'
    b'"Pbat":"539.4400","Sva":"405","VarAC":"-669","VarDC":"96","SOC":"38.0"}'))
BLOCK = 1 << 20


# -- servers in their own process -------------------------------------------------------------

def _serve(listener: socket.socket, mode: str) -> None:
    """sink: read to EOF, answer the byte count (8 bytes); echo: send back what arrives."""
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = bytearray(BLOCK)
            if mode == "sink":
                total = 0
                while n := conn.recv_into(buffer):
                    total += n
                conn.sendall(total.to_bytes(8, "big"))
            else:
                while n := conn.recv_into(buffer):
                    conn.sendall(memoryview(buffer)[:n])


def start_server(mode: str) -> tuple[multiprocessing.Process, int]:
    listener = socket.create_server(("127.0.0.1", 0))
    process = multiprocessing.Process(target=_serve, args=(listener, mode), daemon=True)
    process.start()
    port = listener.getsockname()[1]
    listener.close()
    return process, port


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Hop:
    """Something between the client and the server: nothing, socat, or the relay."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: subprocess.Popen | None = None

    def start(self, upstream: int) -> int:
        return upstream

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(120)


class Socat(Hop):
    def start(self, upstream: int) -> int:
        port = free_port()
        self.proc = subprocess.Popen(["socat", "-b1048576", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                                      f"TCP:127.0.0.1:{upstream},nodelay"], stderr=subprocess.DEVNULL)
        wait_listening(port)
        return port


class Relay(Hop):
    READY = re.compile(r"relay listening: \S+ on 127\.0\.0\.1:(\d+) ")

    def __init__(self, name: str, data_dir: Path, loop: str = "asyncio") -> None:
        super().__init__(name)
        self.data_dir = data_dir
        self.loop = loop
        self.log: list[str] = []

    def start(self, upstream: int) -> int:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy_tcp", "--data-dir", str(self.data_dir), "--protocol", "alphaess",
             "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PVTAP_RELAY_EVENT_LOOP": self.loop})
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            self.log.append(line)
            if m := self.READY.search(line):
                # keep reading its log, so a full pipe never holds the relay up
                self.reader = threading.Thread(target=self._read_log, daemon=True)
                self.reader.start()
                return int(m[1])
        raise RuntimeError("the relay did not start:\n" + "".join(self.log))

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        self.log.extend(self.proc.stdout)

    def stop(self) -> None:
        super().stop()
        self.reader.join(10)


# -- measurements -----------------------------------------------------------------------------

def bulk(port: int, payload: bytes, runs: int) -> float:
    """Best MB/s over `runs` connections, each sending all of `payload` until the sink has it."""
    best = 0.0
    view = memoryview(payload)
    for _ in range(runs):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            started = time.perf_counter()
            for i in range(0, len(view), BLOCK):
                sock.sendall(view[i:i + BLOCK])
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while len(answer) < 8 and (data := sock.recv(8)):
                answer += data
            elapsed = time.perf_counter() - started
        if int.from_bytes(answer, "big") != len(payload):
            raise RuntimeError(f"the sink got {int.from_bytes(answer, 'big')} of {len(payload)} bytes")
        best = max(best, len(payload) / elapsed / 1e6)
    return best


def round_trips(port: int, count: int, first: bytes) -> tuple[float, float]:
    """Median and 99th percentile round trip (µs) of one frame echoed back, after `first`."""
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(first)
        got = 0
        while got < len(first):
            got += len(sock.recv(65536))
        for i in range(count + 50):
            started = time.perf_counter()
            sock.sendall(FRAME)
            got = 0
            while got < len(FRAME):
                got += len(sock.recv(65536))
            if i >= 50:  # warm-up
                times.append((time.perf_counter() - started) * 1e6)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=256, help="MiB sent per bulk run (default 256)")
    parser.add_argument("--runs", type=int, default=3, help="bulk runs per path, best counts (default 3)")
    parser.add_argument("--round-trips", type=int, default=2000, help="echoed frames per path (default 2000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="repeat everything, paths interleaved; the best figures count (default 3)")
    parser.add_argument("--loops", nargs="+", default=["asyncio", "uvloop"], choices=["asyncio", "uvloop"],
                        help="the relay's event loops to measure (default both)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (bench/all.py reads it)")
    args = parser.parse_args()
    if shutil.which("socat") is None:
        print("bench/relay.py: socat is not installed (Debian package socat)", file=sys.stderr)
        return 2

    size = args.megabytes << 20
    frames = (FRAME * (size // len(FRAME) + 1))[:size]
    opaque = bytes.fromhex("160301") + os.urandom(size - 3)
    sink, sink_port = start_server("sink")
    echo, echo_port = start_server("echo")
    best: dict[str, list[float]] = {}  # label → [MB/s, median µs, p99 µs], best over the repeats
    with tempfile.TemporaryDirectory(prefix="pvtap-bench-") as tmp:
        paths: list[tuple[str, Callable[[], Hop], bytes]] = [
            ("direct", lambda: Hop("direct"), frames), ("socat", lambda: Socat("socat"), frames)]
        for loop in args.loops:
            paths += [(f"relay ({loop}), AlphaESS frames", partial(Relay, "relay", Path(tmp) / f"f-{loop}", loop),
                       frames),
                      (f"relay ({loop}), opaque stream", partial(Relay, "relay", Path(tmp) / f"o-{loop}", loop),
                       opaque)]
        try:
            for repeat in range(1, args.repeat + 1):
                for label, make, payload in paths:  # interleaved, so load from elsewhere hits every path
                    print(f"  [{repeat}/{args.repeat}] {label}: bulk {args.megabytes} MiB × {args.runs}, "
                          f"{args.round_trips} round trips", file=sys.stderr, flush=True)
                    hop = make()
                    mbps = bulk(hop.start(sink_port), payload, args.runs)
                    hop.stop()
                    hop = make()
                    median, p99 = round_trips(hop.start(echo_port), args.round_trips, payload[:len(FRAME)])
                    hop.stop()
                    if isinstance(hop, Relay):
                        stopped = next((line for line in hop.log if "relay stopped:" in line), "")
                        print(f"    {stopped.partition('proxy_tcp: ')[2].strip()}", file=sys.stderr)
                        lost = [line for line in hop.log if " lost" in line]
                        if lost:
                            print(f"    {lost[0].strip()}", file=sys.stderr)
                    old = best.setdefault(label, [mbps, median, p99])
                    old[0], old[1:] = max(old[0], mbps), min(old[1:], [median, p99])
        finally:
            sink.terminate()
            echo.terminate()
    rows = [(label, mbps, median, p99) for label, (mbps, median, p99) in best.items()]

    direct, socat_row = rows[0], rows[1]
    print(f"\nbulk {args.megabytes} MiB one way (best of {args.runs} × {args.repeat}); round trip of a "
          f"{len(FRAME)}-byte frame (median / p99 of {args.round_trips}, best of {args.repeat}); "
          f"{os.cpu_count()} CPUs\n")
    print(f"{'path':<34}{'MB/s':>9}{'÷direct':>9}{'÷socat':>8}{'RTT µs':>9}{'p99 µs':>9}"
          f"{'+µs direct':>12}{'×direct':>9}{'×socat':>8}")
    for label, mbps, median, p99 in rows:
        print(f"{label:<34}{mbps:>9.0f}{mbps / direct[1]:>9.2f}{mbps / socat_row[1]:>8.2f}{median:>9.0f}{p99:>9.0f}"
              f"{median - direct[2]:>12.0f}{median / direct[2]:>9.2f}{median / socat_row[2]:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "megabytes": args.megabytes, "round_trips": args.round_trips, "frame_bytes": len(FRAME),
            "paths": {label: {"mb_s": mbps, "rtt_median_us": median, "rtt_p99_us": p99}
                      for label, mbps, median, p99 in rows}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
