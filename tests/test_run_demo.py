"""`pvtap run` and `pvtap demo` as a user runs them: real subprocesses, real mitmdump, signals."""

from __future__ import annotations

import asyncio
import http.client
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from pvtap.cli import main
from pvtap.cli.run import SetupError, find_mitmdump
from pvtap.simulate.alphaess import run_simulator
from pvtap.simulate.enphase import Simulator, encode_body, post_report
from pvtap.simulate.enphase_cloud import EnphaseCloud
from pvtap.store.local import LocalStore
from tests.conftest import HEALTH_ENV, REPO
from tests.mitm_support import wait_for

MITMDUMP = str(Path(sys.executable).parent / "mitmdump")
ADDON = str(REPO / "addons" / "enphase.py")


class Pvtap:
    """`python -m pvtap ARGS` with its output read line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PVTAP_") or k in HEALTH_ENV}
        self.proc = subprocess.Popen([sys.executable, "-m", "pvtap", *args], cwd=cwd, text=True,
                                     env={**full_env, "PYTHONUNBUFFERED": "1", **env}, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None  # a pipe
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first line (from here on) matching `pattern`; fails after `timeout` seconds."""
        return self.expect_each(pattern, timeout=timeout)[0]

    def expect_each(self, *patterns: str, timeout: float = 30.0) -> list[re.Match[str]]:
        """A line matching each of `patterns`, in whatever order they come: lines of different
        processes (the Envoy's, mitmproxy's, the records') interleave as they please."""
        deadline = time.monotonic() + timeout
        found: dict[str, re.Match[str]] = {}
        while len(found) < len(patterns):
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                missing = [p for p in patterns if p not in found]
                raise AssertionError(f"no line matching {missing!r}; output so far:\n" + "\n".join(self.lines))
            self.lines.append(line)
            for pattern in patterns:
                if pattern not in found and (match := re.search(pattern, line)):
                    found[pattern] = match
                    break
        return [found[p] for p in patterns]

    def stop(self, signum: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Send `signum`, wait for the exit status, and collect the rest of the output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        status = self.proc.wait(timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return status

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def _pid_alive(pid: int) -> bool:
    """Running (a zombie is not: an orphan's exit status waits for an init that may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# -- pvtap run: the command lines --------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, ["--mode", "transparent", "--listen-host", "0.0.0.0", "--listen-port", "8443", "-s", ADDON,
          "--set", "confdir={data}/mitmproxy", "--set", "enphase_data_dir={data}",
          "--set", "termlog_verbosity=info"]),
    ({"PVTAP_ENPHASE_MODE": "reverse", "PVTAP_ENPHASE_LISTEN": "127.0.0.1:9443"},
     ["--mode", "reverse:https://reports.enphaseenergy.com:443", "--listen-host", "127.0.0.1", "--listen-port", "9443",
      "-s", ADDON, "--set", "confdir={data}/mitmproxy", "--set", "enphase_data_dir={data}",
      "--set", "termlog_verbosity=info",
      "--set", "keep_host_header=true"]),
    ({"PVTAP_ENPHASE_LOCAL_MODE": "true", "PVTAP_LOG_LEVEL": "warning"},
     ["--mode", "transparent", "--listen-host", "0.0.0.0", "--listen-port", "8443", "-s", ADDON,
      "--set", "confdir={data}/mitmproxy", "--set", "enphase_data_dir={data}", "--set", "termlog_verbosity=warn",
      "--set", "enphase_local_mode=true", "--set", "connection_strategy=lazy"]),
])
def test_run_dry_run_prints_the_mitmdump_command(monkeypatch, capsys, data_dir: Path, env: dict,
                                                 expected: list) -> None:
    for key in [k for k in os.environ if k.startswith("PVTAP_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["--data-dir", str(data_dir), "run", "--dry-run",
                 "--mitmproxy-set", "tls_version_client_min=TLS1"]) == 0
    mitmproxy, relay, web = capsys.readouterr().out.strip().split("\n")
    assert relay == f"relay: {sys.executable} -m proxy_tcp --data-dir {data_dir.resolve()}"
    assert web == f"web: {sys.executable} -m pvtap --data-dir {data_dir.resolve()} web"
    argv = mitmproxy.removeprefix("mitmproxy: ").split(" ")
    assert argv == [MITMDUMP, *(a.format(data=data_dir) for a in expected), "--set", "tls_version_client_min=TLS1"]


def test_run_says_clearly_when_mitmdump_is_not_installed(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python3"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SetupError, match=r"mitmdump .* is not installed"):
        find_mitmdump()
    assert main(["--data-dir", str(tmp_path / "data"), "run"]) == 2
    err = capsys.readouterr().err
    assert "not installed" in err and "pip install mitmproxy" in err


def test_run_refuses_a_bad_mode_naming_the_key(monkeypatch, capsys) -> None:
    monkeypatch.setenv("PVTAP_ENPHASE_MODE", "socks")
    assert main(["run", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "enphase.mode = 'socks'" in err and "PVTAP_ENPHASE_MODE" in err and "transparent, reverse, regular" in err


# -- pvtap run: the real thing -----------------------------------------------------------------

def _worker_stopped(path: Path) -> bool:
    with LocalStore(path, readonly=True) as store:
        status = store.status()
        return status is not None and not status.running


def _relay_config(tmp_path: Path) -> Path:
    """A relay listener on a free loopback port answering locally: the default listeners would
    take the devices' real ports and look up the vendors' real host names."""
    path = tmp_path / "pvtap.toml"
    path.write_text('[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "127.0.0.1:0"\npolicy = "local"\n')
    return path


def _run(tmp_path: Path, env: dict[str, str], *extra: str) -> Pvtap:
    """`pvtap run` with its web view on a free port (tests run side by side)."""
    return Pvtap(["--config", str(_relay_config(tmp_path)), "--data-dir", str(tmp_path / "data"), "run",
                  "--mitmproxy-set", f"confdir={tmp_path / 'conf'}", *extra],
                 {"PVTAP_WEB_LISTEN": "127.0.0.1:0", **env}, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_forwards_and_stores_and_stops_cleanly_on_a_signal(tmp_path: Path, signum: int) -> None:
    data = tmp_path / "data"
    report = Simulator(micros=2, start=1699956000).next_report()
    body = encode_body(report.xml)
    with EnphaseCloud(cert_dir=tmp_path / "cloud") as cloud:
        run = _run(tmp_path, {"PVTAP_ENPHASE_MODE": "reverse", "PVTAP_ENPHASE_UPSTREAM": cloud.url,
                              "PVTAP_ENPHASE_LISTEN": "127.0.0.1:0"},
                   "--mitmproxy-set", f"ssl_verify_upstream_trusted_ca={cloud.cafile}")
        up = run.expect(r"mitmproxy is up on 127\.0\.0\.1:(\d+) \(pid (\d+)\)")
        port, mitmdump_pid = int(up.group(1)), int(up.group(2))
        relay_port = int(run.expect(r"relay listening: alphaess on 127\.0\.0\.1:(\d+) \(local").group(1))
        relay_pid = int(run.expect(r"relay is up \(pid (\d+)\)").group(1))
        run.expect(r"pvtap tail --follow")
        response = post_report("https://reports.enphaseenergy.com/emu_reports/performance_report?webcomm_version=3.0",
                               body, connect=("127.0.0.1", port))
        assert response.status == 200 and cloud.received()[0].body == body
        run.expect(r"enphase: performance_report from peer#1 .* forwarded, 200")  # no LAN address logged
        battery = asyncio.run(run_simulator("127.0.0.1", relay_port, interval=0.05, count=3))
        assert battery.counts["1-1-16"] == 3 and battery.unanswered == 0  # the relay answered as the cloud
        run.expect(r"alphaess .* local")  # the relay's connection line
        assert run.stop(signum) == 0
    assert not _pid_alive(mitmdump_pid) and not _pid_alive(relay_pid)
    assert "enphase: 2 payloads handed to the ingest worker" in run.output  # the addon's done hook ran
    assert run.lines[-1] == "pvtap run: stopped"
    # mitmdump's ingest worker ends by itself once it archived the last payloads (no hook waits)
    wait_for(lambda: _worker_stopped(data / "enphase.sqlite"), what="the enphase ingest worker to stop")
    with LocalStore(data / "enphase.sqlite", readonly=True) as store:
        assert store.count_raw() == 2
        assert store.count_records(measurements=["enphase_interval"]) == len(report.intervals)
    with LocalStore(data / "relay.sqlite", readonly=True) as store:
        assert store.count_records(measurements=["alphaess_realtime"]) == 3


@pytest.mark.slow
def test_run_in_transparent_mode_starts_and_stops(tmp_path: Path) -> None:
    run = _run(tmp_path, {"PVTAP_ENPHASE_LISTEN": "127.0.0.1:0"})
    port = int(run.expect(r"mitmproxy is up on 127\.0\.0\.1:(\d+)").group(1))
    run.expect(rf"iptables -t nat -A PREROUTING -s 192\.0\.2\.10 -p tcp --dport 443 -j REDIRECT --to-port {port}$")
    run.expect(r"pvtap tail --follow")
    # a connection straight to the listener, not REDIRECTed: mitmproxy cannot learn where it was going
    with socket.create_connection(("127.0.0.1", port)) as direct:
        direct.sendall(b"\x16\x03\x01\x00\x05hello")  # the start of a ClientHello
        line = run.expect(r"was not redirected").string
    # its address only with privacy.store_network_identity: a name otherwise (pvtap/peers.py)
    assert line.split("] ", 1)[1] == (
        "enphase: connection from peer#1 was not redirected here by a firewall rule on this host, so its destination "
        "is unknown (FileNotFoundError: No such file or directory); closed it. Fix: REDIRECT the Envoy's port 443 "
        "to this listener on this host (docs/enphase.md, firewall/README.md); if a DNS override or a DNAT on the "
        'router sends it here, set enphase.mode = "reverse"')
    assert run.stop(signal.SIGINT) == 0
    assert "Transparent Proxy listening at 127.0.0.1" in run.output
    assert "Transparent mode failure" not in run.output


@pytest.mark.slow
def test_run_exits_non_zero_when_a_service_dies(tmp_path: Path) -> None:
    run = _run(tmp_path, {"PVTAP_ENPHASE_LISTEN": "127.0.0.1:0"})
    pid = int(run.expect(r"mitmproxy is up on .* \(pid (\d+)\)").group(1))
    os.kill(pid, signal.SIGKILL)
    run.expect(r"mitmproxy exited with status -9; stopping the others")
    assert run.proc.wait(30) == 1


@pytest.mark.slow
def test_sigkill_of_run_leaves_no_orphaned_mitmdump_or_relay(tmp_path: Path) -> None:
    run = _run(tmp_path, {"PVTAP_ENPHASE_LISTEN": "127.0.0.1:0"})
    mitmdump_pid = int(run.expect(r"mitmproxy is up on .* \(pid (\d+)\)").group(1))
    relay_pid = int(run.expect(r"relay is up \(pid (\d+)\)").group(1))
    assert "mitmdump" in Path(f"/proc/{mitmdump_pid}/cmdline").read_text()  # the service itself, not a wrapper
    assert "proxy_tcp" in Path(f"/proc/{relay_pid}/cmdline").read_text()
    assert run.stop(signal.SIGKILL) == -signal.SIGKILL  # no handler of pvtap's can run
    # the services stop cleanly on their SIGTERM
    wait_for(lambda: not _pid_alive(mitmdump_pid), 30, what="mitmdump to end after pvtap run was killed")
    wait_for(lambda: not _pid_alive(relay_pid), 30, what="the relay to end after pvtap run was killed")


@pytest.mark.slow
def test_run_names_the_pvtap_setting_when_mitmproxy_cannot_listen(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = _run(tmp_path, {"PVTAP_ENPHASE_LISTEN": f"127.0.0.1:{port}"})
        assert run.proc.wait(60) == 2
        run.stop()
    assert run.lines[-1] == (
        f"pvtap run: config error: enphase.listen = '127.0.0.1:{port}' (from PVTAP_ENPHASE_LISTEN): mitmproxy cannot "
        "listen there (address already in use). Fix: stop what listens there, or set enphase.listen "
        "(PVTAP_ENPHASE_LISTEN) to a free port")
    assert "--mode" not in run.output.replace(run.lines[1], "")  # mitmproxy's own hint is not passed on
    assert "relay" not in run.output.replace(run.lines[1], "")  # nothing after it was started


@pytest.mark.slow
def test_run_passes_on_the_relays_config_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(f'[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "127.0.0.1:{port}"\n'
                          'policy = "local"\n')
        run = Pvtap(["--config", str(config), "--data-dir", str(tmp_path / "data"), "run",
                     "--mitmproxy-set", f"confdir={tmp_path / 'conf'}"], {"PVTAP_ENPHASE_LISTEN": "127.0.0.1:0"},
                    tmp_path)
        assert run.proc.wait(60) == 2
        run.stop()
    assert run.lines[-1] == (
        f"pvtap run: config error: relay.listeners[0].listen = '127.0.0.1:{port}': cannot listen there: error while "
        f"attempting to bind on address ('127.0.0.1', {port}): address already in use. Fix: use a free port on an "
        "address of this host")


# -- pvtap demo --------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_shows_records_within_seconds_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    started = time.monotonic()
    demo = Pvtap(["--data-dir", str(tmp_path / "data"), "demo", "--every", "0.5"], {"PVTAP_WEB_LISTEN": "127.0.0.1:0"},
                 tmp_path)
    demo.expect(rf"records go to {re.escape(str(tmp_path / 'data' / 'demo'))} ")
    mitm_line = demo.expect(r"demo \| Enphase Envoy: mitmproxy with addons/enphase\.py on .* \(pid (\d+)\)")
    mitmdump_pid = int(mitm_line.group(1))
    demo.expect_each(r"mitmproxy \| .*enphase: performance_report from peer#1 .* forwarded, 200",
                     r"envoy \| report 1: 200 OK",
                     r"record \| \S+Z  enphase_interval  envoy=999900000000,eqid=999900000001\.1  id=1000001 ")
    assert time.monotonic() - started < 20
    demo.expect(r"envoy \| report 3: 200 OK")  # it keeps posting
    # the relay devices, each through one relay in front of its stand-in cloud
    # (seven more processes start one after another: generous timeouts on a loaded machine)
    demo.expect(r"record \| \S+Z  alphaess_realtime  serial=ALSIM0000000001 ", timeout=90)
    demo.expect(r"record \| \S+Z  foxess_telemetry  layout=m1,serial=60MSIMULATED001  ac_power_w=", timeout=90)
    demo.expect(r"record \| \S+Z  foxess_h1_realtime  serial=H1SIMULATED0001  pv1_voltage_v=", timeout=90)
    # the T-series, last: its bridge's first frame goes out as it connects (no serial: no serial tag)
    demo.expect(r"record \| \S+Z  foxess_t_realtime  payload_version=0  grid_power_w=", timeout=90)
    assert demo.stop(signal.SIGINT) == 0
    stopped_at = time.time()
    stopped = re.search(r"stopped; (\d+) records shown", demo.lines[-1])
    assert stopped
    shown = int(stopped.group(1))
    summary = [line for line in demo.lines if "reports posted" in line]
    assert len(summary) == 1 and re.search(r"envoy \| (\d+) reports posted, \1 answered 2xx, 0 failed", summary[0])
    with LocalStore(tmp_path / "data" / "demo" / "enphase.sqlite", readonly=True) as enphase, \
            LocalStore(tmp_path / "data" / "demo" / "relay.sqlite", readonly=True) as relay:
        assert enphase.count_records() + relay.count_records() == shown  # every stored record was shown, none twice
        assert enphase.count_records(measurements=["enphase_interval"]) >= 6
        # the simulated Envoy never runs ahead of the clock: `tail` shows the newest records last
        assert all(s.record.time.timestamp() <= stopped_at for s in enphase.records())
        assert relay.count_records(measurements=["alphaess_realtime"]) >= 1
        assert {d.device for d in relay.devices()} == {"ALSIM0000000001", "60MSIMULATED001", "H1SIMULATED0001", ""}
        t_records = [s.record for s in relay.records(measurements=["foxess_t_realtime"])]
    # each T-series record holds the values the bridge logged for its frame, and the bridge's
    # closing count is the number of records (it stops before the relay, which stores all it got)
    sent = [line for line in demo.lines if " t-series | " in line and "realtime frames sent" in line]
    assert len(sent) == 1 and (count := re.search(r"foxess-t: (\d+) realtime frames sent to 127\.0\.0\.1:", sent[0]))
    assert len(t_records) == int(count.group(1)) >= 1
    built = [m for line in demo.lines if (m := re.search(
        r" t-series \| .*realtime (\d+): generation (-?\d+) W, grid (-?\d+) W, load (-?\d+) W, "
        r"PV1 ([\d.]+) V ([\d.]+) A, total yield ([\d.]+) kWh$", line))]
    assert [int(m.group(1)) for m in built] == list(range(1, len(t_records) + 1))
    assert [(r.fields["generation_power_w"], r.fields["grid_power_w"], r.fields["load_power_w"],
             f"{r.fields['pv1_voltage_v']:.1f}", f"{r.fields['pv1_current_a']:.1f}",
             f"{r.fields['total_yield_kwh']:.1f}", dict(r.tags)) for r in t_records] == [
        (int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5), m.group(6), m.group(7),
         {"payload_version": "0"}) for m in built]
    assert not (tmp_path / "data" / "enphase.sqlite").exists()  # the real store is not touched
    assert not _pid_alive(mitmdump_pid)


def test_the_demo_relay_config_keeps_the_users_settings_and_holds_the_demo_listeners(tmp_path: Path) -> None:
    from pvtap.cli.demo import relay_config
    from pvtap.config import load_config

    user = tmp_path / "user.toml"
    user.write_text('log_level = "debug"\n[privacy]\npseudonymize_serials = true\n[enphase]\nhosts = ["a", "b"]\n'
                    '[influx]\nurl = "http://127.0.0.1:8086"\norg = "-"\ntimeout_s = 2.5\n'
                    '[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "0.0.0.0:7777"\npolicy = "local"\n')
    config = load_config(user, env={})
    listeners: list[dict[str, object]] = [
        {"protocol": "alphaess", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1"},
        {"protocol": "foxess", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:2", "upstream_tls": True,
         "upstream_pin_sha256": "ab" * 32}]
    path = tmp_path / "relay.toml"
    path.write_text(relay_config(config, listeners))
    demo = load_config(path, env={})
    assert (demo.log_level, demo.privacy, demo.enphase, demo.influx) == (
        config.log_level, config.privacy, config.enphase, config.influx)
    assert [(x.protocol, x.listen, x.upstream, x.upstream_tls) for x in demo.relay.listeners] == [
        ("alphaess", "127.0.0.1:0", "127.0.0.1:1", False), ("foxess", "127.0.0.1:0", "127.0.0.1:2", True)]


def _post_with_tls_1_0(port: int, body: bytes) -> int:
    """POST a report as a 2012-era Envoy might: TLS 1.0 only, one plain-RSA CBC suite (what an
    OpenSSL 0.9.8 client offers), no certificate check. Returns the HTTP status."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():  # Python deprecates TLS 1.0; the test needs it on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("@SECLEVEL=0:AES128-SHA")
    conn = http.client.HTTPSConnection("reports.enphaseenergy.com", 443, context=context, timeout=30)
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                               server_hostname="reports.enphaseenergy.com")
    assert sock.version() == "TLSv1" and (sock.cipher() or ("",))[0] == "AES128-SHA"
    conn.sock = sock
    try:
        conn.request("POST", "/emu_reports/performance_report?webcomm_version=3.0", body,
                     {"Content-Type": "application/x-deflate", "Host": "reports.enphaseenergy.com:443"})
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("tls_min_version, accepted", [(None, False), ("TLS1", True)])
def test_an_old_tls_envoy_gets_through_with_the_documented_setting(tmp_path: Path, tls_min_version: str | None,
                                                                   accepted: bool) -> None:
    """README and docs/enphase.md: `enphase.tls_min_version = "TLS1"` (PVTAP_ENPHASE_TLS_MIN_VERSION), and
    nothing else: mitmproxy then adds @SECLEVEL=0 and the old suites to its own cipher list."""
    body = encode_body(Simulator(micros=1, start=1699956000).next_report().xml)
    env = {"PVTAP_ENPHASE_MODE": "reverse", "PVTAP_ENPHASE_LISTEN": "127.0.0.1:0"}
    if tls_min_version:
        env["PVTAP_ENPHASE_TLS_MIN_VERSION"] = tls_min_version
    with EnphaseCloud(cert_dir=tmp_path / "cloud") as cloud:
        run = _run(tmp_path, {**env, "PVTAP_ENPHASE_UPSTREAM": cloud.url},
                   "--mitmproxy-set", f"ssl_verify_upstream_trusted_ca={cloud.cafile}")
        port = int(run.expect(r"mitmproxy is up on 127\.0\.0\.1:(\d+)").group(1))
        run.expect(r"pvtap tail --follow")
        if accepted:
            assert _post_with_tls_1_0(port, body) == 200
            assert [r.body for r in cloud.received()] == [body]
        else:
            with pytest.raises(ssl.SSLError):
                _post_with_tls_1_0(port, body)
            assert cloud.received() == []
        assert run.stop(signal.SIGINT) == 0
    if accepted:
        assert "enphase: accepting TLS 1.0 and newer from the Envoy (enphase.tls_min_version)" in run.output


@pytest.mark.slow
def test_mitmproxys_own_tls_option_that_crashes_it_points_to_the_pvtap_setting(tmp_path: Path) -> None:
    run = _run(tmp_path, {"PVTAP_ENPHASE_LISTEN": "127.0.0.1:0"}, "--mitmproxy-set", "tls_version_client_min=TLS1")
    assert run.proc.wait(60) == 2
    run.stop()
    assert run.lines[-1] == (
        "pvtap run: config error: --mitmproxy-set = 'tls_version_client_min=TLS1': mitmproxy fails on this option "
        "with this OpenSSL build. Fix: use the pvtap setting instead: enphase.tls_min_version = \"TLS1\" "
        "(PVTAP_ENPHASE_TLS_MIN_VERSION=TLS1)")
