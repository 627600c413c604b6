"""Prometheus metrics of one pvtap process, read from snapshot providers.

Nothing on the forwarding path counts for Prometheus. The pieces keep the plain counts they keep
anyway (a connection its bytes, the channel what it sent, the ingest workers their snapshot);
each registers a *provider*, a callable returning one of the snapshots below, and the
`Collector` calls them when Prometheus scrapes (on the health server's thread). Re-wiring a
piece means registering another callable.

Labels stay few and bounded: protocol, direction, outcome, stage, state. Per-device last contact is the
one exception; see `MAX_DEVICES`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as PrometheusCollector

log = logging.getLogger("pvtap.metrics")

#: Devices exported with their own last-contact series, per process. A home has a few gateways
#: (one Envoy, one battery, some inverters; microinverters are not devices here); a fleet of
#: thousands belongs in InfluxDB (the pvtap health dashboard), not in Prometheus labels. Past the
#: limit the devices heard from longest ago are left out and counted.
MAX_DEVICES = 256


@dataclass
class Traffic:
    """What a forwarding process moved: the relay's listeners, or mitmproxy's Enphase flows."""

    open: Counter[str] = field(default_factory=Counter)  # protocol -> connections open now
    closed: Counter[tuple[str, str]] = field(default_factory=Counter)  # (protocol, outcome) -> ended
    bytes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (protocol, direction) -> bytes
    frames: Counter[str] = field(default_factory=Counter)  # protocol -> frames seen here (Enphase reports)

    def add(self, other: Traffic) -> None:
        for name in ("open", "closed", "bytes", "frames"):
            getattr(self, name).update(getattr(other, name))


class FlowTraffic:
    """What mitmproxy's hooks see of the Enphase traffic: client connections and report posts.
    The hooks run on mitmproxy's event loop and only add to counters; `snapshot` may run on
    any thread."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self._traffic = Traffic()
        self._traffic.open[protocol] = 0
        for direction in ("up", "down"):
            self._traffic.bytes[(protocol, direction)] = 0
        self._traffic.frames[protocol] = 0
        self._lock = threading.Lock()

    def connected(self) -> None:
        with self._lock:
            self._traffic.open[self.protocol] += 1

    def disconnected(self, outcome: str) -> None:
        with self._lock:
            self._traffic.open[self.protocol] -= 1
            self._traffic.closed[(self.protocol, outcome)] += 1

    def report(self, up: int, down: int) -> None:
        """A report posted (up) and its answer (down; 0 when none came)."""
        with self._lock:
            self._traffic.frames[self.protocol] += 1
            self._traffic.bytes[(self.protocol, "up")] += up
            self._traffic.bytes[(self.protocol, "down")] += down

    def snapshot(self) -> Traffic:
        out = Traffic()
        with self._lock:
            out.add(self._traffic)
        return out


#: the forwarder states of pvtap/store/supervisor.py, least to most severe
FORWARDER_STATES = ("off", "idle", "delivering", "restarting", "failing", "stuck")
#: the MQTT publisher states of the worker snapshot (pvtap/ingest/outputs.py `mqtt_state`), least to
#: most severe: "stopped" only while pvtap shuts down, "dead" when its thread ended on an error
MQTT_STATES = ("off", "connected", "connecting", "stopped", "failing", "dead")


