"""Throughput of the Enphase path: reports per second through mitmdump with the pvtap addon, through
mitmdump without it, and straight to the stand-in cloud, side by side in one run.

    .venv/bin/python bench/enphase_mitm.py [--requests 400] [--concurrency 4] [--micros 16] [--rounds 3]

All three use the same stand-in cloud (a separate process, so it does not share the client's
GIL), the same pre-built reports and the Envoy's own request shape: HTTPS, one connection per
report (`Connection: close`). Both mitmdumps run in reverse mode with identical options; the one
with the addon also stores and decodes every report and answer. Rounds alternate between the
three targets so drift on a shared machine hits all of them alike; the median round counts.
After the addon's rounds the store is checked: every report and answer must be in it.

Besides reports/s, the CPU time each mitmdump process spends per report in the timed rounds
(from /proc; the addon's ingest worker, a child process, counted apart): less noisy than a rate
on a shared machine, and it says whether the addon costs mitmdump's own process or the cores
beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cputime import children  # noqa: E402  (bench/cputime.py)

from pvtap.simulate.enphase import Simulator, encode_body, post_report  # noqa: E402
from pvtap.store.local import LocalStore  # noqa: E402
from tests.mitm_support import Mitmdump, wait_for  # noqa: E402

URL = "https://reports.enphaseenergy.com/emu_reports/performance_report?webcomm_version=3.0"


@dataclass(frozen=True)
class CloudProcess:
    """The stand-in cloud running as `python -m pvtap.simulate.enphase_cloud`."""

    proc: subprocess.Popen
    url: str
    cafile: str

    @classmethod
    def start(cls, cert_dir: Path) -> CloudProcess:
        proc = subprocess.Popen([sys.executable, "-m", "pvtap.simulate.enphase_cloud", "--cert-dir", str(cert_dir)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None  # a pipe
        line = proc.stdout.readline()
        if "listening on" not in line:
            proc.kill()
            raise RuntimeError(f"the stand-in cloud did not start: {line!r}")
        url = line.split("listening on ", 1)[1].split(" ", 1)[0]
        return cls(proc, url, str(cert_dir / "enphase-cloud.crt"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def post_all(bodies: list[bytes], connect: tuple[str, int], concurrency: int) -> float:
    """Post every body (concurrently); returns the elapsed seconds. Any non-200 is an error."""
    failures: list[str] = []
    lock = threading.Lock()

    def one(body: bytes) -> None:
        response = post_report(URL, body, connect=connect)
        if response.status != 200:
            with lock:
                failures.append(f"{response.status} {response.reason}")

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(bodies)} posts failed, e.g. {failures[0]}")
    return elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat), 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> tuple[float, float]:
    """(CPU seconds of the process, of its children)."""
    return cpu_seconds(pid), sum(cpu_seconds(child) for child in children(pid))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="reports per round and target (default 400)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--micros", type=int, default=16, help="microinverters per report (default 16)")
    parser.add_argument("--intervals", type=int, help="intervals per report (default: one period = --micros)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (bench/all.py reads it)")
    args = parser.parse_args()

    simulator = Simulator(micros=args.micros, start=1699956000)
    bodies = [encode_body(simulator.next_report(args.intervals).xml) for _ in range(args.requests)]
    print(f"{args.requests} reports per round ({args.micros} micros, {len(bodies[0]):,} bytes each), "
          f"{args.concurrency} client threads, {args.rounds} rounds", flush=True)

    with tempfile.TemporaryDirectory(prefix="pvtap-bench-") as tmp:
        work = Path(tmp)
        cloud = CloudProcess.start(work / "cloud")
        data_dir = work / "data"
        plain = Mitmdump.reverse(work / "plain", cloud, data_dir=None).start()
        tapped = Mitmdump.reverse(work / "tapped", cloud, data_dir=data_dir).start()
        targets = {
            "direct to cloud": ("127.0.0.1", int(cloud.url.rsplit(":", 1)[1])),
            "mitmdump": ("127.0.0.1", plain.port),
            "mitmdump + addon": ("127.0.0.1", tapped.port),
        }
        processes = {"mitmdump": plain.proc, "mitmdump + addon": tapped.proc}
        rates: dict[str, list[float]] = {name: [] for name in targets}
        cpu: dict[str, list[float]] = {name: [0.0, 0.0] for name in processes}  # own, children
        try:
            warm_up = bodies[:20]
            for target in targets.values():  # warm-up: certificates generated, code paths loaded
                post_all(warm_up, target, args.concurrency)
            for round_no in range(1, args.rounds + 1):
                for name, target in targets.items():
                    proc = processes.get(name)
                    before = cpu_of(proc.pid) if proc is not None else (0.0, 0.0)
                    elapsed = post_all(bodies, target, args.concurrency)
                    rates[name].append(len(bodies) / elapsed)
                    if proc is not None:
                        after = cpu_of(proc.pid)
                        cpu[name][0] += after[0] - before[0]
                        cpu[name][1] += after[1] - before[1]
                print(f"round {round_no}: " + ", ".join(f"{n} {r[-1]:.0f}/s" for n, r in rates.items()), flush=True)
            expected = 2 * (len(warm_up) + args.rounds * args.requests)  # request + answer per report
            started = time.perf_counter()
            store_path = data_dir / "enphase.sqlite"

            def stored() -> bool:
                with LocalStore(store_path, readonly=True) as store:
                    return store.count_raw() >= expected
            wait_for(stored, timeout=300, interval=0.2, what="the addon's store to catch up")
            catch_up = time.perf_counter() - started
            with LocalStore(store_path, readonly=True) as store:
                raws, records = store.count_raw(), store.count_records()
        finally:
            tapped.stop()
            plain.stop()
            cloud.stop()

    median = {name: statistics.median(r) for name, r in rates.items()}
    print()
    print(f"{'':>24}" + "".join(f"{name:>18}" for name in median))
    print(f"{'reports/s (median)':>24}" + "".join(f"{v:>18.0f}" for v in median.values()))
    print(f"{'relative to mitmdump':>24}" + "".join(f"{v / median['mitmdump']:>18.2f}" for v in median.values()))
    print()
    print(f"addon / no addon: {median['mitmdump + addon'] / median['mitmdump']:.2f}")
    posted = args.rounds * len(bodies)
    per_report = {name: (own * 1000 / posted, kids * 1000 / posted) for name, (own, kids) in cpu.items()}
    plain_ms, (tapped_ms, worker_ms) = per_report["mitmdump"][0], per_report["mitmdump + addon"]
    print(f"CPU per report in the timed rounds: mitmdump {plain_ms:.2f} ms; mitmdump + addon {tapped_ms:.2f} ms "
          f"in mitmdump's process and {worker_ms:.2f} ms in its ingest worker (a process of its own)")
    print(f"store: {raws:,} raw payloads, {records:,} records; caught up {catch_up:.1f} s after the last post")
    if args.json:
        args.json.write_text(json.dumps({"requests": args.requests, "concurrency": args.concurrency,
                                         "reports_s": median, "raw": raws, "expected_raw": expected,
                                         "records": records, "catch_up_s": catch_up,
                                         "cpu_ms_per_report": per_report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
