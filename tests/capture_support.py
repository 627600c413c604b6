"""Helpers for the `pvtap import` tests: a real tcpdump, rewriting captures (drop packets, cut the
file, convert to pcapng) and comparing the records of a live run with those of an import.

Every capture is made by the test that uses it, on loopback, from the simulators' placeholder
traffic; none is committed."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from scapy.utils import RawPcapNgWriter, RawPcapWriter

from pvtap.capture.packets import Datagram, Segment, parse
from pvtap.capture.reader import Capture, CaptureError, Frame
from pvtap.records import Record
from pvtap.store.local import LocalStore
from tests.mitm_support import wait_for

TCPDUMP = shutil.which("tcpdump") or "/usr/bin/tcpdump"


class Tcpdump:
    """`tcpdump -i lo -w FILE FILTER`, ready once it says it listens. `stop()` first sends a marker
    datagram (to a port of its own, also captured) and waits until the file holds it, so every
    packet before it is in the file too; then SIGINT, and tcpdump's closing counts."""

    def __init__(self, path: Path, bpf_filter: str) -> None:
        self.path = path
        self._marker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._marker.bind(("127.0.0.1", 0))
        self.marker_port = self._marker.getsockname()[1]
        # --immediate-mode: hand each packet over at once (not in blocks a SIGINT may discard);
        # -U: write it at once; -Z root: Debian's tcpdump would drop to user tcpdump, who may
        # not write into the test's directory
        self.argv = [TCPDUMP, "-i", "lo", "-n", "--immediate-mode", "-U", "-s", "0", "-Z", "root", "-w", str(path),
                     f"({bpf_filter}) or udp port {self.marker_port}"]
        self.proc: subprocess.Popen | None = None
        self.stderr = ""

    def __enter__(self) -> Tcpdump:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "tcpdump: listening on lo, link-type EN10MB ..." once it captures
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"tcpdump did not start: {line}{self.proc.stderr.read()}")
        return self

    def _holds_marker(self) -> bool:
        try:
            with Capture(self.path) as capture:
                return any(isinstance(p := parse(f.linktype, f.data), Datagram) and p.dst[1] == self.marker_port
                           for f in capture)
        except CaptureError:  # still being written
            return False

    def stop(self) -> str:
        """Marker, wait for it in the file, SIGINT, wait; returns tcpdump's closing lines."""
        assert self.proc is not None
        if self.proc.poll() is None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"end of test traffic", ("127.0.0.1", self.marker_port))
            wait_for(self._holds_marker, timeout=20, what="tcpdump to write the marker")
            self.proc.send_signal(signal.SIGINT)
        _, rest = self.proc.communicate(timeout=20)
        self.stderr = rest
        self._marker.close()
        return rest

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.communicate(timeout=20)
        self._marker.close()


def frames(path: Path) -> list[Frame]:
    with Capture(path) as capture:
        return list(capture)


def rewrite(source: Path, target: Path, keep: Callable[[Frame], bool] = lambda frame: True, *,
            pcapng: bool = False) -> int:
    """Copy the frames `keep` accepts into a new pcap (or pcapng); returns how many were left out."""
    originals = frames(source)
    writer = RawPcapNgWriter(str(target)) if pcapng else RawPcapWriter(str(target))
    writer.linktype = originals[0].linktype
    left_out = 0
    with writer:
        writer.write_header(None)
        for frame in originals:
            if not keep(frame):
                left_out += 1
                continue
            if pcapng:  # scapy's pcapng writer takes the time as one number and ignores usec
                writer.write_packet(frame.data, sec=frame.time, caplen=len(frame.data), wirelen=frame.wirelen)
                continue
            sec = int(frame.time)
            writer.write_packet(frame.data, sec=sec, usec=round((frame.time - sec) * 1_000_000),
                                caplen=len(frame.data), wirelen=frame.wirelen)
    return left_out


def segment_of(frame: Frame) -> Segment | None:
    parsed = parse(frame.linktype, frame.data)
    return parsed if isinstance(parsed, Segment) else None


def record_key(record: Record) -> tuple:
    """Everything of a record but its time and its connection id."""
    fields = tuple(sorted((k, type(v).__name__, v) for k, v in record.fields.items()))
    return (record.measurement, tuple(sorted(record.tags.items())), fields, record.origin.protocol,
            record.origin.device, record.origin.direction)


def decoded_records(store_path: Path) -> list[Record]:
    """The decoded records of a store, without the connection records."""
    with LocalStore(store_path, readonly=True) as store:
        return [s.record for s in store.records() if s.record.measurement != "pvtap_connection"]


def paired(live: Iterable[Record], imported: Iterable[Record]) -> list[tuple[Record, Record]]:
    """Live and imported records matched one to one by everything but time (time orders equals)."""
    def order(r: Record) -> tuple:
        return record_key(r), r.time
    left, right = sorted(live, key=order), sorted(imported, key=order)
    assert [record_key(r) for r in left] == [record_key(r) for r in right]
    return list(zip(left, right))
