"""`pvtap import` on captures built here, segment by segment, where the real tcpdump tests cannot
reach: frames split over segments that arrive out of order and again, a segment lost inside a
frame, a capture that starts mid-connection, ports reused, TLS, unknown protocols, protocols
found by content, Enphase reports over plain HTTP, a gzip-compressed file. Placeholder traffic
only (documentation addresses, simulator serials)."""

from __future__ import annotations

import gzip
import re
import urllib.parse
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import RawPcapWriter

from pvtap.capture.importer import Importer
from pvtap.capture.packets import parse
from pvtap.capture.reader import Capture
from pvtap.cli import main
from pvtap.decode.alphaess import REQUEST, encode_frame
from pvtap.decode.foxess import HEARTBEAT, build_frame
from pvtap.ingest import Ingest
from pvtap.privacy import Privacy
from pvtap.records import DOWN, UP, Origin, RawPayload, Record, utc_from_unix
from pvtap.simulate.enphase import Simulator
from pvtap.simulate.enphase_cloud import answer
from pvtap.simulate.foxess_m1 import join_me_req
from pvtap.store.local import LocalStore

DEVICE, CLOUD = "192.0.2.10", "198.51.100.2"
T0 = 1_700_000_000.0


def realtime(n: int) -> bytes:
    return encode_frame(REQUEST, 16, b'{"Time":"2023/11/14 22:13:%02d","SN":"ALSIM0000000009","Ppv1":"%d","SOC":"50.0"}'
                        % (n, 1000 + n))


@dataclass
class Conversation:
    """One TCP connection, packet by packet, as a capture would hold it."""

    server_port: int
    client_port: int = 50000
    packets: list[tuple[float, bytes]] = field(default_factory=list)
    seq: dict[str, int] = field(default_factory=lambda: {UP: 1000, DOWN: 9000})

    def _ends(self, direction: str) -> tuple[tuple[str, int], tuple[str, int]]:
        client, server = (DEVICE, self.client_port), (CLOUD, self.server_port)
        return (client, server) if direction == UP else (server, client)

    def packet(self, direction: str, payload: bytes = b"", *, flags: str = "PA", seq: int | None = None,
               ack: int | None = None) -> None:
        (src, sport), (dst, dport) = self._ends(direction)
        other = DOWN if direction == UP else UP
        tcp = TCP(sport=sport, dport=dport, flags=flags, seq=self.seq[direction] if seq is None else seq,
                  ack=self.seq[other] if ack is None else ack)
        frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst) / tcp / Raw(payload)
        self.packets.append((T0 + len(self.packets) * 0.01, bytes(frame)))

    def open(self) -> None:
        self.packet(UP, flags="S", ack=0)
        self.seq[UP] += 1
        self.packet(DOWN, flags="SA")
        self.seq[DOWN] += 1
        self.packet(UP, flags="A")

    def send(self, direction: str, data: bytes) -> None:
        """One segment, acknowledged by the other side."""
        self.packet(direction, data)
        self.seq[direction] += len(data)
        self.packet(DOWN if direction == UP else UP, flags="A")

    def close(self) -> None:
        self.packet(UP, flags="FA")
        self.seq[UP] += 1
        self.packet(DOWN, flags="FA")
        self.seq[DOWN] += 1
        self.packet(UP, flags="A")


def write(path: Path, *conversations: Conversation) -> Path:
    packets = sorted((p for c in conversations for p in c.packets), key=lambda p: p[0])
    with RawPcapWriter(str(path), linktype=1) as writer:
        writer.write_header(None)
        for time, frame in packets:
            sec = int(time)
            writer.write_packet(frame, sec=sec, usec=round((time - sec) * 1e6))
    return path


def run_import(path: Path, ports: dict[int, str] | None = None) -> tuple[Importer, list[RawPayload], list[Record]]:
    stored: list[RawPayload] = []
    connections: list[Record] = []
    importer = Importer(store=stored.append, store_record=connections.append, privacy=Privacy(), name=path.name,
                        ports=ports)
    with Capture(path) as capture:
        for frame in capture:
            importer.packet(frame.time, frame.wirelen, parse(frame.linktype, frame.data))
    importer.finish()
    return importer, stored, connections


