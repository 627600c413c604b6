"""`python -m proxy_tcp`: the relay on its own, with the same options as `pvtap relay`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pvtap.cli import relay as relay_cli
from pvtap.cli import setup_logging
from pvtap.config import ConfigError, env_warnings, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy_tcp", description=relay_cli.DESCRIPTION,
                                     epilog=relay_cli.epilog("python -m proxy_tcp"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="TOML config file (default: $PVTAP_CONFIG, else built-in defaults)")
    parser.add_argument("--data-dir", type=Path, help="directory of the local stores (overrides data_dir)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    relay_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    for warning in env_warnings():
        print(f"{parser.prog}: {warning}", file=sys.stderr)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    if args.data_dir is not None:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    setup_logging("debug" if args.verbose else config.log_level)
    return relay_cli.run(args, config, prog=parser.prog)


if __name__ == "__main__":
    sys.exit(main())
