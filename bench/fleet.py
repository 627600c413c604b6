"""Bench: many devices behind one relay, each sending one AlphaESS realtime frame a second.

    .venv/bin/python bench/fleet.py [--devices 100 1000] [--seconds 20] [--paths direct socat relay relay-uvloop]

Three processes on 127.0.0.1: a stand-in cloud that answers every frame with the cloud's ack
(`01 02 <type> … {"Status":"Success"}`), the hop under test (nothing, socat, or `python -m
proxy_tcp` with one fixed alphaess listener), and this client, which opens one connection per
device and, per device, sends a realtime frame once a second (devices spread evenly over the
second) and times the round trip until the ack is back. `relay` runs on the standard library's loop
(the default), `relay-uvloop` on uvloop (relay.event_loop).

On a machine with two or more CPUs the hop under test (socat and its children, or the relay and
its ingest worker) runs on the last CPU and this client and the cloud on the others (`--pin`,
the default there), as if the devices and the cloud were other machines: otherwise the load
generator's own scheduling on the shared cores shows up in the hop's p99. `--no-pin` lets the
scheduler place everything.

Each fleet first sends --warm-up seconds untimed, as a relay that has run for a while sees it:
connections open, and with the default ingest.cpu_priority ("adaptive") its worker on idle CPU
time once it kept up for 5 s. Then --seconds are timed. Per path it prints the round trip's
median / p99 / max over the timed seconds, what the hop adds over the direct path
(same run), and for the relay what its raw archive misses: every frame sent up and every ack
sent down should end up there (decoded then, or after a restart); `dropped` is what the relay
itself counted as copies it could not hand to its worker (the connection records'
dropped_copies: an overload, counted), and `lost` the rest of what is missing, uncounted:
2 × round trips (the warm-up's too) − frames archived − dropped. The relay is stopped with
SIGTERM after its decode backlog is empty (or after --drain seconds), as a user would stop it.

CPU per round trip (the table's last columns; much less sensitive to load than latency): the
hop's process over the fleet's seconds (socat with its per-connection children), and for the
relay also its ingest worker process(es) from the relay's start until the relay is stopped —
every copy archived and decoded (unless the backlog outlived --drain: the row says so) — since
the worker's share of each round trip is done whenever it gets to it. On a 2-core machine both
take from the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cputime import children, cpu_s, reaped_cpu_s, wait_childless  # noqa: E402  (bench/cputime.py)

from pvtap.decode.alphaess import REQUEST, ack_frame, encode_frame  # noqa: E402

ACK = ack_frame(16)


def frame(serial: str) -> bytes:
    return encode_frame(REQUEST, 16, (
        b'{"Time":"2024/03/03 22:05:21","SN":"' + serial.encode() + b'","Ppv1":"0","Ppv2":"0","PrealL1":"420",'
        b'"PrealL2":"0.0","PrealL3":"0.0","PmeterL1":"-4","PmeterL2":"0","PmeterL3":"0","PmeterDC":"0",'
        b'"Pbat":"539.4400","Sva":"405","VarAC":"-669","VarDC":"96","SOC":"38.0"}'))


FRAME_SIZE = len(frame("ALSIM0000000001"))


# -- the stand-in cloud, in its own process ---------------------------------------------------

def _cloud(listener: socket.socket) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readexactly(FRAME_SIZE)
                writer.write(ACK)
        except (asyncio.IncompleteReadError, OSError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, sock=listener, backlog=4096)
        await server.serve_forever()

    asyncio.run(main())


def start_cloud() -> tuple[multiprocessing.Process, int]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    process = multiprocessing.Process(target=_cloud, args=(listener,), daemon=True)
    process.start()
    port = listener.getsockname()[1]
    listener.close()
    return process, port


# -- the devices ------------------------------------------------------------------------------

async def device(port: int, serial: str, offset: float, until: float, timed_from: float, times: list[float],
                 timed: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = frame(serial)
    loop = asyncio.get_running_loop()
    tick = loop.time() + offset
    try:
        while tick < until:
            await asyncio.sleep(max(0.0, tick - loop.time()))
            started = time.perf_counter()
            writer.write(data)
            await reader.readexactly(len(ACK))
            times.append(time.perf_counter() - started)
            if tick >= timed_from:
                timed.append(times[-1])
            tick += 1.0
    finally:
        writer.close()


async def fleet(port: int, devices: int, seconds: float, warm_up: float) -> tuple[list[float], list[float], int]:
    """Round-trip times (s) of every frame, of those after the warm-up; failed connections."""
    loop = asyncio.get_running_loop()
    timed_from = loop.time() + 1.0 + warm_up
    until = timed_from + seconds
    times: list[float] = []
    timed: list[float] = []
    tasks = [device(port, f"ALSIM{i:010d}", 1.0 + i / devices, until, timed_from, times, timed)
             for i in range(devices)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = sum(isinstance(r, BaseException) for r in results)
    return times, timed, failed


# -- the hops ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def on_cpus(command: list[str], cpus: set[int] | None) -> list[str]:
    """The command run on these CPUs (with everything it starts), or as it is (None)."""
    return ["taskset", "-c", ",".join(map(str, sorted(cpus))), *command] if cpus else command


def start_socat(upstream: int, cpus: set[int] | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(on_cpus(["socat", "-b1048576",
                                     f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                                     f"TCP:127.0.0.1:{upstream},nodelay"], cpus), stderr=subprocess.DEVNULL)
    wait_listening(port)
    return proc, port


def start_relay(upstream: int, data_dir: Path, log: Path, loop: str = "uvloop",
                cpus: set[int] | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = data_dir.parent / "fleet.toml"
    config.write_text(f'[relay]\nevent_loop = "{loop}"\n[[relay.listeners]]\nprotocol = "alphaess"\n'
                      f'listen = "127.0.0.1:{port}"\nupstream = "127.0.0.1:{upstream}"\nmax_connections = 20000\n')
    with open(log, "wb") as out:
        proc = subprocess.Popen(on_cpus([sys.executable, "-m", "proxy_tcp", "--config", str(config), "--data-dir",
                                         str(data_dir)], cpus),  # its ingest worker inherits the CPUs
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    wait_listening(port)
    return proc, port


def stores(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("*.sqlite"))


def decode_backlog(data_dir: Path) -> int | None:
    """Raw payloads not decoded yet (None: this pvtap has no decode cursor, it decodes at once)."""
    total = 0
    for path in stores(data_dir):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name='decoding'").fetchone():
                return None
            cursor = db.execute("SELECT cursor FROM decoding").fetchone()
            total += db.execute("SELECT COUNT(*) FROM raw WHERE id > ?", (cursor[0] if cursor else 0,)).fetchone()[0]
        finally:
            db.close()
    return total


def archived(data_dir: Path) -> tuple[int, int, int]:
    """(raw frames archived, alphaess_realtime records, copies the relay dropped) over every store."""
    frames = records = dropped = 0
    for path in stores(data_dir):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            frames += db.execute("SELECT COUNT(*) FROM raw WHERE kind='frame'").fetchone()[0]
            records += db.execute("SELECT COUNT(*) FROM records WHERE measurement='alphaess_realtime'").fetchone()[0]
            dropped += db.execute("SELECT COALESCE(SUM(json_extract(fields, '$.dropped_copies')), 0) FROM records"
                                  " WHERE measurement='pvtap_connection'").fetchone()[0]
        finally:
            db.close()
    return frames, records, dropped


def percentile(sorted_times: list[float], q: float) -> float:
    return sorted_times[min(len(sorted_times) - 1, int(len(sorted_times) * q))]


def run_path(path: str, devices: int, seconds: float, warm_up: float, cloud_port: int, tmp: Path, drain: float,
             hop_cpus: set[int] | None) -> dict[str, Any]:
    proc: subprocess.Popen | None = None
    data_dir = tmp / f"{path}-{devices}" / "data"
    data_dir.mkdir(parents=True)
    port = cloud_port
    if path == "socat":
        proc, port = start_socat(cloud_port, hop_cpus)
    elif path.startswith("relay"):
        proc, port = start_relay(cloud_port, data_dir, data_dir.parent / "relay.log",
                                 "uvloop" if path == "relay-uvloop" else "asyncio", hop_cpus)
    cpu_before = reaped_cpu_s(proc.pid) if proc is not None else 0.0
    workers = children(proc.pid, "pvtap.ingest.worker") if proc is not None and path.startswith("relay") else []
    workers_before = sum(cpu_s(pid) for pid in workers)
    try:
        times, timed, failed = asyncio.run(fleet(port, devices, seconds, warm_up))
        if path == "socat" and proc is not None and not wait_childless(proc.pid, timeout=60):
            # its per-connection children's CPU time is counted once each is reaped: at 5,000 devices
            # 978 were not yet a second after the fleet closed its connections (all 0.2 s later)
            print(f"fleet: socat still has {len(children(proc.pid))} children after 60 s; its CPU is "
                  "counted without theirs", file=sys.stderr)
        cpu = reaped_cpu_s(proc.pid) - cpu_before if proc is not None else 0.0  # the relay's worker not included
        row: dict[str, Any] = {"path": path, "devices": devices, "frames": len(times), "failed": failed,
                               "load": os.getloadavg()[0]}
        if proc is not None and times:  # the hop's own CPU per round trip: much less sensitive to load than latency
            row["cpu_us_per_round_trip"] = cpu / len(times) * 1e6
        timed.sort()
        if timed:
            row.update(timed=len(timed), p50=statistics.median(timed) * 1e3, p99=percentile(timed, 0.99) * 1e3,
                       max=timed[-1] * 1e3)
        if path.startswith("relay"):
            deadline = time.monotonic() + drain
            while time.monotonic() < deadline and (decode_backlog(data_dir) or 0) > 0:
                time.sleep(0.2)
            row["backlog_at_stop"] = decode_backlog(data_dir)
            if workers and times:
                row["worker_cpu_us_per_round_trip"] = (sum(cpu_s(pid) for pid in workers) - workers_before) / len(
                    times) * 1e6
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    if path.startswith("relay"):
        frames, records, dropped = archived(data_dir)
        row.update(archived=frames, records=records, lost=2 * row["frames"] - frames - dropped,
                   dropped=dropped)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000], help="fleet sizes (default 100 1000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds each fleet is timed (default 20)")
    parser.add_argument("--warm-up", type=float, default=6.0,
                        help="seconds each fleet sends first, untimed (default 6): a relay that has run for a while "
                             "has its worker on idle CPU time (ingest.cpu_priority = adaptive, after 5 s of keeping "
                             "up)")
    parser.add_argument("--paths", nargs="+", default=["direct", "socat", "relay", "relay-uvloop"],
                        choices=["direct", "socat", "relay", "relay-uvloop"], help="hops to measure, in this order")
    parser.add_argument("--json", type=Path, help="also write the rows to this file (bench/all.py reads it)")
    parser.add_argument("--drain", type=float, default=60.0,
                        help="seconds to wait for the relay's decode backlog before stopping it (default 60)")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2,
                        help="the hop on the last CPU, client and cloud on the others (default: on with 2+ CPUs)")
    args = parser.parse_args()
    hop_cpus: set[int] | None = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error("--pin needs at least 2 CPUs")
        hop_cpus = {cpus[-1]}
        os.sched_setaffinity(0, cpus[:-1])  # this client, and the cloud it forks
    if "socat" in args.paths and shutil.which("socat") is None:
        print("bench/fleet.py: socat is not installed (Debian package socat)", file=sys.stderr)
        return 2
    random.seed(1)
    cloud, cloud_port = start_cloud()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="pvtap-fleet-") as tmp:
            for devices in args.devices:
                for path in args.paths:
                    print(f"  {devices} devices × 1 frame/s, {args.seconds:g} s: {path}", file=sys.stderr, flush=True)
                    rows.append(run_path(path, devices, args.seconds, args.warm_up, cloud_port, Path(tmp), args.drain,
                                         hop_cpus))
    finally:
        cloud.terminate()
    print(f"\n{FRAME_SIZE}-byte AlphaESS realtime frame answered by a {len(ACK)}-byte ack; round trip in ms; "
          f"added = minus the direct path of the same fleet size; {os.cpu_count()} CPUs"
          + (f"; hop pinned to CPU {min(hop_cpus)}, client and cloud to the others" if hop_cpus else "; not pinned")
          + "\n")
    print(f"{'devices':>7} {'path':<14}{'frames':>8}{'p50':>8}{'p99':>8}{'max':>8}{'+p50':>8}{'+p99':>8}"
          f"{'lost':>7}{'dropped':>8}{'archived':>9}{'records':>8}{'load':>6}{'CPU µs/rt':>10}{'worker':>8}")
    direct = {r["devices"]: r for r in rows if r["path"] == "direct"}
    for r in rows:
        base = direct.get(r["devices"])
        added = (f"{r['p50'] - base['p50']:>8.2f}{r['p99'] - base['p99']:>8.2f}" if base and "p50" in r
                 else f"{'-':>8}{'-':>8}")
        lost = (f"{r['lost']:>7}{r['dropped']:>8}{r['archived']:>9}{r['records']:>8}" if "lost" in r
                else f"{'-':>7}{'-':>8}{'-':>9}{'-':>8}")
        failed = f"  ({r['failed']} connections failed)" if r["failed"] else ""
        backlog = f"  (decode backlog {r['backlog_at_stop']} at stop)" if r.get("backlog_at_stop") else ""
        print(f"{r['devices']:>7} {r['path']:<14}{r['frames']:>8}{r.get('p50', 0):>8.2f}{r.get('p99', 0):>8.2f}"
              f"{r.get('max', 0):>8.1f}{added}{lost}{r['load']:>6.2f}{r.get('cpu_us_per_round_trip', 0):>10.0f}"
              f"{r.get('worker_cpu_us_per_round_trip', 0):>8.0f}{failed}{backlog}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "frame_bytes": FRAME_SIZE, "rows": rows,
                                         "pinned": hop_cpus is not None}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
