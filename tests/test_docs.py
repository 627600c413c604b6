"""The docs and the help agree with what the code does, and the docs stand on their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from proxy_tcp.listeners import DEFAULT_LISTENERS
from pvtap.config import ListenerConfig

from .conftest import REPO


def _help(*argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PVTAP_")}
    done = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, env=env, check=True)
    return done.stdout


def _expected_words(listener: ListenerConfig) -> list[str]:
    words = [listener.protocol, listener.transport, listener.listen]
    if listener.transport == "udp":
        return [*words, "listen only"]
    if listener.policy == "local":
        return [*words, "local"]
    return [*words, listener.policy, listener.upstream]


@pytest.mark.parametrize("argv", [["-m", "pvtap", "relay"], ["-m", "proxy_tcp"], ["-m", "pvtap", "run"]])
def test_help_lists_every_default_listener(argv: list[str]) -> None:
    text = _help(*argv)
    lines = [line.strip() for line in text.splitlines()
             if re.match(r"\s+(alphaess|foxess)\s+(tcp|udp)\s", line)]
    assert len(lines) == len(DEFAULT_LISTENERS)
    for line, listener in zip(lines, DEFAULT_LISTENERS):
        for word in _expected_words(listener):
            assert word in line, f"{word!r} missing from the help's line {line!r}"
        assert ("tls" in line.split("→")[0]) == bool(listener.tls_cert)
        assert ("pinned" in line) == bool(listener.upstream_pin_sha256)


def test_relay_doc_lists_every_default_listener() -> None:
    text = (REPO / "docs" / "relay.md").read_text()
    table = text[text.index("| Protocol | Transport | Listen | Policy | Upstream |"):]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    assert [row[:5] for row in rows] == [
        [x.protocol, x.transport, x.listen, x.policy, x.upstream or "—"] for x in DEFAULT_LISTENERS]
