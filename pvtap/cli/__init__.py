"""The `pvtap` command: one sub-command per module in this package.

Each sub-command module has `register(subparsers)`, which adds its parser and sets
`func(args, config) -> int` as the parser default. Adding a command is one module and one
name in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from pvtap.config import Config, ConfigError, env_warnings, load_config

COMMANDS = ("run", "relay", "forward", "status", "deadletters", "tail", "devices", "export", "replay", "import_",
            "simulate", "demo", "certs", "mqtt", "init", "health", "firewall", "web")

DESCRIPTION = """\
pvtap sits between your solar/battery devices and their vendor clouds, forwards every byte
unmodified, and decodes a copy into time series (a local SQLite store by default, InfluxDB
optionally). Settings come from a TOML file (--config or PVTAP_CONFIG) and PVTAP_* environment
variables; see docs/config.md."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvtap", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="TOML config file (default: $PVTAP_CONFIG, else built-in defaults)")
    parser.add_argument("--data-dir", type=Path,
                        help="directory of the local stores (overrides data_dir / PVTAP_DATA_DIR)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pvtap.cli.{name}").register(sub)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for warning in env_warnings():
        print(f"pvtap: {warning}", file=sys.stderr)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pvtap: {exc}", file=sys.stderr)
        return 2
    if args.data_dir is not None:
        config = _with_data_dir(config, args.data_dir)
    setup_logging("debug" if args.verbose else config.log_level)
    try:
        return int(args.func(args, config) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pvtap export | head`
        return 0


def _with_data_dir(config: Config, data_dir: Path) -> Config:
    import dataclasses
    return dataclasses.replace(config, data_dir=data_dir)


if __name__ == "__main__":
    sys.exit(main())
