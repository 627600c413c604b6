"""The settings table: one frozen dataclass per section ([privacy], [enphase], [influx], [ingest],
[mqtt], [web], [health]; [relay] is listeners.py) and `Config`, which holds them. Each setting
carries its default, its help text (docs/config.md is generated from it) and its check; a check
spanning settings of one section is its `__post_init__`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pvtap.config.checks import (
    HIDDEN,
    ConfigError,
    Duration,
    is_loopback,
    listen_address,
    one_of,
    optional,
    positive,
    setting,
    split_host_port,
)
from pvtap.config.listeners import RelayConfig

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
        check=listen_address)
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
    token: str = setting("", "API token (InfluxDB 1.8: user:password; InfluxDB 3: a database token).", secret=True)
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
    stuck_after_s: float = setting(300.0, "With records waiting, seconds without delivery progress before the "
                                          "forwarder counts as stuck (`pvtap status`, /readyz fails).", check=positive)

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
            "for its archive); beyond it copies are dropped and counted (pvtap status). Forwarding never waits. The "
            "copies not yet archived are also held to what the worker archives in half of its stop grace, as it "
            "measures itself (at least 2,000 copies), so that a stop loses none of them (docs/design.md, Bounds).",
        check=lambda v: None if 1 <= v <= 4096 else "must be between 1 and 4096")
    stop_decode_s: float = setting(
        2.0, "Seconds a stopping ingest worker goes on decoding its backlog before it leaves the rest for the next "
             "start (nothing is lost: the backlog stays in the raw archive). It bounds how long a stop takes, which "
             "matters under a supervisor's stop grace (Docker: stop_grace_period); docs/relay.md, \"Stopping\".",
        check=lambda v: None if 0 <= v <= MAX_STOP_DECODE_S else f"must be between 0 and {MAX_STOP_DECODE_S:g}")
    cpu_priority: str = setting(
        "adaptive", "The ingest workers' CPU priority, so that forwarding goes first. adaptive: a worker runs on "
                    "CPU time nothing else wants (Linux SCHED_IDLE) while it keeps up, so a decode never delays a "
                    "forwarded frame (a lower added p99 at 1,000 devices, docs/design.md), and at nice 10 as soon as "
                    "it falls behind (copies unarchived for a second, a quarter of what may wait for it waiting, "
                    "5,000 payloads to decode); the relay switches it, which needs root or CAP_SYS_NICE (as in the "
                    "container), else it stays at nice 10. low: nice 10 always. idle: SCHED_IDLE always: on cores "
                    "busy with other work the workers get almost nothing, and past ingest.queue_mb copies are "
                    "dropped (counted, pvtap status). At a stop, once forwarding is over, the workers go back to the "
                    "relay's own priority (root or CAP_SYS_NICE) to archive the last copies.",
        check=one_of("adaptive", "idle", "low"))


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
    password: str = setting("", "Password at the broker (with mqtt.username).", secret=True)
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
            raise ConfigError("mqtt.password", HIDDEN, "a password without a user name",
                              "set mqtt.username too, or remove mqtt.password")
        if self.ca_file and not self.url.startswith("mqtts://"):
            raise ConfigError("mqtt.ca_file", self.ca_file, "a CA file is only used for TLS",
                              "use an mqtts:// URL in mqtt.url, or remove mqtt.ca_file")
        if self.discovery and self.discovery_prefix == self.topic_prefix:
            raise ConfigError("mqtt.topic_prefix", self.topic_prefix, "the same as mqtt.discovery_prefix",
                              "give pvtap's topics their own prefix (the default is pvtap)")


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
            raise ConfigError("web.password", HIDDEN, "shorter than 8 characters",
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