def test_split_reordered_retransmitted_and_lost_segments(tmp_path: Path) -> None:
    c = Conversation(7777)
    c.open()
    c.send(UP, realtime(1))
    two = realtime(2)
    start = c.seq[UP]
    parts = [two[:10], two[10:40], two[40:]]
    offsets = [0, 10, 40]
    for i in (0, 2, 1, 0):  # out of order, then the first part again (a retransmission)
        c.packet(UP, parts[i], seq=start + offsets[i])
    c.seq[UP] += len(two)
    c.packet(DOWN, flags="A")
    three = realtime(3)
    start = c.seq[UP]
    c.packet(UP, three[:20], seq=start)
    # three[20:50] crosses the wire but not the capture; the cloud acknowledges it
    c.packet(UP, three[50:], seq=start + 50)
    c.seq[UP] += len(three)
    c.packet(DOWN, flags="A")
    c.send(UP, realtime(4))
    c.close()
    importer, stored, (connection,) = run_import(write(tmp_path / "c.pcap", c))

    frames = [p for p in stored if p.kind == "frame"]
    assert [f.payload for f in frames] == [realtime(1), realtime(2), realtime(4)]  # whole, once each, in order
    assert b"".join(p.payload for p in stored if p.kind == "garbage") == three[:20] + three[50:]  # kept, not decoded
    s = importer.summary
    assert (s.gaps, s.gap_bytes, s.retransmitted, s.out_of_order) == (1, 30, 10, 2)  # two came early
    assert (connection.tags["protocol"], connection.tags["outcome"]) == ("alphaess", "closed")
    assert (connection.fields["gaps"], connection.fields["gap_bytes"]) == (1, 30)
    assert connection.origin.device == "ALSIM0000000009"  # learned by the Tap, as in the relay
    assert frames[0].received == utc_from_unix(T0 + 0.03)  # the capture's own time


def test_mid_connection_reused_ports_tls_unknown_and_content(tmp_path: Path) -> None:
    late = Conversation(7777, client_port=50001)  # the capture began after the handshake
    late.send(UP, realtime(5))
    late.send(DOWN, encode_frame(2, 16, b'{"Status":"Success"}'))
    reused = [Conversation(10001, client_port=50002, seq={UP: 1000 + 10_000 * i, DOWN: 9000}) for i in range(2)]
    for i, conversation in enumerate(reused):
        conversation.open()
        conversation.send(UP, build_frame(0x01, b"\x00" * 4, stamp=i))
        conversation.close()
    reused[1].packets = [(t + 1.0, frame) for t, frame in reused[1].packets]  # after the first ended
    tls = Conversation(443, client_port=50003)
    tls.open()
    tls.send(UP, b"\x16\x03\x01\x00\x05hello")
    unknown = Conversation(5555, client_port=50004)
    unknown.open()
    unknown.send(UP, b"HELO placeholder\r\n")
    by_content = Conversation(9999, client_port=50005)
    by_content.open()
    by_content.send(UP, build_frame(0x01, b"\x00" * 4))
    importer, stored, connections = run_import(write(tmp_path / "m.pcap", late, *reused, tls, unknown, by_content))
    s = importer.summary
    assert s.streams == Counter({"alphaess": 1, "foxess": 3})
    assert s.skipped_streams == Counter({
        "TLS on port 443: encrypted, cannot be read from a capture (pvtap decodes it live)": 1,
        "unknown protocol on port 5555": 1})
    assert len(connections) == 6
    late_frames = [p for p in stored if p.origin.protocol == "alphaess" and p.kind == "frame"]
    assert [(p.origin.direction, p.payload) for p in late_frames] == \
        [(UP, realtime(5)), (DOWN, encode_frame(2, 16, b'{"Status":"Success"}'))]
    fox = [p for p in stored if p.origin.protocol == "foxess" and p.kind == "frame"]
    assert len(fox) == 3 and len({p.origin.connection for p in fox}) == 3  # two on the same ports: two connections