@dataclass(frozen=True)
class WorkerStats:
    """A process's ingest workers, from their snapshots (`Channel.stats()` or `ChannelPool.stats()`,
    pvtap/ingest/channel.py): what they framed, archived, decoded and forwarded."""

    workers: int
    alive: int
    restarts: int
    frames: int
    framing_errors: int  # a protocol's Tap raised
    decode_errors: int
    redact_errors: int
    payloads: int  # raw payloads archived
    records: int
    decode_backlog: int  # archived, not decoded yet
    buffered_bytes: int  # copies waiting in this process for the worker
    channel_dropped: int  # copies that never reached a worker (its buffer full, it was down, or behind)
    archive_dropped: int  # copies a worker had no room for in its archive queue
    archive_failing: bool  # the store does not take writes (full or failing disk)
    forwarder: str  # the worst forwarder state (FORWARDER_STATES)
    forwarder_error: str | None
    backlog: int  # records not yet accepted by InfluxDB
    delivered: int  # since the workers started
    delivery_failures: int  # failed write attempts since the workers started
    forwarder_restarts: int
    mqtt: str = "off"  # the worst MQTT publisher state (MQTT_STATES)
    mqtt_error: str | None = None  # its last error while not connected
    mqtt_broker: str = ""  # "<url> as <client id>" of that publisher
    mqtt_published: int = 0  # messages since the publishers started
    mqtt_backlog: int = 0  # records in the stores the publishers have not read yet
    mqtt_devices: int = 0  # devices with state to publish
    mqtt_refused: int = 0  # energy counter values held back (lower than the last, or implausible)
    behind_dropped: int = 0  # of channel_dropped: more than the worker archives within its stop grace waited

    @classmethod
    def of(cls, stats: dict[str, Any]) -> WorkerStats:
        """From one channel's stats, or a pool's (sums, and each worker's under `workers`)."""
        each = stats.get("workers") or [stats]
        worst = max((w.get("forwarder", "off") for w in each), key=severity, default="off")
        error = next((w.get("forwarder_error") for w in each if w.get("forwarder") == worst), None)
        mqtt = max((w.get("mqtt", "off") for w in each), key=mqtt_severity, default="off")
        mqtt_worst: dict[str, Any] = next((w for w in each if w.get("mqtt") == mqtt), {})

        def n(key: str) -> int:
            return int(stats.get(key, 0) or 0)

        return cls(workers=len(each), alive=sum(bool(w.get("worker_alive")) for w in each),
                   restarts=n("worker_restarts"), frames=n("frames"), framing_errors=n("tap_errors"),
                   decode_errors=n("decode_errors"), redact_errors=n("redact_errors"), payloads=n("raw_archived"),
                   records=n("records"), decode_backlog=max(0, n("decode_backlog")), buffered_bytes=n("buffered_bytes"),
                   channel_dropped=n("copies_dropped"), archive_dropped=n("dropped_copies"),
                   archive_failing=any(w.get("archive_failing") for w in each), forwarder=worst, forwarder_error=error,
                   backlog=n("forwarder_backlog"), delivered=n("forwarder_delivered"),
                   delivery_failures=n("forwarder_failures"), forwarder_restarts=n("forwarder_restarts"),
                   mqtt=mqtt, mqtt_error=mqtt_worst.get("mqtt_error"), mqtt_broker=mqtt_worst.get("mqtt_broker", ""),
                   mqtt_published=n("mqtt_published"),
                   mqtt_backlog=n("mqtt_backlog"), mqtt_devices=n("mqtt_devices"), mqtt_refused=n("mqtt_refused"),
                   behind_dropped=n("copies_dropped_behind"))


def severity(state: str) -> int:
    """Order of FORWARDER_STATES; an unknown state counts as the worst."""
    return FORWARDER_STATES.index(state) if state in FORWARDER_STATES else len(FORWARDER_STATES)


def mqtt_severity(state: str) -> int:
    """Order of MQTT_STATES; an unknown state counts as the worst."""
    return MQTT_STATES.index(state) if state in MQTT_STATES else len(MQTT_STATES)


@dataclass(frozen=True, order=True)
class Contact:
    """When a device was last heard from (Unix time)."""

    protocol: str
    device: str
    last: float


@dataclass
class Providers:
    """The snapshot providers of one process; each list may hold several (they are summed)."""

    traffic: list[Callable[[], Traffic]] = field(default_factory=list)
    workers: list[Callable[[], WorkerStats]] = field(default_factory=list)
    contacts: list[Callable[[], Iterable[Contact]]] = field(default_factory=list)

    def read_traffic(self) -> Traffic:
        total = Traffic()
        for provider in self.traffic:
            total.add(provider())
        return total

    def read_workers(self) -> list[WorkerStats]:
        return [provider() for provider in self.workers]

    def read_contacts(self) -> list[Contact]:
        latest: dict[tuple[str, str], float] = {}
        for provider in self.contacts:
            for contact in provider():
                key = (contact.protocol, contact.device)
                latest[key] = max(latest.get(key, 0.0), contact.last)
        return [Contact(p, d, t) for (p, d), t in latest.items()]


