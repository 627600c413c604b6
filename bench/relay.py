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

Where the bulk time goes, in a second table: the CPU each part used during the bulk windows (from
connecting until the sink's answer that it has every byte), in ms per MiB sent, summed over all
runs of a path: the relay process (every thread), its ingest worker process(es) (its children
`python -m pvtap.ingest.worker`), socat (its own and its per-connection children's, collected
once each is reaped), and this bench's client thread plus the sink's CPU for that connection
(which it reports with its byte count). The relay and worker read their POSIX CPU clocks (ns),
socat its /proc ticks (10 ms: a few hundred MiB make its figure a few percent exact). On 2 cores
these parts share the same two cores, and the worker's framing and archiving of the copies mostly
comes after the window: the last column is the worker's CPU from the first run's start until its
store holds every frame it was given (with what it decoded meanwhile), per MiB of frames archived,
and how long after the last run that was — what archiving costs in all, taken from the cores the
sender, sink and relay need. The store is polled read-only, on the first repeat only (it takes
seconds per 16 MiB). Only for the AlphaESS frames (an opaque stream archives no frames). When the
relay's channel to the worker was full and dropped copies, their frames never come: the worker
is done when no frame came for 15 s, and the column says how many frames of those sent it
archived and how many copies were dropped (from the relay's "relay stopped" line).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cputime import children, cpu_s, reaped_cpu_s, wait_childless  # noqa: E402  (bench/cputime.py)

from pvtap.decode.alphaess import REQUEST, encode_frame  # noqa: E402

FRAME = encode_frame(REQUEST, 16, (
    b'{"Time":"2024/03/03 22:05:21","SN":"ALSIM0000000001","Ppv1":"0","Ppv2":"0","PrealL1":"420",'
    b'"PrealL2":"0.0","PrealL3":"0.0","PmeterL1":"-4","PmeterL2":"0","PmeterL3":"0","PmeterDC":"0",'
    b'"Pbat":"539.4400","Sva":"405","VarAC":"-669","VarDC":"96","SOC":"38.0"}'))
BLOCK = 1 << 20


# -- servers in their own process -------------------------------------------------------------

def _serve(listener: socket.socket, mode: str) -> None:
    """sink: read to EOF, answer the byte count and the CPU ns this connection took (8 bytes
    each); echo: send back what arrives."""
    while True:
        conn, _ = listener.accept()
        with conn:
            started = time.thread_time_ns()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = bytearray(BLOCK)
            if mode == "sink":
                total = 0
                while n := conn.recv_into(buffer):
                    total += n
                conn.sendall(total.to_bytes(8, "big") + (time.thread_time_ns() - started).to_bytes(8, "big"))
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

    def cpu(self) -> dict[str, float]:
        """CPU seconds its parts have used so far."""
        return {}

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

    def cpu(self) -> dict[str, float]:
        """Once the connection's child is reaped: its time is then in socat's."""
        assert self.proc is not None
        wait_childless(self.proc.pid)
        return {"socat": reaped_cpu_s(self.proc.pid)}


class Relay(Hop):
    READY = re.compile(r"relay listening: \S+ on 127\.0\.0\.1:(\d+) ")
    STOPPED = re.compile(r"relay stopped: (\d+) copies sent to \d+ ingest worker\(s\), (\d+) dropped")

    def __init__(self, name: str, data_dir: Path, loop: str = "asyncio") -> None:
        super().__init__(name)
        self.data_dir = data_dir
        self.loop = loop
        self.log: list[str] = []
        self.workers: list[int] = []
        self._counted: dict[Path, tuple[int, int]] = {}  # store → (frames counted, last raw id read)

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
                self.workers = children(self.proc.pid, "pvtap.ingest.worker")  # started before it listens
                return int(m[1])
        raise RuntimeError("the relay did not start:\n" + "".join(self.log))

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        self.log.extend(self.proc.stdout)

    def stop(self) -> None:
        super().stop()
        self.reader.join(10)

    def tell_stop(self) -> None:
        """Its last words on stderr: copies sent to the worker and dropped, and anything lost."""
        stopped = next((line for line in self.log if "relay stopped:" in line), "")
        print(f"    {stopped.partition('proxy_tcp: ')[2].strip()}", file=sys.stderr)
        lost = [line for line in self.log if " lost" in line and "relay stopped:" not in line]
        if lost:
            print(f"    {lost[0].strip()}", file=sys.stderr)

    def copies(self) -> tuple[int, int] | None:
        """Once stopped: copies sent to its worker(s), and dropped (the channel was full)."""
        m = next((m for line in self.log if (m := self.STOPPED.search(line))), None)
        return (int(m[1]), int(m[2])) if m else None

    def cpu(self) -> dict[str, float]:
        assert self.proc is not None
        return {"relay": cpu_s(self.proc.pid), "worker": sum(cpu_s(pid) for pid in self.workers)}

    def archived_frames(self) -> int:
        """Frames in its stores so far (read-only; each call reads only the rows added since the last)."""
        total = 0
        for path in sorted(self.data_dir.glob("*.sqlite")):
            seen, last = self._counted.get(path, (0, 0))
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                new, last = db.execute("SELECT COALESCE(SUM(kind = 'frame'), 0), COALESCE(MAX(id), ?) FROM raw "
                                       "WHERE id > ?", (last, last)).fetchone()
            except sqlite3.OperationalError:  # no table yet
                new = 0
            finally:
                db.close()
            self._counted[path] = (seen + new, last)
            total += seen + new
        return total

    def catch_up(self, frames: int, worker_from: float, stall_s: float = 15.0) -> CatchUp:
        """Wait until its stores (new with it) hold `frames` frames, or until none came for
        `stall_s` (copies were dropped: the rest never comes). The worker's CPU since
        `worker_from` and the time since this call, as of the last frame seen."""
        started = time.monotonic()
        got = self.archived_frames()
        out = CatchUp(frames, got, self.cpu()["worker"] - worker_from, 0.0)
        while got < frames and time.monotonic() - started - out.seconds < stall_s:
            time.sleep(0.2)
            now, cpu = time.monotonic(), self.cpu()["worker"]
            if (count := self.archived_frames()) > got:
                got = count
                out = CatchUp(frames, got, cpu - worker_from, now - started)
        return out


@dataclass
class CatchUp:
    """The ingest worker's work until its archive held every frame it was given."""

    expected: int  # frames sent
    frames: int  # archived (fewer: copies were dropped, and the relay's log says how many)
    worker_cpu: float  # seconds
    seconds: float  # after the bulk runs
    copies: tuple[int, int] | None = None  # copies sent to the worker and dropped (Relay.copies)

    def ms_per_mib(self) -> float | None:
        """The worker's CPU per MiB of frames archived."""
        return self.worker_cpu * 1e3 / (self.frames * len(FRAME) / 2**20) if self.frames else None

    def describe(self) -> str:
        ms = self.ms_per_mib()
        if ms is None:
            return "no frame archived"
        of = ""
        if self.frames < self.expected:
            dropped = f"; {self.copies[1]:,} of {sum(self.copies):,} copies dropped" if self.copies else ""
            of = f" (of {self.frames:,}/{self.expected:,} frames{dropped})"
        return f"{ms:.0f} ms/MiB{of}, {self.seconds:.1f} s after"


# -- measurements -----------------------------------------------------------------------------

@dataclass
class Bulk:
    """`runs` connections' worth of bulk through one hop."""

    mb_s: float = 0.0  # the best run's
    mib: float = 0.0  # sent in all
    cpu: dict[str, float] = field(default_factory=dict)  # part → CPU seconds in the bulk windows, all runs

    def add(self, other: Bulk) -> None:
        """Another's MiB and CPU seconds added to these (the best MB/s is kept elsewhere)."""
        self.mib += other.mib
        for part, seconds in other.cpu.items():
            self.cpu[part] = self.cpu.get(part, 0.0) + seconds


def bulk(port: int, payload: bytes, runs: int) -> float:
    """Best MB/s over `runs` connections, each sending all of `payload` until the sink has it."""
    return bulk_measured(port, payload, runs).mb_s


def bulk_measured(port: int, payload: bytes, runs: int, hop: Hop | None = None) -> Bulk:
    """`bulk`, with the CPU each part used in the windows: the hop's and client+sink."""
    out = Bulk()
    view = memoryview(payload)
    for _ in range(runs):
        before = hop.cpu() if hop else {}
        client_started = time.thread_time()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            started = time.perf_counter()
            for i in range(0, len(view), BLOCK):
                sock.sendall(view[i:i + BLOCK])
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while len(answer) < 16 and (data := sock.recv(16)):
                answer += data
            elapsed = time.perf_counter() - started
        client = time.thread_time() - client_started
        after = hop.cpu() if hop else {}
        received, sink_ns = int.from_bytes(answer[:8], "big"), int.from_bytes(answer[8:16], "big")
        if received != len(payload):
            raise RuntimeError(f"the sink got {received} of {len(payload)} bytes")
        out.mb_s = max(out.mb_s, len(payload) / elapsed / 1e6)
        out.add(Bulk(mib=len(payload) / 2**20, cpu={**{part: after[part] - before[part] for part in after},
                                                    "client+sink": client + sink_ns / 1e9}))
    return out


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
    spent: dict[str, Bulk] = {}  # label → MiB and CPU seconds of all its bulk runs
    caught_up: dict[str, CatchUp] = {}  # label → the first repeat's
    with tempfile.TemporaryDirectory(prefix="pvtap-bench-") as tmp:
        relays = itertools.count()  # each relay gets a new data directory: no backlog from the last one

        def relay(loop: str) -> Relay:
            return Relay("relay", Path(tmp) / f"relay-{next(relays)}", loop)

        paths: list[tuple[str, Callable[[], Hop], bytes]] = [
            ("direct", lambda: Hop("direct"), frames), ("socat", lambda: Socat("socat"), frames)]
        for loop in args.loops:
            paths += [(f"relay ({loop}), AlphaESS frames", partial(relay, loop), frames),
                      (f"relay ({loop}), opaque stream", partial(relay, loop), opaque)]
        try:
            for repeat in range(1, args.repeat + 1):
                for label, make, payload in paths:  # interleaved, so load from elsewhere hits every path
                    print(f"  [{repeat}/{args.repeat}] {label}: bulk {args.megabytes} MiB × {args.runs}, "
                          f"{args.round_trips} round trips", file=sys.stderr, flush=True)
                    hop = make()
                    port = hop.start(sink_port)
                    at_start = hop.cpu()
                    measured = bulk_measured(port, payload, args.runs, hop)
                    if isinstance(hop, Relay) and payload is frames and repeat == 1:
                        caught_up[label] = hop.catch_up(args.runs * (len(payload) // len(FRAME)),
                                                        at_start["worker"])
                    hop.stop()
                    if isinstance(hop, Relay):
                        hop.tell_stop()
                        if label in caught_up and repeat == 1:
                            caught_up[label].copies = hop.copies()  # known once it stopped
                    mbps = measured.mb_s
                    spent.setdefault(label, Bulk()).add(measured)
                    hop = make()
                    median, p99 = round_trips(hop.start(echo_port), args.round_trips, payload[:len(FRAME)])
                    hop.stop()
                    if isinstance(hop, Relay):
                        hop.tell_stop()
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
    cpu = {label: {part: seconds * 1e3 / bulk_mib.mib for part, seconds in bulk_mib.cpu.items()}
           for label, bulk_mib in spent.items()}
    print(f"\nCPU ms per MiB sent, in the bulk windows (all {args.runs} × {args.repeat} runs of a path); last column: "
          "the worker's\nfrom the first run until its archive held every frame it was given, per MiB archived, and "
          "when (first repeat)\n")
    parts = ["relay", "worker", "socat", "client+sink"]
    print(f"{'path':<34}" + "".join(f"{part:>12}" for part in parts) + "   worker until archived")
    for label, _, _, _ in rows:
        cells = "".join(f"{cpu[label][part]:>12.1f}" if part in cpu[label] else f"{'-':>12}" for part in parts)
        print(f"{label:<34}{cells}   {caught_up[label].describe() if label in caught_up else '-'}")
    if args.json:
        args.json.write_text(json.dumps({
            "megabytes": args.megabytes, "round_trips": args.round_trips, "frame_bytes": len(FRAME),
            "paths": {label: {"mb_s": mbps, "rtt_median_us": median, "rtt_p99_us": p99, "cpu_ms_per_mib": cpu[label],
                              **({"worker_catch_up": {"ms_per_mib": caught_up[label].ms_per_mib(),
                                                          **dataclasses.asdict(caught_up[label])}}
                                 if label in caught_up else {})}
                      for label, mbps, median, p99 in rows}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
