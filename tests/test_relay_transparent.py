"""Transparent mode for real: three network namespaces made by the test (device, relay, cloud),
the relay routing between them, a firewall REDIRECT of TCP 7777 to the relay's port — iptables
in one test, nftables in another, IPv4 and IPv6 — and `python -m proxy_tcp --policy transparent`
inside the relay namespace.

The device dials the cloud's own address; the relay reads the original destination
(SO_ORIGINAL_DST), logs it and forwards byte for byte. A connection straight to the relay's port,
or redirected to the relay's own address, is refused and logged, never looped. Only documentation
addresses (192.0.2.0/24, 198.51.100.0/24, 2001:db8::/32) inside the test's namespaces are used.
"""

from __future__ import annotations

import socket
import threading

import pytest

from pvtap.decode.alphaess import REQUEST, AlphaFrame, Framer, ack_frame, encode_frame
from pvtap.store.local import LocalStore
from tests.relay_support import RelayProcess, Topology, connect_from, listen_in, recv_to_eof, sh, three_namespaces

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CLOUD_PORT = 7777
RELAY_PORT = 17777
PASSWORD = "pvtap-netns-placeholder-password"
DEVICE_FRAMES = (
    encode_frame(REQUEST, 2, b'{"UserName":"ALSIM0000000002","Password":"%s","CompanyName":"AlphaESS"}'
                 % PASSWORD.encode())
    + encode_frame(REQUEST, 16, b'{"Time":"2024/03/03 22:05:21","SN":"ALSIM0000000002","Ppv1":"1250","Pbat":'
                                b'"-539.4","SOC":"38.0"}')
)


@pytest.fixture
def topo():
    with three_namespaces() as topology:
        yield topology


class AckingCloud:
    """The stand-in cloud inside the cloud namespace: reads the device's frames to EOF, acks each
    request, closes; keeps exactly the bytes it received and sent."""

    def __init__(self, netns: str, host: str) -> None:
        self.server = listen_in(netns, host, CLOUD_PORT)
        self.server.settimeout(10)
        self.received = b""
        self.sent = b""
        self.peer = ""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, peer = self.server.accept()
        except OSError:
            return
        self.peer = peer[0]
        with conn:
            conn.settimeout(10)
            self.received = recv_to_eof(conn)
            acks = [ack_frame(f.type) for f in Framer().feed(self.received)
                    if isinstance(f, AlphaFrame) and f.b1 == REQUEST]
            self.sent = b"".join(acks)
            conn.sendall(self.sent)

    def close(self) -> None:
        self.thread.join(10)
        self.server.close()


def device_exchange(topo: Topology, host: str, port: int, payload: bytes) -> bytes:
    """The device connects from its namespace, sends, half-closes and reads to EOF."""
    with connect_from(topo.device, host, port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_to_eof(sock)


def check_transparent_relay(topo: Topology, tmp_path, families: tuple[str, ...]) -> None:
    relay = RelayProcess(["--protocol", "alphaess", "--listen", f"*:{RELAY_PORT}", "--policy", "transparent"],
                         tmp_path / "data", netns=topo.relay).start()
    try:
        for family in families:
            cloud_ip = topo.cloud_ip if family == "ipv4" else topo.cloud_ip6
            own_ip = topo.relay_device_side_ip if family == "ipv4" else topo.relay_device_side_ip6
            device_ip = topo.device_ip if family == "ipv4" else topo.device_ip6
            cloud = AckingCloud(topo.cloud, cloud_ip)
            try:
                got = device_exchange(topo, cloud_ip, CLOUD_PORT, DEVICE_FRAMES)  # dials the cloud's own address
            finally:
                cloud.close()
            assert cloud.received == DEVICE_FRAMES and got == cloud.sent and len(got) == 2 * 29
            assert cloud.peer == (topo.relay_cloud_side_ip if family == "ipv4" else topo.relay_cloud_side_ip6)
            cloud_at = f"{cloud_ip}:{CLOUD_PORT}" if family == "ipv4" else f"[{cloud_ip}]:{CLOUD_PORT}"
            line = relay.wait_for("[transparent: forward]")
            assert " peer#" in line and device_ip not in line  # no LAN address without store_network_identity
            assert f"→ {cloud_at} [transparent: forward] device_closed" in line
            assert f"up {len(DEVICE_FRAMES)} B, down {len(got)} B, frames 4" in line

            # straight to the relay's port: not redirected, refused, never looped
            assert device_exchange(topo, own_ip, RELAY_PORT, b"hello relay") == b""
            assert "refused_not_redirected" in relay.wait_for("[transparent: refused]")
            # redirected, but to the relay host's own address: refused too
            assert device_exchange(topo, own_ip, CLOUD_PORT, b"hello relay") == b""
            assert "refused_self" in relay.wait_for("[transparent: refused]")
    finally:
        status = relay.stop()
    assert status == 0, relay.text
    assert PASSWORD not in relay.text
    with LocalStore(tmp_path / "data" / "relay.sqlite", readonly=True) as store:
        outcomes = sorted(r.record.tags["outcome"] for r in store.records(measurements=["pvtap_connection"]))
        assert outcomes == sorted(["device_closed", "refused_not_redirected", "refused_self"] * len(families))
        assert store.count_records(measurements=["alphaess_realtime"]) == len(families)
        assert all(PASSWORD.encode() not in r.raw.payload for r in store.raw_payloads())


def test_iptables_redirect_ipv4_and_ip6tables_redirect_ipv6(topo, tmp_path):
    for tool in ("iptables", "ip6tables"):
        sh(tool, "-t", "nat", "-A", "PREROUTING", "-i", topo.relay_device_if, "-p", "tcp", "--dport", str(CLOUD_PORT),
           "-j", "REDIRECT", "--to-ports", str(RELAY_PORT), netns=topo.relay)
    check_transparent_relay(topo, tmp_path, ("ipv4", "ipv6"))


def test_nftables_redirect_ipv4_and_ipv6(topo, tmp_path):
    sh("nft", "-f", "-", netns=topo.relay, input=f"""
        table inet pvtap {{
            chain prerouting {{
                type nat hook prerouting priority dstnat; policy accept;
                iifname "{topo.relay_device_if}" tcp dport {CLOUD_PORT} redirect to :{RELAY_PORT}
            }}
        }}
    """)
    check_transparent_relay(topo, tmp_path, ("ipv4", "ipv6"))


def test_a_fixed_upstream_on_the_relay_host_is_refused_at_start(topo, tmp_path):
    own = topo.relay_cloud_side_ip  # not loopback: what a DNS override would resolve the cloud to
    loop = RelayProcess(["--protocol", "alphaess", "--listen", "0.0.0.0:7777", "--upstream", f"{own}:7777"],
                        tmp_path, netns=topo.relay)
    status, output = loop.run_to_end()
    assert status == 2 and "is the relay's own listening address (0.0.0.0:7777)" in output
    elsewhere = RelayProcess(["--protocol", "alphaess", "--listen", "0.0.0.0:7777", "--upstream", f"{own}:9"],
                             tmp_path, netns=topo.relay)
    status, output = elsewhere.run_to_end()
    assert status == 2 and f"{own}:9 is an address of this host, not the cloud" in output
