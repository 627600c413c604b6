"""How long pvtap takes to redact, decode and store one Envoy catch-up report (500 intervals +
500 readings), next to the bare minimum of reading it: zlib.decompress, form-unquote and
lxml.etree.fromstring of the same body, measured side by side in the same run.

    .venv/bin/python bench/enphase_parse.py [--repeat 30] [--micros 10] [--intervals 500]

Prints the median and best time per phase and the ratio of pvtap's total to the baseline.
The store phase is a LocalStore (SQLite, WAL, synchronous=FULL) in a temporary directory, so it
includes the fsyncs of two transactions and depends on the disk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import urllib.parse
import zlib

from lxml import etree

from pvtap.decode.enphase import decode_raw, redact_raw
from pvtap.privacy import Privacy
from pvtap.records import UP, Origin, RawPayload, now_utc
from pvtap.simulate.enphase import Simulator, encode_body
from pvtap.store.local import LocalStore

PRIVACY = {
    "default": Privacy(),
    "pseudonyms": Privacy(pseudonym_key=b"bench-key-" * 4),
    "keep": Privacy(keep_network_identity=True),
}


def baseline(body: bytes) -> etree._Element:
    """The least any reader of this report must do."""
    form = zlib.decompress(body)
    return etree.fromstring(urllib.parse.unquote_to_bytes(form.partition(b"body=")[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--micros", type=int, default=10, help="microinverters in the report (default 10)")
    parser.add_argument("--intervals", type=int, default=500, help="intervals and readings (default 500)")
    parser.add_argument("--privacy", choices=PRIVACY, default="pseudonyms",
                        help="redaction settings (default pseudonyms: the most work)")
    args = parser.parse_args()

    report = Simulator(micros=args.micros, start=1718928000).next_report(args.intervals)
    body = encode_body(report.xml)
    raw = RawPayload(Origin("enphase", "", "bench", UP), "performance_report", body, now_utc(),
                     {"method": "POST", "path": "/emu_reports/performance_report", "query": "webcomm_version=3.0",
                      "content_type": "application/x-deflate"})
    privacy = PRIVACY[args.privacy]
    times: dict[str, list[float]] = {"baseline": [], "redact": [], "decode": [], "store": [], "total": []}
    with tempfile.TemporaryDirectory(prefix="pvtap-bench-") as tmp:
        store = LocalStore.for_process(tmp, "enphase")
        for round_ in range(args.repeat + 1):  # round 0 warms up
            t0 = time.perf_counter()
            baseline(body)
            t1 = time.perf_counter()
            redacted = redact_raw(raw, privacy)
            t2 = time.perf_counter()
            records = decode_raw(redacted)
            t3 = time.perf_counter()
            store.append(records, raw_id=store.add_raw(redacted))
            t4 = time.perf_counter()
            if round_:
                for name, seconds in (("baseline", t1 - t0), ("redact", t2 - t1), ("decode", t3 - t2),
                                      ("store", t4 - t3), ("total", t4 - t1)):
                    times[name].append(seconds)
        stored = store.count_records()
        store.close()

    print(f"report: {len(report.intervals)} intervals + {len(report.readings)} readings + {len(report.events)} events "
          f"+ {len(report.devices)} devices from {args.micros} micros; body {len(body)} bytes zlib, "
          f"XML {len(report.xml)} bytes; {len(records)} records per report ({stored} stored in total); "
          f"privacy {args.privacy}; {args.repeat} rounds")
    print(f"{'phase':<34}{'median ms':>10}{'best ms':>10}")
    labels = {"baseline": "baseline (zlib+unquote+fromstring)", "redact": "redact_raw", "decode": "decode_raw",
              "store": "store (add_raw + append)", "total": "pvtap total (redact+decode+store)"}
    for name, label in labels.items():
        print(f"{label:<34}{statistics.median(times[name]) * 1000:>10.2f}{min(times[name]) * 1000:>10.2f}")
    base = statistics.median(times["baseline"])
    parse = statistics.median(times["redact"]) + statistics.median(times["decode"])
    print(f"ratio redact+decode / baseline: {parse / base:.1f}x; "
          f"total / baseline: {statistics.median(times['total']) / base:.1f}x")


if __name__ == "__main__":
    main()
