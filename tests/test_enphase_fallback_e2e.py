"""`enphase.fallback_after` for real: the Envoy simulator → a real mitmdump with the addon, in its
default (eager) connection strategy → the stand-in cloud, in network namespaces the tests make.

The cloud goes down and up by firewall rules in its namespace: refusing (a TCP reset) or a black
hole (packets dropped). Before the fallback time the Envoy sees the error and nothing is answered
locally; after it the Envoy gets a valid perf_report_response from the addon; once the cloud
answers again reports are forwarded byte for byte. Every report is stored once, every change of
state is one log line and one `enphase_fallback` record.

- reverse mode: up, down (refusing, then black-holing), up, black hole, up (the whole sequence);
- regular mode (the Envoy's CONNECT by name; /etc/netns/<ns>/hosts gives the name an address):
  a cloud already down when the proxy starts, then up;
- transparent mode (device, proxy and cloud namespaces, an iptables REDIRECT): up, refusing, up;
- a cloud that answers 503 is a cloud that answers: for far longer than fallback_after every
  503 reaches the Envoy as the cloud sent it and nothing is answered locally;
- a cloud whose certificate mitmproxy rejects (signed by another CA) is unreachable: the Envoy
  gets mitmproxy's 502 until fallback_after, then the local answer.
"""

from __future__ import annotations

import contextlib
import http.client
import secrets
import shutil
import sqlite3
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from pvtap.certs import self_signed, write_pair
from pvtap.records import Record
from pvtap.simulate.enphase import SimReport, SimResponse, Simulator, encode_body, post_report
from pvtap.simulate.enphase_cloud import EnphaseCloud
from pvtap.store.local import LocalStore
from tests.mitm_support import ADDON, MITMDUMP, Mitmdump, wait_for
from tests.relay_support import in_netns, sh, three_namespaces

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HOST = "reports.enphaseenergy.com"
URL = f"https://{HOST}/emu_reports/performance_report?webcomm_version=3.0"
FALLBACK_AFTER = 3.0  # seconds of unreachable cloud before the addon answers
CLOUD_TIMEOUT = 1.0  # the addon's patience with a connect or a TLS handshake
ENVOY_TIMEOUT = 4.0  # the simulated Envoy's patience: longer than the addon's probe
RETRY = 0.3  # the simulated Envoy's pause before it tries a report again
MAX_TRIES = 60
DAYTIME = 1699956000


@dataclass
class Attempt:
    started: float
    response: SimResponse | None
    error: str = ""
    ended: float = 0.0


