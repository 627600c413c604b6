"""Run every benchmark and write docs/benchmarks.md (`make bench`).

    .venv/bin/python bench/all.py [--out docs/benchmarks.md] [--short] [--only relay fleet ...]

Each benchmark runs as its own process (bench/<name>.py --json FILE) one after another, with the
load average read before and after it; the page lists, per row, what was measured, pvtap's
figure, the reference measured in the same run, their ratio, and the load, under a header naming
the machine. `--short` runs every benchmark for seconds instead of minutes: the smoke test CI
runs (tests/test_bench.py), which checks that each still works, not its figures. A benchmark
that fails is a row saying so and makes the run exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


@dataclass
class Bench:
    name: str
    script: str
    full: list[str]
    short: list[str]
    timeout: float  # full mode; short mode gets a fifth, at least 120 s
    json: bool = True  # takes --json FILE
    rows: Callable[[dict[str, Any]], list[Row]] = lambda _doc: []


@dataclass
class Row:
    what: str
    pvtap: str
    reference: str
    ratio: str = ""


@dataclass
class Outcome:
    bench: Bench
    load_before: float
    load_after: float
    seconds: float
    doc: dict[str, Any] = field(default_factory=dict)
    output: str = ""
    error: str = ""


# -- turning each benchmark's figures into rows ------------------------------------------------

def ratio(a: float, b: float, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}×" if b else "-"


def bulk_cpu(p: dict[str, Any], socat: dict[str, Any]) -> str:
    """Where a relay's bulk time went: each part's CPU per MiB in the bulk windows, and the
    worker's until its archive held what it was given (bench/relay.py)."""
    cpu, socat_cpu = p.get("cpu_ms_per_mib"), socat.get("cpu_ms_per_mib", {})
    if not cpu:
        return ""
    out = (f"; CPU ms/MiB: relay {cpu['relay']:.1f}, worker {cpu['worker']:.1f}, client+sink "
           f"{cpu['client+sink']:.1f} (socat {socat_cpu.get('socat', 0):.1f})")
    c = p.get("worker_catch_up")
    if c and c["ms_per_mib"] is not None:
        copies = c.get("copies")
        dropped = f"; {copies[1]:,} of {sum(copies):,} copies dropped" if copies and copies[1] else ""
        of = f" ({c['frames']:,} of {c['expected']:,} frames{dropped})" if c["frames"] < c["expected"] else ""
        out += (f"; worker until its archive held every frame it got: {c['ms_per_mib']:.0f} ms/MiB, "
                f"{c['seconds']:.1f} s after the last run{of}")
    return out


def relay_rows(doc: dict[str, Any]) -> list[Row]:
    paths = doc["paths"]
    direct, socat = paths["direct"], paths["socat"]
    rows = []
    for label, p in paths.items():
        if not label.startswith("relay"):
            continue
        rows.append(Row(f"bulk {doc['megabytes']} MiB one way: {label}",
                        f"{p['mb_s']:.0f} MB/s{bulk_cpu(p, socat)}", f"socat -b1048576 {socat['mb_s']:.0f} MB/s; "
                        f"direct {direct['mb_s']:.0f} MB/s", f"{ratio(p['mb_s'], socat['mb_s'])} socat"))
    for label, p in paths.items():
        if label.startswith("relay") and "AlphaESS" in label:
            rows.append(Row(f"one device's round trip ({doc['frame_bytes']} B frame echoed), {label}: added median / "
                            "p99", f"+{p['rtt_median_us'] - direct['rtt_median_us']:.0f} µs / "
                            f"+{p['rtt_p99_us'] - direct['rtt_p99_us']:.0f} µs",
                            f"socat +{socat['rtt_median_us'] - direct['rtt_median_us']:.0f} µs / "
                            f"+{socat['rtt_p99_us'] - direct['rtt_p99_us']:.0f} µs", ""))
    return rows


