"""The relay's settings: `[[relay.listeners]]` in the config file and the quick-start flags of
`pvtap relay` / `python -m proxy_tcp`. Every mistake stops start-up with the key, the value and
the fix."""

from __future__ import annotations

import argparse
import socket
import ssl
import subprocess

import pytest

from proxy_tcp import default_listeners
from pvtap.certs import foxess_pair
from pvtap.cli import main as pvtap_main
from pvtap.cli.relay import add_arguments, quick_listener
from pvtap.config import ConfigError, ListenerConfig, check_listener, load_config
from tests.conftest import free_port
from tests.relay_support import PYTHON, REPO, RelayProcess


def load(tmp_path, toml: str):
    path = tmp_path / "pvtap.toml"
    path.write_text(toml)
    return load_config(path, env={})


def error_of(tmp_path, toml: str) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        load(tmp_path, toml)
    return error.value


def test_a_listener_with_every_setting(tmp_path):
    config = load(tmp_path, """
        [[relay.listeners]]
        protocol = "alphaess"
        listen = "0.0.0.0:7777"
        policy = "auto"
        upstream = "www.alphaess.com:7777"
        resolver = "192.0.2.53:5353"
        connect_timeout = 3
        idle_timeout = 7200
        decode_queue = 32
        max_connections = 4
        first_byte_timeout = 5
        allow_from = ["192.0.2.0/24", "2001:db8::1"]

        [[relay.listeners]]
        protocol = "alphaess"
        listen = "*:17777"
        policy = "transparent"
    """)
    first, second = config.relay.listeners
    assert first == ListenerConfig(protocol="alphaess", listen="0.0.0.0:7777", policy="auto",
                                   upstream="www.alphaess.com:7777", resolver="192.0.2.53:5353", connect_timeout=3.0,
                                   idle_timeout=7200.0, decode_queue=32, max_connections=4, first_byte_timeout=5.0,
                                   allow_from=["192.0.2.0/24", "2001:db8::1"])
    assert (second.policy, second.upstream, second.idle_timeout) == ("transparent", "", 3600.0)


@pytest.mark.parametrize("policy", ["fixed", "auto"])
def test_fixed_and_auto_without_upstream_name_the_key_and_the_fix(tmp_path, policy):
    error = error_of(tmp_path, f"""
        [[relay.listeners]]
        protocol = "alphaess"
        listen = "0.0.0.0:7777"
        policy = "{policy}"
    """)
    assert error.key == "relay.listeners[0].upstream"
    assert f"the {policy} policy needs the cloud's address" in error.problem
    assert "set relay.listeners[0].upstream" in error.fix and "relay.listeners[0].policy" in error.fix


@pytest.mark.parametrize("toml, key, words", [
    ('protocol = "enphase"\nlisten = "0.0.0.0:1"\npolicy = "local"', "protocol", "must be one of alphaess"),
    ('listen = "0.0.0.0:1"\npolicy = "local"', "protocol", "missing"),
    ('protocol = "alphaess"\npolicy = "local"', "listen", "missing"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:70000"\npolicy = "local"', "listen", "between 1 and 65535"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:1"\npolicy = "bridge"', "policy", "must be one of fixed"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:1"\npolicy = "local"\ntransport = "sctp"', "transport",
     "must be one of"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:1"\npolicy = "transparent"\nupstream = "a.example:1"', "upstream",
     "does not use an upstream"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:1"\nupstream = "a.example"', "upstream", "expected host:port"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:1"\nupstream = "a.example:1"\nresolver = "dns.example"', "resolver",
     "not a name"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:1"\npolicy = "local"\nresolver = "192.0.2.53"', "resolver",
     "only used to resolve the upstream"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:1"\npolicy = "local"\nconnect_timeout = 0', "connect_timeout",
     "greater than 0"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:1"\npolicy = "local"\ndecode_queue = -1', "decode_queue",
     "must be 0 or more (better: remove it)"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:1"\npolicy = "local"\nidle_timout = 5', "idle_timout",
     "did you mean relay.listeners[0].idle_timeout"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:1"\npolicy = "local"\nfirst_byte_timeout = 0', "first_byte_timeout",
     "greater than 0"),
    ('protocol = "foxess"\nlisten = "0.0.0.0:1"\npolicy = "local"\ntransport = "udp"\nudp_max_rate = -1',
     "udp_max_rate", "greater than 0"),
    ('protocol = "alphaess"\nlisten = "0.0.0.0:1"\npolicy = "local"\nallow_from = "192.0.2.0/24"', "allow_from",
     "expected a list"),
])
def test_a_wrong_listener_setting_is_named(tmp_path, toml, key, words):
    error = error_of(tmp_path, "[[relay.listeners]]\n" + toml)
    assert error.key == f"relay.listeners[0].{key}"
    assert words in str(error)