class Collector(PrometheusCollector):
    """Turns the providers' snapshots into metric families at scrape time. A provider that
    raises costs its own families for that scrape (logged), never the scrape."""

    def __init__(self, providers: Providers, process: str) -> None:
        self.providers = providers
        self.process = process  # "relay" or "enphase": the pvtap_info label

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("pvtap_info", "pvtap process (value 1)", labels=["process"])
        info.add_metric([self.process], 1)
        yield info
        for part in (self._traffic, self._frames, self._workers, self._contacts):
            try:
                yield from part()
            except Exception:
                log.exception("metrics: %s failed; its metrics are left out of this scrape", part.__name__)

    def _traffic(self) -> Iterator[Metric]:
        if not self.providers.traffic:
            return
        t = self.providers.read_traffic()
        yield _gauge("pvtap_connections_open", "Device connections open now", ["protocol"],
                     {(p,): n for p, n in t.open.items()})
        yield _counter("pvtap_connections", "Device connections ended, by how they ended", ["protocol", "outcome"],
                       t.closed)
        yield _counter("pvtap_bytes", "Bytes moved, up (device to cloud) and down", ["protocol", "direction"], t.bytes)

    def _frames(self) -> Iterator[Metric]:
        frames = sum(self.providers.read_traffic().frames.values())
        yield _counter("pvtap_frames", "Frames the decoders were given (relay: framed copies; Enphase: reports)",
                       [], {(): frames + sum(w.frames for w in self.providers.read_workers())})

    def _workers(self) -> Iterator[Metric]:
        stats = self.providers.read_workers()
        if not stats:
            return
        yield _gauge("pvtap_ingest_workers", "Ingest worker processes, and how many run", ["state"],
                     {("configured",): sum(w.workers for w in stats), ("alive",): sum(w.alive for w in stats)})
        yield _counter("pvtap_ingest_worker_restarts", "Ingest workers restarted after they died", [],
                       {(): sum(w.restarts for w in stats)})
        yield _counter("pvtap_decode_errors", "Failures: framing (a Tap raised), decoding (a payload's decoder), "
                       "redaction (a payload kept without its bytes)", ["stage"],
                       {("framing",): sum(w.framing_errors for w in stats),
                        ("decoding",): sum(w.decode_errors for w in stats),
                        ("redaction",): sum(w.redact_errors for w in stats)})
        yield _counter("pvtap_dropped_copies", "Copies not archived for lack of room (forwarding unaffected): in "
                       "this process's channel to the worker (its buffer full or the worker down), held back "
                       "because the worker was as far behind as it archives within its stop grace, or in the "
                       "worker's archive queue", ["stage"],
                       {("channel",): sum(w.channel_dropped - w.behind_dropped for w in stats),
                        ("behind",): sum(w.behind_dropped for w in stats),
                        ("archive",): sum(w.archive_dropped for w in stats)})
        yield _gauge("pvtap_ingest_queue_bytes", "Bytes of copies waiting in this process for the ingest worker",
                     [], {(): sum(w.buffered_bytes for w in stats)})
        yield _gauge("pvtap_decode_backlog_payloads", "Raw payloads archived and not decoded yet", [],
                     {(): sum(w.decode_backlog for w in stats)})
        yield _counter("pvtap_ingest_payloads", "Raw payloads archived in the local store", [],
                       {(): sum(w.payloads for w in stats)})
        yield _counter("pvtap_ingest_records", "Records decoded into the local store", [],
                       {(): sum(w.records for w in stats)})
        yield _gauge("pvtap_archive_failing", "1 while the local store does not take writes", [],
                     {(): float(any(w.archive_failing for w in stats))})
        yield _gauge("pvtap_store_backlog_records", "Records in the local store not yet accepted by InfluxDB", [],
                     {(): sum(w.backlog for w in stats)})
        yield _counter("pvtap_delivered_records", "Records InfluxDB accepted", [],
                       {(): sum(w.delivered for w in stats)})
        yield _counter("pvtap_delivery_failures", "Failed write attempts to InfluxDB (each retried)", [],
                       {(): sum(w.delivery_failures for w in stats)})
        worst = max((w.forwarder for w in stats), key=severity)
        yield _gauge("pvtap_forwarder_state", "The InfluxDB forwarder's state (1 for the current one; the worst "
                     "of the workers')", ["state"], {(state,): float(state == worst) for state in FORWARDER_STATES})
        yield _counter("pvtap_forwarder_restarts", "Forwarder threads restarted after they died", [],
                       {(): sum(w.forwarder_restarts for w in stats)})
        yield from self._mqtt(stats)

    def _mqtt(self, stats: list[WorkerStats]) -> Iterator[Metric]:
        worst = max((w.mqtt for w in stats), key=mqtt_severity)
        yield _gauge("pvtap_mqtt_state", "The MQTT publisher's state (1 for the current one; the worst of the "
                     "workers'); off when [mqtt] url is not set", ["state"],
                     {(state,): float(state == worst) for state in MQTT_STATES})
        yield _counter("pvtap_mqtt_published_messages", "MQTT messages published (state, availability, discovery)",
                       [], {(): sum(w.mqtt_published for w in stats)})
        yield _gauge("pvtap_mqtt_backlog_records", "Records in the local store the MQTT publisher has not read yet",
                     [], {(): sum(w.mqtt_backlog for w in stats)})
        yield _gauge("pvtap_mqtt_devices", "Devices the MQTT publisher holds a state for", [],
                     {(): sum(w.mqtt_devices for w in stats)})
        yield _counter("pvtap_mqtt_refused_values", "Energy counter values not published: lower than the last one, "
                       "or more than the device could have made since (docs/mqtt.md)", [],
                       {(): sum(w.mqtt_refused for w in stats)})

    def _contacts(self) -> Iterator[Metric]:
        if not self.providers.contacts:
            return
        contacts = sorted(self.providers.read_contacts(), key=lambda c: c.last, reverse=True)
        shown, left_out = contacts[:MAX_DEVICES], len(contacts) - MAX_DEVICES
        yield _gauge("pvtap_device_last_contact_timestamp_seconds",
                     "When pvtap last received a payload from or for the device (its serial as stored)",
                     ["protocol", "device"], {(c.protocol, c.device): c.last for c in shown})
        yield _gauge("pvtap_devices_not_shown", f"Devices left out of the last-contact series (over {MAX_DEVICES})",
                     [], {(): max(left_out, 0)})


def _counter(name: str, doc: str, labels: list[str], values: Mapping[Any, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _gauge(name: str, doc: str, labels: list[str], values: Mapping[Any, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family