class CloudSwitch:
    """Makes the stand-in cloud (TCP 443 in `netns`) refuse or drop connections, or answer again."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.rule: list[str] | None = None

    def _set(self, *target: str) -> None:
        self.up()
        self.rule = ["INPUT", "-p", "tcp", "--dport", "443", "-j", *target]
        sh("iptables", "-A", *self.rule, netns=self.netns)

    def refusing(self) -> None:
        self._set("REJECT", "--reject-with", "tcp-reset")

    def black_hole(self) -> None:
        self._set("DROP")

    def up(self) -> None:
        if self.rule is not None:
            sh("iptables", "-D", *self.rule, netns=self.netns)
            self.rule = None


@dataclass
class EnvoyPath:
    """The Envoy's side (its namespace and how it reaches the proxy), the proxy, the cloud."""

    envoy_ns: str
    post: dict
    proxy: Mitmdump
    cloud: EnphaseCloud
    switch: CloudSwitch
    data_dir: Path

    def attempt(self, report: SimReport) -> Attempt:
        started = time.time()
        try:
            with in_netns(self.envoy_ns):
                response = post_report(URL, encode_body(report.xml), timeout=ENVOY_TIMEOUT, **self.post)
            return Attempt(started, response, ended=time.time())
        except (OSError, http.client.HTTPException) as exc:  # what the Envoy sees as an error
            return Attempt(started, None, f"{type(exc).__name__}: {exc}", ended=time.time())

    def until_answered(self, report: SimReport) -> list[Attempt]:
        """Try the report as the Envoy does: again after each error, until it gets an answer."""
        attempts = []
        for _ in range(MAX_TRIES):
            attempts.append(self.attempt(report))
            if attempts[-1].response is not None:
                return attempts
            time.sleep(RETRY)
        raise AssertionError(f"no answer after {MAX_TRIES} tries: {attempts[-3:]}")

    def forwarded(self, report: SimReport) -> None:
        """While the cloud is up: the report reaches it byte for byte, its answer comes back as it was."""
        seen = len(self.cloud.received())
        attempts = self.until_answered(report)  # the first try after the cloud is back may still fail
        response = attempts[-1].response
        assert response is not None
        exchange = self.cloud.received()[seen]
        assert len(self.cloud.received()) == seen + 1
        assert exchange.body == encode_body(report.xml)
        assert exchange.headers == (("Accept", "*/*"), ("Connection", "close"),
                                    ("Content-Type", "application/x-deflate"),
                                    ("Content-Length", str(len(exchange.body))), ("Host", f"{HOST}:443"))
        assert (response.status, response.headers, response.body) == \
            (exchange.status, exchange.response_headers, exchange.response_body)

    def answered_locally(self, report: SimReport, down) -> list[Attempt]:
        """Take the cloud down (`down`), then try the report until it is answered: by the addon."""
        seen = len(self.cloud.received())
        down()
        attempts = self.until_answered(report)
        *errors, answered = attempts
        assert errors, "the Envoy saw errors first"
        assert all(a.response is None for a in errors)
        response = answered.response
        assert response is not None and response.status == 200
        assert dict(response.headers)["Content-Type"] == "application/x-deflate; charset=utf-8"
        answer = etree.fromstring(zlib.decompress(response.body))
        assert (answer.tag, answer.get("status")) == ("perf_report_response", "success")
        assert [e.get("id") for e in answer.iter("event")] == [str(e.id) for e in report.events]
        assert len(self.cloud.received()) == seen  # it never reached the cloud
        return attempts

    def store(self) -> LocalStore:
        return LocalStore(self.data_dir / "enphase.sqlite", readonly=True)

    def fallback_records(self, count: int) -> list[Record]:
        def ready():
            with self.store() as store:
                found = [s.record for s in store.records(measurements=["enphase_fallback"])]
            return found if len(found) >= count else None
        return wait_for(ready, timeout=30, what=f"{count} enphase_fallback records")


def check_episode(path: EnvoyPath, attempts: list[Attempt], unreachable: Record, fallback: Record) -> None:
    """The fallback came FALLBACK_AFTER after the cloud was found unreachable; the answer after it."""
    assert (unreachable.tags["state"], fallback.tags["state"]) == ("unreachable", "fallback")
    assert (fallback.time - unreachable.time).total_seconds() >= FALLBACK_AFTER
    # the tries before the last had errors (until_answered): the answer came once the fallback began
    assert attempts[-1].ended >= fallback.time.timestamp()
    assert any(a.started < fallback.time.timestamp() for a in attempts[:-1])  # the Envoy saw errors before it


def stored_reports(path: EnvoyPath) -> list[int]:
    """The report_timestamp of every stored report, in order, with the answer each got."""
    with path.store() as store:
        return [int(etree.fromstring(s.raw.payload).get("report_timestamp") or 0)
                for s in store.raw_payloads() if s.raw.kind == "performance_report"]


def local_answers(path: EnvoyPath) -> list[dict]:
    with path.store() as store:
        return [dict(s.raw.meta) for s in store.raw_payloads()
                if s.raw.kind == "performance_report_response" and s.raw.meta.get("answered_locally")]


def wait_stored(path: EnvoyPath, count: int) -> None:
    def ready():
        if not (path.data_dir / "enphase.sqlite").exists():
            return False
        with sqlite3.connect(f"file:{path.data_dir / 'enphase.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM raw").fetchone()[0] >= count
    wait_for(ready, timeout=30, what=f"{count} raw payloads")


