"""The cloud-fallback state machine on its own (pvtap.enphase_fallback), and its probe against
real local sockets. The addon that feeds it from mitmproxy: test_enphase_fallback_e2e.py."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from pvtap.config import ConfigError, load_config, parse_duration
from pvtap.enphase_fallback import (
    MEASUREMENT,
    CloudState,
    CloudWatch,
    Decision,
    plain_reason,
    probe,
    upstream_name,
)
from pvtap.records import utc_from_unix

CLOUD = "198.51.100.2:443"
T0 = 1_700_000_000.0


def states(transitions) -> list[str]:
    return [t.state.value for t in transitions]


def test_forwards_while_failing_and_falls_back_only_after_fallback_after() -> None:
    watch = CloudWatch(fallback_after=90, timeout=10)
    assert watch.decide(CLOUD, T0) == (Decision.FORWARD, [])
    (down,) = watch.failed(CLOUD, "Connection refused", T0 + 1)
    assert (down.state, down.previous, down.reason) == (CloudState.UNREACHABLE, CloudState.REACHABLE,
                                                        "Connection refused")
    assert "reports are still forwarded" in down.log_line()
    assert watch.failed(CLOUD, "Connection refused", T0 + 30) == []  # one transition, not one per failure
    assert watch.decide(CLOUD, T0 + 90.9) == (Decision.FORWARD, [])  # 89.9 s after the first failure
    decision, (fallback,) = watch.decide(CLOUD, T0 + 91)
    assert decision is Decision.PROBE and watch.in_fallback
    assert (fallback.state, fallback.since, fallback.unreachable_s) == (CloudState.FALLBACK, T0 + 1, 90)
    assert "unreachable for 90 s (Connection refused): answering performance reports locally" in fallback.log_line()
    watch.answered_locally(CLOUD)
    watch.answered_locally(CLOUD)
    assert watch.decide(CLOUD, T0 + 200) == (Decision.PROBE, [])
    (back,) = watch.answered(CLOUD, T0 + 301)
    assert (back.state, back.previous, back.answered_locally) == (CloudState.REACHABLE, CloudState.FALLBACK, 2)
    assert "answers again after 300 s unreachable (2 report(s) answered locally)" in back.log_line()
    assert watch.decide(CLOUD, T0 + 302) == (Decision.FORWARD, []) and not watch.in_fallback


def test_an_answer_before_fallback_after_starts_the_count_again() -> None:
    watch = CloudWatch(fallback_after=60, timeout=10)
    watch.failed(CLOUD, "refused", T0)
    assert states(watch.answered(CLOUD, T0 + 50)) == ["reachable"]
    assert states(watch.failed(CLOUD, "refused", T0 + 55)) == ["unreachable"]
    assert watch.decide(CLOUD, T0 + 100)[0] is Decision.FORWARD  # 45 s of the new episode
    assert watch.decide(CLOUD, T0 + 115)[0] is Decision.PROBE


def test_no_answer_within_the_timeout_is_a_failure_counted_once() -> None:
    watch = CloudWatch(fallback_after=30, timeout=10)
    assert watch.attempt("conn-1", CLOUD, "connect", T0) == []
    assert watch.tick(T0 + 9.9) == []
    (down,) = watch.tick(T0 + 10)
    assert (down.state, down.at) == (CloudState.UNREACHABLE, T0 + 10)
    assert down.reason == "no answer to the connect within 10 s"
    assert watch.failed(CLOUD, "timed out", T0 + 20, key="conn-1") == []  # its late end is not a second failure
    (fallback,) = watch.tick(T0 + 40)
    assert fallback.state is CloudState.FALLBACK


def test_a_step_that_completes_in_time_is_no_failure_and_answers_count_per_upstream() -> None:
    other = "203.0.113.9:443"
    watch = CloudWatch(fallback_after=30, timeout=10)
    watch.attempt("conn-1", CLOUD, "connect", T0)
    assert watch.answered(CLOUD, T0 + 2, key="conn-1") == []
    assert watch.tick(T0 + 100) == []
    watch.failed(other, "refused", T0)
    assert states(watch.tick(T0 + 30)) == ["fallback"]  # promoted by the clock alone, without a report
    assert watch.state(other) is CloudState.FALLBACK and watch.state(CLOUD) is CloudState.REACHABLE
    assert watch.decide(CLOUD, T0 + 31)[0] is Decision.FORWARD


def test_the_record_says_why() -> None:
    watch = CloudWatch(fallback_after=5, timeout=1)
    watch.failed(CLOUD, "DNS: Name or service not known", T0)
    (fallback,) = watch.tick(T0 + 6)
    record = fallback.record()
    assert record.measurement == MEASUREMENT
    assert record.time == utc_from_unix(T0 + 6)
    assert dict(record.tags) == {"upstream": CLOUD, "state": "fallback"}
    assert dict(record.fields) == {"previous": "unreachable", "reason": "DNS: Name or service not known",
                                   "unreachable_s": 6.0, "answered_locally": 0, "fallback_after_s": 5}


def test_plain_reasons() -> None:
    assert plain_reason("[Errno 111] Connect call failed ('192.0.2.1', 443)") == "Connection refused"
    assert plain_reason("[Errno -2] Name or service not known") == "[Errno -2] Name or service not known"
    assert plain_reason("TLS: handshake failed") == "TLS: handshake failed"


def test_upstream_names() -> None:
    assert upstream_name(("reports.enphaseenergy.com", 443)) == "reports.enphaseenergy.com:443"
    assert upstream_name(("2001:db8::2", 443)) == "[2001:db8::2]:443"
    assert upstream_name(None) == "?"


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1.5 min", 90),
                                           ("250ms", 0.25), (45, 45), (2.5, 2.5)])
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("env, problem", [
    ({"PVTAP_ENPHASE_FALLBACK_AFTER": "soon"}, "expected a duration"),
    ({"PVTAP_ENPHASE_FALLBACK_AFTER": "-5s"}, "expected a duration"),
    ({"PVTAP_ENPHASE_CLOUD_TIMEOUT": "0"}, "must be greater than 0"),
    ({"PVTAP_ENPHASE_FALLBACK_AFTER": "90s", "PVTAP_ENPHASE_LOCAL_MODE": "true"}, "local mode already answers"),
])
def test_bad_settings_name_the_key_and_the_fix(env, problem) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env=env)
    assert caught.value.key.startswith("enphase.") and problem in str(caught.value) and "Fix:" in str(caught.value)


def test_settings_from_a_file(tmp_path) -> None:
    path = tmp_path / "pvtap.toml"
    path.write_text('[enphase]\nfallback_after = "15m"\ncloud_timeout = 5\n')
    config = load_config(path, env={})
    assert (float(config.enphase.fallback_after), float(config.enphase.cloud_timeout)) == (900.0, 5.0)
    assert float(load_config(env={}).enphase.fallback_after) == 0.0  # off by default


# -- the probe, against real sockets on 127.0.0.1 -------------------------------------------------

async def test_probe_refused_answered_and_silent(tmp_path) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now: refused
    assert "refused" in (await probe("127.0.0.1", port, server_name=None, timeout=5) or "").lower()

    from pvtap.certs import self_signed, write_pair
    cert, key = self_signed("reports.enphaseenergy.com", ["reports.enphaseenergy.com"])
    certfile, keyfile = write_pair(tmp_path, "cloud", cert, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    handshakes = asyncio.Event()

    async def tls_client(reader, writer):
        handshakes.set()
        writer.close()

    silent_conns = []

    async def silent(reader, writer):  # accepts, never speaks TLS: a black hole behind a live port
        silent_conns.append(writer)

    tls_server = await asyncio.start_server(tls_client, "127.0.0.1", 0, ssl=context)
    silent_server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with tls_server, silent_server:
        tls_port = tls_server.sockets[0].getsockname()[1]
        silent_port = silent_server.sockets[0].getsockname()[1]
        assert await probe("127.0.0.1", tls_port, server_name="reports.enphaseenergy.com", timeout=5) is None
        await asyncio.wait_for(handshakes.wait(), 5)  # the stand-in saw a completed handshake
        assert await probe("127.0.0.1", silent_port, server_name="reports.enphaseenergy.com", timeout=0.5) == \
            "no answer within 0.5 s"
        assert await probe("127.0.0.1", silent_port, server_name=None, timeout=0.5) is None  # TCP alone answers
        for writer in silent_conns:
            writer.close()
    assert (await probe("name.invalid", 443, server_name=None, timeout=5) or "").startswith("DNS: ")


# -- the addon's options ----------------------------------------------------------------------------

def test_addon_options_validate_durations(tmp_path, monkeypatch) -> None:
    from mitmproxy import exceptions
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.test import taddons

    from tests.test_enphase_addon import addon_module

    monkeypatch.delenv("PVTAP_CONFIG", raising=False)
    addon = addon_module.EnphaseTap()
    with taddons.context(Proxyserver(), addon, addon.fallback) as tctx:
        tctx.configure(addon, enphase_data_dir=str(tmp_path), enphase_fallback_after="15m",
                       enphase_cloud_timeout="5s")
        assert (addon.settings.fallback_after, addon.settings.cloud_timeout) == (900.0, 5.0)
        assert addon.fallback.watch is not None and addon.fallback.watch.fallback_after == 900.0
        with pytest.raises(exceptions.OptionsError, match=r"enphase_fallback_after = 'soon'.*Fix: --set "):
            tctx.configure(addon, enphase_fallback_after="soon")
        with pytest.raises(exceptions.OptionsError, match="local mode already answers every report"):
            tctx.configure(addon, enphase_local_mode=True, connection_strategy="lazy")
        tctx.configure(addon, enphase_fallback_after="0")
        assert addon.fallback.watch is None  # off


def test_the_record_crosses_the_channel_to_the_ingest_worker_unchanged() -> None:
    from pvtap.ingest import wire

    watch = CloudWatch(fallback_after=5, timeout=1)
    watch.failed(CLOUD, "Connection refused", T0)
    (transition,) = watch.tick(T0 + 5.25)
    record = transition.record()
    ((kind, body),) = wire.Reader().feed(b"".join(wire.record(record)))
    assert kind is wire.Kind.RECORD and wire.read_record(body) == record
