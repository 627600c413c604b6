"""`pvtap relay` (also `python -m proxy_tcp`): the raw-TCP relay for AlphaESS and FoxESS devices.

Listeners come from `[[relay.listeners]]` in the config file, or one from the command line for
a quick start, or, when neither gives any, one per supported device on its usual port.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pvtap.config import RELAY_POLICIES, RELAY_PROTOCOLS, Config, ConfigError, ListenerConfig, check_listener

DESCRIPTION = """\
Relay device connections to their vendor cloud byte for byte, and decode a copy into
<data_dir>/relay.sqlite. Each listener has a protocol, an address and a policy:
  fixed        forward to --upstream (a name or an IP; with a DNS override, add --resolver)
  transparent  forward to the original destination of a firewall REDIRECT on this host
               (firewall/README.md); connections that were not redirected are refused
  local        no cloud: answer the device as the cloud would
  auto         forward to --upstream; while it cannot be reached within --connect-timeout,
               answer locally, and try the cloud again for the next connection
The relay never connects back to itself: an upstream that resolves to this host is refused."""

def describe_listener(listener: ListenerConfig) -> str:
    """One listener in a line: `foxess  tcp 0.0.0.0:14431  tls, auto → tls 8.209.116.72:14431 (pinned)`."""
    tls = "tls, " if listener.tls_cert else ""
    if listener.transport == "udp":
        where = "listen only"
    elif listener.policy == "local":
        where = f"{tls}local answers"
    elif listener.policy == "transparent":
        where = f"{tls}transparent → the original destination"
    else:
        pinned = " (pinned)" if listener.upstream_pin_sha256 else ""
        where = f"{tls}{listener.policy} → {'tls ' if listener.upstream_tls else ''}{listener.upstream}{pinned}"
    return f"{listener.protocol:<9} {listener.transport} {listener.listen:<14} {where}"


def default_listener_lines() -> list[str]:
    """The relay's listeners when none is configured, one line each (for --help)."""
    from proxy_tcp.listeners import DEFAULT_LISTENERS

    return [describe_listener(listener) for listener in DEFAULT_LISTENERS]


EPILOG = """\
without [[relay.listeners]] in the config and without --protocol, one listener per supported
device on its usual port (auto: forward to the cloud, answer locally while it cannot be reached):
  {defaults}

examples:
  pvtap relay                      the [[relay.listeners]] of the config, else the defaults above
  pvtap relay --protocol alphaess --listen 0.0.0.0:7777 --upstream www.alphaess.com:7777
  pvtap relay --protocol alphaess --listen 0.0.0.0:7777 --upstream www.alphaess.com:7777 \\
              --resolver 192.0.2.53            the local DNS overrides www.alphaess.com
  pvtap relay --protocol alphaess --listen '*:17777' --policy transparent
  pvtap relay --protocol alphaess --listen 0.0.0.0:7777 --policy local
  pvtap relay --protocol alphaess --listen 0.0.0.0:7777 --upstream www.alphaess.com:7777 \\
              --allow-from 192.0.2.10              only the battery may connect

Each connection ends with one log line (device, upstream, policy, bytes, frames, outcome) and a
pvtap_connection record. SIGINT/SIGTERM stop it cleanly. See docs/relay.md."""

def epilog(prog: str = "pvtap relay") -> str:
    return EPILOG.replace("pvtap relay", prog).format(defaults="\n  ".join(default_listener_lines()))


#: the quick-start flags and the listener settings they set
FLAGS = ("protocol", "listen", "policy", "upstream", "resolver", "connect_timeout", "idle_timeout",
         "first_byte_timeout", "allow_from")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ListenerConfig()
    quick = parser.add_argument_group("one listener from the command line (replaces the configured ones)")
    quick.add_argument("--protocol", choices=RELAY_PROTOCOLS, help="protocol spoken on the port")
    quick.add_argument("--listen", metavar="HOST:PORT", help="address to listen on ([v6]:port; *:port for all)")
    quick.add_argument("--policy", choices=RELAY_POLICIES, help=f"where connections go (default {defaults.policy})")
    quick.add_argument("--upstream", metavar="HOST:PORT", help="the cloud, for fixed and auto")
    quick.add_argument("--resolver", metavar="IP[:PORT]",
                       help="DNS server that resolves --upstream (when a DNS override points it at this host)")
    quick.add_argument("--connect-timeout", type=float, metavar="SECONDS",
                       help=f"to reach the cloud (default {defaults.connect_timeout:g})")
    quick.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                       help=f"close a connection silent both ways this long (default {defaults.idle_timeout:g})")
    quick.add_argument("--first-byte-timeout", type=float, metavar="SECONDS",
                       help="close a connection whose device sent nothing this long after connecting "
                            f"(default {defaults.first_byte_timeout:g})")
    quick.add_argument("--allow-from", action="append", metavar="NETWORK",
                       help="accept connections only from this network or address (repeatable; default: any)")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("relay", help="run the raw-TCP relay (AlphaESS, FoxESS)", description=DESCRIPTION,
                            epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def quick_listener(args: argparse.Namespace) -> ListenerConfig | None:
    """The listener the flags describe, None when no flag was given; ConfigError naming the flag."""
    given = {name: getattr(args, name) for name in FLAGS if getattr(args, name, None) is not None}
    if not given:
        return None
    for field in dataclasses.fields(ListenerConfig):
        check = field.metadata.get("check")
        problem = check(given[field.name]) if check and field.name in given else None
        if problem:
            raise ConfigError(flag(field.name), given[field.name], problem,
                              f"{flag(field.name)}: {field.metadata['help']}")
    listener = ListenerConfig(**given)
    check_listener(listener, flag)
    return listener


def run(args: argparse.Namespace, config: Config, prog: str = "pvtap relay") -> int:
    from proxy_tcp import service

    try:
        listener = quick_listener(args)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if listener is None:
        return service.run(config, prog=prog)
    return service.run(config, [listener], keys=lambda _index, name: flag(name), prog=prog)
