"""LAN addresses are kept nowhere without `privacy.store_network_identity` — not in a log line,
not in a store file — and are kept when the user opts in.

Real traffic from a known address, 127.0.0.77 (Linux routes all of 127.0.0.0/8 to loopback, so
a client can bind it without any set-up), through the relay in this process with its real
decoders, ingest worker and store (a TCP connection, one refused at accept, UDP datagrams), and
through a real mitmdump with the Enphase addon. Everything the store wrote (database, WAL) and
everything logged is searched for the address.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import ssl
from pathlib import Path

import pytest

from proxy_tcp import relay_running
from pvtap.config import ListenerConfig
from pvtap.decode.alphaess import REQUEST, encode_frame
from pvtap.peers import PeerNames
from pvtap.privacy import Privacy
from pvtap.simulate.enphase import Simulator, encode_body
from pvtap.simulate.enphase_cloud import EnphaseCloud
from pvtap.simulate.foxess_m1 import join_me_req
from pvtap.store.local import LocalStore
from tests.mitm_support import Mitmdump, wait_for
from tests.relay_support import StandInCloud, read_to_eof
from tests.waiting import until

pytestmark = pytest.mark.timeout(90)

DEVICE = "127.0.0.77"
FRAMES = encode_frame(REQUEST, 16, b'{"Time":"2024/03/03 22:05:21","SN":"ALSIM0000000003","Ppv1":"1250","SOC":"38.0"}')

PRIVACIES = {
    "default": Privacy(),
    "pseudonyms": Privacy(pseudonym_key=b"k" * 32),
    "opted_in": Privacy(keep_network_identity=True),
}


def files_of(directory: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file())


# -- names --------------------------------------------------------------------------------------

def test_peer_names_hide_the_address_unless_kept():
    numbered = PeerNames()
    assert [numbered.name(h) for h in ("192.0.2.1", "192.0.2.2", "::ffff:192.0.2.1")] == ["peer#1", "peer#2",
                                                                                           "peer#1"]
    keyed = PeerNames(Privacy(pseudonym_key=b"k" * 32))
    assert keyed.name("192.0.2.1") == PeerNames(Privacy(pseudonym_key=b"k" * 32)).name("192.0.2.1")  # stable
    assert keyed.name("192.0.2.1").startswith("peer-") and keyed.name("192.0.2.1") != keyed.name("192.0.2.2")
    assert "192.0.2" not in keyed.name("192.0.2.1") + keyed.endpoint("192.0.2.1", 50122)
    kept = PeerNames(Privacy(keep_network_identity=True))
    assert (kept.name("192.0.2.1"), kept.endpoint("2001:db8::1", 7)) == ("192.0.2.1", "[2001:db8::1]:7")


def test_the_numbered_table_is_bounded():
    names = PeerNames(capacity=3)
    for i in range(1000):
        names.name(f"10.0.{i // 250}.{i % 250}")
    assert len(names._numbers) == 3
    assert names.name("10.0.3.249") == "peer#1000"  # still known: among the most recent
    assert names.name("10.0.0.0") == "peer#1001"  # forgotten: numbered anew


# -- the relay ---------------------------------------------------------------------------------

@pytest.mark.parametrize("privacy_name", PRIVACIES)
async def test_the_relay_keeps_the_peer_address_only_when_opted_in(privacy_name, data_dir, caplog):
    privacy = PRIVACIES[privacy_name]
    caplog.set_level(logging.DEBUG)
    store = LocalStore.for_process(data_dir, "relay")
    try:
        async with StandInCloud() as cloud:
            listeners = [
                ListenerConfig(protocol="alphaess", listen="127.0.0.1:0", policy="fixed", upstream=cloud.address),
                ListenerConfig(protocol="alphaess", listen="127.0.0.1:0", policy="local", allow_from=["127.0.0.1"]),
                ListenerConfig(protocol="foxess", listen="127.0.0.1:0", transport="udp", policy="local",
                               udp_max_rate=1),
            ]
            async with relay_running(listeners, store=store, privacy=privacy) as relay:
                forward, refusing, udp = (listener.endpoints[0].port for listener in relay.listeners)
                reader, writer = await asyncio.open_connection("127.0.0.1", forward, local_addr=(DEVICE, 0))
                writer.write(FRAMES)
                writer.write_eof()
                await read_to_eof(reader)
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", refusing, local_addr=(DEVICE, 0))
                with pytest.raises(ConnectionResetError):  # refused at accept: not in allow_from
                    await read_to_eof(reader)
                writer.close()
                datagrams = relay.listeners[2].datagrams
                assert datagrams is not None
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                    sender.bind((DEVICE, 0))
                    for seq in range(3):  # the first passes, the next two are over udp_max_rate
                        sender.sendto(join_me_req(seq, 1), ("127.0.0.1", udp))
                await until(lambda: datagrams.datagrams >= 3 and not relay.connections,
                            what="three datagrams counted and every connection ended")
    finally:
        store.close()

    assert datagrams.over_rate == 2 and relay.listeners == []
    with LocalStore(data_dir / "relay.sqlite", readonly=True) as stored:
        (connection,) = [s.record for s in stored.records(measurements=["pvtap_connection"])]
        assert stored.count_records(measurements=["alphaess_realtime"]) == 1
        assert stored.count_records(measurements=["foxess_presence"]) == 1
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for line in ("alphaess c-", "refused 1 not in allow_from", "first datagram from", "udp_max_rate"):
        assert line in logged
    if privacy_name == "opted_in":
        assert DEVICE in logged and DEVICE.encode() in files_of(data_dir)
        assert str(connection.fields["peer"]).startswith(f"{DEVICE}:")
        return
    assert DEVICE not in logged
    assert DEVICE.encode() not in files_of(data_dir)
    assert "peer" not in connection.fields
    assert ("peer-" if privacy_name == "pseudonyms" else "peer#1") in logged


# -- the Enphase addon in a real mitmdump --------------------------------------------------------

def post_from(address: str, port: int, body: bytes) -> int:
    """POST a report as the Envoy does, from `address`."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, source_address=(address, 0), timeout=30)
    try:
        conn.request("POST", "/emu_reports/performance_report?webcomm_version=3.0", body,
                     {"Host": "reports.enphaseenergy.com", "Content-Type": "application/x-deflate"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("opted_in", [False, True])
def test_the_addon_and_mitmproxy_log_no_envoy_address_unless_opted_in(tmp_path, opted_in):
    data = tmp_path / "data"
    config = tmp_path / "pvtap.toml"
    config.write_text(f"[privacy]\nstore_network_identity = {'true' if opted_in else 'false'}\n")
    body = encode_body(Simulator(micros=2, start=1699956000).next_report().xml)
    with EnphaseCloud(cert_dir=tmp_path / "cloud") as cloud:
        with Mitmdump.reverse(tmp_path, cloud, data_dir=data, extra=["--set", f"pvtap_config={config}"]) as proxy:
            assert post_from(DEVICE, proxy.port, body) == 200
            wait_for(lambda: "enphase: performance_report from" in proxy.output(), what="the addon's report line")
            wait_for(lambda: "client disconnect" in proxy.output(), what="mitmproxy's disconnect line")
        output = proxy.output()
    assert "2 payloads archived" in output  # the addon and its ingest worker stopped cleanly: the store is complete
    if opted_in:
        assert f"performance_report from {DEVICE} " in output and f"[{DEVICE}:" in output
        return
    assert DEVICE not in output
    assert "performance_report from peer#1 " in output and "[peer#1:" in output  # mitmproxy's own lines too
    assert DEVICE.encode() not in files_of(data)
