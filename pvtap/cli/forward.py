"""`pvtap forward`: deliver every local store in the data directory to InfluxDB.

The same forwarder runs inside the relay and the addon for their own store; this command is for
running it on its own (a separate container, a cron-style `--once` catch-up, after an outage).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from pvtap.config import Config
from pvtap.store.delivery import read_status
from pvtap.store.forwarder import STOP_TIMEOUT_S, Forwarder
from pvtap.store.local import store_paths

RESCAN_S = 5.0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "forward", help="deliver the local stores to InfluxDB (at least once, survives outages and restarts)",
        description="Deliver every local store in the data directory to InfluxDB ([influx] settings; see "
                    "docs/influxdb.md). Records are marked delivered only once InfluxDB accepted them; a dead, "
                    "slow or rejecting database keeps them in the store. Stores that appear later are picked "
                    "up. Stop with Ctrl-C or SIGTERM (within 5 s).")
    parser.add_argument("--once", action="store_true",
                        help="deliver what is waiting now, then exit (0 when everything was delivered)")
    parser.add_argument("--timeout", type=float, default=0.0, metavar="S",
                        help="with --once: give up after S seconds and exit 1 (default: wait as long as it takes)")
    parser.add_argument("--store", action="append", default=[], metavar="NAME",
                        help="only this store (e.g. relay or relay.sqlite); repeatable")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: Config) -> int:
    if not config.influx.url:
        print("pvtap forward: influx.url is not set, so there is nowhere to forward to. Fix: set [influx] url, "
              "token, org and bucket in the config file or PVTAP_INFLUX_URL etc. (docs/influxdb.md)", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    wanted = {name.removesuffix(".sqlite") for name in args.store}
    forwarders: dict[Path, Forwarder] = {}

    def scan() -> None:
        for path in store_paths(config.data_dir):
            if path not in forwarders and (not wanted or path.stem in wanted):
                forwarders[path] = Forwarder(path, config.influx).start()

    scan()
    if not forwarders:
        print(f"pvtap forward: no local stores in {config.data_dir}" + (" matching --store" if wanted else "")
              + ("" if args.once else "; waiting for one to appear"), file=sys.stderr)
        if args.once:
            return 0
    try:
        if args.once:
            return _drain_once(forwarders, stop, args.timeout)
        while not stop.wait(RESCAN_S):
            scan()
        return 0
    finally:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for f in forwarders.values():
            f.stop_soon()  # all at once, then wait for each within one shared deadline
        for f in forwarders.values():
            f.stop(max(0.1, deadline - time.monotonic()))


def _drain_once(forwarders: dict[Path, Forwarder], stop: threading.Event, timeout: float) -> int:
    start = time.monotonic()
    total = _waiting(forwarders)
    last_print = start
    while not stop.is_set():
        waiting = _waiting(forwarders)
        now = time.monotonic()
        if waiting == 0:
            print(f"pvtap forward: delivered {total} records in {now - start:.1f} s", file=sys.stderr)
            return 0
        if now - last_print >= 2.0:
            last_print = now
            done = max(0, total - waiting)
            print(f"pvtap forward: {done}/{total} delivered ({100 * done / max(total, 1):.0f}%), "
                  f"{waiting} waiting, {now - start:.0f} s", file=sys.stderr)
        if timeout and now - start >= timeout:
            print(f"pvtap forward: {waiting} records still waiting after {timeout:g} s (see pvtap status)",
                  file=sys.stderr)
            return 1
        stop.wait(0.1)
    return 1


def _waiting(forwarders: dict[Path, Forwarder]) -> int:
    return sum(state.backlog + state.requeued for state in map(read_status, forwarders))
