"""Bench: time from starting `pvtap run` to both processes ready (their /readyz answering 200).

    .venv/bin/python bench/startup.py [--runs 5]

`pvtap run` with one local AlphaESS listener on a free port (the default listeners would also
resolve the clouds' names at start, which depends on the network), mitmproxy on a free port, the
health endpoints on free fixed ports, polled every 10 ms.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def once(tmp: Path) -> tuple[float, float]:
    """Seconds until the relay and until mitmproxy answered /readyz 200."""
    config = tmp / "pvtap.toml"
    config.write_text(f'[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "127.0.0.1:{free_port()}"\n'
                      'policy = "local"\n')
    relay_port, enphase_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PVTAP_")}
    env.update(PVTAP_HEALTH_RELAY_LISTEN=f"127.0.0.1:{relay_port}",
               PVTAP_HEALTH_ENPHASE_LISTEN=f"127.0.0.1:{enphase_port}", PVTAP_ENPHASE_LISTEN="127.0.0.1:0")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pvtap", "--config", str(config), "--data-dir", str(tmp / "data"),
                             "run", "--mitmproxy-set", f"confdir={tmp / 'conf'}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times: dict[int, float] = {}
    try:
        while len(times) < 2 and time.perf_counter() - started < 60:
            for port in (relay_port, enphase_port):
                if port not in times and ready(port):
                    times[port] = time.perf_counter() - started
            time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(60)
    if len(times) < 2:
        raise RuntimeError("pvtap run did not become ready within 60 s")
    return times[enphase_port], times[relay_port]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="pvtap-bench-") as tmp:
            results.append(once(Path(tmp)))
        print(f"  run {run + 1}: mitmproxy ready after {results[-1][0]:.2f} s, relay after {results[-1][1]:.2f} s",
              file=sys.stderr)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\n`pvtap run` to ready (median of {args.runs}; {os.cpu_count()} CPUs, load {' '.join(load)}): "
          f"mitmproxy {statistics.median(r[0] for r in results):.2f} s, "
          f"relay (started after mitmproxy) {statistics.median(r[1] for r in results):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
