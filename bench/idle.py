"""Bench: memory of idle device connections held by one relay process.

    .venv/bin/python bench/idle.py [--connections 10000]

A stand-in cloud in its own process accepts and holds connections; `python -m proxy_tcp` relays
to it (one fixed alphaess listener); this client opens N connections through the relay, each
sending one AlphaESS realtime frame (so every connection has a decoder state in the ingest
worker) and then staying silent. The relay process's RSS (from /proc) is read before and after,
and so is the ingest worker's; the reference is a bare asyncio relay (two `StreamReader`s and
two tasks per connection, no copies) measured in the same run. Every process raises its open
files limit: each relayed connection holds two sockets in the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pvtap.decode.alphaess import REQUEST, encode_frame  # noqa: E402

FRAME = encode_frame(REQUEST, 16, b'{"Time":"2024/03/03 22:05:21","SN":"ALSIM0000000001","Ppv1":"0","SOC":"38.0"}')
BARE_RELAY = """
import asyncio, socket, sys
async def pipe(reader, writer):
    try:
        while data := await reader.read(262144):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
async def serve(reader, writer):
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[1]), limit=262144)
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=262144, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def lift_open_files() -> None:
    """Children inherit it: the relay holds two sockets per connection, the client and cloud one."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):  # not root: what the hard limit allows
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _cloud(listener: socket.socket) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the client goes

    held: list[asyncio.StreamWriter] = []

    async def main() -> None:
        server = await asyncio.start_server(serve, sock=listener, backlog=4096)
        await server.serve_forever()

    asyncio.run(main())


async def open_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` connections, each sends one frame, in waves so the accept queue is not overrun."""
    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, 500):
        opened = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                        for _ in range(start, min(count, start + 500))))
        for _reader, writer in opened:
            writer.write(FRAME)
            writers.append(writer)
        await asyncio.sleep(0.05)
    return writers


def measure(name: str, pid: int, port: int, count: int, settle: float, worker: int | None = None) -> dict:
    before = rss_mb(pid)
    worker_before = rss_mb(worker) if worker else 0.0

    async def run() -> dict:
        writers = await open_idle(port, count)
        await asyncio.sleep(settle)  # the copies reach the worker, the loop settles
        after = rss_mb(pid)
        out = {"before_mb": before, "after_mb": after, "per_connection_kb": (after - before) * 1024 / count}
        if worker:
            out["worker_before_mb"], out["worker_after_mb"] = worker_before, rss_mb(worker)
        for writer in writers:
            writer.close()
        return out

    result = asyncio.run(run())
    print(f"  {name}: {result['before_mb']:.0f} MB → {result['after_mb']:.0f} MB with {count} idle connections, "
          f"{result['per_connection_kb']:.1f} KB each", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000, help="idle connections (default 10000)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before reading RSS (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (bench/all.py reads it)")
    args = parser.parse_args()
    lift_open_files()
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    cloud = multiprocessing.Process(target=_cloud, args=(listener,), daemon=True)
    cloud.start()
    cloud_port = listener.getsockname()[1]
    listener.close()
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="pvtap-idle-") as tmp:
            config = Path(tmp) / "idle.toml"
            config.write_text(f'[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "127.0.0.1:0"\n'
                              f'upstream = "127.0.0.1:{cloud_port}"\nmax_connections = {args.connections + 100}\n'
                              f'idle_timeout = 3600\n[ingest]\nworkers = 1\n')
            relay = subprocess.Popen([sys.executable, "-m", "proxy_tcp", "--config", str(config), "--data-dir",
                                      str(Path(tmp) / "data")], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
            assert relay.stdout is not None
            port = worker = 0
            for line in relay.stdout:
                if m := re.search(r"ingest worker \(pid (\d+)\)", line):
                    worker = int(m[1])
                if m := re.search(r"relay listening: \S+ on 127\.0\.0\.1:(\d+)", line):
                    port = int(m[1])
                if "relay ready:" in line:
                    break
            try:
                results["relay"] = measure("relay", relay.pid, port, args.connections, args.settle, worker)
            finally:
                relay.terminate()
                relay.communicate(timeout=120)
            bare = subprocess.Popen([sys.executable, "-c", BARE_RELAY, str(cloud_port)], stdout=subprocess.PIPE,
                                    text=True)
            assert bare.stdout is not None
            try:
                time.sleep(0.2)
                results["bare asyncio relay"] = measure("bare asyncio relay", bare.pid,
                                                        int(bare.stdout.readline()), args.connections, args.settle)
            finally:
                bare.terminate()
                bare.wait(30)
    finally:
        cloud.terminate()
    if args.json:
        args.json.write_text(json.dumps({"connections": args.connections, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
