"""The Enphase path end to end: simulator → real mitmdump with addons/enphase.py → stand-in cloud.

One mitmdump per module (reverse mode in front of the stand-in HTTPS cloud, Host header kept,
upstream certificate verified against the stand-in's own certificate), plus one in local mode.
Every test proves byte-identical forwarding both ways and checks the store the addon writes.
"""

from __future__ import annotations

import hashlib
import http.client
import random
import re
import sqlite3
import ssl
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from pvtap.records import utc_from_unix
from pvtap.simulate.enphase import SimReport, SimResponse, Simulator, encode_body, post_report
from pvtap.simulate.enphase_cloud import EnphaseCloud, Exchange
from pvtap.store.local import LocalStore, StoredRaw
from tests.mitm_support import Mitmdump, wait_for

pytestmark = pytest.mark.slow

HOST = "reports.enphaseenergy.com"
REPORT_PATH = "/emu_reports/performance_report"
DAYTIME = 1699956000  # 2023-11-14 10:00 UTC: the simulated micros produce
ENVOY = "999900000000"  # the simulator's placeholder serial
ENVOY_NETWORK = (b"192.0.2.10", b"00:00:5e:00:53:01")  # the simulator's placeholder IP and MAC


@dataclass
class ProxyPath:
    cloud: EnphaseCloud
    proxy: Mitmdump
    data_dir: Path

    def post(self, body: bytes, target: str = REPORT_PATH + "?webcomm_version=3.0") -> SimResponse:
        """POST as the Envoy does, through mitmdump, verifying mitmdump's certificate."""
        return post_report(f"https://{HOST}{target}", body, connect=("127.0.0.1", self.proxy.port),
                           cafile=str(self.proxy.ca_cert))

    def store(self) -> LocalStore:
        return LocalStore(self.data_dir / "enphase.sqlite", readonly=True)

    def marks(self) -> tuple[int, int, int]:
        """(exchanges seen by the cloud, last raw id, last record id): what a test's new data follows."""
        if not (self.data_dir / "enphase.sqlite").exists():
            return len(self.cloud.received()), 0, 0
        with self.store() as store:
            try:
                last = next(store.records(newest_first=True, limit=1), None)
                newest_raw = max([r.id for r in store.raw_payloads()], default=0)
            except sqlite3.OperationalError:  # the addon created the file but not its tables yet
                return len(self.cloud.received()), 0, 0
            return len(self.cloud.received()), newest_raw, last.id if last else 0

    def new_raws(self, after: int, count: int, *, decoded: bool = True) -> list[StoredRaw]:
        """Wait for `count` raw payloads after id `after`, each decoded (records or an error)."""
        def ready():
            with self.store() as store:
                raws = list(store.raw_payloads(after_id=after))
                if len(raws) < count:
                    return None
                if decoded and not all(r.decode_error or _records_of(store, r.id) for r in raws):
                    return None
                return raws
        return wait_for(ready, timeout=30, what=f"{count} raw payloads in the store")


def _records_of(store: LocalStore, raw_id: int) -> int:
    with sqlite3.connect(f"file:{store.path}?mode=ro", uri=True) as db:
        return db.execute("SELECT COUNT(*) FROM records WHERE raw_id=?", (raw_id,)).fetchone()[0]


def _count_records(store_path: Path) -> int:
    with LocalStore(store_path, readonly=True) as store:
        return store.count_records()


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("enphase-e2e")
    with EnphaseCloud(cert_dir=workdir / "cloud") as cloud, \
            Mitmdump.reverse(workdir, cloud, data_dir=workdir / "data") as proxy:
        yield ProxyPath(cloud, proxy, workdir / "data")
        assert proxy.running, f"mitmdump died during the tests:\n{proxy.output()}"


def _assert_forwarded_unchanged(exchange: Exchange, body: bytes, target: str, response: SimResponse) -> None:
    assert exchange.method == "POST"
    assert exchange.target == target
    assert exchange.body == body
    assert exchange.headers == (  # exactly what the simulator sends, as the Envoy does, in order
        ("Accept", "*/*"), ("Connection", "close"), ("Content-Type", "application/x-deflate"),
        ("Content-Length", str(len(body))), ("Host", f"{HOST}:443"))
    assert (response.status, response.headers, response.body) == \
        (exchange.status, exchange.response_headers, exchange.response_body)


