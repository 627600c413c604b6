"""The web view in a real headless Chromium (Debian's, driven by Playwright), on the records the
simulators sent through the real relay and the real mitmproxy addon (`pvtap demo`) plus a second
battery that stops: the page lists every device with its serial and last contact, shows the
current values that are in the store, its charts hold the stored points (read from uPlot's data),
the battery that stopped turns "silent" without a reload, and nothing is loaded from anywhere but
127.0.0.1 (every other host is unreachable for this browser). A screenshot goes to
build/web-screenshot.png (the CI artefact)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from pvtap.simulate.foxess_h1 import SERIAL as H1_SERIAL
from pvtap.simulate.foxess_m1 import SERIAL as M1_SERIAL
from pvtap.store.local import LocalStore
from pvtap.web.quantities import SOURCES
from tests.conftest import REPO
from tests.mitm_support import wait_for
from tests.test_run_demo import Pvtap

CHROMIUM = "/usr/bin/chromium"
#: a time in ns passes the page as a JavaScript number (a double): this close to the stored one
JS_NS = 1000
SCREENSHOT = REPO / "build" / "web-screenshot.png"
SECOND = "ALSIM0000000002"
#: the web view's name for the demo's T-series, whose records carry no serial
T_SERIES = "T-series"
ALPHA_MEASUREMENTS = ("alphaess_realtime", "alphaess_extended", "alphaess_backfill")
#: Chromium as root in CI: no sandbox, nothing of its own on the network, and every host but
#: 127.0.0.1 unresolvable, any proxied request sent to a port where nothing listens
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9",
                 "--proxy-bypass-list=127.0.0.1"]

pytestmark = pytest.mark.slow


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def soc_points(store: Path, serial: str, since: float, until: float) -> list[tuple[float, float]]:
    """The battery's stored SoC per timestamp in [since, until), as the chart has it: at one time,
    each measurement's readings averaged (frames within one second of the device's clock), then
    the measurements' (realtime, extended, back-fill) averaged."""
    by_time: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with LocalStore(store, readonly=True) as s:
        for stored in s.records(measurements=ALPHA_MEASUREMENTS):
            r = stored.record
            if r.origin.device == serial and since * 1e9 <= r.time_ns < until * 1e9 and "SOC" in r.fields:
                by_time[r.time_ns][r.measurement].append(float(r.fields["SOC"]))
    return [(t / 1e9, round(mean([mean(v) for v in per.values()]), 3)) for t, per in sorted(by_time.items())]


def newest(store: Path, serial: str, quantity: str, measurements: tuple[str, ...],
           until_ns: int | None = None) -> tuple[int, float, list]:
    """(time_ns, value, parts) of the newest stored value of a quantity, worked out here from the
    records: per measurement, its records at its newest time (each part's readings averaged, the
    parts, an Envoy's micros, added); of the measurements, the newest, at equal times the first in SOURCES.
    `until_ns`: the newest at that time or before (what the page showed then, while devices go on)."""
    found = []
    for rank, source in enumerate(SOURCES):
        if source.quantity != quantity or source.measurement not in measurements:
            continue
        by_time: dict[int, list[tuple[str, float]]] = defaultdict(list)
        with LocalStore(store, readonly=True) as s:
            for stored in s.records(measurements=[source.measurement]):
                r = stored.record
                mine = r.origin.device == serial and (until_ns is None or r.time_ns <= until_ns)
                value = source.value(r.fields) if mine else None
                if value is not None:
                    by_time[r.time_ns].append((r.tags.get("eqid", ""), value))
        if by_time:
            when = max(by_time)
            by_part: dict[str, list[float]] = defaultdict(list)
            for part, v in by_time[when]:
                by_part[part].append(v)
            means = [mean(v) for v in by_part.values()]
            found.append((when, -rank, max(means) if source.combine == "max" else sum(means),
                          [(part, mean(v)) for part, v in by_part.items()]))
    when, _, value, parts = max(found, key=lambda f: (f[0], f[1]))
    return when, value, parts


