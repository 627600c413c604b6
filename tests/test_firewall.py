"""`pvtap firewall`: the files in firewall/ are its output for the example setup, its errors name
the fix, and the rules it prints, applied for real, carry every device's traffic through pvtap.

The real thing: three network namespaces (device, pvtap host, cloud; tests/relay_support.py),
`pvtap run` inside the pvtap host's (mitmproxy in transparent mode for the Envoy, the relay with
transparent listeners for AlphaESS, FoxESS M1 over TLS and FoxESS H-series), the rules
`pvtap firewall` prints for that setup loaded with iptables or nftables, then each simulator dials
its cloud's own address from the device namespace, and the stand-in clouds must receive exactly
what the devices sent, and the devices exactly what the clouds answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from pvtap.cli import main
from pvtap.simulate.alphaess import run_simulator
from pvtap.simulate.alphaess_cloud import AlphaCloud
from pvtap.simulate.enphase import Simulator, encode_body, post_report
from pvtap.simulate.enphase_cloud import EnphaseCloud
from pvtap.simulate.foxess_cloud import FoxCloud
from pvtap.simulate.foxess_h1 import H1Simulator
from pvtap.simulate.foxess_m1 import M1Simulator
from pvtap.store.local import LocalStore
from tests.conftest import REPO
from tests.health_support import LoggedProcess
from tests.relay_support import Topology, in_netns, sh, three_namespaces

EXAMPLE = ["--device", "alphaess=192.0.2.10", "--device", "alphaess=2001:db8::10", "--device", "enphase=192.0.2.11",
           "--device", "foxess-m1=192.0.2.12", "--device", "foxess-h1=192.0.2.13", "--lan-if", "eth0",
           "--pvtap-host", "192.0.2.2"]
FILES = {"iptables": "iptables.sh", "nftables": "pvtap.nft", "dnsmasq": "dnsmasq-pvtap.conf",
         "opnsense": "opnsense-pfsense.txt"}


@pytest.fixture
def no_config(monkeypatch) -> None:
    """The example setup is made with pvtap's built-in defaults."""
    for key in ("PVTAP_CONFIG", "PVTAP_ENPHASE_LISTEN"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("fmt", list(FILES))
def test_the_example_files_are_its_output_for_the_example_setup(fmt: str, no_config, capsys) -> None:
    assert main(["firewall", *EXAMPLE, "--format", fmt]) == 0
    expected = (REPO / "firewall" / FILES[fmt]).read_text()
    assert capsys.readouterr().out == expected, f"firewall/{FILES[fmt]} is stale: regenerate it (firewall/README.md)"


def test_the_rules_follow_the_configured_ports(tmp_path: Path, no_config, capsys) -> None:
    config = tmp_path / "pvtap.toml"
    config.write_text('[enphase]\nlisten = "0.0.0.0:9443"\n\n'
                      '[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "*:17777"\npolicy = "transparent"\n')
    assert main(["--config", str(config), "firewall", "--device", "alphaess=192.0.2.10", "--device",
                 "enphase=192.0.2.11", "--format", "iptables"]) == 0
    out = capsys.readouterr().out
    assert ("\n# AlphaESS battery 192.0.2.10, TCP 7777 → the pvtap relay on port 17777 (relay.listeners[0].listen)\n"
            'iptables  -t nat "$ACTION" PREROUTING -s 192.0.2.10 -p tcp --dport 7777 -j REDIRECT --to-ports 17777\n'
            ) in out
    assert "--dport 443 -j REDIRECT --to-ports 9443\n" in out and "LAN_IF" not in out
    assert main(["--config", str(config), "firewall", "--device", "foxess-h1=192.0.2.13"]) == 2
    err = capsys.readouterr().err
    assert "relay.listeners = 'foxess port 10001': no foxess listener on port 10001" in err
    assert 'Fix: add a [[relay.listeners]] with protocol = "foxess" and listen = "*:10001"' in err


@pytest.mark.parametrize("args, words", [
    (["--device", "solaredge=192.0.2.1"], "expected KIND=ADDRESS with KIND one of enphase, alphaess"),
    (["--device", "alphaess=battery.lan"], "'battery.lan' is not an IP address"),
    (["--device", "enphase=192.0.2.11", "--format", "dnsmasq"], "Fix: --pvtap-host <its LAN address>"),
])
def test_bad_input_is_refused_with_the_fix(args: list[str], words: str, no_config, capsys) -> None:
    assert main(["firewall", *args]) == 2
    assert words in capsys.readouterr().err


# -- applied for real ------------------------------------------------------------------------------

class NetnsLoop:
    """An event loop on a thread of its own that lives in a network namespace: every socket its
    coroutines open (servers, clients) is in that namespace."""

    def __init__(self, netns: str) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            with in_netns(netns):
                asyncio.set_event_loop(self.loop)
                started.set()
                self.loop.run_forever()

        self.thread = threading.Thread(target=run, name=f"loop-{netns}", daemon=True)
        self.thread.start()
        started.wait()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def pvtap_run(topo: Topology, tmp_path: Path, m1_pin: str, cloud_ca: str) -> Iterator[Path]:
    """`pvtap run` in the pvtap host's namespace; yields its config file."""
    config = tmp_path / "pvtap.toml"
    config.write_text(f"""
[enphase]
listen = "0.0.0.0:8443"
mode = "transparent"

[[relay.listeners]]
protocol = "alphaess"
listen = "*:7777"
policy = "transparent"

[[relay.listeners]]
protocol = "foxess"
listen = "*:14431"
policy = "transparent"
tls_cert = "certs/foxess-monitor.crt"
tls_key = "certs/foxess-monitor.key"
upstream_tls = true
upstream_pin_sha256 = "{m1_pin}"

[[relay.listeners]]
protocol = "foxess"
listen = "*:10001"
policy = "transparent"

[[relay.listeners]]
protocol = "foxess"
listen = "*:6666"
policy = "local"
""")
    run = LoggedProcess(["ip", "netns", "exec", topo.relay, sys.executable, "-m", "pvtap", "--config", str(config),
                         "--data-dir", str(tmp_path / "data"), "run", "--mitmproxy-set",
                         f"confdir={tmp_path / 'mitmproxy'}", "--mitmproxy-set",
                         f"ssl_verify_upstream_trusted_ca={cloud_ca}"], cwd=REPO)
    try:
        run.expect(r"pvtap run: relay is up", timeout=60)
        yield config
    finally:
        assert run.stop(30) == 0, run.output
        assert "Traceback" not in run.output, run.output


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("fmt", ["iptables", "nftables"])
def test_the_printed_rules_carry_every_device_through_pvtap_byte_for_byte(fmt: str, tmp_path: Path, no_config,
                                                                         capsys) -> None:
    with three_namespaces() as topo:
        cloud_loop, device_loop = NetnsLoop(topo.cloud), NetnsLoop(topo.device)
        try:
            with in_netns(topo.cloud):  # its server socket is made here
                enphase_cloud = EnphaseCloud(topo.cloud_ip, 443, cert_dir=tmp_path / "enphase-cloud")
            enphase_cloud.start()
            alpha4, alpha6 = AlphaCloud(topo.cloud_ip, 7777), AlphaCloud(topo.cloud_ip6, 7777)
            m1_cloud, h1_cloud = FoxCloud(tls=True, cert_dir=tmp_path / "m1-cloud"), FoxCloud(tls=False,
                                                                                             ack_bootstrap=False)
            for start in (alpha4.start(), alpha6.start(), m1_cloud.start(topo.cloud_ip, 14431),
                          h1_cloud.start(topo.cloud_ip, 10001)):
                cloud_loop.run(start)
            with pvtap_run(topo, tmp_path, m1_cloud.fingerprint, str(enphase_cloud.cafile)) as config:
                devices = [f"enphase={topo.device_ip}", f"alphaess={topo.device_ip}", f"alphaess={topo.device_ip6}",
                           f"foxess-m1={topo.device_ip}", f"foxess-h1={topo.device_ip}"]
                assert main(["--config", str(config), "firewall", *(a for d in devices for a in ("--device", d)),
                             "--lan-if", topo.relay_device_if, "--format", fmt]) == 0
                rules = capsys.readouterr().out
                if fmt == "iptables":
                    sh("sh", "-s", netns=topo.relay, input=rules)
                else:
                    sh("nft", "-f", "-", netns=topo.relay, input=rules)

                # the devices dial their clouds' own addresses
                report = encode_body(Simulator(micros=2).next_report().xml)
                with in_netns(topo.device):
                    answer = post_report("https://reports.enphaseenergy.com/emu_reports/performance_report?"
                                         "webcomm_version=3.0", report, connect=(topo.cloud_ip, 443))
                battery4 = device_loop.run(run_simulator(topo.cloud_ip, 7777, interval=0.05, count=3))
                battery6 = device_loop.run(run_simulator(topo.cloud_ip6, 7777, interval=0.05, count=2))
                m1, h1 = M1Simulator(seed=3), H1Simulator(seed=3)
                assert device_loop.run(m1.run_cloud(topo.cloud_ip, 14431, count=2, interval=0.05, linger=0.3)) == 2
                assert device_loop.run(h1.run(topo.cloud_ip, 10001, count=2, interval=0.05, linger=0.3)) == 2
                for fox in (m1_cloud, h1_cloud):
                    cloud_loop.run(fox.wait_session())
                    cloud_loop.run(asyncio.wait_for(fox.sessions[0].closed.wait(), 10))
        finally:
            for closing in (alpha4.close(), alpha6.close(), m1_cloud.close(), h1_cloud.close()):
                cloud_loop.run(closing)
            enphase_cloud.stop()
            cloud_loop.close()
            device_loop.close()

    # byte for byte, both ways, for every device
    (exchange,) = enphase_cloud.received()
    assert exchange.body == report and answer.status == 200 and answer.body == exchange.response_body
    assert battery4.sent == alpha4.received and battery4.received == alpha4.sent and battery4.counts["1-1-16"] == 3
    assert battery6.sent == alpha6.received and battery6.received == alpha6.sent and battery6.counts["1-1-16"] == 2
    assert bytes(m1.sent) == bytes(m1_cloud.sessions[0].received) and bytes(m1.received) == bytes(
        m1_cloud.sessions[0].sent)
    assert bytes(h1.sent) == bytes(h1_cloud.sessions[0].received) and bytes(h1.received) == bytes(
        h1_cloud.sessions[0].sent)
    # through pvtap, which decoded a copy and forwarded each connection to its original destination
    with LocalStore(tmp_path / "data" / "relay.sqlite", readonly=True) as store:
        upstreams = sorted(str(r.record.fields["upstream"]) for r in store.records(measurements=["pvtap_connection"]))
        assert upstreams == sorted([f"{topo.cloud_ip}:7777", f"[{topo.cloud_ip6}]:7777", f"{topo.cloud_ip}:14431",
                                    f"{topo.cloud_ip}:10001"])
        assert store.count_records(measurements=["alphaess_realtime"]) == 5
        assert store.count_records(measurements=["foxess_telemetry"]) == 2
        assert store.count_records(measurements=["foxess_h1_realtime"]) == 2
    with LocalStore(tmp_path / "data" / "enphase.sqlite", readonly=True) as store:
        assert store.count_records(measurements=["enphase_interval"]) == 2