@pytest.mark.parametrize("entry, words", [
    ("192.0.2.5/24", "has host bits set"),
    ("lan", "does not appear to be an IPv4 or IPv6 network"),
    ("192.0.2.0/33", "not an IP network"),
])
def test_a_wrong_allow_from_entry_is_named_with_the_fix(tmp_path, entry, words):
    error = error_of(tmp_path, f"""
        [[relay.listeners]]
        protocol = "alphaess"
        listen = "0.0.0.0:7777"
        policy = "local"
        allow_from = ["192.0.2.0/24", "{entry}"]
    """)
    assert error.key == "relay.listeners[0].allow_from"
    assert f"entry 1 ({entry!r})" in error.problem and words in error.problem
    assert "192.168.1.0/24" in error.fix and "one address" in error.fix


def test_two_listeners_on_one_address_are_refused(tmp_path):
    error = error_of(tmp_path, """
        [[relay.listeners]]
        protocol = "alphaess"
        listen = "0.0.0.0:7777"
        policy = "local"
        [[relay.listeners]]
        protocol = "alphaess"
        listen = "0.0.0.0:7777"
        policy = "transparent"
    """)
    assert error.key == "relay.listeners[1].listen" and "relay.listeners[0] already listens there" in str(error)
    twice_any_port = 'protocol = "alphaess"\nlisten = "127.0.0.1:0"\npolicy = "local"\n'
    config = load(tmp_path, f"[[relay.listeners]]\n{twice_any_port}[[relay.listeners]]\n{twice_any_port}")
    assert len(config.relay.listeners) == 2  # port 0: each takes a free port of its own


def test_resolver_takes_ipv4_ipv6_and_a_port(tmp_path):
    for resolver in ("192.0.2.53", "192.0.2.53:5353", "2001:db8::53", "[2001:db8::53]:53"):
        config = load(tmp_path, f"""
            [[relay.listeners]]
            protocol = "alphaess"
            listen = "0.0.0.0:7777"
            upstream = "www.alphaess.com:7777"
            resolver = "{resolver}"
        """)
        assert config.relay.listeners[0].resolver == resolver


def test_the_default_listeners_are_valid_and_cover_alphaess_on_7777():
    listeners = default_listeners()
    for listener in listeners:
        check_listener(listener, lambda name: name)
    (alphaess,) = [item for item in listeners if item.protocol == "alphaess"]
    assert (alphaess.listen, alphaess.policy, alphaess.upstream) == ("0.0.0.0:7777", "auto", "www.alphaess.com:7777")


# -- the command line -------------------------------------------------------------------------

def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_quick_start_flags_make_one_listener():
    listener = quick_listener(parse("--protocol", "alphaess", "--listen", "0.0.0.0:7777",
                                    "--upstream", "www.alphaess.com:7777", "--resolver", "192.0.2.53",
                                    "--connect-timeout", "2.5"))
    assert listener == ListenerConfig(protocol="alphaess", listen="0.0.0.0:7777", policy="fixed",
                                      upstream="www.alphaess.com:7777", resolver="192.0.2.53", connect_timeout=2.5)
    assert quick_listener(parse()) is None  # no flag: the configured listeners
    guarded = quick_listener(parse("--protocol", "alphaess", "--listen", "0.0.0.0:7777", "--policy", "local",
                                   "--allow-from", "192.0.2.10", "--allow-from", "2001:db8::/64",
                                   "--first-byte-timeout", "5"))
    assert guarded is not None
    assert (guarded.allow_from, guarded.first_byte_timeout) == (["192.0.2.10", "2001:db8::/64"], 5.0)


@pytest.mark.parametrize("argv, key, words", [
    (["--protocol", "alphaess", "--listen", "0.0.0.0:7777"], "--upstream", "set --policy to transparent"),
    (["--protocol", "alphaess", "--upstream", "a.example:1"], "--listen", "missing"),
    (["--listen", "0.0.0.0:7777", "--policy", "local"], "--protocol", "missing"),
    (["--protocol", "alphaess", "--listen", "nowhere", "--policy", "local"], "--listen", "expected host:port"),
    (["--protocol", "alphaess", "--listen", "0.0.0.0:1", "--upstream", "a.example:1", "--resolver", "x"],
     "--resolver", "not a name"),
    (["--protocol", "alphaess", "--listen", "0.0.0.0:1", "--policy", "local", "--idle-timeout", "0"],
     "--idle-timeout", "greater than 0"),
    (["--protocol", "alphaess", "--listen", "0.0.0.0:1", "--policy", "local", "--allow-from", "lan"],
     "--allow-from", "not an IP network"),
])
def test_quick_start_mistakes_name_the_flag(argv, key, words):
    with pytest.raises(ConfigError) as error:
        quick_listener(parse(*argv))
    assert error.value.key == key and words in str(error.value)


