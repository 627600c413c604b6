"""Fixtures every test area shares. Area-specific helpers live in tests/<area>_support.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for servers that cannot bind port 0 themselves)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def number(value: object) -> float:
    """A numeric record field (a FieldValue may also be a str), for arithmetic in assertions."""
    assert isinstance(value, (int, float)), f"{value!r} is not a number"
    return value


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path
