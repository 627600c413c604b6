"""One configuration for every part of pvtap: a TOML file, then `PVTAP_*` environment overrides.

Each section is a dataclass; each setting carries its help text and, where a type is not enough,
a check. Loading validates everything at start-up and stops with a `ConfigError` that names the
key, the value, where it came from and the fix. Environment variables are named after the key:
`data_dir` → `PVTAP_DATA_DIR`, `enphase.local_mode` → `PVTAP_ENPHASE_LOCAL_MODE`. Lists of
tables (relay listeners) come only from the file. A `PVTAP_*` variable that names no setting is
reported (`env_warnings`) rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "PVTAP_"
CONFIG_ENV = "PVTAP_CONFIG"


class ConfigError(ValueError):
    """A setting is wrong; the message says which, why, and how to fix it."""

    def __init__(self, key: str, value: object, problem: str, fix: str, source: str = "") -> None:
        self.key, self.value, self.problem, self.fix, self.source = key, value, problem, fix, source
        where = f" (from {source})" if source else ""
        super().__init__(f"config error: {key} = {value!r}{where}: {problem}. Fix: {fix}")


def setting(default: Any, help: str, check: Callable[[Any], str | None] | None = None,
            fix: str = "", secret: bool = False) -> Any:
    """A config field: its default, one line of help, an optional check returning a problem.
    A `secret` one is left out of the config's repr, so a logged config never shows it."""
    metadata = {"help": help, "check": check, "fix": fix}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata, repr=not secret)


# -- reusable checks --------------------------------------------------------------------------

def host_port(value: str) -> str | None:
    """`host:port` or `[v6]:port` with a port in 1–65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "expected host:port with a port between 1 and 65535 (IPv6 as [::1]:7777)"
    return None


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"
    return check


class Duration(float):
    """Seconds, written in the config as a number of seconds or with a unit: 90, "90s", "15m", "2h"."""


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86_400}


def parse_duration(value: object) -> Duration:
    """A Duration from a number of seconds or a string such as "90s", "15m", "2h"; ValueError
    (saying what is accepted) for anything else, negative numbers included."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a duration: a number of seconds or e.g. \"90s\", \"15m\", \"2h\"")
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if not match:
            raise ValueError("expected a duration: a number of seconds or e.g. \"90s\", \"15m\", \"2h\"")
        return Duration(float(match[1]) * _DURATION_UNITS[(match[2] or "s").lower()])
    if value < 0 or value != value or value == float("inf"):
        raise ValueError("a duration must be a finite number of seconds, 0 or more")
    return Duration(value)


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# -- the sections -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PrivacyConfig:
    store_network_identity: bool = setting(
        False, "Keep the device's LAN IP, MAC and location in records and raw payloads (redacted by default).")
    pseudonymize_serials: bool = setting(
        False, "Replace every device serial with a stable pseudonym before it is stored or logged.")
    keep_unredacted: bool = setting(
        False, "Keep in full the bytes a decoder could not positively redact (rejected bytes, a frame cut off at "
               "the end of a connection, a body that does not parse). By default only their size, SHA-256 and the "
               "reason are stored, since they may hold a password or serial in clear.")