def fleet_rows(doc: dict[str, Any]) -> list[Row]:
    rows = []
    by = {(r["devices"], r["path"]): r for r in doc["rows"]}
    pinned = "; relay and socat on a CPU of their own" if doc.get("pinned") else ""
    for devices in sorted({r["devices"] for r in doc["rows"]}):
        direct, socat = by.get((devices, "direct")), by.get((devices, "socat"))
        if direct is None or "p50" not in direct:
            continue
        ref = (f"socat +{socat['p50'] - direct['p50']:.2f} / +{socat['p99'] - direct['p99']:.2f} ms"
               if socat and "p50" in socat else "-")
        for path in ("relay", "relay-uvloop"):
            r = by.get((devices, path))
            if r is None or "p50" not in r:
                continue
            loop = "uvloop" if path == "relay-uvloop" else "asyncio"
            failed = f", {r['failed']} connections failed" if r.get("failed") else ""
            worker = (f", its ingest worker {r['worker_cpu_us_per_round_trip']:.0f} µs (until drained)"
                      if "worker_cpu_us_per_round_trip" in r else "")
            cpu = (f"; relay process CPU {r['cpu_us_per_round_trip']:.0f} µs per round trip{worker} (socat "
                   f"{socat['cpu_us_per_round_trip']:.0f})" if socat and "cpu_us_per_round_trip" in socat else "")
            rows.append(Row(f"{devices:,} devices × 1 frame/s ({loop}): added p50 / p99 round trip; decoded copies "
                            "dropped, lost", f"+{r['p50'] - direct['p50']:.2f} / +{r['p99'] - direct['p99']:.2f} ms; "
                            f"of {2 * r['frames']:,}: dropped {r['dropped']:,}, lost {r['lost']:,}{failed}{cpu}", ref,
                            f"direct p50 {direct['p50']:.2f} ms, p99 {direct['p99']:.2f} ms{pinned}"))
    return rows


def idle_rows(doc: dict[str, Any]) -> list[Row]:
    relay, bare = doc["relay"], doc["bare asyncio relay"]
    worker = (f"; its ingest worker {relay['worker_before_mb']:.0f} → {relay['worker_after_mb']:.0f} MB"
              if "worker_after_mb" in relay else "")
    return [Row(f"{doc['connections']:,} idle device connections: RSS per connection (relay process)",
                f"{relay['per_connection_kb']:.1f} KB ({relay['before_mb']:.0f} → {relay['after_mb']:.0f} MB{worker})",
                f"bare asyncio relay {bare['per_connection_kb']:.1f} KB ({bare['before_mb']:.0f} → "
                f"{bare['after_mb']:.0f} MB)", ratio(relay["per_connection_kb"], bare["per_connection_kb"]))]


def store_rows(doc: dict[str, Any]) -> list[Row]:
    rows = []
    for b in doc["batches"]:
        rows.append(Row(f"store append, {b['batch']} records per commit (WAL, synchronous=FULL)",
                        f"{b['append_records_s']:,.0f} records/s",
                        f"bare sqlite3 executemany, no indexes {b['bare_sqlite_rows_s']:,.0f} rows/s",
                        ratio(b["append_records_s"], b["bare_sqlite_rows_s"])))
        rows.append(Row(f"raw archive, {b['batch']} payloads per commit", f"{b['archive_payloads_s']:,.0f} payloads/s",
                        "", ""))
    return rows


def forwarder_rows(doc: dict[str, Any]) -> list[Row]:
    return [Row(f"InfluxDB drain: the forwarder, store → VictoriaMetrics, batches of {doc['batch_size']}",
                f"{doc['forwarder']:,.0f} records/s",
                f"influxdb-client synchronous, pre-built lines {doc['synchronous_prebuilt']:,.0f} records/s; "
                f"its batching WriteApi (memory only) {doc['batching_write_api']:,.0f}",
                ratio(doc["forwarder"], doc["synchronous_prebuilt"]))]


def enphase_rows(doc: dict[str, Any]) -> list[Row]:
    r = doc["reports_s"]
    return [Row(f"Enphase reports through mitmdump, {doc['concurrency']} clients (median of rounds)",
                f"with the addon {r['mitmdump + addon']:.0f} reports/s",
                f"mitmdump without it {r['mitmdump']:.0f}/s; direct {r['direct to cloud']:.0f}/s",
                ratio(r["mitmdump + addon"], r["mitmdump"])),
            Row("Enphase: every report and answer in the raw archive when the run ends",
                f"{doc['raw']:,} of {doc['expected_raw']:,} (caught up {doc['catch_up_s']:.1f} s after the last post)",
                "", "")]


