"""The Envoy simulator: its reports decode to the values it generated, and it posts them over
real TLS to a real local server with the Envoy's exact headers."""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from pathlib import Path

import pytest

from pvtap.certs import self_signed, write_pair
from pvtap.cli import main
from pvtap.decode.enphase import build_response, decode_raw, inflate, redact_raw, split_form
from pvtap.privacy import Privacy
from pvtap.records import utc_from_unix
from pvtap.simulate.enphase import (
    MAX_RECORDS,
    PERIOD,
    SimReport,
    Simulator,
    build_report_xml,
    encode_body,
    post_report,
    report_url,
)
from tests.enphase_support import DEFLATE, REPORT_HOST, Answer, RecordingServer, request_raw

NOON = 1718971200  # 2024-06-21 12:00 UTC
URL = f"https://{REPORT_HOST}/emu_reports/performance_report?webcomm_version=3.0"


def decoded(report: SimReport) -> dict[str, list]:
    by: dict[str, list] = {}
    for record in decode_raw(request_raw(encode_body(report.xml))):
        by.setdefault(record.measurement, []).append(record)
    return by


# -- reports ----------------------------------------------------------------------------------

def test_report_round_trips_to_the_generated_values() -> None:
    simulator = Simulator(micros=3, start=NOON)
    report = simulator.next_report()
    assert report.report_timestamp == NOON + PERIOD + 7
    records = decoded(report)
    (envoy,) = records["enphase_envoy"]
    assert envoy.tags == {"envoy": "999900000000"} and envoy.time == utc_from_unix(report.report_timestamp)
    assert envoy.fields["interval_count"] == envoy.fields["reading_count"] == 3

    assert len(report.intervals) == 3
    for interval, record in zip(report.intervals, records["enphase_interval"], strict=True):
        assert record.time == utc_from_unix(interval.end_date) and record.tags["eqid"] == interval.eqid
        assert record.fields == {"id": interval.id, "interval_duration_s": 300,
                                 "stat_duration_s": interval.stat_duration, "energy_j": interval.joules,
                                 "energy_wh": interval.joules / 3600, "avg_power_w": interval.joules / 300}
        assert 100 * 300 < interval.joules < 300 * 300  # noon: 100-300 W per micro
    for reading, record in zip(report.readings, records["enphase_reading"], strict=True):
        assert record.time == utc_from_unix(reading.date) and record.tags["eqid"] == reading.eqid
        assert record.fields == {
            "id": reading.id, "duration_s": reading.duration, "ac_voltage_v": reading.ac_mv / 1000,
            "ac_frequency_hz": reading.ac_mhz / 1000, "dc_voltage_v": reading.dc_mv / 1000,
            "dc_current_a": reading.dc_ma / 1000, "temperature_c": float(reading.temperature_c), "flags": 0,
            "stats_5": 0, "stats_6": 0, "energy_j": reading.joules, "avg_power_w": reading.joules / reading.duration}
        assert 230 < reading.ac_mv / 1000 < 250 and 49.9 < reading.ac_mhz / 1000 < 50.1
        assert 25 < reading.dc_mv / 1000 < 40
        assert 20 <= reading.temperature_c <= 60
    # the first report: a power-on reset of every micro, and every device's state
    assert [(r.fields["event_code"], r.fields["state"], r.tags["eqid"]) for r in records["enphase_event"]] == [
        (509, "one-shot", "999900000001"), (509, "one-shot", "999900000002"), (509, "one-shot", "999900000003")]
    assert [r.tags["eqid"] for r in records["enphase_device"]] == ["999900000001", "999900000002", "999900000003"]
    assert [r.tags["eqid"] for r in records["enphase_channel"]] == ["999900000001.1", "999900000002.1",
                                                                     "999900000003.1"]
    assert all(r.fields["device_type"] == 1 for r in records["enphase_device"])