@dataclass(frozen=True)
class EnphaseConfig:
    local_mode: bool = setting(
        False, "Answer performance reports locally (status success) instead of forwarding to the cloud.")
    hosts: list[str] = setting(
        ["reports.enphaseenergy.com"],
        "Hosts whose /emu_reports/ posts are decoded; other traffic passes untouched.",
        check=lambda v: None if v and all(h and " " not in h for h in v) else "needs at least one host name",
    )
    listen: str = setting(
        "0.0.0.0:8443",
        "Where `pvtap run` has mitmproxy listen for the Envoy's HTTPS, host:port (port 0: any free port).",
        # a lambda, not the function: listen_address is defined below, with the relay's settings
        check=lambda v: listen_address(v))  # noqa: PLW0108
    mode: str = setting(
        "transparent",
        "How the Envoy's traffic reaches mitmproxy: transparent (a firewall REDIRECT on this host), reverse (a DNS "
        "override or DNAT to this host; forwarded to enphase.upstream) or regular (the device uses it as HTTP proxy).",
        check=one_of("transparent", "reverse", "regular"))
    tls_min_version: str = setting(
        "TLS1_2", "Oldest TLS version mitmproxy accepts from the Envoy: TLS1_2 (mitmproxy's default), or TLS1 / TLS1_1 "
        "for an old Envoy that speaks nothing newer (the old cipher suites it needs are then allowed too).",
        check=one_of("TLS1", "TLS1_1", "TLS1_2", "TLS1_3"))
    upstream: str = setting(
        "https://reports.enphaseenergy.com:443", "The cloud reverse mode forwards to, https://host[:port].",
        check=lambda v: None if re.fullmatch(r"https?://[^/:\s]+(:\d{1,5})?/?", v) else "expected https://host[:port]")
    fallback_after: Duration = setting(
        Duration(0), "Once the cloud has been unreachable this long (seconds, or e.g. \"90s\", \"15m\", \"2h\"), "
        "answer performance reports locally until it answers again; 0 = never (the default). For a cloud that is gone, "
        "not one that blinks: a local answer makes the Envoy drop reports the cloud never got (docs/enphase.md).")
    cloud_timeout: Duration = setting(
        Duration(30), "Seconds (or e.g. \"30s\") the cloud may take to accept a connection or a TLS handshake before "
        "it counts as unreachable (for enphase.fallback_after).",
        check=lambda v: None if v > 0 else "must be greater than 0")

    def __post_init__(self) -> None:
        if self.fallback_after and self.local_mode:
            raise ConfigError("enphase.fallback_after", self.fallback_after,
                              "local mode already answers every report locally",
                              "remove enphase.fallback_after, or set enphase.local_mode = false")


RELAY_PROTOCOLS = ("alphaess", "foxess")
RELAY_POLICIES = ("fixed", "transparent", "local", "auto")


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """A check that lets the empty value (meaning "not set") through."""
    return lambda value: None if value in ("", None) else check(value)


def listen_address(value: str) -> str | None:
    """`host:port` as for host_port, where port 0 takes any free port (the log says which)."""
    host, sep, port = value.rpartition(":")
    return None if sep and host and port == "0" else host_port(value)


def ip_with_optional_port(value: str) -> str | None:
    """An IP address, optionally with a port: `192.0.2.53`, `192.0.2.53:5353`, `[2001:db8::53]:53`."""
    host, port = value, ""
    if value.startswith("["):
        host, _, port = value[1:].partition("]")
        port = port.removeprefix(":")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "expected the IP address of a DNS server (optionally :port), not a name"
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        return "the port must be between 1 and 65535"
    return None


def networks(value: list[str]) -> str | None:
    """Each entry an IP network with no host bits set (`192.168.1.0/24`) or a single address."""
    for index, entry in enumerate(value):
        try:
            ipaddress.ip_network(entry.strip())
        except ValueError as exc:
            return f"entry {index} ({entry!r}) is not an IP network: {exc}"
    return None


def sha256_hex(value: str) -> str | None:
    """64 hex digits, colons between the bytes allowed (as browsers and openssl print them)."""
    return None if re.fullmatch(r"[0-9a-fA-F]{64}", value.replace(":", "")) else "expected 64 hex digits (a SHA-256)"


