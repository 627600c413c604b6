"""`make bench` still works: every benchmark runs in its short mode (seconds) and docs/benchmarks.md
gets a row for each. A smoke test: the figures are not checked (they depend on the machine and
its load); that each benchmark ran, and what it found lost, is."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_every_benchmark_runs_in_its_short_mode(tmp_path):
    page = tmp_path / "benchmarks.md"
    result = subprocess.run([sys.executable, "bench/all.py", "--short", "--out", str(page)], cwd=REPO,
                            capture_output=True, text=True, timeout=880, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    text = page.read_text()
    assert "in SHORT mode" in text and "Machine: " in text
    for words in ("bulk 4 MiB one way: relay (asyncio), AlphaESS frames", "5 devices × 1 frame/s (asyncio)",
                  "200 idle device connections: RSS per connection", "store append, 500 records per commit",
                  "InfluxDB drain: the forwarder", "Enphase reports through mitmdump",
                  "Enphase: every report and answer in the raw archive when the run ends | 40 of 40"):
        assert words in text, f"no row {words!r} in:\n{text}"
    assert re.search(r"dropped 0, lost 0 of [1-9]\d*", text)  # every frame and ack of the fleet archived
    assert "**not measured**" not in text or "bench/decoders.py is not on this branch yet" in text
