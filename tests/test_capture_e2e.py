"""`pvtap import` against captures a real tcpdump made while the simulators talked through the
relay on loopback: AlphaESS (session, realtime, extended, CSV back-fill, a cloud command), the
FoxESS H1 in cleartext (with a Modbus read from the cloud) and the M1's UDP broadcasts.

The import must decode to the records the live relay stored — the same measurements, tags,
typed fields, devices and directions, apart from the connection records and ids. Times: the
relay stamps a chunk when it reads it, tcpdump when the packet crosses `lo`, a little earlier;
records stamped on arrival (and AlphaESS's clock offset, learned from arrival times in whole
seconds) may therefore be up to 1 s earlier in the import, never later. Then the same capture
with a segment dropped (the gap is reported, the whole frames decode), cut short (a clear error,
what was read is kept) and as pcapng.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

import pvtap.decode.alphaess as alphaess
from proxy_tcp import relay_running
from pvtap.cli import main
from pvtap.config import ListenerConfig
from pvtap.privacy import Privacy
from pvtap.records import UP, Origin, now_utc
from pvtap.simulate.alphaess import PLACEHOLDER_PASSWORD, run_simulator
from pvtap.simulate.alphaess_cloud import AlphaCloud
from pvtap.simulate.foxess_cloud import FoxCloud
from pvtap.simulate.foxess_h1 import H1Simulator
from pvtap.simulate.foxess_m1 import M1Simulator
from pvtap.store.local import LocalStore
from tests.capture_support import Tcpdump, decoded_records, frames, paired, record_key, rewrite, segment_of
from tests.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def _ended(relay) -> None:
    await until(lambda: not relay.connections, what="the relay to end every connection")


async def live_run(data_dir: Path, capture: Path) -> dict[str, int]:
    """The simulators through an in-process relay (real store and ingest), captured by tcpdump on
    the device side of the relay only. Returns the relay's listening ports by role."""
    store = LocalStore.for_process(data_dir, "relay")
    try:
        async with AlphaCloud() as alpha_cloud, FoxCloud(tls=False, ack_bootstrap=False) as fox_cloud:
            listeners = [
                ListenerConfig(protocol="alphaess", listen="127.0.0.1:0", upstream=f"127.0.0.1:{alpha_cloud.port}"),
                ListenerConfig(protocol="foxess", listen="127.0.0.1:0", upstream=f"127.0.0.1:{fox_cloud.port}"),
                ListenerConfig(protocol="foxess", listen="127.0.0.1:0", transport="udp", policy="local"),
                ListenerConfig(protocol="foxess", listen="127.0.0.1:0", transport="udp", policy="local"),
            ]
            # its ingest worker (a thread here) has archived and decoded everything when the block ends
            async with relay_running(listeners, store=store, privacy=Privacy()) as relay:
                ports = dict(zip(("alphaess", "foxess", "mesh", "heartbeat"),
                                 (listener.endpoints[0].port for listener in relay.listeners)))
                bpf = (f"tcp port {ports['alphaess']} or tcp port {ports['foxess']} or udp port {ports['mesh']} "
                       f"or udp port {ports['heartbeat']}")
                with Tcpdump(capture, bpf) as tcpdump:
                    await run_simulator("127.0.0.1", ports["alphaess"], interval=0.1, extended_every=0.25, count=6,
                                        backfill_rows=6, ack_timeout=5)
                    h1 = H1Simulator(seed=4)
                    run = asyncio.create_task(h1.run("127.0.0.1", ports["foxess"], count=2, interval=0.05, linger=0.5))
                    session = await fox_cloud.wait_session()
                    await session.wait_frame(lambda f: f.function == 0x02)
                    await session.modbus_read(11000, 13, function=0x04)
                    assert await run == 2
                    await M1Simulator(seed=2).broadcast("127.0.0.1", mesh_port=ports["mesh"],
                                                        heartbeat_port=ports["heartbeat"], mesh_interval=0.05,
                                                        heartbeat_interval=0.1, duration=0.3)
                    await _ended(relay)
                    tcpdump.stop()
                assert "0 packets dropped by kernel" in tcpdump.stderr, tcpdump.stderr
        return ports
    finally:
        store.close()


def import_(capture: Path, data_dir: Path, ports: dict[str, int], capsys, *extra: str) -> tuple[int, str, str]:
    args = ["--data-dir", str(data_dir), "import", str(capture), *extra]
    for role, protocol in (("alphaess", "alphaess"), ("foxess", "foxess"), ("mesh", "foxess"),
                           ("heartbeat", "foxess")):
        args += ["--port", f"{ports[role]}={protocol}"]
    status = main(args)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory):
    """One live run for the module: (capture, live store, ports)."""
    workdir = tmp_path_factory.mktemp("capture")
    capture = workdir / "live.pcap"
    ports = asyncio.run(live_run(workdir / "live", capture))
    return capture, workdir / "live" / "relay.sqlite", ports


def check_same_records(live_store: Path, imported_store: Path) -> None:
    live = decoded_records(live_store)
    imported = decoded_records(imported_store)
    assert len(imported) == len(live) > 40
    for live_record, imported_record in paired(live, imported):
        assert 0 <= (live_record.time - imported_record.time).total_seconds() <= 1.0, (live_record, imported_record)