@dataclass(frozen=True)
class ListenerConfig:
    """One relay listener (a `[[relay.listeners]]` table)."""

    protocol: str = setting("", f"Protocol spoken on this port: {', '.join(RELAY_PROTOCOLS)}.",
                            check=one_of(*RELAY_PROTOCOLS))
    listen: str = setting("", "Address to listen on, host:port ([v6]:port; *:port for every IPv4 and IPv6 address).",
                          check=listen_address)
    transport: str = setting("tcp", "tcp, or udp: listen only (policy local); each datagram is decoded, nothing "
                             "is forwarded or answered.", check=one_of("tcp", "udp"))
    policy: str = setting("fixed", "Where connections go: fixed (the upstream), transparent (the original "
                          "destination of a firewall REDIRECT), local (answer as the cloud would), auto "
                          "(the upstream, answering locally while it cannot be reached).",
                          check=one_of(*RELAY_POLICIES))
    upstream: str = setting("", "Cloud host:port for the fixed and auto policies (a name or an IP address).",
                            check=optional(host_port))
    resolver: str = setting("", "IP[:port] of the DNS server that resolves the upstream name; set it when a DNS "
                            "override points the cloud's name at this relay (empty: the system resolver).",
                            check=optional(ip_with_optional_port))
    connect_timeout: float = setting(10.0, "Seconds to resolve and connect to the cloud before giving up "
                                     "(auto then answers locally).", check=positive)
    idle_timeout: float = setting(3600.0, "Seconds without a byte either way before a connection is closed "
                                  "(devices hold connections for hours).", check=positive)
    decode_queue: int = setting(0, "Obsolete, ignored: the copies of every listener share ingest.queue_mb now. A "
                                "value set here logs a warning when the relay starts; remove it.",
                                check=lambda v: None if v >= 0 else "must be 0 or more (better: remove it)")
    max_connections: int = setting(64, "Connections open at once on this listener; more are refused as they are "
                                   "accepted (before any TLS handshake), counted and logged at most every 10 s.",
                                   check=positive)
    first_byte_timeout: float = setting(
        15.0, "Seconds from accept in which the device must send its first byte (on a TLS listener: complete its "
        "handshake and send its first byte), or the connection is closed and its slot freed.", check=positive)
    allow_from: list[str] = setting(
        [], "Source networks allowed to connect (e.g. [\"192.168.1.0/24\", \"2001:db8::/64\"]; an address alone is "
        "one host); others are refused at accept without using a slot. Empty: every source. UDP listeners drop "
        "datagrams from other sources.", check=networks,
        fix="write each entry as an IP network (192.168.1.0/24) or one address (192.168.1.20)")
    udp_max_rate: float = setting(10.0, "UDP listeners: datagrams a second accepted from one source (bursts up to a "
                                  "second's worth); the excess is dropped and counted.", check=positive)
    tls_cert: str = setting("", "PEM certificate presented to devices: with tls_key, the relay terminates the "
                            "devices' TLS here and the decoder sees the application bytes. Relative paths are taken "
                            "in data_dir; a pair that does not exist is generated (self-signed, tls_subject).")
    tls_key: str = setting("", "The private key of tls_cert (PEM; keep it mode 0600, never in a repository).")
    tls_subject: str = setting("/CN=pvtap", "Subject of a generated tls_cert, OpenSSL style: /C=../O=../CN=...")
    upstream_tls: bool = setting(False, "Speak TLS to the upstream, checked by upstream_pin_sha256, upstream_ca_file "
                                 "or (said explicitly) upstream_insecure.")
    upstream_pin_sha256: str = setting("", "SHA-256 of the upstream's certificate (hex, colons allowed; "
                                       "`pvtap certs fingerprint HOST:PORT`): only that certificate is accepted.",
                                       check=optional(sha256_hex))
    upstream_ca_file: str = setting("", "PEM CA bundle the upstream's certificate chain and name are checked against.")
    upstream_insecure: bool = setting(False, "Accept any upstream certificate (no check at all).")


def check_listener(listener: ListenerConfig, key: Callable[[str], str]) -> None:
    """The checks that span settings of one listener; `key(name)` names a setting in the error."""
    if not listener.protocol:
        raise ConfigError(key("protocol"), "", "missing", f"name the protocol: one of {', '.join(RELAY_PROTOCOLS)}")
    if not listener.listen:
        raise ConfigError(key("listen"), "", "missing", "give the address to listen on, e.g. 0.0.0.0:7777")
    if listener.policy in ("fixed", "auto") and not listener.upstream:
        raise ConfigError(key("upstream"), "", f"the {listener.policy} policy needs the cloud's address",
                          f"set {key('upstream')} to the cloud's host:port (e.g. www.alphaess.com:7777), or set "
                          f"{key('policy')} to transparent (firewall REDIRECT) or local (no cloud)")
    if listener.policy in ("transparent", "local") and listener.upstream:
        raise ConfigError(key("upstream"), listener.upstream, f"the {listener.policy} policy does not use an upstream",
                          f"remove {key('upstream')}, or set {key('policy')} to fixed or auto")
    if listener.resolver and not listener.upstream:
        raise ConfigError(key("resolver"), listener.resolver, "a resolver is only used to resolve the upstream",
                          f"remove {key('resolver')}, or set {key('upstream')} ({key('policy')} fixed or auto)")
    check_listener_tls(listener, key)


