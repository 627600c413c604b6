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

Then "where the time goes", one column per path: the same frames (the same report) with each
stage timed over a hundred frames in turn — each through Tap.feed, then each payload through
redact_raw, then through decode_raw (as the ingest worker frames and redacts a chunk of copies,
then decodes from its archive) — so no timer runs per call; thread CPU per frame (per report for
the Envoy), best of the rounds. What a payload's reading does once lands in the stage that needs
it first: the AlphaESS Tap reads each body (its JSON, for the serial and the device clock), so
that parse is in its Tap.feed, and decode_raw reuses it. Their sum, and the frames/s it means,
sit beside the end-to-end time of the rows above (1 / best frames/s) and the budget the target
allows (1 s / 50,000 = 20 µs a frame; 20 ms a report). Two floor rows say what pure Python cannot
avoid on this core, measured the same way over the same frames: making one RawPayload of the
frame and the Record(s) its decoding gives (`Record.trusted`, the tags and fields dicts built
from that record's own names and values; no checks, no parsing), and, for AlphaESS,
`orjson.loads` of its JSON body (the parse a JSON body needs whatever decodes it). With the
yardstick (first and last line), a reader sees how far the decoders are from the floor and how
fast this core is.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pvtap.decode import Codec, TapFactory, alphaess, enphase, foxess
from pvtap.privacy import Privacy
from pvtap.records import UP, Origin, RawPayload, Record, now_utc
from pvtap.simulate.alphaess import _Battery
from pvtap.simulate.enphase import Simulator, encode_body
from pvtap.simulate.foxess_m1 import SunModel, telemetry_payload

PRIVACY = {
    "default": Privacy(),
    "pseudonyms": Privacy(pseudonym_key=b"bench-key-" * 4),
    "keep": Privacy(keep_network_identity=True),
}
SERIAL = "AL0000000000001"  # a placeholder, as in the simulators
#: the targets of issue 14: frames/s through Tap+redact+decode, and an Envoy report's time
TARGET_FRAMES_S = 50_000
TARGET_REPORT_S = 0.020
#: frames per turn of the stage split: few enough that the payloads of a turn are young garbage (as
#: in the end-to-end loop), enough that the timer is read a few times per 100 frames only
SPLIT_CHUNK = 100


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


def enphase_report(intervals: int) -> RawPayload:
    report = Simulator(micros=10, start=1718928000).next_report(intervals)
    return RawPayload(Origin("enphase", "", "bench", UP), "performance_report", encode_body(report.xml), now_utc(),
                      {"method": "POST", "path": "/emu_reports/performance_report", "query": "webcomm_version=3.0",
                       "content_type": "application/x-deflate"})


def enphase_ms(intervals: int, privacy: Privacy, repeat: int) -> tuple[float, float, int]:
    raw = enphase_report(intervals)
    times = []
    records = 0
    for _ in range(repeat + 1):
        t0 = time.thread_time()
        records = len(enphase.decode_raw(enphase.redact_raw(raw, privacy)))
        times.append((time.thread_time() - t0) * 1000)
    return min(times[1:]), statistics.median(times[1:]), records


# -- where the time goes -------------------------------------------------------------------------

@dataclass
class Split:
    """Thread CPU seconds per payload of each stage (best of the rounds); `tap` None: no Tap."""

    tap: float | None
    redact: float
    decode: float

    @property
    def total(self) -> float:
        return (self.tap or 0.0) + self.redact + self.decode


def frame_split(protocol: str, make_tap: TapFactory, codec: Codec, frames: list[bytes], privacy: Privacy,
                repeat: int) -> Split:
    """Each stage over a chunk of frames in turn (module docstring)."""
    best = [float("inf")] * 3
    received = now_utc()
    for round_ in range(repeat + 1):  # the first round warms up
        tap = make_tap(Origin(protocol, "", "bench", ""))
        spent = [0.0] * 3
        for start in range(0, len(frames), SPLIT_CHUNK):
            t0 = time.thread_time()
            raws = [raw for frame in frames[start:start + SPLIT_CHUNK] for raw in tap.feed(UP, frame, received)]
            t1 = time.thread_time()
            redacted = [codec.redact_raw(raw, privacy) for raw in raws]
            t2 = time.thread_time()
            for raw in redacted:
                codec.decode_raw(raw)
            t3 = time.thread_time()
            spent[0] += t1 - t0
            spent[1] += t2 - t1
            spent[2] += t3 - t2
        if round_:
            best = [min(b, t) for b, t in zip(best, spent)]
    return Split(*(b / len(frames) for b in best))


def enphase_split(raw: RawPayload, privacy: Privacy, repeat: int) -> Split:
    best = [float("inf")] * 2
    for round_ in range(repeat + 1):
        t0 = time.thread_time()
        redacted = enphase.redact_raw(raw, privacy)
        t1 = time.thread_time()
        enphase.decode_raw(redacted)
        t2 = time.thread_time()
        if round_:
            best = [min(b, t) for b, t in zip(best, (t1 - t0, t2 - t1))]
    return Split(None, *best)


#: what making a payload's records needs at least: per record its measurement, time, tag items,
#: field names and values (taken from the record its decoding gave)
RecordParts = tuple[str, datetime, tuple[tuple[str, str], ...], tuple[str, ...], tuple]


def record_parts(raws: list[RawPayload], codec: Codec, privacy: Privacy) -> list[tuple[RawPayload, list[RecordParts]]]:
    """Each payload beside the parts of the records its decoding gives."""
    return [(raw, [(r.measurement, r.time, tuple(r.tags.items()), tuple(r.fields), tuple(r.fields.values()))
                   for r in codec.decode_raw(codec.redact_raw(raw, privacy))]) for raw in raws]


def floor_objects(payloads: list[tuple[RawPayload, list[RecordParts]]], repeat: int) -> float:
    """Thread CPU seconds per payload to make a RawPayload of its bytes and its Record(s) from
    their parts, best of the rounds."""
    origin = Origin("bench", SERIAL, "bench", UP)
    received = now_utc()
    best = float("inf")
    for round_ in range(repeat + 1):
        t0 = time.thread_time()
        for raw, records in payloads:
            RawPayload(origin, raw.kind, raw.payload, received)
            for measurement, moment, tags, names, values in records:
                Record.trusted(measurement, moment, dict(tags), dict(zip(names, values)), origin)
        if round_:
            best = min(best, time.thread_time() - t0)
    return best / len(payloads)


def floor_json(frames: list[bytes], repeat: int) -> float:
    """Thread CPU seconds per AlphaESS frame to parse its JSON body with orjson, best of the rounds."""
    bodies = [alphaess.parse_frame(frame).body for frame in frames]
    best = float("inf")
    for round_ in range(repeat + 1):
        t0 = time.thread_time()
        for body in bodies:
            orjson.loads(body)
        if round_:
            best = min(best, time.thread_time() - t0)
    return best / len(frames)


def frame_column(title: str, protocol: str, frames: list[bytes], end_to_end: float, privacy: Privacy,
                 repeat: int) -> Column:
    make_tap, codec, _ = PATHS[protocol]
    split = frame_split(protocol, make_tap, codec, frames, privacy, repeat)
    tap = make_tap(Origin(protocol, "", "bench", ""))
    received = now_utc()
    parts = record_parts([raw for frame in frames for raw in tap.feed(UP, frame, received)], codec, privacy)
    settle()
    return Column(title, "µs", split, end_to_end, 1 / TARGET_FRAMES_S, floor_objects(parts, repeat),
                  floor_json(frames, repeat) if protocol == "alphaess" else None)


@dataclass
class Column:
    """One path's figures in the "where the time goes" table, seconds per payload (a frame, a report)."""

    title: str
    unit: str  # "µs" (per frame) or "ms" (per report)
    split: Split
    end_to_end: float
    budget: float
    floor_objects: float
    floor_parse: float | None = None

    def time(self, seconds: float | None) -> str:
        if seconds is None:
            return "-"
        return f"{seconds * (1e6 if self.unit == 'µs' else 1e3):,.1f} {self.unit}"


def where_the_time_goes(columns: list[Column], yardstick_us: float, repeat: int) -> list[str]:
    """The table's lines: a row per stage, then what they mean."""
    per = "frame" if all(c.unit == "µs" for c in columns) else "frame (Envoy: per report)"
    rows: list[tuple[str, Callable[[Column], str]]] = [
        ("Tap.feed", lambda c: c.time(c.split.tap)),
        ("redact_raw", lambda c: c.time(c.split.redact)),
        ("decode_raw", lambda c: c.time(c.split.decode)),
        ("stage sum", lambda c: c.time(c.split.total)),
        ("  its rate", lambda c: f"{1 / c.split.total:,.0f}/s"),
        ("end-to-end, as above", lambda c: c.time(c.end_to_end)),
        ("  its rate", lambda c: f"{1 / c.end_to_end:,.0f}/s"),
        ("target's budget", lambda c: c.time(c.budget)),
        ("floor: RawPayload+Record(s)", lambda c: c.time(c.floor_objects)),
        ("floor: orjson.loads(body)", lambda c: c.time(c.floor_parse)),
    ]
    width = max(14, *(len(c.title) + 2 for c in columns))
    lines = [f"where the time goes: thread CPU per {per}; each stage over {SPLIT_CHUNK} frames in turn; "
             f"best of {repeat} rounds",
             f"{'stage':<28}" + "".join(f"{c.title:>{width}}" for c in columns)]
    lines += [f"{label:<28}" + "".join(f"{cell(c):>{width}}" for c in columns) for label, cell in rows]
    lines += [f"budget: 1 s / {TARGET_FRAMES_S:,} frames (the Envoy report: its {TARGET_REPORT_S * 1e3:.0f} ms "
              "target); floors: the objects alone (no checks), the JSON body's parse alone",
              f"yardstick: this core runs sum(range(1000)) in {yardstick_us:.1f} µs (a recent desktop core: "
              "some 8–10 µs)"]
    return lines


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
    yardstick = calibration_us()
    print(f"privacy {args.privacy}; {args.frames} frames x {args.repeat} rounds; load average "
          f"{os.getloadavg()[0]:.2f} (figures are indicative while other work runs); this core runs "
          f"sum(range(1000)) in {yardstick:.1f} µs (a recent desktop core: some 8–10 µs)")
    print(f"{'path':<52}{'best':>12}{'median':>12}  records/round")
    columns = []
    for (name, title), (protocol, (tap, codec, make)) in zip(
            (("AlphaESS realtime 1-1-16, Tap+redact+decode", "AlphaESS realtime"),
             ("FoxESS M1 telemetry 0x02, Tap+redact+decode", "FoxESS M1 0x02")), PATHS.items()):
        frames = make(args.frames)
        settle()
        best, median, records = frames_per_second(protocol, tap, codec.redact_raw, codec.decode_raw,
                                                  frames, privacy, args.repeat)
        print(f"{name:<52}{best:>10,.0f}/s{median:>10,.0f}/s  {records}")
        columns.append(frame_column(title, protocol, frames, 1 / best, privacy, args.repeat))
    settle()
    best_ms, median_ms, records = enphase_ms(args.intervals, privacy, args.repeat)
    print(f"{f'Enphase {args.intervals}+{args.intervals} report, redact+decode':<52}{best_ms:>10.2f}ms"
          f"{median_ms:>10.2f}ms  {records}")
    report = enphase_report(args.intervals)
    parts = record_parts([report], enphase, privacy)
    settle()
    columns.append(Column(f"Enphase {args.intervals}+{args.intervals}", "ms",
                          enphase_split(report, privacy, args.repeat), best_ms / 1e3, TARGET_REPORT_S,
                          floor_objects(parts, args.repeat)))
    print()
    print("\n".join(where_the_time_goes(columns, yardstick, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