def test_reports_advance_five_minutes_with_monotonic_ids() -> None:
    simulator = Simulator(micros=2, start=NOON + 123, events_rate=0)  # aligned down to 12:00
    reports = [simulator.next_report() for _ in range(4)]
    assert [r.intervals[0].end_date for r in reports] == [NOON + PERIOD * i for i in range(1, 5)]
    assert all(i.end_date % PERIOD == 0 for r in reports for i in r.intervals)
    ids = [i.id for r in reports for i in r.intervals]
    assert ids == list(range(ids[0], ids[0] + 8))
    assert [r.report_timestamp for r in reports] == [NOON + PERIOD * i + 7 for i in range(1, 5)]
    assert len(reports[0].events) == len(reports[0].devices) == 2  # power-on resets, inventory
    assert all(not r.devices and not r.events for r in reports[1:])  # nothing pending: nothing sent


def test_catch_up_report_has_exactly_500_intervals_and_readings() -> None:
    simulator = Simulator(micros=3, start=NOON - 6 * 3600)
    report = simulator.next_report(MAX_RECORDS)
    assert report.xml.count(b"<interval ") == report.xml.count(b"<reading ") == 500
    records = decoded(report)
    assert len(records["enphase_interval"]) == len(records["enphase_reading"]) == 500
    ends = [i.end_date for i in report.intervals]
    assert ends == sorted(ends) and ends[0] == NOON - 6 * 3600 + PERIOD  # oldest first
    assert Counter(ends)[ends[-1]] == 500 - 3 * 166  # the 167th period is split across reports
    following = simulator.next_report()
    assert following.intervals[0].id == report.intervals[-1].id + 1  # nothing lost between reports
    assert following.intervals[0].end_date == ends[-1]


