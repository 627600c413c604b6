"""Bench: the ingest worker's whole work per copy, on one thread, stage by stage.

    .venv/bin/python bench/pipeline.py [--copies 20000] [--repeat 3] [--privacy pseudonyms] [--short]

What one worker core can take: each copy of an AlphaESS realtime frame and of a FoxESS M1
telemetry frame goes the way the worker takes it (pvtap/ingest/): framed by its connection's Tap
(`Connections.chunk`), redacted (`Ingest.redact`), archived in group commits of 500
(`Ingest.archive`, WAL, synchronous=FULL), then decoded from the archive (`Ingest.decode_pending`:
read back, decode, the records and the cursor committed). Thread CPU per copy of each stage, best
of the rounds, and the copies per second their sum means. `bench/decoders.py` times the
decoders alone (Tap + redact + decode, no store, no worker); the difference is the store and the
worker's own glue. The worker process does the same work on three threads (reader, archiver,
decoder) sharing one GIL, so its CPU per copy is this plus their hand-offs: this is its floor,
and 1 s over it the copies a second one worker core can archive and decode.
`--short` runs a few hundred copies, for the smoke test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoders import PRIVACY, alphaess_frames, calibration_us, foxess_frames, settle

from pvtap.decode import codec_for
from pvtap.ingest.engine import Ingest
from pvtap.ingest.framing import ConnectionRecord, Connections
from pvtap.privacy import Privacy
from pvtap.records import UP
from pvtap.store.local import LocalStore

#: copies per turn: the archiver's group commits and the decoder's batches are about this size
#: when the worker is busy
BATCH = 500
STAGES = ("frame", "redact", "archive", "decode")
PATHS: dict[str, tuple[str, Callable[[int], list[bytes]]]] = {
    "AlphaESS realtime 1-1-16": ("alphaess", alphaess_frames),
    "FoxESS M1 telemetry 0x02": ("foxess", foxess_frames),
}


def one_round(protocol: str, frames: list[bytes], privacy: Privacy, data_dir: Path) -> dict[str, float]:
    """Thread CPU seconds per copy of each stage, over every frame, in turns of BATCH."""
    store = LocalStore(data_dir / f"{protocol}-{time.monotonic_ns()}.sqlite")
    ingest = Ingest(store, privacy)
    connections = Connections(privacy, codec_for, lambda _conn: None)
    connections.open(1, ConnectionRecord(id="c-bench", protocol=protocol, listener="bench", policy="forward",
                                         started=datetime.now(UTC), peer="192.0.2.10:40000"), "")
    spent = dict.fromkeys(STAGES, 0.0)
    clock = time.thread_time
    now_ns = time.time_ns()
    for start in range(0, len(frames), BATCH):
        t0 = clock()
        payloads = [raw for frame in frames[start:start + BATCH] for raw in connections.chunk(1, UP, now_ns, frame)]
        t1 = clock()
        safe = [ingest.redact(raw) for raw in payloads]
        t2 = clock()
        ingest.archive(safe)
        t3 = clock()
        while ingest.decode_pending():
            pass
        t4 = clock()
        for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            spent[stage] += seconds
    assert ingest.counts.decoded == len(frames) and ingest.counts.decode_errors == 0, ingest.counts
    store.close()
    return {stage: seconds / len(frames) for stage, seconds in spent.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=20_000, help="copies per round and protocol (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--privacy", choices=PRIVACY, default="pseudonyms",
                        help="redaction settings (default pseudonyms: the most work)")
    parser.add_argument("--short", action="store_true", help="a few hundred copies, one round: does it still run")
    args = parser.parse_args(argv)
    if args.short:
        args.copies, args.repeat = 600, 1
    privacy = PRIVACY[args.privacy]
    yardstick = calibration_us()
    print(f"privacy {args.privacy}; {args.copies} copies x {args.repeat} rounds, group commits of {BATCH}; load "
          f"average {os.getloadavg()[0]:.2f}; this core runs sum(range(1000)) in {yardstick:.1f} µs")
    print(f"{'path':<28}" + "".join(f"{stage:>10}" for stage in STAGES) + f"{'sum':>10}{'copies/s':>11}")
    with tempfile.TemporaryDirectory(prefix="pvtap-pipeline-") as tmp:
        for title, (protocol, make) in PATHS.items():
            frames = make(args.copies)
            settle()
            rounds = [one_round(protocol, frames, privacy, Path(tmp)) for _ in range(args.repeat)]
            best = min(rounds, key=lambda r: sum(r.values()))
            total = sum(best.values())
            print(f"{title:<28}" + "".join(f"{best[stage] * 1e6:>8.1f}µs" for stage in STAGES)
                  + f"{total * 1e6:>8.1f}µs{1 / total:>11,.0f}")
    print("µs of thread CPU per copy, the best round; the worker's threads add their hand-offs to this")
    return 0


if __name__ == "__main__":
    sys.exit(main())
