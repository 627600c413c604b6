"""`pvtap import CAPTURE`: decode tcpdump/Wireshark captures of device traffic into a local store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pvtap.capture.importer import PROTOCOLS, TCP_PORTS, UDP_PORTS, Importer, IngestBatches, Summary
from pvtap.capture.packets import parse
from pvtap.capture.reader import Capture, CaptureError, TruncatedCapture
from pvtap.cli._common import Progress, iso_utc
from pvtap.config import Config
from pvtap.ingest import Ingest
from pvtap.privacy import Privacy
from pvtap.records import utc_from_unix
from pvtap.store.local import SUFFIX, LocalStore

DESCRIPTION = """\
Read pcap or pcapng captures (also .gz) of your devices' cloud traffic, put each TCP connection
back in order (retransmissions, segments out of order; missing bytes are reported as gaps, never
made up), and decode it with the same decoders, redaction and store as live traffic, stamped
with the capture's own times. Records go to <data_dir>/import.sqlite (--store to choose), where
`pvtap tail`, `export` and `devices` find them."""

EPILOG = f"""\
how the protocol is chosen, per TCP connection, by the server's port:
  {", ".join(f"{port} {name}" for port, name in sorted(TCP_PORTS.items()))}
  (443 and 14431 are TLS: counted and reported, but a capture cannot be read there), and UDP
  {", ".join(f"{port} {name}" for port, name in sorted(UDP_PORTS.items()))} (the FoxESS M1's broadcasts);
  on any other port by the first bytes (AlphaESS 01 01, FoxESS 7E 7E / 7F 7F, an HTTP POST to
  /emu_reports/). --port PORT=PROTOCOL names the protocol of another port.

examples:
  sudo tcpdump -i eth0 -w battery.pcap host 192.0.2.10      capture (stop with Ctrl-C)
  pvtap import battery.pcap
  pvtap import --store july envoy-july.pcapng.gz
  pvtap import --port 17777=alphaess relay-test.pcap

Capture on one side of pvtap only (the device's side, or the router's): a capture on the pvtap
host itself sees each connection twice, once on each side of the relay. Importing the same
capture twice stores its records twice: use a new --store name. Exit status 1 when a file could
not be read to its end (truncated): what was before the damage is stored all the same."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("import", help="decode pcap/pcapng captures of device traffic into a local store",
                            description=DESCRIPTION, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captures", nargs="+", type=Path, metavar="CAPTURE", help="pcap or pcapng file (.gz too)")
    parser.add_argument("--store", default="import", metavar="NAME",
                        help="store file in the data directory to write to (default: import → import.sqlite)")
    parser.add_argument("--port", action="append", default=[], type=_port, metavar="PORT=PROTOCOL",
                        help=f"decode TCP (and, for foxess, UDP) port PORT as PROTOCOL ({', '.join(PROTOCOLS)}); "
                             "repeatable")
    parser.add_argument("--progress", action="store_true",
                        help="show progress on stderr even when it is not a terminal")
    parser.set_defaults(func=run)


def _port(text: str) -> tuple[int, str]:
    port, _, protocol = text.partition("=")
    if not port.isdigit() or not 0 < int(port) < 65536 or protocol not in PROTOCOLS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PORT=PROTOCOL, e.g. 17777=alphaess "
                                         f"(protocols: {', '.join(PROTOCOLS)})")
    return int(port), protocol