def check_listener_tls(listener: ListenerConfig, key: Callable[[str], str]) -> None:
    """UDP listens only; TLS files come in pairs; upstream TLS says how the cloud is checked."""
    if listener.transport == "udp":
        if listener.policy != "local":
            raise ConfigError(key("policy"), listener.policy, "a UDP listener only listens",
                              f'set {key("policy")} = "local" (datagrams are decoded, never forwarded)')
        if listener.tls_cert or listener.upstream_tls:
            raise ConfigError(key("transport"), "udp", "TLS settings need a TCP listener",
                              f"remove the tls_* and upstream_tls settings, or set {key('transport')} = \"tcp\"")
    if bool(listener.tls_cert) != bool(listener.tls_key):
        missing = "tls_key" if listener.tls_cert else "tls_cert"
        raise ConfigError(key(missing), "", "TLS termination needs both tls_cert and tls_key",
                          f"set {key(missing)} too (`pvtap certs` makes a pair), or remove the other")
    checks = [name for name in ("upstream_pin_sha256", "upstream_ca_file", "upstream_insecure")
              if getattr(listener, name)]
    if not listener.upstream_tls:
        if checks:
            raise ConfigError(key(checks[0]), getattr(listener, checks[0]), "only used with upstream_tls = true",
                              f"set {key('upstream_tls')} = true, or remove {key(checks[0])}")
        return
    if listener.policy == "local":
        raise ConfigError(key("upstream_tls"), True, "the local policy has no upstream",
                          f"remove {key('upstream_tls')}, or use policy fixed, auto or transparent")
    if len(checks) != 1:
        problem = ("nothing says how to check the upstream's certificate" if not checks
                   else f"{' and '.join(checks)} are all set; choose one")
        raise ConfigError(key("upstream_tls"), True, problem,
                          f"set exactly one of {key('upstream_pin_sha256')} (`pvtap certs fingerprint HOST:PORT`), "
                          f"{key('upstream_ca_file')}, or {key('upstream_insecure')} = true")
    if listener.upstream_ca_file and not Path(listener.upstream_ca_file).is_file():
        raise ConfigError(key("upstream_ca_file"), listener.upstream_ca_file, "no such file",
                          "point it at a PEM CA bundle")


@dataclass(frozen=True)
class RelayConfig:
    listeners: list[ListenerConfig] = setting(
        [], "The relay's listeners ([[relay.listeners]] tables); none: one per supported device on its usual "
            "port (see docs/relay.md).")
    event_loop: str = setting(
        "asyncio", "The relay's event loop: asyncio (the standard library's) or uvloop (libuv: about a third less CPU "
                   "per relayed frame, docs/benchmarks.md; not with listeners that terminate TLS).",
        check=one_of("asyncio", "uvloop"))

    def __post_init__(self) -> None:
        seen: dict[tuple[str, str], int] = {}
        for i, listener in enumerate(self.listeners):
            def key(name: str, i: int = i) -> str:
                return f"relay.listeners[{i}].{name}"

            check_listener(listener, key)
            where = (listener.transport, listener.listen)  # UDP and TCP may share a port
            if where in seen and not listener.listen.endswith(":0"):  # port 0: each gets a free port of its own
                raise ConfigError(f"relay.listeners[{i}].listen", listener.listen,
                                  f"relay.listeners[{seen[where]}] already listens there",
                                  "give every listener its own address or port")
            seen[where] = i
        tls = [i for i, listener in enumerate(self.listeners) if listener.tls_cert]
        if self.event_loop == "uvloop" and tls:  # the device's first TLS bytes reach the stream before start_tls does
            raise ConfigError("relay.event_loop", "uvloop", f"relay.listeners[{tls[0]}] terminates TLS (tls_cert), "
                              "which the relay does only on the asyncio loop",
                              'set relay.event_loop = "asyncio", or use uvloop in a relay without TLS listeners')


def _influx_url(value: str) -> str | None:
    if not value:
        return None
    return None if re.fullmatch(r"https?://[^/\s]+(/\S*)?", value) else "expected http(s)://host[:port]"


def _existing_file(value: str) -> str | None:
    return None if not value or Path(value).is_file() else "no such file"


def _at_least(minimum: float) -> Callable[[float], str | None]:
    return lambda value: None if value >= minimum else f"must be at least {minimum:g}"