@contextlib.contextmanager
def namespace(hosts: str = "") -> Iterator[str]:
    """A network namespace with only `lo` (up); `hosts`: its /etc/hosts (ip netns exec mounts it)."""
    name = f"pvf-{secrets.token_hex(3)}"
    etc = Path("/etc/netns") / name
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "set", "lo", "up", netns=name)
        if hosts:
            etc.mkdir(parents=True)
            (etc / "hosts").write_text(hosts)
        yield name
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        sh("ip", "netns", "del", name, check=False)


def stand_in_cloud(netns: str, host: str, cert_dir: Path) -> EnphaseCloud:
    with in_netns(netns):  # its listening socket lives in the cloud's namespace
        return EnphaseCloud(host, 443, cert_dir=cert_dir).start()


def mitmdump_in(netns: str, workdir: Path, cloud: EnphaseCloud, mode: list[str], trusted_ca: str = "") -> Mitmdump:
    """`trusted_ca`: the CA mitmdump checks the cloud's certificate against (default: the cloud's own)."""
    argv = ["ip", "netns", "exec", netns, str(MITMDUMP), *mode, "-s", str(ADDON),
            "--set", f"confdir={workdir / 'mitmproxy-conf'}",
            "--set", f"ssl_verify_upstream_trusted_ca={trusted_ca or cloud.cafile}",
            "--set", "flow_detail=0", "--set", f"enphase_data_dir={workdir / 'data'}",
            "--set", f"enphase_fallback_after={FALLBACK_AFTER:g}s", "--set", f"enphase_cloud_timeout={CLOUD_TIMEOUT:g}"]
    return Mitmdump(workdir, argv).start()


def state_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "enphase: cloud " in line and
            ("unreachable" in line or "answers again" in line)]


def test_reverse_mode_up_refusing_up_black_hole_up(tmp_path: Path) -> None:
    simulator = Simulator(micros=2, start=DAYTIME, seed=11)
    reports = [simulator.next_report() for _ in range(6)]
    with namespace() as ns:
        cloud = stand_in_cloud(ns, "127.0.0.1", tmp_path / "cloud")
        proxy = mitmdump_in(ns, tmp_path, cloud, ["--mode", "reverse:https://127.0.0.1:443", "--listen-host",
                                                  "127.0.0.1", "--listen-port", "8443", "--set",
                                                  "keep_host_header=true"])
        path = EnvoyPath(ns, {"connect": ("127.0.0.1", 8443)}, proxy, cloud, CloudSwitch(ns), tmp_path / "data")
        try:
            path.forwarded(reports[0])
            refused = path.answered_locally(reports[1], path.switch.refusing)
            assert any("Reset" in a.error or "EOF" in a.error or "closed" in a.error for a in refused[:-1]), refused
            path.switch.black_hole()  # still down, now silent: the addon's try times out, the answer is local
            seen = len(cloud.received())
            silent = path.attempt(reports[2])
            assert silent.response is not None and silent.response.status == 200 and len(cloud.received()) == seen
            path.switch.up()
            path.forwarded(reports[3])
            dropped = path.answered_locally(reports[4], path.switch.black_hole)
            assert any("timed out" in a.error for a in dropped[:-1]), dropped
            path.switch.up()
            path.forwarded(reports[5])
            records = path.fallback_records(6)
            wait_stored(path, 12)
        finally:
            status = proxy.stop()
            cloud.stop()
    assert status == 0, proxy.output()
    states = [r.tags["state"] for r in records]
    assert states == ["unreachable", "fallback", "reachable"] * 2
    check_episode(path, refused, records[0], records[1])
    check_episode(path, dropped, records[3], records[4])
    assert records[0].fields["reason"] == "Connection refused"
    assert records[3].fields["reason"] == f"no answer to the connect within {CLOUD_TIMEOUT:g} s"
    assert [r.fields["answered_locally"] for r in (records[2], records[5])] == [2, 1]
    assert all(r.tags["upstream"] == "127.0.0.1:443" for r in records)
    assert stored_reports(path) == [r.report_timestamp for r in reports]  # each report once
    assert [a["cloud_unreachable"] for a in local_answers(path)] == [
        "Connection refused", f"no answer within {CLOUD_TIMEOUT:g} s", f"no answer within {CLOUD_TIMEOUT:g} s"]
    lines = state_lines(proxy.output())
    assert len(lines) == 6, lines  # one per change of state, not one per report or per try
    assert "connection_strategy=lazy while the cloud is unreachable (was eager)" in proxy.output()
    assert "connection_strategy=eager again" in proxy.output()


