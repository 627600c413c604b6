"""bench/decoders.py still runs (its figures live in the report and docs, not in assertions)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("Tap.feed", "redact_raw", "decode_raw", "stage sum", "end-to-end, as above", "target's budget",
          "floor: RawPayload+Record(s)", "floor: orjson.loads(body)")


def table_row(out: str, label: str) -> list[str]:
    """The cells of the "where the time goes" row `label` (one per path)."""
    match = re.search(rf"^{re.escape(label)}  +(.+)$", out, re.M)
    assert match, f"no row {label!r} in:\n{out}"
    return re.findall(r"-|[\d,.]+ (?:µs|ms)|[\d,]+/s", match[1])


def seconds(cell: str) -> float:
    value, unit = cell.split()
    return float(value.replace(",", "")) * (1e-6 if unit == "µs" else 1e-3)


def test_the_decoder_bench_runs_in_short_mode():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "decoders.py"), "--short"], capture_output=True,
                         text=True, timeout=240, check=True, cwd=REPO).stdout
    rates = dict(re.findall(r"^(AlphaESS|FoxESS)\b.*?([\d,]+)/s", out, re.M))
    assert set(rates) == {"AlphaESS", "FoxESS"} and all(int(r.replace(",", "")) > 0 for r in rates.values()), out
    assert re.search(r"^Enphase 50\+50 report, redact\+decode\s+[\d.]+ms", out, re.M), out
    # every frame gave its record, the report its 100+: the bench measured decoding, not a failure path
    counts = [int(n) for n in re.findall(r"\s(\d+)$", out, re.M)]
    assert counts[:2] == [300, 300] and counts[2] > 100, out

    # where the time goes: a column per path, a row per stage
    assert re.search(r"^stage +AlphaESS realtime +FoxESS M1 0x02 +Enphase 50\+50$", out, re.M), out
    rows = {label: table_row(out, label) for label in STAGES}
    assert all(len(cells) == 3 for cells in rows.values()), rows
    assert rows["Tap.feed"][2] == "-" and rows["floor: orjson.loads(body)"][1:] == ["-", "-"], rows
    assert [cell.split()[1] for cell in rows["stage sum"]] == ["µs", "µs", "ms"], rows
    assert rows["target's budget"] == ["20.0 µs", "20.0 µs", "20.0 ms"], rows
    for path in range(3):
        stages = [seconds(rows[s][path]) for s in ("Tap.feed", "redact_raw", "decode_raw") if rows[s][path] != "-"]
        total, end_to_end = seconds(rows["stage sum"][path]), seconds(rows["end-to-end, as above"][path])
        assert all(s > 0 for s in stages) and abs(sum(stages) - total) <= 0.11 * len(stages) * (
            1e-6 if path < 2 else 1e-3), rows  # the sum of the rounded cells
        # the stages timed apart account for the path timed whole (not a factor off: no stage missed or doubled)
        assert end_to_end / 3 < total < end_to_end * 3, rows
        # the floor is below what the decoders do on top of it
        assert 0 < seconds(rows["floor: RawPayload+Record(s)"][path]) < total, rows
    assert 0 < seconds(rows["floor: orjson.loads(body)"][0]) < seconds(rows["stage sum"][0]), rows
    # the rates are the times' inverses
    rates_rows = re.findall(r"^  its rate +(.+)$", out, re.M)
    assert len(rates_rows) == 2 and all(len(re.findall(r"[\d,]+/s", r)) == 3 for r in rates_rows), out
    assert re.search(r"^yardstick: this core runs sum\(range\(1000\)\) in [\d.]+ µs", out, re.M), out