@dataclass(frozen=True)
class InfluxConfig:
    """Where and how the forwarder delivers the local stores (docs/influxdb.md)."""

    url: str = setting("", "InfluxDB URL (e.g. http://influxdb:8086); empty keeps records in the local store only.",
                       check=_influx_url)
    token: str = setting("", "API token (InfluxDB 1.8: user:password; InfluxDB 3: a database token).")
    org: str = setting("", "Organisation (InfluxDB 1.8: -; InfluxDB 3: ignored, any value).")
    bucket: str = setting("pvtap", "Bucket (InfluxDB 1.8: database/retention_policy; InfluxDB 3: the database).",
                          check=lambda v: None if v.strip() else "must not be empty")
    verify_tls: bool = setting(True, "Check the server's TLS certificate for https:// URLs (false only for testing).")
    ca_file: str = setting("", "PEM file with the CA that signed the server certificate (empty: system CAs).",
                           check=_existing_file, fix="point influx.ca_file at an existing PEM file or leave it empty")
    timeout_s: float = setting(10.0, "Seconds one write request may take before it counts as failed and is retried.",
                               check=positive)
    gzip: bool = setting(False, "Compress write requests with gzip.")
    batch_size: int = setting(1000, "Records per write request; a full batch is sent at once.",
                              check=lambda v: None if 1 <= v <= 100_000 else "must be between 1 and 100000")
    batch_age_s: float = setting(1.0, "Send a partial batch when its oldest record has waited this many seconds.",
                                 check=_at_least(0.0))
    retry_initial_s: float = setting(1.0, "First retry delay after a failed write; doubles each time (with jitter).",
                                     check=positive)
    retry_max_s: float = setting(60.0, "Longest delay between retries (connection errors retry forever).",
                                 check=positive)
    retry_after_max_s: float = setting(600.0, "Longest Retry-After from the server that is honoured.",
                                       check=positive)
    max_store_mb: int = setting(0, "Bound on each local store's size in MiB (0: no bound). Over it, the oldest "
                                   "delivered records and raw payloads are pruned first.", check=_at_least(0))
    prune_undelivered: bool = setting(
        True, "When pruning delivered rows is not enough to stay under max_store_mb, also drop the oldest "
              "undelivered records (logged as an error with the count); false keeps them and lets the store grow.")

    def __post_init__(self) -> None:
        if self.url and not self.org.strip():
            raise ConfigError("influx.org", self.org, "an organisation is needed when influx.url is set",
                              'set influx.org (InfluxDB 2: your org name; InfluxDB 1.8: "-"; InfluxDB 3: any '
                              'value, e.g. "-")')
        if self.retry_max_s < self.retry_initial_s:
            raise ConfigError("influx.retry_max_s", self.retry_max_s,
                              f"smaller than influx.retry_initial_s ({self.retry_initial_s:g})",
                              "make retry_max_s at least retry_initial_s")
        if self.ca_file and not self.verify_tls:
            raise ConfigError("influx.verify_tls", self.verify_tls, "influx.ca_file is set but verification is off",
                              "set verify_tls = true to use the CA file, or drop ca_file")


#: the longest ingest.stop_decode_s, so that a relay's whole stop stays under `pvtap run`'s STOP_TIMEOUT
MAX_STOP_DECODE_S = 10.0


def _workers(value: int) -> str | None:
    return None if 0 <= value <= 64 else "must be between 0 (one per core beyond the first) and 64"


@dataclass(frozen=True)
class IngestConfig:
    """How copies are archived and decoded, off the forwarding processes (docs/design.md)."""

    workers: int = setting(
        0, "Ingest worker processes of the relay, each with its own store file (relay.sqlite, relay-1.sqlite, ...); "
           "connections are spread over them by device address. 0: one per CPU core beyond the first, at most 4 "
           "(1 on a 2-core machine).", check=_workers)
    queue_mb: int = setting(
        32, "MiB of copies a forwarding process holds for its ingest worker while the worker is busy (and the worker "
            "for its archive); beyond it copies are dropped and counted (pvtap status). Forwarding never waits.",
        check=lambda v: None if 1 <= v <= 4096 else "must be between 1 and 4096")
    stop_decode_s: float = setting(
        2.0, "Seconds a stopping ingest worker goes on decoding its backlog before it leaves the rest for the next "
             "start (nothing is lost: the backlog stays in the raw archive). It bounds how long a stop takes, which "
             "matters under a supervisor's stop grace (Docker: stop_grace_period); docs/relay.md, \"Stopping\".",
        check=lambda v: None if 0 <= v <= MAX_STOP_DECODE_S else f"must be between 0 and {MAX_STOP_DECODE_S:g}")


