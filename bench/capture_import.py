"""How fast `pvtap import` reads a capture: packets per second for reading + parsing + reassembly
alone, and for the whole import into a real store (redaction, decoding, SQLite commits).

    .venv/bin/python bench/capture_import.py [--frames 20000]

The capture is built here: one AlphaESS connection (placeholder serial) carrying `frames`
realtime frames, each acknowledged by the cloud (so two packets per frame). Figures depend on
the machine and its load: report them with `cat /proc/loadavg`.
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import RawPcapWriter

from pvtap.capture.importer import Importer, IngestBatches
from pvtap.capture.packets import parse
from pvtap.capture.reader import Capture
from pvtap.decode.alphaess import REQUEST, encode_frame
from pvtap.ingest import Ingest
from pvtap.privacy import Privacy
from pvtap.store.local import LocalStore

SEQ_OFFSET = 14 + 20 + 4  # Ethernet, IPv4 without options, TCP source and destination ports


def build(path: Path, frames: int) -> int:
    """A pcap of one connection: the device's frames and the cloud's ACKs; returns the packet count."""
    body = b'{"Time":"2023/11/14 22:13:20","SN":"ALSIM0000000001","Ppv1":"1250","Pbat":"-539.4","SOC":"38.0"}'
    frame = encode_frame(REQUEST, 16, body)
    ether = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    data = bytearray(bytes(ether / IP(src="192.0.2.10", dst="198.51.100.2") /
                           TCP(sport=50000, dport=7777, flags="PA", seq=0, ack=1) / Raw(frame)))
    ack = bytearray(bytes(ether / IP(src="198.51.100.2", dst="192.0.2.10") /
                          TCP(sport=7777, dport=50000, flags="A", seq=1, ack=0)))
    with RawPcapWriter(str(path), linktype=1) as writer:
        writer.write_header(None)
        for i in range(frames):
            seq = i * len(frame)
            struct.pack_into("!I", data, SEQ_OFFSET, seq)
            struct.pack_into("!I", ack, SEQ_OFFSET + 4, seq + len(frame))
            t = 1_700_000_000 + i
            writer.write_packet(bytes(data), sec=t, usec=0)
            writer.write_packet(bytes(ack), sec=t, usec=500)
    return 2 * frames


def read_only(path: Path) -> Importer:
    importer = Importer(store=lambda raw: None, store_record=lambda record: None, privacy=Privacy())
    with Capture(path) as capture:
        for frame in capture:
            importer.packet(frame.time, frame.wirelen, parse(frame.linktype, frame.data))
    importer.finish()
    return importer


def whole(path: Path, data_dir: Path) -> Ingest:
    with LocalStore.for_process(data_dir, "import") as store:
        ingest = Ingest(store, Privacy())
        batches = IngestBatches(ingest)
        importer = Importer(store=batches.payload, store_record=batches.record, privacy=Privacy())
        with Capture(path) as capture:
            for frame in capture:
                importer.packet(frame.time, frame.wirelen, parse(frame.linktype, frame.data))
        importer.finish()
        batches.flush()
    return ingest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pvtap-bench-import-") as tmp:
        path = Path(tmp) / "bench.pcap"
        packets = build(path, args.frames)
        started = time.perf_counter()
        importer = read_only(path)
        took = time.perf_counter() - started
        assert importer.summary.streams["alphaess"] == 1 and importer.summary.gaps == 0
        print(f"read + parse + reassemble + frame: {packets:,} packets in {took:.2f} s = "
              f"{packets / took:,.0f} packets/s")
        started = time.perf_counter()
        ingest = whole(path, Path(tmp) / "data")
        took = time.perf_counter() - started
        assert ingest.counts.records == args.frames
        print(f"whole import into a store: {packets:,} packets, {ingest.counts.records:,} records in {took:.2f} s = "
              f"{packets / took:,.0f} packets/s, {ingest.counts.records / took:,.0f} records/s")
    with open("/proc/loadavg") as load:
        print(f"load average: {load.read().strip()}")


if __name__ == "__main__":
    main()
