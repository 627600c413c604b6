"""Reading a capture file: pcap or pcapng (also gzip-compressed), packet by packet.

The file formats are scapy's job (`RawPcapReader` picks pcap or pcapng by the file's magic and
reads .gz transparently); scapy's dissectors are not used, they are ~50 times slower than
`packets.parse`. What scapy only warns about is checked here: a file that ends inside a packet
record (a capture copied while tcpdump was still writing, a download cut short) raises
`TruncatedCapture` after every whole packet before it was yielded, so the caller keeps them.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scapy.error import Scapy_Exception
from scapy.utils import RawPcapNgReader, RawPcapReader

MAX_FRAME = 1 << 24


class CaptureError(Exception):
    """The file cannot be read as a capture; the message says why and what to do."""


class TruncatedCapture(CaptureError):
    """The file ends inside a packet record; the packets before it were read."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured link-layer frame."""

    time: float  # Unix seconds
    linktype: int
    data: bytes
    wirelen: int  # its length on the wire (more than len(data) when cut by the snap length)


class Capture:
    """A capture file opened for reading; iterate it once for its frames. `position` and
    `size` (bytes) drive a progress display; `size` is 0 for a compressed file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CaptureError(f"{self.path}: no such file")
        logging.getLogger("scapy.runtime").setLevel(logging.ERROR)  # its truncation warnings: see module doc
        try:
            self._reader: Any = RawPcapReader(str(self.path))
        except (Scapy_Exception, EOFError, OSError, struct.error) as exc:
            raise CaptureError(f"{self.path}: not a pcap or pcapng capture ({exc}). Save it from Wireshark or "
                               "tcpdump as pcap or pcapng (tcpdump -w FILE)") from None
        self.format = "pcapng" if isinstance(self._reader, RawPcapNgReader) else "pcap"
        self.compressed = isinstance(self._reader.f, gzip.GzipFile)
        self.size = 0 if self.compressed else os.path.getsize(self.path)

    @property
    def position(self) -> int:
        return int(self._reader.f.tell())

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        reader = self._reader
        whole = self.position  # where the last whole record ended
        while True:
            try:
                # scapy's documented raw read ("Use _read_packet()"), without its 64 KiB cap: loopback
                # frames can be 64 KiB + headers
                data, meta = reader._read_packet(size=MAX_FRAME)
            except EOFError:
                break
            except (Scapy_Exception, struct.error, ValueError) as exc:
                raise TruncatedCapture(f"{self.path}: unreadable record after byte {whole} ({exc}); "
                                       "the packets before it were imported") from None
            if self.format == "pcapng":
                frame = Frame(((meta.tshigh << 32) | meta.tslow) / meta.tsresol, meta.linktype, data, meta.wirelen)
                whole = self.position
            else:
                if len(data) < meta.caplen:
                    raise TruncatedCapture(self._cut(whole))
                scale = 1e9 if getattr(reader, "nano", False) else 1e6
                frame = Frame(meta.sec + meta.usec / scale, reader.linktype, data, meta.wirelen)
                whole = self.position
            yield frame
        if self._tail_is_cut(whole):
            raise TruncatedCapture(self._cut(whole))

    def _cut(self, whole: int) -> str:
        return (f"{self.path}: the file ends inside a packet record (after byte {whole}): it is truncated, e.g. "
                "copied while tcpdump was still writing. The whole packets before it were imported")

    def _tail_is_cut(self, whole: int) -> bool:
        """Whether bytes after the last whole record are less than a record. In pcapng they may
        be whole blocks that hold no packet (statistics, names): walk them."""
        f = self._reader.f
        f.seek(whole)
        tail = f.read()
        if self.format == "pcap" or not tail:
            return bool(tail)
        endian = self._reader.endian
        at = 0
        while at < len(tail):
            if len(tail) - at < 12:
                return True
            length = struct.unpack_from(endian + "I", tail, at + 4)[0]
            if length < 12 or at + length > len(tail):
                return True
            at += length
        return False