_MQTT_URL = re.compile(r"(mqtts?)://(\[[0-9a-fA-F:]+\]|[^/:\s@\[\]]+)(?::(\d{1,5}))?/?")


def _mqtt_url(value: str) -> str | None:
    match = _MQTT_URL.fullmatch(value)
    if not value or (match and 0 < int(match[3] or 1883) < 65536):
        return None
    return "expected mqtt://host[:port] or mqtts://host[:port] (user and password go in mqtt.username/password)"


def broker_address(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of a valid mqtt.url; the port defaults to 1883, or 8883 for mqtts."""
    match = _MQTT_URL.fullmatch(url)
    assert match, f"not a checked mqtt.url: {url!r}"
    tls = match[1] == "mqtts"
    return match[2].strip("[]"), int(match[3] or (8883 if tls else 1883)), tls


def _topic_prefix(value: str) -> str | None:
    if not value or value.startswith("/") or value.endswith("/") or any(c in value for c in "#+\0 "):
        return "expected a topic prefix such as pvtap: no leading or trailing /, no #, + or spaces"
    return None


@dataclass(frozen=True)
class MqttConfig:
    """Publishing to an MQTT broker, with Home Assistant discovery (docs/mqtt.md)."""

    url: str = setting("", "Broker URL: mqtt://host[:port] (1883) or mqtts://host[:port] (8883, TLS); empty: no MQTT.",
                       check=_mqtt_url)
    username: str = setting("", "User name at the broker (empty: connect without one).")
    password: str = setting("", "Password at the broker (with mqtt.username).")
    ca_file: str = setting("", "PEM file with the CA that signed the broker's certificate, for mqtts:// (empty: the "
                           "system CAs).", check=_existing_file,
                           fix="point mqtt.ca_file at an existing PEM file or leave it empty")
    client_id: str = setting("pvtap", "Client id at the broker; each publisher adds its name (pvtap-relay, "
                             "pvtap-enphase, pvtap-mqtt), so several can connect at once.",
                             check=lambda v: None if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", v)
                             else "use 1-40 letters, digits and _ . -")
    topic_prefix: str = setting("pvtap", "First level of pvtap's topics: <prefix>/<vendor>/<serial>/state.",
                                check=_topic_prefix)
    discovery: bool = setting(True, "Publish Home Assistant MQTT discovery configs (one per sensor, retained).")
    discovery_prefix: str = setting("homeassistant", "Home Assistant's discovery prefix (its MQTT integration "
                                    "setting; also where it announces itself: <prefix>/status).",
                                    check=_topic_prefix)
    min_interval_s: float = setting(10.0, "Publish a device's state at most this often; what comes in between is "
                                    "merged and its newest values sent when the interval is over (0: every update).",
                                    check=_at_least(0.0))
    offline_after_s: float = setting(900.0, "A device is shown offline after this long without a record from it "
                                     "(Envoys on low-bandwidth reporting send a few times a day: raise it for them).",
                                     check=positive)
    exclude: list[str] = setting([], "Serials (as stored: pseudonyms when privacy.pseudonymize_serials is on) never "
                                 "published; their retained topics are cleared at start. An Envoy's serial "
                                 "excludes its microinverters too.")
    retry_max_s: float = setting(60.0, "Longest wait between connection attempts (the wait doubles from 1 s; a refused "
                                 "password waits this long at once).", check=positive)

    def __post_init__(self) -> None:
        if self.password and not self.username:
            raise ConfigError("mqtt.password", "***", "a password without a user name",
                              "set mqtt.username too, or remove mqtt.password")
        if self.ca_file and not self.url.startswith("mqtts://"):
            raise ConfigError("mqtt.ca_file", self.ca_file, "a CA file is only used for TLS",
                              "use an mqtts:// URL in mqtt.url, or remove mqtt.ca_file")
        if self.discovery and self.discovery_prefix == self.topic_prefix:
            raise ConfigError("mqtt.topic_prefix", self.topic_prefix, "the same as mqtt.discovery_prefix",
                              "give pvtap's topics their own prefix (the default is pvtap)")


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WebConfig:
    """The read-only web view (`pvtap web`, started by `pvtap run`): see docs/web.md."""

    listen: str = setting(
        "127.0.0.1:8080", "Where the web view listens, host:port; empty: `pvtap run` starts no web view. Any "
        "address but loopback opens it to the LAN and then needs web.password.",
        check=optional(listen_address))
    password: str = setting(
        "", "Password the browser must give (HTTP basic authentication, any user name) when web.listen is not "
            "a loopback address; there is no default one. At least 8 characters.", secret=True)
    refresh_s: float = setting(5.0, "Seconds between the page's live updates.",
                               check=lambda v: None if 0.2 <= v <= 3600 else "must be between 0.2 and 3600")
    silent_after_s: float = setting(
        900.0, "A device without contact for this many seconds is shown as silent (an Envoy reports every 5 min).",
        check=positive)

    def __post_init__(self) -> None:
        if self.password and len(self.password) < 8:
            raise ConfigError("web.password", "(hidden)", "shorter than 8 characters",
                              "set web.password (or PVTAP_WEB_PASSWORD) to a longer password of your own")
        if self.listen and not self.password and not is_loopback(split_host_port(self.listen)[0]):
            raise ConfigError("web.password", "", f"web.listen = {self.listen!r} opens the web view to the LAN, "
                              "and it has no password",
                              "set web.password (or PVTAP_WEB_PASSWORD) to a password of your own (8 characters "
                              "or more), or listen on 127.0.0.1 only (web.listen = \"127.0.0.1:8080\")")


@dataclass(frozen=True)
class HealthConfig:
    """The health and metrics endpoints of each process (docs/health.md)."""

    relay_listen: str = setting(
        "127.0.0.1:9108", "Where the relay serves /healthz, /readyz and /metrics, host:port (port 0: any free port; "
        "empty: no endpoint). Keep it on a local or management address: it is not authenticated.",
        check=optional(listen_address))
    enphase_listen: str = setting(
        "127.0.0.1:9109", "The same for mitmproxy with the Enphase addon.", check=optional(listen_address))
    stats_every_s: float = setting(
        60.0, "Every this many seconds each process stores its own counts (connections, bytes, errors, InfluxDB "
        "backlog) as a pvtap_stats record, for the pvtap health dashboard; 0: never.", check=_at_least(0.0))


@dataclass(frozen=True)
class Config:
    data_dir: Path = setting(Path("./data"), "Directory holding the local SQLite stores.")
    log_level: str = setting("info", "Log verbosity.", check=one_of("debug", "info", "warning", "error"))
    privacy: PrivacyConfig = setting(PrivacyConfig(), "")
    enphase: EnphaseConfig = setting(EnphaseConfig(), "")
    relay: RelayConfig = setting(RelayConfig(), "")
    influx: InfluxConfig = setting(InfluxConfig(), "")
    ingest: IngestConfig = setting(IngestConfig(), "")
    mqtt: MqttConfig = setting(MqttConfig(), "")
    health: HealthConfig = setting(HealthConfig(), "")
    web: WebConfig = setting(WebConfig(), "")


# -- loading ----------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any; `PVTAP_CONFIG` names it when `path` is None), apply the
    environment, validate. Raises ConfigError."""
    env = os.environ if env is None else env
    path = path if path is not None else env.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config file", str(p), "the file does not exist",
                              "create it (see docs/config.md) or drop --config / PVTAP_CONFIG") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config file", str(p), f"not valid TOML ({exc})", "correct the TOML syntax") from None
        source = str(p)
    return _build(Config, data, env, prefix="", source=source)


