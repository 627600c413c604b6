"""Bench: what serving /metrics costs the relay.

    .venv/bin/python bench/metrics.py [--megabytes 128] [--runs 3] [--repeat 3] [--connections 200]

One relay (`python -m proxy_tcp`, a fixed upstream, health on a free port) in front of a sink,
as bench/relay.py starts it. Bulk AlphaESS frames go through it with and without a scraper
fetching /metrics every second, interleaved, in the same process (only the scraper differs).
Then the time one scrape takes while that many idle connections are open (a scrape adds up
every open connection's counts).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/relay.py: the relay and sink as it starts them

from relay import FRAME, Relay, bulk, start_server


class Scraper:
    """GET /metrics every `every` seconds on a thread; keeps each scrape's duration."""

    def __init__(self, url: str, every: float = 1.0) -> None:
        self.url, self.every = url, every
        self.durations: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.durations.append(scrape(self.url))
            self._stop.wait(self.every)


def scrape(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read()
    assert b"pvtap_bytes_total" in body, body[:200]
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=128, help="MiB sent per bulk run (default 128)")
    parser.add_argument("--runs", type=int, default=3, help="bulk runs per measurement (default 3)")
    parser.add_argument("--repeat", type=int, default=3, help="with/without pairs, interleaved (default 3)")
    parser.add_argument("--connections", type=int, default=200, help="idle connections open while timing scrapes")
    args = parser.parse_args()
    size = args.megabytes << 20
    payload = (FRAME * (size // len(FRAME) + 1))[:size]
    sink, sink_port = start_server("sink")
    os.environ["PVTAP_HEALTH_RELAY_LISTEN"] = "127.0.0.1:0"
    os.environ["PVTAP_HEALTH_STATS_EVERY_S"] = "0"
    results: dict[str, list[float]] = {"without scraper": [], "scraping every 1 s": []}
    scrapes: list[float] = []
    with tempfile.TemporaryDirectory(prefix="pvtap-bench-") as tmp:
        relay = Relay("relay", Path(tmp) / "data")
        port = relay.start(sink_port)
        health = next(line for line in relay.log if "health: /healthz" in line)
        url = health.split("on ", 1)[1].split()[0] + "metrics"
        try:
            for repeat in range(1, args.repeat + 1):
                print(f"  [{repeat}/{args.repeat}] bulk {args.megabytes} MiB × {args.runs}, without and with "
                      "a scraper", file=sys.stderr, flush=True)
                results["without scraper"].append(bulk(port, payload, args.runs))
                with Scraper(url) as scraper:
                    results["scraping every 1 s"].append(bulk(port, payload, args.runs))
                scrapes += scraper.durations
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.connections)]
            time.sleep(1.0)  # let the relay accept and connect them all upstream
            with_open = [scrape(url) for _ in range(20)]
            for sock in idle:
                sock.close()
        finally:
            relay.stop()
            sink.terminate()
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nrelay bulk throughput, AlphaESS frames, {args.megabytes} MiB one way, best of {args.runs} per "
          f"measurement, {args.repeat} interleaved pairs; {os.cpu_count()} CPUs, load {' '.join(load)}\n")
    print(f"{'':<22}{'best MB/s':>10}{'median MB/s':>13}")
    for label, values in results.items():
        print(f"{label:<22}{max(values):>10.0f}{statistics.median(values):>13.0f}")
    base, scraped = (statistics.median(v) for v in results.values())
    print(f"\nmedian change with the scraper: {100 * (scraped / base - 1):+.1f} %")
    print(f"one scrape during bulk: median {1000 * statistics.median(scrapes):.1f} ms over {len(scrapes)} scrapes")
    print(f"one scrape with {args.connections} connections open: median {1000 * statistics.median(with_open):.1f} ms, "
          f"max {1000 * max(with_open):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