def _expected_counts(reports: list[SimReport]) -> dict[str, int]:
    counts = {
        "enphase_envoy": len(reports),
        "enphase_interval": sum(len(r.intervals) for r in reports),
        "enphase_reading": sum(len(r.readings) for r in reports),
        "enphase_event": sum(len(r.events) for r in reports),
        "enphase_device": sum(len(r.devices) for r in reports),
        "enphase_channel": sum(len(r.devices) for r in reports),
        "enphase_report_response": len(reports),
    }
    return {m: n for m, n in counts.items() if n}


def test_reports_pass_byte_identical_and_are_stored_decoded(path: ProxyPath) -> None:
    seen, raw_mark, record_mark = path.marks()
    simulator = Simulator(micros=4, start=DAYTIME, seed=7)
    posts = [
        (simulator.next_report(), REPORT_PATH + "?webcomm_version=3.0"),
        (simulator.next_report(), REPORT_PATH + "?webcomm_version=42.0.0-never-seen&site=placeholder"),
        (simulator.next_report(intervals=500), REPORT_PATH + "?webcomm_version=4.6.0"),  # a catch-up
    ]
    for i, (report, target) in enumerate(posts):
        body = encode_body(report.xml)
        response = path.post(body, target)
        assert response.status == 200
        exchange = path.cloud.received()[seen + i]
        _assert_forwarded_unchanged(exchange, body, target, response)
        assert list(exchange.acknowledged) == [str(e.id) for e in report.events]

    raws = path.new_raws(raw_mark, 2 * len(posts))
    assert [(r.raw.kind, r.raw.origin.direction) for r in raws] == \
        [("performance_report", "up"), ("performance_report_response", "down")] * len(posts)
    assert all(r.decode_error is None for r in raws)
    for (report, target), up, down in zip(posts, raws[0::2], raws[1::2]):
        assert up.raw.origin.connection == down.raw.origin.connection  # one flow
        assert (up.raw.meta["path"], f"?{up.raw.meta['query']}") == (REPORT_PATH, target[len(REPORT_PATH):])
        assert up.raw.meta["original_size"] == len(encode_body(report.xml))
        assert up.raw.origin.device == ENVOY
        for identity in ENVOY_NETWORK:  # redacted before the store
            assert identity not in up.raw.payload
        stored_xml = etree.fromstring(up.raw.payload)
        assert len(stored_xml.findall("interval")) == len(report.intervals)
        assert down.raw.meta["status_code"] == 200

    with path.store() as store:
        records = [s.record for s in store.records(after_id=record_mark)]
    counts: dict[str, int] = {}
    for record in records:
        counts[record.measurement] = counts.get(record.measurement, 0) + 1
    reports = [r for r, _ in posts]
    assert counts == _expected_counts(reports)
    catch_up = reports[2]
    assert len(catch_up.intervals) == 500

    def one(measurement: str, record_id: int):
        (found,) = [r for r in records if r.measurement == measurement and r.fields["id"] == record_id]
        return found

    for interval in (catch_up.intervals[0], catch_up.intervals[-1]):
        record = one("enphase_interval", interval.id)
        assert record.time == utc_from_unix(interval.end_date)
        assert record.tags == {"envoy": ENVOY, "eqid": interval.eqid}
        assert record.fields["energy_j"] == interval.joules
        assert record.fields["interval_duration_s"] == 300
        assert record.fields["avg_power_w"] == interval.joules / 300
    reading = catch_up.readings[123]
    record = one("enphase_reading", reading.id)
    assert record.time == utc_from_unix(reading.date)
    assert record.fields["ac_voltage_v"] == reading.ac_mv / 1000
    assert record.fields["ac_frequency_hz"] == reading.ac_mhz / 1000
    assert record.fields["dc_current_a"] == reading.dc_ma / 1000
    assert record.fields["temperature_c"] == float(reading.temperature_c)
    assert record.fields["energy_j"] == reading.joules
    first_event = reports[0].events[0]
    record = one("enphase_event", first_event.id)
    assert (record.fields["event_code"], record.tags["eqid"]) == (first_event.code, first_event.eqid)
    responses = [r for r in records if r.measurement == "enphase_report_response"]
    assert [r.fields["events_acknowledged"] for r in responses] == [len(r.events) for r in reports]
    assert all(r.fields["status"] == "success" and r.fields["http_status"] == 200 for r in responses)


