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
    assert re.search(r"of [1-9][\d,]*: dropped 0, lost 0", text)  # every frame and ack of the fleet archived

    # where the time goes: each part's CPU in the bulk rows, the worker's until its archive was complete (4 MiB
    # of frames fit the channel's buffer: none dropped, every frame archived)
    number = r"(\d+\.\d)"
    frames = re.search(rf"\| bulk 4 MiB one way: relay \(asyncio\), AlphaESS frames \| \d+ MB/s; CPU ms/MiB: relay "
                       rf"{number}, worker {number}, client\+sink {number} \(socat {number}\); worker until its "
                       rf"archive held every frame it got: (\d+) ms/MiB, {number} s after the last run \|", text)
    assert frames, text
    assert float(frames[1]) > 0 and float(frames[3]) > 0 and int(frames[5]) > 0, frames[0]
    opaque = re.search(rf"\| bulk 4 MiB one way: relay \(asyncio\), opaque stream \| \d+ MB/s; CPU ms/MiB: relay "
                       rf"{number}, worker {number}, client\+sink {number} \(socat {number}\) \|", text)
    assert opaque and float(opaque[1]) > 0, text
    assert re.search(r"\| 5 devices × 1 frame/s \(asyncio\):.*relay process CPU \d+ µs per round trip, its ingest "
                     r"worker [1-9]\d* µs \(until drained\) \(socat \d+\)", text), text
    # the decoders' stage split, in their section's output
    decoders = text.partition("### bench/decoders.py")[2]
    for stage in ("Tap.feed", "redact_raw", "decode_raw", "stage sum", "end-to-end, as above", "target's budget",
                  "floor: RawPayload+Record(s)"):
        assert re.search(rf"^{re.escape(stage)}  +[\d.,]+ µs", decoders, re.M), f"no row {stage!r} in:\n{decoders}"
    # the worker's whole work per copy, stage by stage, in its section's output
    pipeline = text.partition("### bench/pipeline.py")[2]
    for path in ("AlphaESS realtime 1-1-16", "FoxESS M1 telemetry 0x02"):
        assert re.search(rf"^{path}( +[\d.]+µs){{5}} +[\d,]+$", pipeline, re.M), f"no row {path!r} in:\n{pipeline}"
    assert "**not measured**" not in text or "bench/decoders.py is not on this branch yet" in text