def test_regular_mode_cloud_down_from_the_start(tmp_path: Path) -> None:
    simulator = Simulator(micros=1, start=DAYTIME, seed=12)
    reports = [simulator.next_report() for _ in range(2)]
    with namespace(hosts=f"127.0.0.1 localhost\n127.0.0.1 {HOST}\n") as ns:
        cloud = stand_in_cloud(ns, "127.0.0.1", tmp_path / "cloud")
        switch = CloudSwitch(ns)
        switch.refusing()  # gone before the proxy starts: the addon knows the cloud by its name
        proxy = mitmdump_in(ns, tmp_path, cloud, ["--mode", "regular", "--listen-host", "127.0.0.1",
                                                  "--listen-port", "8080"])
        path = EnvoyPath(ns, {"proxy": ("127.0.0.1", 8080)}, proxy, cloud, switch, tmp_path / "data")
        try:
            attempts = path.answered_locally(reports[0], lambda: None)
            assert all("502" in a.error for a in attempts[:-1]), attempts  # mitmproxy's answer to the CONNECT
            switch.up()
            path.forwarded(reports[1])
            records = path.fallback_records(3)
            wait_stored(path, 4)
        finally:
            status = proxy.stop()
            cloud.stop()
    assert status == 0, proxy.output()
    assert [r.tags["state"] for r in records] == ["unreachable", "fallback", "reachable"]
    assert records[0].tags["upstream"] == f"{HOST}:443"
    check_episode(path, attempts, records[0], records[1])
    assert stored_reports(path) == [r.report_timestamp for r in reports]


def test_transparent_mode_redirect_up_refusing_up(tmp_path: Path) -> None:
    simulator = Simulator(micros=2, start=DAYTIME, seed=13)
    reports = [simulator.next_report() for _ in range(3)]
    with three_namespaces() as topo:
        sh("iptables", "-t", "nat", "-A", "PREROUTING", "-i", topo.relay_device_if, "-p", "tcp", "--dport", "443",
           "-j", "REDIRECT", "--to-ports", "8443", netns=topo.relay)
        cloud = stand_in_cloud(topo.cloud, topo.cloud_ip, tmp_path / "cloud")
        proxy = mitmdump_in(topo.relay, tmp_path, cloud, ["--mode", "transparent", "--listen-port", "8443"])
        # the Envoy dials the cloud's own address; the REDIRECT on the proxy's host takes it to mitmdump
        path = EnvoyPath(topo.device, {"connect": (topo.cloud_ip, 443)}, proxy, cloud, CloudSwitch(topo.cloud),
                     tmp_path / "data")
        try:
            path.forwarded(reports[0])
            attempts = path.answered_locally(reports[1], path.switch.refusing)
            path.switch.up()
            path.forwarded(reports[2])
            records = path.fallback_records(3)
            wait_stored(path, 6)
        finally:
            status = proxy.stop()
            cloud.stop()
    assert status == 0, proxy.output()
    assert [r.tags["state"] for r in records] == ["unreachable", "fallback", "reachable"]
    assert records[0].tags["upstream"] == f"{topo.cloud_ip}:443"
    check_episode(path, attempts, records[0], records[1])
    assert stored_reports(path) == [r.report_timestamp for r in reports]


REVERSE = ["--mode", "reverse:https://127.0.0.1:443", "--listen-host", "127.0.0.1", "--listen-port", "8443", "--set",
           "keep_host_header=true"]