def test_enphase_reports_over_plain_http_become_the_addons_payloads(tmp_path: Path) -> None:
    report = Simulator(micros=2, start=1699956000, seed=5).next_report()
    body = zlib.compress(b"body=" + urllib.parse.quote(report.xml).encode())
    status, headers, answer_body, _ = answer("POST", "/emu_reports/performance_report", "application/x-deflate", body)
    request = (b"POST /emu_reports/performance_report?webcomm_version=3.0 HTTP/1.1\r\nAccept: */*\r\n"
               b"Connection: close\r\nContent-Type: application/x-deflate\r\n"
               b"Content-Length: %d\r\nHost: reports.enphaseenergy.com:80\r\n\r\n" % len(body)) + body
    response = (b"HTTP/1.1 %d OK\r\n" % status + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
                + b"Content-Length: %d\r\n\r\n" % len(answer_body) + answer_body)
    c = Conversation(80)
    c.open()
    for i in range(0, len(request), 500):  # as TCP cuts it
        c.send(UP, request[i:i + 500])
    c.send(DOWN, response)
    c.close()
    path = write(tmp_path / "envoy.pcap", c)
    assert main(["--data-dir", str(tmp_path), "import", str(path)]) == 0
    with LocalStore(tmp_path / "import.sqlite", readonly=True) as store:
        raws = [s.raw for s in store.raw_payloads()]
        records = [s.record for s in store.records() if s.record.measurement != "pvtap_connection"]
    assert [(r.kind, r.origin.direction) for r in raws] == [("performance_report", UP),
                                                            ("performance_report_response", DOWN)]
    # what the addon would have stored and decoded for the same exchange
    meta: dict[str, str | int | float | bool | None] = {
        "method": "POST", "host": "reports.enphaseenergy.com", "path": "/emu_reports/performance_report",
        "query": "webcomm_version=3.0"}
    extras: list[dict[str, str | int | float | bool | None]] = [
        {"content_type": "application/x-deflate"},
        {"content_type": dict(headers)["Content-Type"], "status_code": status}]
    with LocalStore(tmp_path / "addon" / "enphase.sqlite") as store:
        ingest = Ingest(store, Privacy())
        for raw, payload, direction, kind, extra in (
                (raws[0], body, UP, "performance_report", extras[0]),
                (raws[1], answer_body, DOWN, "performance_report_response", extras[1])):
            ingest.process(RawPayload(Origin("enphase", "", raw.origin.connection, direction), kind, payload,
                                      raw.received, {**meta, **extra}))
        assert [(s.raw.payload, dict(s.raw.meta)) for s in store.raw_payloads()] == \
            [(r.payload, dict(r.meta)) for r in raws]
        expected = [s.record for s in store.records()]
    assert records == expected
    assert len([r for r in records if r.measurement == "enphase_interval"]) == len(report.intervals)


def test_gzip_captures_are_read_too(tmp_path: Path) -> None:
    c = Conversation(7777)
    c.open()
    c.send(UP, realtime(7))
    c.close()
    plain = write(tmp_path / "c.pcap", c)
    packed = tmp_path / "c.pcap.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    _, stored, _ = run_import(packed)
    assert [p.payload for p in stored if p.kind == "frame"] == [realtime(7)]
    with Capture(packed) as capture:
        assert capture.compressed and capture.size == 0


def test_many_connections_are_finished_as_they_end(tmp_path: Path, monkeypatch) -> None:
    import pvtap.capture.importer as importer_module
    monkeypatch.setattr(importer_module, "MAX_OPEN", 4)
    conversations = []
    for i in range(12):
        c = Conversation(7777, client_port=51000 + i)
        c.open()
        c.send(UP, realtime(i))
        c.close()
        c.packets = [(t + i, frame) for t, frame in c.packets]  # one after the other
        conversations.append(c)
    path = write(tmp_path / "many.pcap", *conversations)
    stored: list[RawPayload] = []
    connections: list[Record] = []
    importer = Importer(store=stored.append, store_record=connections.append, privacy=Privacy())
    most_open = 0
    with Capture(path) as capture:
        for frame in capture:
            importer.packet(frame.time, frame.wirelen, parse(frame.linktype, frame.data))
            most_open = max(most_open, len(importer._connections))
    importer.finish()
    assert most_open <= 5
    assert len(connections) == 12 and all(c.tags["outcome"] == "closed" for c in connections)
    assert [p.payload for p in stored if p.kind == "frame"] == [realtime(i) for i in range(12)]


