"""`pvtap firewall`: print the rules that send the devices' cloud traffic to pvtap."""

from __future__ import annotations

import argparse
import shlex
import sys

from pvtap.config import Config, ConfigError
from pvtap.firewall import KINDS, RENDERERS, Device, plan

EPILOG = f"""\
device kinds (what each dials, and where pvtap takes it):
{chr(10).join(f"  {name:<10} {kind.label}: TCP {', '.join(str(p) for p, _ in kind.ports)}"
              + (f"; DNS {', '.join(kind.hosts)}" if kind.hosts else "; by IP address only")
              for name, kind in KINDS.items())}

formats:
  iptables   a shell script for the pvtap host (iptables/ip6tables REDIRECT; `sh FILE -D` removes them)
  nftables   an nft -f file for the pvtap host (one inet table for IPv4 and IPv6)
  dnsmasq    host overrides for dnsmasq or Pi-hole (needs --pvtap-host), for devices that dial a name
  opnsense   the OPNsense/pfSense steps that policy-route the devices' cloud ports to the pvtap host
  all        all four, one after the other (default)

The ports pvtap listens on come from its config (enphase.listen, [[relay.listeners]] or the relay's
defaults): run it with the same --config as `pvtap run`.

examples:
  pvtap firewall --device alphaess=192.0.2.10 --device enphase=192.0.2.11 --lan-if eth0
  pvtap firewall --device alphaess=192.0.2.10 --format iptables > /etc/pvtap-firewall.sh
  pvtap firewall --device enphase=192.0.2.11 --pvtap-host 192.0.2.2 --format dnsmasq
  see firewall/README.md for the example setup (its files are this command's output)"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "firewall", help="print the iptables/nftables rules, DNS overrides and router steps for your devices",
        description="Print what sends each device's cloud connections to pvtap: REDIRECT rules for the pvtap host "
                    "(iptables or nftables), DNS overrides (dnsmasq, Pi-hole), and the OPNsense/pfSense steps "
                    "that route the devices' cloud ports to the pvtap host. Changes nothing itself.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", action="append", default=[], metavar="KIND=ADDRESS", required=True,
                        help=f"a device and its LAN address (repeatable); KIND: {', '.join(KINDS)}")
    parser.add_argument("--lan-if", default="", metavar="IF",
                        help="interface the devices' traffic arrives on at the pvtap host (default: any)")
    parser.add_argument("--pvtap-host", default="", metavar="ADDRESS",
                        help="the pvtap host's LAN address (for DNS overrides and the router steps)")
    parser.add_argument("--format", choices=[*RENDERERS, "all"], default="all", help="what to print (default: all)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        devices = [Device.parse(text) for text in args.device]
    except ValueError as exc:
        print(f"pvtap firewall: --device {exc}", file=sys.stderr)
        return 2
    if args.format == "dnsmasq" and not args.pvtap_host:
        print("pvtap firewall: DNS overrides point the names at pvtap. Fix: --pvtap-host <its LAN address>",
              file=sys.stderr)
        return 2
    command = "pvtap firewall " + " ".join(
        [*(f"--device {d.kind}={d.address}" for d in devices),
         *([f"--lan-if {shlex.quote(args.lan_if)}"] if args.lan_if else []),
         *([f"--pvtap-host {args.pvtap_host}"] if args.pvtap_host else []), f"--format {args.format}"])
    try:
        rules = plan(devices, config, lan_if=args.lan_if, pvtap_host=args.pvtap_host, command=command)
    except ConfigError as exc:
        print(f"pvtap firewall: {exc}", file=sys.stderr)
        return 2
    formats = list(RENDERERS) if args.format == "all" else [args.format]
    for index, name in enumerate(formats):
        if len(formats) > 1:
            print(("\n" if index else "") + f"===== {name} " + "=" * (60 - len(name)))
        sys.stdout.write(RENDERERS[name](rules))
    return 0
