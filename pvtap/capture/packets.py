"""From one captured frame to a TCP segment or a UDP datagram: link layer, IPv4/IPv6, TCP/UDP.

Pure functions over bytes (struct, no I/O). Only what `pvtap import` needs: the link types
tcpdump and Wireshark write for Ethernet, Linux "any" (cooked v1 and v2), loopback and raw IP;
VLAN tags; IPv6 extension headers. Anything else comes back as a `Skipped` reason, counted in
the import's summary: non-IP frames, IP fragments (not reassembled), other transports.
A frame cut short by the capture's snap length still yields its segment, with `missing` saying
how many payload bytes were not captured (the reassembler marks them as a gap).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

# libpcap link types (https://www.tcpdump.org/linktypes.html)
LINKTYPE_NULL = 0  # BSD loopback: 4-byte address family, host byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4/IPv6
LINKTYPE_LOOP = 108  # OpenBSD loopback: 4-byte address family, network byte order
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
VLAN_TAGS = (0x8100, 0x88A8, 0x9100)
_AF_INET6 = (10, 24, 28, 30)  # Linux, BSD, FreeBSD, macOS

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_IPV6_EXTENSIONS = {0, 43, 60, 135, 139, 140}  # hop-by-hop, routing, destination options, mobility, HIP, shim6

Endpoint = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Segment:
    src: Endpoint
    dst: Endpoint
    seq: int
    ack: int
    flags: int
    payload: bytes
    missing: int = 0  # payload bytes the capture did not keep (snap length)


@dataclass(frozen=True, slots=True)
class Datagram:
    src: Endpoint
    dst: Endpoint
    payload: bytes
    missing: int = 0


@dataclass(frozen=True, slots=True)
class Skipped:
    reason: str


Parsed = Segment | Datagram | Skipped


def parse(linktype: int, frame: bytes) -> Parsed:
    """The TCP segment or UDP datagram a captured frame carries, or why it is skipped."""
    try:
        return _parse(linktype, frame)
    except (struct.error, IndexError, ValueError, OSError):  # inet_ntop: too few address bytes
        return Skipped("frame too short for its headers")


def _parse(linktype: int, frame: bytes) -> Parsed:
    if linktype == LINKTYPE_ETHERNET:
        ethertype, offset = struct.unpack_from("!H", frame, 12)[0], 14
        while ethertype in VLAN_TAGS:
            ethertype, offset = struct.unpack_from("!H", frame, offset + 2)[0], offset + 4
        return _ethertype(ethertype, frame, offset)
    if linktype == LINKTYPE_LINUX_SLL:
        return _ethertype(struct.unpack_from("!H", frame, 14)[0], frame, 16)
    if linktype == LINKTYPE_LINUX_SLL2:
        return _ethertype(struct.unpack_from("!H", frame, 0)[0], frame, 20)
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        family = frame[:4]
        value = int.from_bytes(family, "big" if linktype == LINKTYPE_LOOP else "little")
        if linktype == LINKTYPE_NULL and value > 0xFFFF:  # written on a big-endian host
            value = int.from_bytes(family, "big")
        return _ip(frame, 4) if value == 2 or value in _AF_INET6 else Skipped("loopback frame that is not IP")
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6, 12, 14):  # 12/14: raw IP on some BSDs
        return _ip(frame, 0)
    return Skipped(f"link type {linktype} (not Ethernet, Linux cooked, loopback or raw IP)")


def _ethertype(ethertype: int, frame: bytes, offset: int) -> Parsed:
    if ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6):
        return _ip(frame, offset)
    return Skipped("not IP (ARP, LLDP, …)")


def _ip(frame: bytes, offset: int) -> Parsed:
    version = frame[offset] >> 4
    if version == 4:
        header = (frame[offset] & 0x0F) * 4
        total, fragment, protocol = struct.unpack_from("!H2xHxB", frame, offset + 2)
        if fragment & 0x3FFF:  # more fragments, or an offset
            return Skipped("IP fragment (not reassembled)")
        src = socket.inet_ntop(socket.AF_INET, frame[offset + 12:offset + 16])
        dst = socket.inet_ntop(socket.AF_INET, frame[offset + 16:offset + 20])
        return _transport(protocol, src, dst, frame, offset + header, offset + total)
    if version == 6:
        payload_length, next_header = struct.unpack_from("!HB", frame, offset + 4)
        src = socket.inet_ntop(socket.AF_INET6, frame[offset + 8:offset + 24])
        dst = socket.inet_ntop(socket.AF_INET6, frame[offset + 24:offset + 40])
        end, at = offset + 40 + payload_length, offset + 40
        while next_header in _IPV6_EXTENSIONS or next_header == 44:
            if next_header == 44:
                return Skipped("IP fragment (not reassembled)")
            next_header, length = frame[at], frame[at + 1]
            at += (length + 1) * 8
        return _transport(next_header, src, dst, frame, at, end)
    return Skipped("not IPv4 or IPv6")


def _transport(protocol: int, src: str, dst: str, frame: bytes, at: int, end: int) -> Parsed:
    """`end`: where the IP packet ends by its own length (the frame may be shorter or padded)."""
    if protocol == 6:
        sport, dport, seq, ack, offset_flags = struct.unpack_from("!HHIIH", frame, at)
        start = at + (offset_flags >> 12) * 4
        payload = frame[start:end]
        return Segment((src, sport), (dst, dport), seq, ack, offset_flags & 0x3F, payload,
                       max(0, end - start - len(payload)))
    if protocol == 17:
        sport, dport, length = struct.unpack_from("!HHH", frame, at)
        end = at + length if length >= 8 else end
        payload = frame[at + 8:end]
        return Datagram((src, sport), (dst, dport), payload, max(0, end - at - 8 - len(payload)))
    return Skipped(f"IP protocol {protocol} (not TCP or UDP)")
