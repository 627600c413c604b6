"""Bench: the web view on a year of one-minute data, and what an open page costs the relay.

    .venv/bin/python bench/web.py [--store year.sqlite] [--devices 20] [--seconds 20]

1. A store with a year of one-minute AlphaESS realtime records ending now (525,600 records;
   generated once, or reused with --store), served by `pvtap web`: how long its start-up warm-up
   (the hourly cache) takes, the year view's data requests (/api/chart, /api/energy) after it,
   and how long headless Chromium takes from choosing "1 year" to the charts drawn.
2. The relay's round trip (bench/fleet.py's devices, stand-in cloud and relay) with no page, then
   with `pvtap web` on the relay's data directory (the year store beside it) and a Chromium page
   open on it refreshing every second, then with no page again: the added latency of the open page.

Chromium is Debian's (/usr/bin/chromium), driven by Playwright. Figures depend on the machine's
load: the script prints the load average with them.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import fleet  # noqa: E402

from pvtap.records import FieldValue, Origin, Record  # noqa: E402
from pvtap.store.local import LocalStore  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
YEAR_MINUTES = 365 * 24 * 60
SERIAL = "ALSIM0000000042"


def generate_year(path: Path) -> None:
    """A year of one-minute realtime records ending now: a PV day curve, SoC following it."""
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=YEAR_MINUTES)
    origin = Origin("alphaess", SERIAL, "bench", "up")
    started = time.monotonic()
    with LocalStore(path) as store:
        batch = []
        for i in range(YEAR_MINUTES):
            when = start + timedelta(minutes=i)
            hour = when.hour + when.minute / 60
            pv = max(0.0, 4000 * math.sin((hour - 6) / 12 * math.pi))
            fields: dict[str, FieldValue] = {
                "Ppv1": pv / 2, "Ppv2": pv / 2, "PmeterDC": 0.0, "PrealL1": 400.0, "PrealL2": 0.0, "PrealL3": 0.0,
                "PmeterL1": 400.0 - pv / 3, "PmeterL2": 0.0, "PmeterL3": 0.0, "Pbat": -pv / 2,
                "SOC": round(50 + 40 * math.sin((hour - 9) / 24 * 2 * math.pi), 1),
                "device_time": when.replace(tzinfo=None).isoformat()}
            batch.append(Record("alphaess_realtime", when, {"serial": SERIAL}, fields, origin))
            if len(batch) == 10_000:
                store.append(batch)
                batch = []
                print(f"\r  generating: {i + 1:,}/{YEAR_MINUTES:,}", end="", file=sys.stderr, flush=True)
        store.append(batch)
    print(f"\r  generated {YEAR_MINUTES:,} records in {time.monotonic() - started:.0f} s", file=sys.stderr)


def start_web(data_dir: Path, refresh_s: float = 5.0) -> tuple[subprocess.Popen, str, list[str]]:
    env = {**os.environ, "PVTAP_WEB_REFRESH_S": str(refresh_s), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pvtap", "--data-dir", str(data_dir), "web", "--listen",
                             "127.0.0.1:0"], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines = [proc.stdout.readline()]
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", lines[0])
    if not match:
        raise RuntimeError(f"pvtap web did not start: {lines}")
    return proc, f"http://127.0.0.1:{match[1]}", lines


def timed_get(url: str) -> tuple[float, int]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as response:
        size = len(response.read())
    return time.perf_counter() - started, size


def year_view(store: Path, tmp: Path) -> dict[str, Any]:
    data_dir = tmp / "year"
    data_dir.mkdir()
    os.link(store, data_dir / "year.sqlite")
    web, url, lines = start_web(data_dir)
    out: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    try:
        assert web.stdout is not None
        started = time.monotonic()
        while "charts ready" not in lines[-1]:  # the warm-up's log line
            lines.append(web.stdout.readline())
        out["warm_up_s"] = time.monotonic() - started
        out["warm_up_line"] = lines[-1].strip()
        now = time.time()
        query = f"since={now - 365 * 86400}&until={now}"
        out["chart"] = [timed_get(f"{url}/api/chart?{query}") for _ in range(5)]
        out["energy"] = [timed_get(f"{url}/api/energy?{query}&tz=0") for _ in range(5)]
        out["draw_ms"] = draw_in_chromium(url, tmp)
        out["load_after"] = os.getloadavg()[0]
    finally:
        web.terminate()
        web.wait(60)
    return out


def draw_in_chromium(url: str, tmp: Path) -> list[float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(str(tmp / "profile-draw"), executable_path=CHROMIUM,
                                                                args=CHROMIUM_ARGS, headless=True,
                                                                viewport={"width": 1300, "height": 1000})
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("() => window.pvtap && window.pvtap.ready", timeout=120_000)
            times = []
            for value in ("31536000", "86400") * 3:  # year, day, year, …: each change draws afresh
                times.append(page.evaluate("""async (value) => {
                    const before = pvtap.chartUpdates, started = performance.now();
                    const range = document.getElementById('range');
                    range.value = value;
                    range.dispatchEvent(new Event('change'));
                    while (pvtap.chartUpdates === before) await new Promise((r) => setTimeout(r, 2));
                    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
                    return performance.now() - started;
                }""", value))
            return times[0::2]  # the year views
        finally:
            browser.close()


def relay_with_page(store: Path, tmp: Path, devices: int, seconds: float) -> list[dict[str, Any]]:
    cloud, cloud_port = fleet.start_cloud()
    rows = []
    try:
        direct, _, _ = asyncio.run(fleet.fleet(cloud_port, devices, seconds, 0.0))
        rows.append(summary("direct (no relay)", direct))
        data_dir = tmp / "relay" / "data"
        data_dir.mkdir(parents=True)
        os.link(store, data_dir / "year.sqlite")
        relay, port = fleet.start_relay(cloud_port, data_dir, data_dir.parent / "relay.log")
        try:
            times, _, _ = asyncio.run(fleet.fleet(port, devices, seconds, 0.0))
            rows.append(summary("relay, no page", times))
            rows.append(with_page_open(data_dir, port, devices, seconds, tmp))
            times, _, _ = asyncio.run(fleet.fleet(port, devices, seconds, 0.0))
            rows.append(summary("relay, no page again", times))
        finally:
            relay.terminate()
            relay.wait(120)
    finally:
        cloud.terminate()
    return rows


def with_page_open(data_dir: Path, port: int, devices: int, seconds: float, tmp: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    web, url, _ = start_web(data_dir, refresh_s=1.0)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp / "profile-open"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                viewport={"width": 1300, "height": 1000})
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.wait_for_function("() => window.pvtap && window.pvtap.ready", timeout=300_000)
                updates = page.evaluate("() => pvtap.liveUpdates")
                times = fleet_in_thread(port, devices, seconds)  # Playwright's own loop runs in this thread
                updates = page.evaluate("() => pvtap.liveUpdates") - updates
            finally:
                browser.close()
    finally:
        web.terminate()
        web.wait(60)
    row = summary("relay, page open (refresh 1 s)", times)
    row["page_updates"] = updates
    return row


def fleet_in_thread(port: int, devices: int, seconds: float) -> list[float]:
    found: list[float] = []
    worker = threading.Thread(target=lambda: found.extend(asyncio.run(fleet.fleet(port, devices, seconds, 0.0))[0]))
    worker.start()
    worker.join()
    return found


def summary(name: str, times: list[float]) -> dict[str, Any]:
    times = sorted(times)
    return {"path": name, "frames": len(times), "p50": statistics.median(times) * 1e3,
            "p99": fleet.percentile(times, 0.99) * 1e3, "max": times[-1] * 1e3, "load": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="the year store to use (generated there if missing; default: "
                        "a temporary one)")
    parser.add_argument("--devices", type=int, default=20, help="devices sending 1 frame/s each (default 20)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per relay measurement (default 20)")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        print("bench/web.py: needs Debian's chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pvtap-web-bench-") as tmp_name:
        tmp = Path(tmp_name)
        store = args.store or tmp / "year-source.sqlite"
        if not store.exists():
            generate_year(store)
        year = year_view(store, tmp)
        rows = relay_with_page(store, tmp, args.devices, args.seconds)
    print(f"\nyear of one-minute data ({YEAR_MINUTES:,} records), {os.cpu_count()} CPUs, "
          f"load {year['load_before']:.2f} → {year['load_after']:.2f}")
    print(f"  warm-up at start (hourly cache of the year): {year['warm_up_s']:.1f} s  ({year['warm_up_line']})")
    for name in ("chart", "energy"):
        times = [t for t, _ in year[name]]
        print(f"  /api/{name} for the year: median {statistics.median(times) * 1e3:.0f} ms, "
              f"max {max(times) * 1e3:.0f} ms, {year[name][0][1]:,} bytes")
    print("  Chromium, choosing '1 year' to both charts drawn: "
          + ", ".join(f"{t:.0f} ms" for t in year["draw_ms"]))
    print(f"\nrelay round trip, {args.devices} devices × 1 frame/s, {args.seconds:g} s each (ms)")
    print(f"  {'':<34}{'frames':>7}{'p50':>8}{'p99':>8}{'max':>8}{'load':>6}")
    for r in rows:
        extra = f"  ({r['page_updates']} page updates meanwhile)" if "page_updates" in r else ""
        print(f"  {r['path']:<34}{r['frames']:>7}{r['p50']:>8.2f}{r['p99']:>8.2f}{r['max']:>8.1f}"
              f"{r['load']:>6.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