def test_a_cloud_answering_503_is_never_answered_for(tmp_path: Path) -> None:
    simulator = Simulator(micros=1, start=DAYTIME, seed=14)
    reports = [simulator.next_report() for _ in range(3)]
    with namespace() as ns:
        cloud = stand_in_cloud(ns, "127.0.0.1", tmp_path / "cloud")
        proxy = mitmdump_in(ns, tmp_path, cloud, REVERSE)
        path = EnvoyPath(ns, {"connect": ("127.0.0.1", 8443)}, proxy, cloud, CloudSwitch(ns), tmp_path / "data")
        try:
            path.forwarded(reports[0])
            seen = len(cloud.received())
            cloud.failing = 503
            failed: list[Attempt] = []
            while not failed or time.time() - failed[0].started <= 2 * FALLBACK_AFTER:  # well past fallback_after
                failed.append(path.attempt(reports[1]))
                time.sleep(RETRY)
            cloud.failing = None
            path.forwarded(reports[1])
            path.forwarded(reports[2])
            wait_stored(path, 2 * (len(failed) + 3))
        finally:
            status = proxy.stop()
            cloud.stop()
    assert status == 0, proxy.output()
    exchanges = cloud.received()[seen:seen + len(failed)]
    assert len(cloud.received()) == seen + len(failed) + 2  # every try reached the cloud
    for attempt, exchange in zip(failed, exchanges, strict=True):
        assert attempt.response is not None, attempt.error
        assert exchange.status == 503 and exchange.body == encode_body(reports[1].xml)
        assert (attempt.response.status, attempt.response.headers, attempt.response.body) == \
            (exchange.status, exchange.response_headers, exchange.response_body)  # unchanged
    assert local_answers(path) == []
    with path.store() as store:
        assert [s.record for s in store.records(measurements=["enphase_fallback"])] == []
        statuses = [s.raw.meta["status_code"] for s in store.raw_payloads()
                    if s.raw.kind == "performance_report_response"]
    assert statuses == [200] + [503] * len(failed) + [200, 200]
    assert state_lines(proxy.output()) == []


def test_a_certificate_the_proxy_rejects_makes_the_cloud_unreachable(tmp_path: Path) -> None:
    simulator = Simulator(micros=1, start=DAYTIME, seed=15)
    report = simulator.next_report()
    other_ca, _key = write_pair(tmp_path / "other-ca", "other", *self_signed(HOST, [HOST, "127.0.0.1"]))
    with namespace() as ns:
        cloud = stand_in_cloud(ns, "127.0.0.1", tmp_path / "cloud")
        proxy = mitmdump_in(ns, tmp_path, cloud, REVERSE, trusted_ca=str(other_ca))
        path = EnvoyPath(ns, {"connect": ("127.0.0.1", 8443)}, proxy, cloud, CloudSwitch(ns), tmp_path / "data")
        try:
            attempts: list[Attempt] = []
            while not attempts or attempts[-1].response is None or attempts[-1].response.status != 200:
                assert len(attempts) < MAX_TRIES, attempts[-3:]
                if attempts:
                    time.sleep(RETRY)
                attempts.append(path.attempt(report))
            records = path.fallback_records(2)
            wait_stored(path, len(attempts) + 1)  # each try's report, and the local answer
        finally:
            status = proxy.stop()
            cloud.stop()
    assert status == 0, proxy.output()
    *errors, answered = attempts
    assert errors and all(a.response is not None and a.response.status == 502 for a in errors), errors
    assert answered.response is not None
    answer = etree.fromstring(zlib.decompress(answered.response.body))
    assert (answer.tag, answer.get("status")) == ("perf_report_response", "success")
    assert cloud.received() == []  # no request ever got through the failed handshakes
    assert [r.tags["state"] for r in records] == ["unreachable", "fallback"]
    assert "Certificate verify failed" in str(records[0].fields["reason"]), records[0].fields
    check_episode(path, attempts, records[0], records[1])
    assert [a["cloud_unreachable"] for a in local_answers(path)] == ["TLS: CERTIFICATE_VERIFY_FAILED"]  # the probe's
    # every try reached the addon (mitmproxy's 502 comes after the request): each is stored, as it was sent
    assert stored_reports(path) == [report.report_timestamp] * len(attempts)