def test_the_page_in_a_real_browser(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make debian-packages` installs it"

    data = tmp_path / "demo"
    demo = Pvtap(["--data-dir", str(tmp_path / "data"), "demo", "--every", "1", "--demo-dir", str(data)],
                 {"PVTAP_WEB_LISTEN": ""}, tmp_path)  # the page below is this test's own `pvtap web`
    second: subprocess.Popen | None = None
    web: Pvtap | None = None
    try:
        relay_port = demo.expect(r"AlphaESS battery: relay \(python -m proxy_tcp\) on 127\.0\.0\.1:(\d+)", 60)[1]
        demo.expect(r"record \| \S+  alphaess_realtime  serial=ALSIM0000000001 ", 60)
        demo.expect(r"record \| \S+  enphase_interval  ", 60)
        # a second battery through the same relay, stopped below so that it falls silent
        second = subprocess.Popen([sys.executable, "-m", "pvtap", "simulate", "alphaess", "--host", "127.0.0.1",
                                   "--port", relay_port, "--serial", SECOND, "--interval", "0.5",
                                   "--extended-every", "2", "--backfill-rows", "3", "--quiet"],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        web = Pvtap(["--data-dir", str(data), "web", "--listen", "127.0.0.1:0"],
                    {"PVTAP_WEB_SILENT_AFTER_S": "8", "PVTAP_WEB_REFRESH_S": "0.5"}, tmp_path)
        port = web.expect(r"web view ready on http://127\.0\.0\.1:(\d+)/", 60)[1]
        origin = f"http://127.0.0.1:{port}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                headless=True, viewport={"width": 1300, "height": 1000})
            try:
                check_page(browser, origin, data, second)
            finally:
                browser.close()
    finally:
        if second is not None and second.poll() is None:
            second.kill()
            second.wait()
        if web is not None:
            assert web.stop(signal.SIGTERM) == 0
        assert demo.stop(signal.SIGINT) == 0


def check_page(browser, origin: str, data: Path, second: subprocess.Popen) -> None:
    requests: list[str] = []
    problems: list[str] = []
    page = browser.new_page()
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.goto(origin + "/")
    page.evaluate("() => { window.notReloaded = true; }")
    # predicates as functions: a string would be eval()ed, which the page's CSP forbids
    page.wait_for_function("() => window.pvtap && window.pvtap.ready", timeout=60_000)

    # every device, with its serial and a last contact that is seconds old
    for serial in ("ALSIM0000000001", SECOND, "999900000000", M1_SERIAL, H1_SERIAL, T_SERIES):
        row = page.wait_for_selector(f'#devices tr[data-serial="{serial}"][data-state="ok"]', timeout=60_000)
        assert row.query_selector(".serial").inner_text() == serial
        assert row.query_selector(".contact").inner_text().endswith(" s ago")
    assert page.locator('#devices tr[data-serial="999900000000"] td').nth(2).inner_text() == "800-00069-r05"

    # the second battery stops; its newest values in the store are final once its copies are decoded
    second.send_signal(signal.SIGINT)
    second.wait(30)
    relay_store, enphase_store = data / "relay.sqlite", data / "enphase.sqlite"
    with LocalStore(relay_store, readonly=True) as s:
        wait_for(lambda: s.decode_backlog() == 0, timeout=30, what="the relay's worker to decode everything")
    # a second's records may be stored after the page read the first of them (the values at one time
    # are averaged): wait until the page shows what the store holds, time and value
    for quantity in ("soc_pct", "pv_w", "battery_w"):
        when, value, _ = newest(relay_store, SECOND, quantity, ALPHA_MEASUREMENTS)
        cell = f'.now[data-serial="{SECOND}"] [data-quantity="{quantity}"]'
        page.wait_for_function("([cell, when, value]) => { const c = document.querySelector(cell);"
                               " return c && Math.abs(Number(c.dataset.timeNs) - when) < 1000"
                               " && Math.abs(Number(c.dataset.value) - value) < 1e-9; }",
                               arg=[cell, when, value], timeout=30_000)
    # the Envoy's PV, micro by micro, and the FoxESS M1's, H1's and T-series' current values, as stored at the
    # time the page shows (the demo's devices keep sending: the page and the store move on)
    agree(page, enphase_store, "999900000000", "999900000000", "pv_w", "enphase_interval", parts=2)
    for serial, quantity, measurement in ((M1_SERIAL, "pv_w", "foxess_telemetry"),
                                          (M1_SERIAL, "temperature_c", "foxess_telemetry"),
                                          (H1_SERIAL, "pv_w", "foxess_h1_realtime"),
                                          (H1_SERIAL, "grid_w", "foxess_h1_realtime"),
                                          (T_SERIES, "pv_w", "foxess_t_realtime"),
                                          (T_SERIES, "grid_w", "foxess_t_realtime")):
        stored_as = "" if serial == T_SERIES else serial  # the T-series' records carry no serial
        agree(page, relay_store, serial, stored_as, quantity, measurement)

    # the SoC chart holds every stored point of the second battery (6 hours: no averaging)
    page.select_option("#range", "21600")

    last: dict[str, list] = {}

    def chart_matches() -> bool:
        doc = page.evaluate("""(serial) => {
            const i = pvtap.chartSeries.soc.findIndex((s) => s.device === serial);
            const chart = pvtap.charts.soc;
            if (i < 0 || !chart) return null;
            return {times: chart.data[0], values: chart.data[i + 1], since: pvtap.chartData.since,
                    until: pvtap.chartData.until, bucket: pvtap.chartData.bucket_s};
        }""", SECOND)
        if not doc or doc["bucket"]:
            return False
        last["drawn"] = [(t, v) for t, v in zip(doc["times"], doc["values"]) if v is not None]
        last["stored"] = soc_points(relay_store, SECOND, doc["since"], doc["until"])
        return len(last["stored"]) >= 5 and last["drawn"] == last["stored"]
    try:
        wait_for(chart_matches, timeout=60, interval=0.5, what="the SoC chart to hold the stored points")
    except AssertionError:
        assert last.get("drawn") == last.get("stored")
        raise

    # no reload, and the second battery turns silent (the demo's keeps reporting)
    page.wait_for_selector(f'#devices tr[data-serial="{SECOND}"][data-state="silent"]', timeout=60_000)
    assert page.evaluate("() => window.notReloaded") is True
    assert page.locator(f'#devices tr[data-serial="{SECOND}"] .contact').inner_text().startswith("silent for ")
    assert page.locator('#devices tr[data-serial="ALSIM0000000001"]').get_attribute("data-state") == "ok"

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000

    # nothing but this server was asked for anything, and the rest of the world is unreachable
    assert requests and all(url.startswith(origin + "/") or url.startswith("data:") for url in requests), requests
    assert {url.removeprefix(origin) for url in requests} >= {"/", "/static/uPlot.iife.min.js", "/static/app.js",
                                                              "/static/uPlot.min.css", "/static/style.css"}
    elsewhere = browser.new_page()
    with pytest.raises(Exception, match="ERR_"):
        elsewhere.goto("http://cdn.example.com/uPlot.js", timeout=30_000)
    assert problems == [], json.dumps(problems, indent=1)


def agree(page, store: Path, serial: str, stored_as: str, quantity: str, measurement: str, parts: int = 0) -> None:
    """The page's current value of a device that keeps sending equals what the store holds for the time the
    page shows (parts too: an Envoy's micros). A reading can fall between two records of one time (the
    page averages what was stored when it read), so this waits for a read the store agrees with, and on
    timeout says what the page and the store last showed."""
    last: dict = {}

    def agreed() -> bool:
        shown = shown_now(page, serial, quantity)
        when, value, stored_parts = newest(store, stored_as, quantity, (measurement,), shown["time_ns"] + JS_NS)
        last.update(shown=shown, stored=(when, value, stored_parts))
        shown_parts, parts_stored = sorted(shown["parts"]), sorted(stored_parts)
        return (abs(when - shown["time_ns"]) < JS_NS and shown["value"] == pytest.approx(value)
                and (not parts or (len(parts_stored) == parts
                                   and [p for p, _ in shown_parts] == [p for p, _ in parts_stored]
                                   and [v for _, v in shown_parts] == pytest.approx([v for _, v in parts_stored]))))

    try:
        wait_for(agreed, timeout=60, interval=0.5, what=f"{serial} {quantity} on the page to equal the store")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last read: {last}") from None


def shown_now(page, serial: str, quantity: str) -> dict:
    """A device's current value as the page shows it, read at once: {time_ns, value, parts:
    [(eqid, value)]} (parts: an Envoy's micros)."""
    cell = f'.now[data-serial="{serial}"] .value[data-quantity="{quantity}"]'
    page.wait_for_selector(cell + "[data-time-ns]", timeout=60_000)
    doc = page.evaluate("""([serial, quantity, cell]) => {
        const shown = document.querySelector(cell);
        const parts = [...document.querySelectorAll(`.now[data-serial="${serial}"] [data-part]`)]
            .filter((p) => p.dataset.quantity === quantity).map((p) => [p.dataset.part, Number(p.dataset.value)]);
        return {time_ns: shown.dataset.timeNs, value: Number(shown.dataset.value), parts};
    }""", [serial, quantity, cell])
    return {"time_ns": int(float(doc["time_ns"])), "value": doc["value"], "parts": [tuple(p) for p in doc["parts"]]}


def test_ci_installs_chromium() -> None:
    """`make test` installs the Debian packages first: chromium must be one of them."""
    makefile = (REPO / "Makefile").read_text().replace("\\\n", " ")  # continued lines joined
    assert "chromium" in makefile.split("DEBIAN_PACKAGES :=")[1].split("\n")[0].split()