def _billion_laughs() -> bytes:
    entities = ['<!ENTITY lol0 "lol">'] + [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    return (f'<?xml version="1.0"?><!DOCTYPE perf_report [{"".join(entities)}]>'
            '<perf_report report_timestamp="1700000000"><envoy part_num="&lol9;"/></perf_report>').encode()


TRUNCATED_XML = (b'<?xml version="1.0" encoding="UTF-8"?><perf_report report_timestamp="1700000000">'
                 b'<interval interval_duration="300" stat_duration="295" end_date="1700000100" stats="600')
GOOD = encode_body(Simulator(micros=1, start=DAYTIME).next_report().xml)
CORRUPT = GOOD[:20] + bytes(b ^ 0x5A for b in GOOD[20:40]) + GOOD[40:]

# name: (body as posted, the decode error says); the store keeps none of it (not positively
# redacted): its size and SHA-256 only
BAD_INPUT = {
    "corrupt zlib": (CORRUPT, "neither zlib nor raw deflate"),
    "truncated XML": (encode_body(TRUNCATED_XML), "does not parse"),
    "billion laughs": (encode_body(_billion_laughs()), "DOCTYPE"),
    "50 MB body": (random.Random(50).randbytes(50 * 2**20), "neither zlib nor raw deflate"),
    "empty body": (b"", "empty"),
}


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_forwarded_unchanged_and_kept_as_size_and_hash(path: ProxyPath, name: str) -> None:
    body, error = BAD_INPUT[name]
    seen, raw_mark, record_mark = path.marks()
    target = REPORT_PATH + "?webcomm_version=3.0"
    response = path.post(body, target)
    exchange = path.cloud.received()[seen]
    _assert_forwarded_unchanged(exchange, body, target, response)
    assert response.status == 400  # the stand-in refuses what it cannot read; the proxy passed that on

    up, down = path.new_raws(raw_mark, 2)
    assert up.raw.kind == "performance_report" and up.raw.meta["original_size"] == len(body)
    assert up.raw.payload == b"" and up.raw.meta["withheld_sha256"] == hashlib.sha256(body).hexdigest()
    assert error in (up.decode_error or ""), "the decode error is recorded with the raw payload"
    assert down.raw.payload == b"" and down.raw.meta["withheld_size"] == len(exchange.response_body)
    assert down.decode_error
    with path.store() as store:
        assert list(store.records(after_id=record_mark)) == []

    assert path.proxy.running  # still up: a good report goes through as before
    assert path.post(GOOD).status == 200
    assert path.cloud.received()[seen + 1].body == GOOD
    path.new_raws(raw_mark, 4)  # settled before the next test takes its marks


@pytest.mark.parametrize("target, kind, status", [
    ("/emu_reports/task_complete?task_id=placeholder-1", "task_complete", 200),
    ("/emu_reports/some_new_report?v=1", "emu_report", 404),
])
def test_other_emu_reports_are_forwarded_and_stored_raw(path: ProxyPath, target: str, kind: str, status: int) -> None:
    seen, raw_mark, record_mark = path.marks()
    body = b"task_id=placeholder-1&status=done"
    response = path.post(body, target)
    assert response.status == status
    _assert_forwarded_unchanged(path.cloud.received()[seen], body, target, response)
    up, down = path.new_raws(raw_mark, 2, decoded=False)
    assert (up.raw.kind, up.raw.payload, up.raw.meta["query"]) == (kind, b"", target.partition("?")[2])
    assert up.raw.meta["withheld_sha256"] == hashlib.sha256(body).hexdigest()  # undocumented: not kept
    assert (down.raw.kind, down.raw.meta["status_code"]) == (f"{kind}_response", status)
    with path.store() as store:
        assert list(store.records(after_id=record_mark)) == []


def test_traffic_outside_emu_reports_is_forwarded_and_not_stored(path: ProxyPath) -> None:
    seen, raw_mark, _ = path.marks()
    response = path.post(b"hello", "/api/v1/something")
    assert response.status == 404
    _assert_forwarded_unchanged(path.cloud.received()[seen], b"hello", "/api/v1/something", response)
    assert path.post(GOOD).status == 200  # a report after it is stored; nothing in between
    up, _down = path.new_raws(raw_mark, 2)
    assert up.raw.meta["original_size"] == len(GOOD)


def test_local_mode_answers_without_contacting_the_cloud(tmp_path: Path) -> None:
    simulator = Simulator(micros=3, start=DAYTIME, seed=3)
    reports = [simulator.next_report(), simulator.next_report(intervals=60)]
    with EnphaseCloud(cert_dir=tmp_path / "cloud") as cloud:
        proxy = Mitmdump.reverse(tmp_path, cloud, data_dir=tmp_path / "data", local_mode=True).start()
        local = ProxyPath(cloud, proxy, tmp_path / "data")
        try:
            for report in reports:
                body = encode_body(report.xml)
                response = local.post(body)
                assert response.status == 200
                assert dict(response.headers)["Content-Type"] == "application/x-deflate; charset=utf-8"
                answer = etree.fromstring(zlib.decompress(response.body))
                assert (answer.tag, answer.get("status")) == ("perf_report_response", "success")
                assert [e.get("id") for e in answer.iter("event")] == [str(e.id) for e in report.events]
            task = local.post(b"task_id=placeholder-1", "/emu_reports/task_complete?task_id=placeholder-1")
            assert (task.status, task.body) == (200, b"")
            raws = local.new_raws(0, 6, decoded=False)
            expected = sum(_expected_counts(reports).values())
            wait_for(lambda: _count_records(local.data_dir / "enphase.sqlite") >= expected,
                     what="the local-mode records")
        finally:
            status = proxy.stop()
        assert cloud.connections == 0 and cloud.received() == []  # the cloud was never contacted
    assert status == 0
    assert [r.raw.kind for r in raws] == ["performance_report", "performance_report_response"] * 2 + \
        ["task_complete", "task_complete_response"]
    assert all(r.raw.meta.get("answered_locally") for r in raws[1::2])
    with local.store() as store:
        counts: dict[str, int] = {}
        for stored in store.records():
            counts[stored.record.measurement] = counts.get(stored.record.measurement, 0) + 1
    assert counts == _expected_counts(reports)
    assert "LOCAL MODE" in proxy.output()
    assert "6 payloads handed to the ingest worker" in proxy.output()  # the addon's closing line
    # the worker's, once it archived them: it ends by itself after mitmdump (no hook waits for it)
    wait_for(lambda: f"6 payloads archived, {expected} records, 0 decode errors, 0 dropped" in proxy.output(),
             what="the ingest worker's closing line")


def test_the_stand_in_cloud_runs_on_its_own(tmp_path: Path) -> None:
    """`python -m pvtap.simulate.enphase_cloud`, as the bench runs it: real TLS with its own
    certificate, the perf_report_response for a report, 405 for anything but POST, and a clean
    stop on SIGTERM with its counts."""
    proc = subprocess.Popen([sys.executable, "-m", "pvtap.simulate.enphase_cloud", "--cert-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        url = re.search(r"listening on (https://127\.0\.0\.1:\d+) \(certificate (\S+)\)", line)
        assert url, line
        report = Simulator(micros=2, start=DAYTIME).next_report()
        response = post_report(url.group(1) + REPORT_PATH, encode_body(report.xml), cafile=url.group(2))
        assert response.status == 200
        assert etree.fromstring(zlib.decompress(response.body)).findall("events_processed/event")[0].get("id") == "1"
        host, port = url.group(1).removeprefix("https://").split(":")
        context = ssl.create_default_context(cafile=url.group(2))
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
        conn.request("GET", REPORT_PATH)
        assert conn.getresponse().status == 405
        conn.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "2 requests on 2 connections" in out
