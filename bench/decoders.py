"""How fast the decoders are on one core: frames per second through Tap + redact_raw + decode_raw
for AlphaESS realtime (1-1-16) and FoxESS M1 telemetry (0x02) frames, and the milliseconds one
Envoy catch-up report (500 intervals + 500 readings) takes through redact_raw + decode_raw.

    .venv/bin/python bench/decoders.py [--frames 20000] [--repeat 5] [--privacy pseudonyms] [--short]
    .venv/bin/python bench/decoders.py --profile alphaess|foxess|enphase   (where the time goes)

Each frame is fed to the Tap as its own read (as a device sending one frame at a time does), its
RawPayload redacted and decoded. Times are the thread's CPU time (one core's work, less sensitive
to other load than the wall clock); the best of `--repeat` rounds is printed (the median beside
it), since other work on the machine only ever makes a round slower. No store: `bench/enphase_parse.py`
and the relay benches measure that. `--short` runs a few hundred frames, for the smoke test.
`--profile PATH` runs one path under pyinstrument (a sampling profiler, in the test extra) and
prints its call tree instead of the figures.
Targets (issue 14): ≥ 50,000 frames/s for both frame protocols, ≤ 20 ms for the Envoy report.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pvtap.decode import Codec, TapFactory, alphaess, enphase, foxess
from pvtap.privacy import Privacy
from pvtap.records import UP, Origin, RawPayload, now_utc
from pvtap.simulate.alphaess import _Battery
from pvtap.simulate.enphase import Simulator, encode_body
from pvtap.simulate.foxess_m1 import SunModel, telemetry_payload

PRIVACY = {
    "default": Privacy(),
    "pseudonyms": Privacy(pseudonym_key=b"bench-key-" * 4),
    "keep": Privacy(keep_network_identity=True),
}
SERIAL = "AL0000000000001"  # a placeholder, as in the simulators


def alphaess_frames(n: int) -> list[bytes]:
    battery = _Battery(SERIAL)
    start = datetime(2024, 6, 21, 6, 0, tzinfo=UTC)
    return [alphaess.encode_frame(1, 16, alphaess.encode_json(battery.realtime(start + timedelta(seconds=10 * i))))
            for i in range(n)]


def foxess_frames(n: int) -> list[bytes]:
    sun = SunModel(seed=1)
    return [foxess.build_frame(foxess.REALTIME, telemetry_payload(sun.sample(1718949600 + 90 * i)), stamp=i)
            for i in range(n)]


PATHS: dict[str, tuple[TapFactory, Codec, Callable[[int], list[bytes]]]] = {
    "alphaess": (alphaess.Tap, alphaess, alphaess_frames), "foxess": (foxess.Tap, foxess, foxess_frames)}


def frames_per_second(protocol: str, make_tap: TapFactory,
                      redact: Callable[[RawPayload, Privacy], RawPayload], decode: Callable[[RawPayload], list],
                      frames: list[bytes], privacy: Privacy, repeat: int) -> tuple[float, float, int]:
    """(best, median) frames/s and the records per round."""
    rates = []
    records = 0
    received = now_utc()
    for _ in range(repeat + 1):  # the first round warms up
        tap = make_tap(Origin(protocol, "", "bench", ""))
        records = 0
        t0 = time.thread_time()
        for frame in frames:
            for raw in tap.feed(UP, frame, received):
                records += len(decode(redact(raw, privacy)))
        rates.append(len(frames) / (time.thread_time() - t0))
    return max(rates[1:]), statistics.median(rates[1:]), records


def enphase_ms(intervals: int, privacy: Privacy, repeat: int) -> tuple[float, float, int]:
    report = Simulator(micros=10, start=1718928000).next_report(intervals)
    raw = RawPayload(Origin("enphase", "", "bench", UP), "performance_report", encode_body(report.xml), now_utc(),
                     {"method": "POST", "path": "/emu_reports/performance_report", "query": "webcomm_version=3.0",
                      "content_type": "application/x-deflate"})
    times = []
    records = 0
    for _ in range(repeat + 1):
        t0 = time.thread_time()
        records = len(enphase.decode_raw(enphase.redact_raw(raw, privacy)))
        times.append((time.thread_time() - t0) * 1000)
    return min(times[1:]), statistics.median(times[1:]), records


def profile(path: str, args: argparse.Namespace, privacy: Privacy) -> None:
    """One path's rounds under pyinstrument, its call tree printed (time per function, callers above)."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0002)
    if path == "enphase":
        settle()
        with profiler:
            enphase_ms(args.intervals, privacy, args.repeat)
    else:
        tap, codec, make = PATHS[path]
        frames = make(args.frames)
        settle()
        with profiler:
            frames_per_second(path, tap, codec.redact_raw, codec.decode_raw, frames, privacy, args.repeat)
    print(profiler.output_text(unicode=True, show_all=False, short_mode=False))


def calibration_us() -> float:
    """A yardstick of this core's speed in the same run: the best of 200 `sum(range(1000))`."""
    best = float("inf")
    for _ in range(200):
        t0 = time.thread_time()
        sum(range(1000))
        best = min(best, time.thread_time() - t0)
    return best * 1e6


def settle() -> None:
    """The inputs made so far are not the decoder's garbage: collect, then keep the collector
    from rescanning them in every measured round."""
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=20_000, help="frames per round and protocol (default 20000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--intervals", type=int, default=500, help="Envoy report intervals and readings (default 500)")
    parser.add_argument("--privacy", choices=PRIVACY, default="pseudonyms",
                        help="redaction settings (default pseudonyms: the most work)")
    parser.add_argument("--short", action="store_true", help="a few hundred frames, two rounds: does it still run")
    parser.add_argument("--profile", choices=[*PATHS, "enphase"],
                        help="print where one path's time goes (pyinstrument) instead of the figures")
    args = parser.parse_args(argv)
    if args.short:
        args.frames, args.repeat, args.intervals = 300, 2, 50
    privacy = PRIVACY[args.privacy]
    if args.profile:
        profile(args.profile, args, privacy)
        return 0
    print(f"privacy {args.privacy}; {args.frames} frames x {args.repeat} rounds; load average "
          f"{os.getloadavg()[0]:.2f} (figures are indicative while other work runs); this core runs "
          f"sum(range(1000)) in {calibration_us():.1f} µs (a recent desktop core: some 8–10 µs)")
    print(f"{'path':<52}{'best':>12}{'median':>12}  records/round")
    for name, (tap, codec, make) in zip(("AlphaESS realtime 1-1-16, Tap+redact+decode",
                                         "FoxESS M1 telemetry 0x02, Tap+redact+decode"), PATHS.values()):
        frames = make(args.frames)
        settle()
        best, median, records = frames_per_second(name.split()[0].lower(), tap, codec.redact_raw, codec.decode_raw,
                                                  frames, privacy, args.repeat)
        print(f"{name:<52}{best:>10,.0f}/s{median:>10,.0f}/s  {records}")
    settle()
    best, median, records = enphase_ms(args.intervals, privacy, args.repeat)
    print(f"{f'Enphase {args.intervals}+{args.intervals} report, redact+decode':<52}{best:>10.2f}ms{median:>10.2f}ms"
          f"  {records}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
