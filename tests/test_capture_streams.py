"""The pieces of `pvtap import` on their own: TCP reassembly (pvtap.capture.tcp), header parsing
(pvtap.capture.packets) and the HTTP splitter (pvtap.capture.http)."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1Q, Ether, Loopback
from scapy.packet import Raw

from pvtap.capture.http import MessageSplitter
from pvtap.capture.packets import (
    ACK,
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    PSH,
    SYN,
    Datagram,
    Segment,
    Skipped,
    parse,
)
from pvtap.capture.tcp import Data, Gap, HalfStream


def joined(pieces) -> list:
    """Adjacent data pieces merged: what a receiver reads, with the gaps where they are."""
    out: list = []
    for piece in pieces:
        if isinstance(piece, Data) and out and isinstance(out[-1], bytes):
            out[-1] += piece.data
        else:
            out.append(piece.data if isinstance(piece, Data) else ("gap", piece.size))
    return out


# -- reassembly ---------------------------------------------------------------------------------

def test_in_order_after_the_syn() -> None:
    half = HalfStream()
    assert half.segment(1000, b"", 1.0, syn=True) == []
    assert joined(half.segment(1001, b"hello ", 2.0)) == [b"hello "]
    pieces = half.segment(1007, b"world", 3.0, fin=True)
    assert pieces == [Data(b"world", 3.0)]  # each piece keeps its packet's time
    assert half.acknowledged(1013, 3.1) == []  # the FIN's own sequence number is no missing byte
    assert (half.delivered, half.gaps, half.retransmitted, half.out_of_order) == (11, 0, 0, 0)


def test_out_of_order_and_overlapping_retransmissions_give_each_byte_once() -> None:
    half = HalfStream()
    half.segment(99, b"", 0.0, syn=True)
    out = []
    out += half.segment(110, b"KLMNO", 1.0)  # early
    out += half.segment(105, b"FGHIJ", 1.1)  # early too
    assert out == []
    out += half.segment(100, b"ABCDEFG", 1.2)  # fills the hole, overlaps the next by two bytes
    out += half.segment(100, b"ABCDE", 1.3)  # a retransmission: nothing new
    out += half.segment(113, b"NOPQ", 1.4)  # partly new
    assert joined(out) == [b"ABCDEFGHIJKLMNOPQ"]
    assert half.retransmitted == 2 + 5 + 2 and half.out_of_order == 2 and half.gaps == 0


def test_a_hole_the_receiver_acknowledged_is_a_gap_at_once() -> None:
    half = HalfStream()
    half.segment(0, b"one-", 1.0)
    assert half.segment(8, b"three", 1.2) == []  # b"two-" (4..8) was not captured
    pieces = half.acknowledged(13, 1.3)  # but the receiver got it
    assert joined(pieces) == [("gap", 4), b"three"]
    assert pieces[0] == Gap(4, 1.3) and (half.gaps, half.gap_bytes) == (1, 4)
    assert half.segment(4, b"two-", 1.4) == []  # captured late: it was a gap, it stays one (counted as seen)


def test_a_hole_still_open_at_the_end_becomes_a_gap_then_the_rest() -> None:
    half = HalfStream()
    half.segment(0, b"abc", 1.0)
    half.segment(10, b"xyz", 1.5)
    half.segment(7, b"uvw", 1.4)
    assert joined(half.finish(2.0)) == [("gap", 4), b"uvwxyz"]
    assert half.finish(2.0) == []


def test_the_tail_cut_by_the_snap_length_is_a_gap() -> None:
    half = HalfStream()
    assert joined(half.segment(0, b"head", 1.0, missing=60)) == [b"head", ("gap", 60)]
    assert joined(half.segment(64, b"next", 1.1)) == [b"next"]


def test_sequence_numbers_wrap() -> None:
    half = HalfStream()
    half.segment(2**32 - 3, b"", 0.0, syn=True)
    assert joined(half.segment(2**32 - 2, b"ab", 1.0) + half.segment(2, b"ef", 1.2) + half.segment(0, b"cd", 1.1)) \
        == [b"abcdef"]


def test_too_much_waiting_behind_a_hole_gives_up_on_it() -> None:
    half = HalfStream()
    half.segment(0, b"a", 1.0)
    big = b"x" * (4 * 1024 * 1024 + 1)
    assert joined(half.segment(11, big, 1.1)) == [("gap", 10), big]


# -- headers ------------------------------------------------------------------------------------

SEGMENT = TCP(sport=40000, dport=7777, seq=5, ack=9, flags="PA") / Raw(b"\x01\x01payload")


@pytest.mark.parametrize("linktype, frame", [
    (LINKTYPE_ETHERNET, Ether() / IP(src="192.0.2.10", dst="198.51.100.2") / SEGMENT),
    (LINKTYPE_ETHERNET, Ether() / Dot1Q(vlan=7) / IP(src="192.0.2.10", dst="198.51.100.2") / SEGMENT),
    (LINKTYPE_LINUX_SLL, CookedLinux(proto=0x0800) / IP(src="192.0.2.10", dst="198.51.100.2") / SEGMENT),
    (LINKTYPE_LINUX_SLL2, CookedLinuxV2(proto=0x0800) / IP(src="192.0.2.10", dst="198.51.100.2") / SEGMENT),
    (LINKTYPE_NULL, Loopback(type=2) / IP(src="192.0.2.10", dst="198.51.100.2") / SEGMENT),
    (LINKTYPE_RAW, IP(src="192.0.2.10", dst="198.51.100.2") / SEGMENT),
])
def test_tcp_over_ipv4_on_every_link_type(linktype, frame) -> None:
    assert parse(linktype, bytes(frame)) == Segment(("192.0.2.10", 40000), ("198.51.100.2", 7777), 5, 9, PSH | ACK,
                                                    b"\x01\x01payload")


def test_ipv6_padding_snaplen_udp_and_what_is_skipped() -> None:
    v6 = Ether() / IPv6(src="2001:db8::10", dst="2001:db8::2") / TCP(sport=1, dport=2, flags="S", seq=7)
    assert parse(LINKTYPE_ETHERNET, bytes(v6)) == Segment(("2001:db8::10", 1), ("2001:db8::2", 2), 7, 0, SYN, b"")
    padded = bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(flags="A")) + b"\x00" * 6
    assert parse(LINKTYPE_ETHERNET, padded).payload == b""  # type: ignore[union-attr]
    whole = bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(flags="PA") / Raw(b"x" * 100))
    cut = parse(LINKTYPE_ETHERNET, whole[:80])
    assert isinstance(cut, Segment) and (len(cut.payload), cut.missing) == (26, 74)
    udp = parse(LINKTYPE_ETHERNET, bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.255") /
                                         UDP(sport=3334, dport=3334) / Raw(b"hb")))
    assert udp == Datagram(("192.0.2.1", 3334), ("192.0.2.255", 3334), b"hb")
    fragment = IP(src="192.0.2.1", dst="192.0.2.2", flags="MF") / TCP()
    assert parse(LINKTYPE_RAW, bytes(fragment)) == Skipped("IP fragment (not reassembled)")
    v6_fragment = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(m=1) / TCP()
    assert parse(LINKTYPE_RAW, bytes(v6_fragment)) == Skipped("IP fragment (not reassembled)")
    arp = Ether(type=0x0806) / Raw(b"\x00" * 28)
    assert parse(LINKTYPE_ETHERNET, bytes(arp)) == Skipped("not IP (ARP, LLDP, …)")
    assert parse(LINKTYPE_ETHERNET, b"\x00" * 10) == Skipped("frame too short for its headers")
    assert parse(147, b"whatever").reason.startswith("link type 147")  # type: ignore[union-attr]
    icmp = IP(src="192.0.2.1", dst="192.0.2.2", proto=1) / Raw(struct.pack("!BBH", 8, 0, 0))
    assert parse(LINKTYPE_RAW, bytes(icmp)) == Skipped("IP protocol 1 (not TCP or UDP)")


# -- HTTP ---------------------------------------------------------------------------------------

def test_http_messages_by_length_chunked_and_close() -> None:
    requests = MessageSplitter(responses=False)
    wire = (b"POST /emu_reports/performance_report?webcomm_version=3.0 HTTP/1.1\r\nHost: reports.example:80\r\n"
            b"Content-Type: application/x-deflate\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /emu_reports/task_complete HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n")
    out = []
    for i in range(0, len(wire), 7):  # any segmentation; each chunk's time is its offset
        out += requests.feed(wire[i:i + 7], float(i))
    second = wire.index(b"POST /emu_reports/task_complete")
    assert [(m.method_and_target, m.body, m.time) for m in out] == [
        (("POST", "/emu_reports/performance_report?webcomm_version=3.0"), b"hello", 0.0),
        (("POST", "/emu_reports/task_complete"), b"abcde", float(second - second % 7))]
    assert out[0].header("content-type") == "application/x-deflate"
    responses = MessageSplitter(responses=True)
    assert responses.feed(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart", 1.0)[0] \
        .status == 204
    (last,) = responses.finish(2.0)
    assert (last.status, last.body) == (200, b"part")


def test_http_after_a_gap_resumes_at_the_next_message() -> None:
    requests = MessageSplitter(responses=False)
    assert requests.feed(b"POST /emu_reports/a HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345", 1.0) == []
    requests.gap()
    (message,) = requests.feed(b"90POST /emu_reports/b HTTP/1.1\r\nContent-Length: 2\r\n\r\nok", 2.0)
    assert (message.method_and_target[1], message.body, requests.dropped) == ("/emu_reports/b", b"ok", 1)
