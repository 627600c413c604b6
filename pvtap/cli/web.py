"""`pvtap web`: the read-only web view of the local stores, on its own (`pvtap run` starts it too)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from pvtap.config import Config, ConfigError, WebConfig, listen_address, split_host_port

READY_LINE = "web view ready on http://{host}:{port}/"

EPILOG = """\
The page shows every device in the stores (serial, model, firmware, last contact or "silent for",
records today, how its traffic passes pvtap and whether the cloud answers), its current values
(updated every web.refresh_s seconds), power and SoC charts from 6 hours to a year, energy per day,
health in the words of `pvtap status`, and a download of the shown range as CSV or line protocol.
It reads the stores only, and works while pvtap runs (`pvtap run` starts it on web.listen).

examples:
  pvtap web                                   http://127.0.0.1:8080/ on ./data
  pvtap --data-dir data/demo web              the records of `pvtap demo`
  PVTAP_WEB_LISTEN=0.0.0.0:8080 PVTAP_WEB_PASSWORD='…' pvtap web     open to the LAN, with a password

Any address but loopback needs web.password (HTTP basic authentication, any user name)."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "web", help="serve the read-only web view of the local stores (devices, live values, charts, health)",
        description="Serve a web page with the devices, their current values, charts and health, read from the "
                    "local stores (read-only), on web.listen (default 127.0.0.1:8080).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="listen here instead of web.listen (port 0: any free port, printed at start)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: Config) -> int:
    from pvtap.web.server import bind, serve  # aiohttp only for this command

    listen = args.listen or config.web.listen
    try:
        if not listen:
            raise ConfigError("web.listen", "", "empty, so the web view is off",
                              "set web.listen (e.g. 127.0.0.1:8080) or pass --listen")
        if problem := listen_address(listen):
            raise ConfigError("--listen", listen, problem, "give host:port, e.g. 127.0.0.1:8080")
        WebConfig(listen=listen, password=config.web.password)  # the LAN needs a password, --listen too
    except ConfigError as exc:
        print(f"pvtap web: {exc}", file=sys.stderr)
        return 2
    host, port = split_host_port(listen)
    try:
        sock = bind(host, port)
    except OSError as exc:
        print(f"pvtap web: cannot listen on {listen}: {exc.strerror or exc}. Fix: choose another web.listen "
              "(or --listen), or stop what uses that port", file=sys.stderr)
        return 1
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host

    def ready() -> None:
        print(READY_LINE.format(host=shown, port=bound_port) + f" (read-only; stores in {config.data_dir})",
              flush=True)
    os.nice(10)  # on a busy machine the proxies beside it get the CPU first

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM (from `pvtap run`) stops as cleanly as Ctrl-C
    signal.signal(signal.SIGTERM, stop)
    try:
        asyncio.run(serve(config, sock, ready=ready))
    except KeyboardInterrupt:
        pass
    return 0