def test_daylight_curve_and_events() -> None:
    simulator = Simulator(micros=2, start=NOON - 12 * 3600, events_rate=0.2)  # midnight
    night = simulator.next_report()
    assert {i.joules for i in night.intervals} == {0} and {r.dc_ma for r in night.readings} == {0}
    day = simulator.next_report(2 * 12 * 12)  # to noon
    assert max(i.joules for i in day.intervals) > 200 * 300
    codes = Counter((e.code, e.state) for e in day.events)
    assert codes[(10009, 2)] == 2  # both micros wake at dawn
    assert codes[(512, 1)] == codes[(512, 2)] > 0
    by_id = {e.id: e for e in day.events}
    for event in day.events:
        if event.code == 512:  # set and clear point at each other
            assert event.correlation_id is not None
            assert by_id[event.correlation_id].correlation_id == event.id
    ids = [e.id for e in night.events + day.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    dusk = simulator.next_report(2 * 12 * 7)  # to 19:00
    assert Counter((e.code, e.state) for e in dusk.events)[(10009, 1)] == 2
    assert {d.condition_flags for d in dusk.devices} == {2097152}


def test_placeholder_serials_and_addresses_only() -> None:
    xml = build_report_xml(micros=40)
    for attribute in (b'serial_num="', b'eqid="'):
        start = 0
        while (start := xml.find(attribute, start) + len(attribute)) >= len(attribute):
            assert xml[start:start + 4] == b"9999"
    assert b'ip_addr="192.0.2.10"' in xml and b'mac_addr="00:00:5e:00:53:01"' in xml


def test_encode_body_is_the_envoy_form() -> None:
    xml = build_report_xml(micros=1, start=NOON)
    body = encode_body(xml)
    assert zlib.decompress(body) == b"body=" + urllib.parse.quote(xml).encode()
    assert split_form(inflate(body, DEFLATE)) == (xml, {})


def test_report_url() -> None:
    assert report_url("https://reports.enphaseenergy.com") == URL
    assert report_url("https://127.0.0.1:8443/", "4.6.0") == \
        "https://127.0.0.1:8443/emu_reports/performance_report?webcomm_version=4.6.0"
    assert report_url("https://h/x?y=1") == "https://h/x?y=1"


# -- posting ----------------------------------------------------------------------------------

def test_post_report_sends_the_envoy_headers_and_returns_the_body_verbatim(tmp_path: Path) -> None:
    answer_body = build_response(["1", "2"]) + b"\x00trailing\xff"  # not decoded by the client
    body = encode_body(build_report_xml(micros=2, start=NOON))
    with RecordingServer(tmp_path, Answer(body=answer_body)) as server:
        response = post_report(URL, body, connect=("127.0.0.1", server.port))
    (received,) = server.received
    assert received.requestline == "POST /emu_reports/performance_report?webcomm_version=3.0 HTTP/1.1"
    assert received.headers == [("Accept", "*/*"), ("Connection", "close"), ("Content-Type", DEFLATE),
                                ("Content-Length", str(len(body))), ("Host", f"{REPORT_HOST}:443")]
    assert received.body == body
    assert received.server_name == REPORT_HOST
    assert (response.status, response.body) == (200, answer_body)
    assert ("Content-Type", "application/x-deflate; charset=utf-8") in response.headers


def test_post_report_checks_the_certificate_only_with_a_cafile(tmp_path: Path) -> None:
    body = encode_body(build_report_xml(micros=1, start=NOON))
    other_ca, _ = write_pair(tmp_path, "other", *self_signed("other.example"))
    with RecordingServer(tmp_path) as server:
        assert post_report(URL, body, connect=("127.0.0.1", server.port), cafile=str(server.cafile)).status == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            post_report(URL, body, connect=("127.0.0.1", server.port), cafile=str(other_ca))
        assert post_report(URL, body, connect=("127.0.0.1", server.port)).status == 200  # no check by default
    assert len(server.received) == 2


class ConnectProxy:
    """A minimal HTTP CONNECT proxy that records the CONNECT request and tunnels every connection
    to one local target, whatever host was asked for (so no name is ever resolved)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(4096)
            self.requests.append(head)
            with socket.create_connection(self.target) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                sockets = [client, upstream]
                while True:
                    readable, _, _ = select.select(sockets, [], [], 10)
                    if not readable:
                        return
                    for sock in readable:
                        data = sock.recv(65536)
                        if not data:
                            return
                        (upstream if sock is client else client).sendall(data)

    def __enter__(self) -> ConnectProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self.thread.join(5)


def test_post_report_through_a_connect_proxy(tmp_path: Path) -> None:
    body = encode_body(build_report_xml(micros=1, start=NOON))
    with RecordingServer(tmp_path, Answer(body=b"done")) as server, ConnectProxy(("127.0.0.1", server.port)) as proxy:
        response = post_report(URL, body, proxy=("127.0.0.1", proxy.port))
    assert proxy.requests[0].startswith(f"CONNECT {REPORT_HOST}:443 HTTP/1.1\r\n".encode())
    (received,) = server.received
    assert received.body == body and received.server_name == REPORT_HOST
    assert dict(received.headers)["Host"] == f"{REPORT_HOST}:443"
    assert response.body == b"done"


# -- command line -----------------------------------------------------------------------------

def test_cli_posts_reports_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with RecordingServer(tmp_path) as server:
        server.answer = Answer(body=build_response(["1", "2"]))
        code = main(["simulate", "enphase", "--url", f"https://{REPORT_HOST}", "--connect", f"127.0.0.1:{server.port}",
                     "--micros", "2", "--reports", "3", "--start", "2024-06-21T10:00Z"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == f"posting to {URL} via 127.0.0.1:{server.port}: 2 micros, 2 intervals per report"
    assert out[1].startswith("report 1/3: 200 OK; sent ") and out[1].endswith("2 events acknowledged")
    assert "(2 intervals, 2 readings, 2 events)" in out[1]
    assert out[-1] == "3 reports posted, 3 answered 2xx, 0 failed or refused; 6 events acknowledged"
    assert len(server.received) == 3
    ends = []
    for received in server.received:
        records = decode_raw(redact_raw(request_raw(received.body), Privacy()))
        ends.append(max(r.time for r in records if r.measurement == "enphase_interval"))
    start = utc_from_unix(NOON - 2 * 3600)
    assert [int((e - start).total_seconds()) for e in ends] == [300, 600, 900]


def test_cli_reports_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    busy = Answer(status=503, headers=[("Content-Type", "text/plain")], body=b"busy")
    with RecordingServer(tmp_path, busy) as server:
        code = main(["simulate", "enphase", "--url", f"https://{REPORT_HOST}", "--connect", f"127.0.0.1:{server.port}"])
    out = capsys.readouterr().out
    assert code == 1 and "report 1/1: 503 Service Unavailable;" in out and "? events acknowledged" in out
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
    with closed:
        code = main(["simulate", "enphase", "--url", f"https://{REPORT_HOST}",
                     "--connect", f"127.0.0.1:{closed.getsockname()[1]}", "--reports", "2"])
    out = capsys.readouterr().out
    assert code == 1 and out.count("FAILED") == 2
    assert out.splitlines()[-1] == "2 reports posted, 0 answered 2xx, 2 failed or refused; 0 events acknowledged"


class SimulatorProcess:
    """`pvtap simulate enphase ARGS` as a user runs it, its output read as it comes."""

    def __init__(self, server: RecordingServer, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PVTAP_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pvtap", "simulate", "enphase", "--url", f"https://{REPORT_HOST}",
             "--connect", f"127.0.0.1:{server.port}", "--micros", "2", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**env, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []

    def expect(self, text: str) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if text in line:
                return
        raise AssertionError(f"no line with {text!r} in {self.lines}")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=30)
        self.lines += out.splitlines()
        return self.proc.returncode


def test_cli_never_posts_a_report_before_its_time(tmp_path: Path) -> None:
    start = int(time.time()) // PERIOD * PERIOD - 2 * PERIOD
    with RecordingServer(tmp_path) as server:
        sim = SimulatorProcess(server, "--reports", "0", "--every", "0.01", "--start", str(start))
        sim.expect("caught up with the clock: the next report is due at ")
        arrived = time.time()  # every report that was posted had arrived by now
        assert sim.interrupt() == 0
    assert 1 <= len(server.received) <= 2  # the last period ends after now, or within the report delay
    for received in server.received:
        (envoy,) = [r for r in decode_raw(redact_raw(request_raw(received.body), Privacy()))
                    if r.measurement == "enphase_envoy"]
        assert envoy.time.timestamp() <= arrived
        assert all(r.time.timestamp() <= arrived for r in decode_raw(redact_raw(request_raw(received.body),
                                                                                 Privacy())))
    assert sim.lines[-2:] == ["interrupted",
                              f"{len(server.received)} report{'s' if len(server.received) > 1 else ''} posted, "
                              f"{len(server.received)} answered 2xx, 0 failed or refused; 0 events acknowledged"]


def test_cli_does_not_count_the_report_cut_by_ctrl_c_as_failed(tmp_path: Path) -> None:
    with RecordingServer(tmp_path) as server:
        server.hold_after = 2  # the third report waits for an answer
        sim = SimulatorProcess(server, "--reports", "5", "--every", "0.01", "--start", "2024-06-21T10:00Z")
        server.wait_for(3)
        status = sim.interrupt()
    assert status == 0
    assert [line.split(";")[0] for line in sim.lines[1:3]] == ["report 1/5: 200 OK", "report 2/5: 200 OK"]
    assert sim.lines[-2:] == ["interrupted; the report being posted is not counted",
                              "2 reports posted, 2 answered 2xx, 0 failed or refused; 0 events acknowledged"]


def test_cli_help_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "enphase", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--url", "--connect", "--proxy", "--cafile", "--micros", "--intervals", "--reports", "--every"):
        assert option in help_text
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "enphase", "--url", "https://x", "--intervals", "501"])
    assert exit_.value.code == 2
    assert "at most 500 intervals" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "enphase", "--url", "https://x", "--connect", "127.0.0.1"])
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_cli_never_posts_to_the_real_cloud(capsys: pytest.CaptureFixture[str]) -> None:
    for url in (f"https://{REPORT_HOST}", "https://Reports.EnphaseEnergy.com:443/emu_reports/performance_report"):
        assert main(["simulate", "enphase", "--url", url]) == 2
        assert "would post simulated reports to the real Enphase cloud" in capsys.readouterr().err
