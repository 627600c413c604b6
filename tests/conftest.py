"""Fixtures every test area shares. Area-specific helpers live in tests/<area>_support.py."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from proxy_tcp.service import loop_factory
from tests.relay_support import STARTED as RELAYS_STARTED

REPO = Path(__file__).resolve().parent.parent

# Every relay and mitmdump the tests start serves its health endpoints on a free port of its own,
# never on the fixed defaults: several test runs share this machine, and a user's pvtap may run here.
# And they store no pvtap_stats records, which tests counting a store's records would find; the
# tests of those records ask for them.
HEALTH_ENV = {"PVTAP_HEALTH_RELAY_LISTEN": "127.0.0.1:0", "PVTAP_HEALTH_ENPHASE_LISTEN": "127.0.0.1:0",
              "PVTAP_HEALTH_STATS_EVERY_S": "0"}
for _key, _value in HEALTH_ENV.items():
    os.environ.setdefault(_key, _value)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for servers that cannot bind port 0 themselves)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def number(value: object) -> float:
    """A numeric record field (a FieldValue may also be a str), for arithmetic in assertions."""
    assert isinstance(value, (int, float)), f"{value!r} is not a number"
    return value


#: the relay's event loops (relay.event_loop), for tests marked `@pytest.mark.asyncio(loop_factories=RELAY_LOOPS)`
RELAY_LOOPS = ["asyncio", "uvloop"]


def pytest_asyncio_loop_factories(config, item):
    """pytest-asyncio's hook: a test that asks for the relay's loops runs once on each; every
    other async test on the standard library's loop (its test id unchanged)."""
    marker = item.get_closest_marker("asyncio")
    if marker is not None and marker.kwargs.get("loop_factories"):
        return {name: loop_factory(name) for name in RELAY_LOOPS}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def no_relay_left_behind():
    """A test that fails before stopping its relay process still ends it (and its ingest worker)."""
    yield
    while RELAYS_STARTED:
        proc = RELAYS_STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