def test_the_import_decodes_to_the_records_the_live_relay_stored(recorded, tmp_path, capsys) -> None:
    capture, live_store, ports = recorded
    status, out, err = import_(capture, tmp_path, ports, capsys)
    assert status == 0, err
    check_same_records(live_store, tmp_path / "import.sqlite")
    measurements = {r.measurement for r in decoded_records(tmp_path / "import.sqlite")}
    assert {"alphaess_realtime", "alphaess_extended", "alphaess_backfill", "alphaess_command", "foxess_h1_realtime",
            "foxess_modbus", "foxess_register", "foxess_presence"} <= measurements

    # the frames themselves, byte for byte (after the same redaction), in the same directions
    def frames_of(path: Path) -> list[tuple]:
        with LocalStore(path, readonly=True) as store:
            return sorted((s.raw.origin.protocol, s.raw.origin.direction, s.raw.kind, s.raw.payload)
                          for s in store.raw_payloads())
    assert frames_of(tmp_path / "import.sqlite") == frames_of(live_store)
    assert PLACEHOLDER_PASSWORD.encode() not in (tmp_path / "import.sqlite").read_bytes()

    with LocalStore(tmp_path / "import.sqlite", readonly=True) as store:
        connections = [s.record for s in store.records(measurements=["pvtap_connection"])]
    assert sorted(c.tags["protocol"] for c in connections) == ["alphaess", "foxess"]
    assert all(c.tags["action"] == "import" and c.fields["gaps"] == 0 for c in connections)
    assert "TCP connections decoded: 2 (alphaess 1, foxess 1)" in out
    assert "gaps: 0 (0 bytes missing from the capture)" in out
    assert "UDP datagrams decoded: foxess" in out


def test_a_dropped_segment_is_reported_as_a_gap_and_the_whole_frames_decode(recorded, tmp_path, capsys) -> None:
    capture, live_store, ports = recorded
    realtime_header = b"\x01\x01\x10"  # an AlphaESS realtime frame (1-1-16) from the battery

    def is_victim(frame) -> bool:
        segment = segment_of(frame)
        return bool(segment and segment.dst[1] == ports["alphaess"] and segment.payload.startswith(realtime_header))

    victims = [f for f in frames(capture) if is_victim(f)]
    dropped = victims[2]
    lost = segment_of(dropped)
    assert lost is not None
    holed = tmp_path / "holed.pcap"
    assert rewrite(capture, holed, lambda frame: frame is not dropped and frame.data != dropped.data) == 1
    status, out, err = import_(holed, tmp_path, ports, capsys)
    assert status == 0, err
    assert f"gaps: 1 ({len(lost.payload)} bytes missing from the capture)" in out
    # exactly the records of the frame that segment carried are missing (decoded here on its own)
    tap = alphaess.Tap(Origin("alphaess", connection="lost"))
    (frame,) = tap.feed(UP, lost.payload, now_utc())
    lost_records = alphaess.decode_raw(alphaess.redact_raw(frame, Privacy()))
    assert [r.measurement for r in lost_records] == ["alphaess_realtime"]
    live = Counter(map(record_key, decoded_records(live_store)))
    assert Counter(map(record_key, decoded_records(tmp_path / "import.sqlite"))) == live - Counter(
        map(record_key, lost_records))
    with LocalStore(tmp_path / "import.sqlite", readonly=True) as store:
        (alpha,) = [s.record for s in store.records(measurements=["pvtap_connection"])
                    if s.record.tags["protocol"] == "alphaess"]
    assert (alpha.fields["gaps"], alpha.fields["gap_bytes"]) == (1, len(lost.payload))


def test_a_truncated_capture_ends_with_a_clear_error_and_keeps_what_was_read(recorded, tmp_path, capsys) -> None:
    capture, live_store, ports = recorded
    data = capture.read_bytes()
    at = 24  # past the pcap file header: walk the records (16-byte header, then caplen bytes)
    while at + 16 + int.from_bytes(data[at + 8:at + 12], "little") < len(data) * 2 // 3:
        at += 16 + int.from_bytes(data[at + 8:at + 12], "little")
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:at + 16 + 5])  # five bytes into a packet
    status, out, err = import_(cut, tmp_path, ports, capsys)
    assert status == 1
    assert out.startswith("cut.pcap: pcap, ")  # the summary of what was read
    assert "the file ends inside a packet record" in err and "truncated" in err
    assert "The whole packets before it were imported" in err
    imported = decoded_records(tmp_path / "import.sqlite")
    live_keys = sorted(map(record_key, decoded_records(live_store)))
    assert 0 < len(imported) < len(live_keys)
    assert all(key in live_keys for key in map(record_key, imported))  # nothing made up from the cut packet


def test_pcapng_gives_the_same_records(recorded, tmp_path, capsys) -> None:
    capture, live_store, ports = recorded
    ng = tmp_path / "live.pcapng"
    rewrite(capture, ng, pcapng=True)
    assert ng.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"  # a section header block: pcapng
    status, out, err = import_(ng, tmp_path, ports, capsys)
    assert status == 0, err
    assert out.startswith("live.pcapng: pcapng,")
    check_same_records(live_store, tmp_path / "import.sqlite")


def test_bad_input_is_refused_with_the_fix(tmp_path, capsys) -> None:
    """A file that is no capture, a bad --port, a missing file, a live store's name."""
    junk = tmp_path / "notes.txt"
    junk.write_text("not a capture\n")
    assert main(["--data-dir", str(tmp_path), "import", str(junk)]) == 1
    assert "not a pcap or pcapng capture" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data-dir", str(tmp_path), "import", str(junk), "--port", "7777=growatt"])
    assert "expected PORT=PROTOCOL" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path), "import", str(tmp_path / "missing.pcap")]) == 2
    assert main(["--data-dir", str(tmp_path), "import", "--store", "relay", str(junk)]) == 2

