"""`pvtap health`: ask the running processes' health endpoints whether they are ready.

The Docker healthcheck of the pvtap service; also the quickest way to see why pvtap is not.
"""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request

from pvtap.config import Config, split_host_port


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "health", help="ask the running relay and Enphase proxy whether they are ready (exit 1 if not)",
        description="GET /readyz (or /healthz with --live) from the relay (health.relay_listen) and from "
                    "mitmproxy with the Enphase addon (health.enphase_listen), print what each says, and "
                    "exit 0 only when every one answered 200. The Compose stack's healthcheck runs this.")
    parser.add_argument("--live", action="store_true", help="only ask whether they are alive (/healthz)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds per request (default 5)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: Config) -> int:
    path = "/healthz" if args.live else "/readyz"
    targets = {"relay": config.health.relay_listen, "enphase": config.health.enphase_listen}
    asked, failed = 0, 0
    for name, listen in targets.items():
        if not listen:
            continue
        host, port = split_host_port(listen)
        if port == 0:
            print(f"{name}: health.{name}_listen = {listen!r} has no fixed port; cannot ask it")
            failed += 1
            continue
        host = {"0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
        asked += 1
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as resp:
                status, body = resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode(errors="replace")
        except OSError as exc:
            print(f"{name}: no answer from {url} ({getattr(exc, 'reason', exc)}): is `pvtap run` running?")
            failed += 1
            continue
        print(f"{name} ({url}): " + body.strip().replace("\n", "\n  "))
        failed += status != 200
    if not asked and not failed:
        print("both health endpoints are off (health.relay_listen and health.enphase_listen are empty)")
    return 1 if failed else 0