def unknown_env(env: Mapping[str, str] | None = None) -> list[str]:
    """The `PVTAP_*` variables that name no setting, sorted."""
    env = os.environ if env is None else env
    known = _env_names()
    return sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known)


def env_warnings(env: Mapping[str, str] | None = None) -> list[str]:
    """One line per `PVTAP_*` variable that names no setting (a typo is otherwise silently
    ignored), with the nearest setting's variable."""
    known = _env_names()
    out = []
    for name in unknown_env(env):
        guess = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f"did you mean {guess[0]}?" if guess else "settings and their variables: docs/config.md"
        out.append(f"warning: environment variable {name} is not a pvtap setting and is ignored; {hint}")
    return out


def _env_names() -> set[str]:
    return {CONFIG_ENV, *(name for _key, name, _default, _help in describe())}


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, env var, default, help) for every setting, for `--help` and the docs."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING, f"{key} has no default"
            default = f.default_factory()
        if dataclasses.is_dataclass(_hint(cls, f.name)):
            out.extend(describe(_hint(cls, f.name), key + "."))
        else:
            out.append((key, _env_name(key), default, f.metadata.get("help", "")))
    return out


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


def _build(cls: type, data: Mapping[str, Any], env: Mapping[str, str], prefix: str, source: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "config", data, "expected a table", f"write [{prefix.rstrip('.')}]")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            guess = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {prefix}{guess[0]}?" if guess else f"known keys: {', '.join(names)}"
            raise ConfigError(f"{prefix}{key}", data[key], "unknown setting", hint, source)
    values = {}
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, data.get(f.name, {}), env, key + ".", source)
            continue
        env_key = _env_name(key)
        if env_key in env and _is_table_list(hint):
            raise ConfigError(key, env[env_key], "listeners come only from the config file, not from the environment",
                              f"unset {env_key} and write each listener in the config file as a [[{key}]] table "
                              'with protocol, listen and policy on lines of their own (docs/relay.md)', env_key)
        if env_key in env:
            raw, where = env[env_key], env_key
            value = _from_env(key, hint, raw, where)
        elif f.name in data:
            raw, where = data[f.name], source
            value = _coerce(key, hint, raw, where, env)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, None, "missing", f"add {key} ({f.metadata['help']})", source)
        else:
            continue
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            fix = f.metadata.get("fix") or f"set {key} to a valid value ({f.metadata['help']})"
            raise ConfigError(key, raw, problem, fix, where)
        values[f.name] = value
    return cls(**values)