def test_pvtap_relay_help_explains_the_policies(capsys):
    with pytest.raises(SystemExit) as exit_:
        pvtap_main(["relay", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for words in ("transparent", "--resolver", "auto", "pvtap relay --protocol alphaess --listen 0.0.0.0:7777"):
        assert words in out


def run_relay(*argv: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), "-m", "proxy_tcp", "--data-dir", str(tmp_path), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=False)


def test_a_start_up_error_exits_2_naming_the_flag_and_the_fix(tmp_path):
    port = free_port()
    result = run_relay("--protocol", "alphaess", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{port}",
                       tmp_path=tmp_path)
    assert result.returncode == 2
    assert "python -m proxy_tcp: config error: --upstream = " in result.stderr
    assert "connecting there would loop" in result.stderr and "Fix: set --resolver" in result.stderr


def test_a_config_file_error_exits_2(tmp_path):
    config = tmp_path / "pvtap.toml"
    config.write_text('[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "0.0.0.0:7777"\n')
    result = run_relay("--config", str(config), tmp_path=tmp_path)
    assert result.returncode == 2 and "relay.listeners[0].upstream" in result.stderr


def test_the_stop_graces_add_up():
    """`pvtap run` kills a service only after the relay's own stop could have finished, whatever
    ingest.stop_decode_s says (it is bounded for that)."""
    from proxy_tcp.connection import CLOSE_GRACE
    from proxy_tcp.listeners import STOP_GRACE
    from proxy_tcp.service import RELAY_STOP_GRACE, RELAY_STOP_GRACE_MAX, relay_stop_grace
    from pvtap.cli.run import STOP_TIMEOUT
    from pvtap.config import MAX_STOP_DECODE_S, Config, IngestConfig
    from pvtap.ingest.settings import ARCHIVE_STOP_GRACE_S, OUTPUTS_STOP_S, WORKER_STOP_GRACE_S, worker_stop_grace
    from pvtap.mqtt.thread import STOP_TIMEOUT_S as MQTT_STOP_S
    from pvtap.store.forwarder import STOP_TIMEOUT_S as FORWARDER_STOP_S

    assert CLOSE_GRACE < STOP_GRACE
    assert max(FORWARDER_STOP_S, MQTT_STOP_S) <= OUTPUTS_STOP_S  # they stop together
    assert worker_stop_grace(0.0) > ARCHIVE_STOP_GRACE_S + OUTPUTS_STOP_S
    assert worker_stop_grace(3.0) == worker_stop_grace(0.0) + 3.0
    assert RELAY_STOP_GRACE == STOP_GRACE + WORKER_STOP_GRACE_S == relay_stop_grace(Config()) == 21.0
    slowest = Config(ingest=IngestConfig(stop_decode_s=MAX_STOP_DECODE_S))
    assert relay_stop_grace(slowest) == RELAY_STOP_GRACE_MAX < STOP_TIMEOUT


def test_an_obsolete_decode_queue_starts_with_a_warning_naming_its_replacement(tmp_path):
    config = tmp_path / "pvtap.toml"
    config.write_text('[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "127.0.0.1:0"\npolicy = "local"\n'
                      'decode_queue = 256\n')
    relay = RelayProcess(["--config", str(config)], tmp_path / "data").start()
    assert relay.stop() == 0
    assert ("relay.listeners[0].decode_queue = 256 is no longer used: the copies of every listener share "
            "ingest.queue_mb (32 MiB) on their way to the ingest worker. Fix: remove relay.listeners[0].decode_queue"
            " from the config") in relay.text


def test_the_relay_runs_on_uvloop_by_default_and_asyncio_stays_selectable(tmp_path):
    assert load(tmp_path, "").relay.event_loop == "uvloop"
    assert load(tmp_path, '[relay]\nevent_loop = "asyncio"\n').relay.event_loop == "asyncio"
    error = error_of(tmp_path, '[relay]\nevent_loop = "trio"\n')
    assert error.key == "relay.event_loop"


@pytest.mark.slow
def test_a_tls_listener_serves_a_handshake_in_a_relay_process_on_its_default_loop(tmp_path):
    """What the relay used to refuse: a listener terminating TLS on uvloop. The client sends its
    ClientHello the moment it connects (the case that broke), and the relay process answers it."""
    cert, key = foxess_pair(tmp_path / "certs")
    config = tmp_path / "pvtap.toml"
    config.write_text(f'[[relay.listeners]]\nprotocol = "foxess"\nlisten = "127.0.0.1:0"\npolicy = "local"\n'
                      f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    relay = RelayProcess(["--config", str(config)], tmp_path / "data").start()
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw, \
                context.wrap_socket(raw) as device:
            device.sendall(b"after the handshake")
            peer = device.getpeercert(binary_form=True)
        line = relay.wait_for("[local: local]")  # its connection line: served after the handshake
    finally:
        assert relay.stop() == 0
    assert peer == ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert "up 19 B" in line  # b"after the handshake", decrypted
    assert "relay event loop: uvloop (relay.event_loop)" in relay.text
    assert "device_tls_failed" not in relay.text and "Traceback" not in relay.text
