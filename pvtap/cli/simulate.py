"""`pvtap simulate DEVICE`: device simulators for demos, tests and benchmarks.

Each simulator module in `pvtap.simulate` has `register(subparsers)`, like the commands.
"""

from __future__ import annotations

import argparse
import importlib

SIMULATORS = ("enphase", "alphaess", "foxess_m1", "foxess_h1", "foxess_t")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("simulate", help="run a device simulator (placeholder serials, realistic values)",
                            description="Simulate a device talking to its cloud, straight or through pvtap.")
    devices = parser.add_subparsers(dest="device", metavar="DEVICE", required=True)
    for name in SIMULATORS:
        importlib.import_module(f"pvtap.simulate.{name}").register(devices)