BENCHES = [
    Bench("relay", "relay.py", ["--megabytes", "128", "--runs", "2", "--round-trips", "2000", "--repeat", "2"],
          ["--megabytes", "4", "--runs", "1", "--round-trips", "50", "--repeat", "1", "--loops", "asyncio"], 600,
          rows=relay_rows),
    Bench("idle", "idle.py", ["--connections", "10000"], ["--connections", "200", "--settle", "0.5"], 300,
          rows=idle_rows),
    Bench("decoders", "decoders.py", [], ["--short"], 300, json=False),
    Bench("pipeline", "pipeline.py", [], ["--short"], 300, json=False),
    Bench("store", "store.py", ["--records", "50000"], ["--records", "2000", "--batches", "500"], 300,
          rows=store_rows),
    Bench("forwarder", "forwarder.py", ["--records", "50000"], ["--records", "2000"], 300, rows=forwarder_rows),
    Bench("enphase", "enphase_mitm.py", ["--requests", "200", "--concurrency", "8", "--rounds", "3"],
          ["--requests", "10", "--concurrency", "2", "--rounds", "1"], 600, rows=enphase_rows),
    # last: socat's 5,000 per-connection processes lift the 1-minute load average for minutes after
    # they exit, which would mark every benchmark after it as run under load
    Bench("fleet", "fleet.py", ["--devices", "1", "100", "1000", "5000", "--seconds", "8", "--drain", "20"],
          ["--devices", "5", "--seconds", "2", "--warm-up", "0.5", "--drain", "10", "--paths", "direct", "socat",
           "relay"], 900,
          rows=fleet_rows),
]


# -- running --------------------------------------------------------------------------------------

def run(bench: Bench, short: bool, tmp: Path) -> Outcome:
    script = BENCH / bench.script
    outcome = Outcome(bench, os.getloadavg()[0], 0.0, 0.0)
    if not script.exists():
        outcome.error = f"bench/{bench.script} is not on this branch yet"
        outcome.load_after = outcome.load_before
        return outcome
    out = tmp / f"{bench.name}.json"
    argv = [sys.executable, str(script), *(bench.short if short else bench.full)]
    if bench.json:
        argv += ["--json", str(out)]
    timeout = max(120.0, bench.timeout / 5) if short else bench.timeout
    print(f"bench/all.py: {bench.name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
        outcome.output = result.stdout + result.stderr
        if result.returncode != 0:
            outcome.error = f"exited with status {result.returncode}: {outcome.output.strip().splitlines()[-1:]}"
        elif bench.json:
            outcome.doc = json.loads(out.read_text())
    except subprocess.TimeoutExpired:
        outcome.error = f"did not finish within {timeout:.0f} s"
    except (OSError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.seconds = time.monotonic() - started
    outcome.load_after = os.getloadavg()[0]
    print(f"bench/all.py: {bench.name}: {'FAILED: ' + outcome.error if outcome.error else 'done'} "
          f"({outcome.seconds:.0f} s)", file=sys.stderr, flush=True)
    return outcome


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = "?"
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
        memory = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, {memory} memory; Linux {platform.release()}; "
            f"Python {platform.python_version()}")


def render(outcomes: list[Outcome], short: bool) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`bench/all.py`) on {when}"
        + (" in SHORT mode (a smoke test: its figures mean nothing)." if short else "."),
        "",
        f"Machine: {machine()}.",
        "",
        "Every figure comes with the reference measured in the same run, on the same machine, and the load",
        "average (1 min) before → after its benchmark. With a load above about 0.5 on this 2-core class of",
        "machine the figures are indicative only: compare a row with its reference, not across runs.",
        "",
        "| What | pvtap | Reference (same run) | Ratio | Load |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for o in outcomes:
        load = f"{o.load_before:.1f} → {o.load_after:.1f}"
        if o.error:
            lines.append(f"| {o.bench.name}: **not measured** | {o.error} | | | {load} |")
            continue
        rows = o.bench.rows(o.doc) if o.bench.json else []
        if not o.bench.json:
            rows = [Row(f"{o.bench.name}: see its output below", "", "", "")]
            notes.append(f"### bench/{o.bench.script}\n\n```\n{o.output.strip()}\n```\n")
        for row in rows:
            lines.append(f"| {row.what} | {row.pvtap} | {row.reference} | {row.ratio} | {load} |")
    lines += ["", "How each is measured: the docstring of each `bench/*.py`. Targets (issue 14): relay bulk with",
              "decoding ≥ 0.8× socat; 1,000 devices: added p99 < 1 ms and no decoded copy dropped; 10,000 idle",
              "connections under 1 GB; store append ≥ 50,000 records/s; the Enphase addon ≥ 0.9× plain mitmdump.", ""]
    return "\n".join(lines + notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="the page to write")
    parser.add_argument("--short", action="store_true", help="seconds instead of minutes (CI's smoke test)")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES], help="run only these")
    args = parser.parse_args()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pvtap-bench-all-") as tmp:
        outcomes = [run(bench, args.short, Path(tmp)) for bench in chosen]
    args.out.write_text(render(outcomes, args.short))
    failed = [o.bench.name for o in outcomes if o.error and "not on this branch" not in o.error]
    print(f"bench/all.py: wrote {args.out} in {time.monotonic() - started:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
