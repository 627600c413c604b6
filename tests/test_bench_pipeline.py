"""bench/pipeline.py still runs, and what it times is the worker's whole path (its figures live in
docs/benchmarks.md, not in assertions)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def test_the_pipeline_bench_times_every_stage_of_every_copy():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "pipeline.py"), "--short"], capture_output=True,
                         text=True, timeout=240, check=True, cwd=REPO).stdout
    assert re.search(r"^path +frame +redact +archive +decode +sum +copies/s$", out, re.M), out
    for path in ("AlphaESS realtime 1-1-16", "FoxESS M1 telemetry 0x02"):
        row = re.search(rf"^{path}((?: +[\d.]+µs){{5}}) +([\d,]+)$", out, re.M)
        assert row, f"no row {path!r} in:\n{out}"
        *stages, total = (float(cell) for cell in re.findall(r"([\d.]+)µs", row[1]))
        assert all(stage > 0 for stage in stages) and abs(sum(stages) - total) <= 0.25, row[0]
        assert abs(int(row[2].replace(",", "")) - 1e6 / total) <= 1e6 / total * 0.01 + 1, row[0]  # copies/s = 1 / sum
