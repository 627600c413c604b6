"""The relay's settings: its listeners (`[[relay.listeners]]` tables, only from the file) and the
checks that span several settings of a listener (policy and upstream, TLS files in pairs, how an
upstream's certificate is checked), which `pvtap relay --listen` applies to its own listeners too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pvtap.config.checks import (
    ConfigError,
    host_port,
    ip_with_optional_port,
    listen_address,
    networks,
    one_of,
    optional,
    positive,
    setting,
    sha256_hex,
)

RELAY_PROTOCOLS = ("alphaess", "foxess")
RELAY_POLICIES = ("fixed", "transparent", "local", "auto")


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
        "uvloop", "The relay's event loop: uvloop (libuv: about a third less CPU per relayed frame and a shorter "
                  "worst round trip at 1,000 devices, docs/benchmarks.md) or asyncio (the standard library's).",
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