def run(args: argparse.Namespace, config: Config) -> int:
    name = args.store.removesuffix(SUFFIX)
    if not name or "/" in name or name in ("enphase", "relay"):
        print(f"pvtap import: --store {args.store!r}: give a plain name other than enphase or relay "
              "(those are the live stores), e.g. --store import", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.captures if not p.is_file()]
    if missing:
        print(f"pvtap import: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    status = 0
    with LocalStore.for_process(config.data_dir, name) as store:
        ingest = Ingest(store, Privacy.from_config(config))
        for path in args.captures:
            if not import_capture(path, ingest, dict(args.port), progress_forced=args.progress):
                status = 1
        c = ingest.counts
        print(f"stored in {store.path}: {c.stored_raw:,} payloads, {c.records:,} records, "
              f"{c.decode_errors:,} decode errors (`pvtap tail` shows them)")
    return status


def import_capture(path: Path, ingest: Ingest, ports: dict[int, str], *, progress_forced: bool = False) -> bool:
    """Import one file; prints its summary. False when it could not be read to its end."""
    before = (ingest.counts.stored_raw, ingest.counts.records, ingest.counts.decode_errors,
              dict(ingest.counts.by_kind))
    batches = IngestBatches(ingest)
    importer = Importer(store=batches.payload, store_record=batches.record, privacy=ingest.privacy, name=path.name,
                        ports=ports)
    error = ""
    try:
        with Capture(path) as capture:
            progress = Progress(f"importing {path.name}, bytes", capture.size, enabled=Progress.wanted(progress_forced))
            drawn = 0
            try:
                for frame in capture:
                    importer.packet(frame.time, frame.wirelen, parse(frame.linktype, frame.data))
                    if importer.summary.packets % 512 == 0:
                        progress.advance(capture.position - drawn)
                        drawn = capture.position
            except TruncatedCapture as exc:
                error = str(exc)
            finally:
                importer.finish()
                batches.flush()  # what was read is stored, whatever stopped the reading
                progress.advance(max(0, capture.position - drawn))
                progress.finish()
            kind = capture.format + (" (gzip)" if capture.compressed else "")
    except CaptureError as exc:
        print(f"pvtap import: {exc}", file=sys.stderr)
        return False
    counts = ingest.counts
    by_kind = {k: v - before[3].get(k, 0) for k, v in counts.by_kind.items()}
    print(f"{path.name}: {kind}, " + "\n  ".join(_summary(importer.summary, counts.stored_raw - before[0],
                                                          counts.records - before[1], counts.decode_errors - before[2],
                                                          by_kind)))
    if error:
        print(f"pvtap import: {error}", file=sys.stderr)
        return False
    return True


def _summary(s: Summary, payloads: int, records: int, decode_errors: int, by_kind: dict[str, int]) -> list[str]:
    span = (f" from {iso_utc(utc_from_unix(s.first))} to {iso_utc(utc_from_unix(s.last))}"
            if s.first is not None and s.last is not None else "")
    lines = [f"{s.packets:,} packets ({s.bytes:,} bytes){span}"]
    decoded = ", ".join(f"{name} {n}" for name, n in sorted(s.streams.items())) or "none"
    lines.append(f"TCP connections decoded: {sum(s.streams.values())} ({decoded})")
    for reason, n in sorted(s.skipped_streams.items()):
        lines.append(f"TCP connections skipped: {n} × {reason}")
    if s.datagrams:
        lines.append("UDP datagrams decoded: " + ", ".join(f"{name} {n}" for name, n in sorted(s.datagrams.items())))
    frames = by_kind.get("frame", 0) + s.messages
    rejected = sum(n for kind, n in by_kind.items() if kind in ("garbage", "partial", "opaque"))
    lines.append(f"frames: {frames:,} ({rejected:,} runs of bytes in no frame), records: {records:,}, "
                 f"payloads stored: {payloads:,}, decode errors: {decode_errors:,}")
    lines.append(f"gaps: {s.gaps:,} ({s.gap_bytes:,} bytes missing from the capture), retransmitted bytes: "
                 f"{s.retransmitted:,}, segments out of order: {s.out_of_order:,}"
                 + (f", HTTP messages lost to gaps: {s.http_dropped}" if s.http_dropped else ""))
    for reason, n in s.skipped_packets.most_common():
        lines.append(f"packets skipped: {n:,} × {reason}")
    return lines