def _is_table_list(hint: Any) -> bool:
    """A list of settings tables (`[[relay.listeners]]`), which only the file can hold."""
    if typing.get_origin(hint) is not list:
        return False
    (item,) = typing.get_args(hint)
    return isinstance(item, type) and dataclasses.is_dataclass(item)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_env(key: str, hint: Any, raw: str, where: str) -> Any:
    if hint is bool:
        if raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigError(key, raw, "expected a boolean", f"set {where} to true or false", where)
    if typing.get_origin(hint) is list:
        return _coerce(key, hint, [part.strip() for part in raw.split(",") if part.strip()], where, {})
    return _coerce(key, hint, raw, where, {})


def _coerce(key: str, hint: Any, raw: Any, where: str, env: Mapping[str, str]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if raw in (None, "") else _coerce(key, args[0], raw, where, env)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(raw, Mapping) and _is_table_list(hint):
            raise ConfigError(key, raw, f"[{key}] (single brackets) is one table, but {key} is a list of tables",
                              f"write [[{key}]] (double brackets) above each one", where)
        if not isinstance(raw, list):
            raise ConfigError(key, raw, "expected a list", f"write {key} = [ ... ]", where)
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            return [_build(item, entry, {}, f"{key}[{i}].", where) for i, entry in enumerate(raw)]
        return [_coerce(f"{key}[{i}]", item, v, where, env) for i, v in enumerate(raw)]
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        raise ConfigError(key, raw, "expected a boolean", f"write {key} = true or false", where)
    if hint in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(key, raw, f"expected a number ({hint.__name__})", f"write a number for {key}", where)
        try:
            value = hint(raw)
        except (TypeError, ValueError):
            raise ConfigError(key, raw, f"expected a number ({hint.__name__})", f"write a number for {key}",
                              where) from None
        if hint is int and isinstance(raw, float) and raw != value:
            raise ConfigError(key, raw, "expected a whole number", f"write an integer for {key}", where)
        return value
    if hint is Duration:
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise ConfigError(key, raw, str(exc), f'write {key} = "90s" (or 90, "15m", "2h")', where) from None
    if hint is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(key, raw, "expected a string", f'quote it: {key} = "..."', where)
    if hint is Path:
        if isinstance(raw, str) and raw:
            return Path(raw)
        raise ConfigError(key, raw, "expected a path", f'write {key} = "/some/dir"', where)
    raise TypeError(f"config field {key} has unsupported type {hint!r}")