# -- the command's output and defaults (issue 10) ---------------------------------------------------

def udp_packet(time: float, dport: int, payload: bytes) -> tuple[float, bytes]:
    frame = (Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / IP(src=DEVICE, dst="192.0.2.255")
             / UDP(sport=dport, dport=dport) / Raw(payload))
    return time, bytes(frame)


def test_the_m1s_datagrams_on_the_default_udp_ports_decode_without_port_options(tmp_path: Path, capsys) -> None:
    c = Conversation(0)
    stamp = 1_700_000_000
    for n in range(3):
        c.packets.append(udp_packet(T0 + n, 6364, join_me_req(n, 12345)))
        c.packets.append(udp_packet(T0 + n + 0.5, 3334, build_frame(HEARTBEAT, b"\x01", stamp=stamp + n, family=0x7F)))
    path = write(tmp_path / "m1.pcap", c)
    assert main(["--data-dir", str(tmp_path / "data"), "import", str(path)]) == 0  # no --port
    out = capsys.readouterr().out
    assert "UDP datagrams decoded: foxess 6" in out, out
    with LocalStore(tmp_path / "data" / "import.sqlite", readonly=True) as store:
        stored = list(store.raw_payloads())
        records = [s.record for s in store.records()]
    assert len(stored) == 6 and all(s.raw.origin.protocol == "foxess" and s.decode_error is None for s in stored)
    assert [s.raw.kind for s in stored] == ["datagram"] * 6
    assert Counter(r.measurement for r in records) == {"foxess_presence": 6}
    assert Counter(s.raw.origin.connection for s in stored) == {"udp-6364": 3, "udp-3334": 3}
    assert [r.time.timestamp() for r in records] == sorted(p[0] for p in c.packets)  # the capture's own times


def test_progress_counts_move_and_the_summary_counts_everything(tmp_path: Path, capsys, monkeypatch) -> None:
    import pvtap.cli.import_ as import_module
    from pvtap.cli._common import Progress

    class EveryStep(Progress):  # a draw at each step (every 512 packets), not every 0.25 s
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "every": 0.0})

    monkeypatch.setattr(import_module, "Progress", EveryStep)
    c = Conversation(7777)
    c.open()
    frames = 800
    for n in range(frames):
        c.send(UP, realtime(n % 60))
    c.close()
    path = write(tmp_path / "big.pcap", c)
    assert main(["--data-dir", str(tmp_path / "data"), "import", str(path), "--progress"]) == 0
    out, err = capsys.readouterr()
    draws = [(int(done.replace(",", "")), int(total.replace(",", "")))
             for done, total in re.findall(r"\rimporting big\.pcap, bytes: ([\d,]+)/([\d,]+) \(", err)]
    size = path.stat().st_size
    assert len(draws) >= 3, err
    assert all(total == size for _, total in draws)
    assert [d for d, _ in draws] == sorted(d for d, _ in draws) and draws[0][0] < size  # they move forward
    assert draws[-1][0] == size and err.endswith("\n")  # the last one is complete, then the summary
    packets = len(c.packets)
    assert f"big.pcap: pcap, {packets:,} packets" in out, out
    assert "TCP connections decoded: 1 (alphaess 1)" in out
    assert f"frames: {frames:,} (0 runs of bytes in no frame), records: " in out
    assert "gaps: 0 (0 bytes missing from the capture)" in out
    assert re.search(r"stored in .*import\.sqlite: [\d,]+ payloads, [\d,]+ records, 0 decode errors", out), out
