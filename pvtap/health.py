"""Health and metrics of one pvtap process: `/healthz`, `/readyz` and `/metrics` on a local port.

The relay and the Enphase addon each start one `Health` (`[health] relay_listen`,
`enphase_listen`). It serves from its own thread, so a scrape never runs on the forwarding loop,
and it only reads what the pieces keep anyway (pvtap/metrics.py):

- `/healthz`: the process is alive and its event loop turns (a loop that stopped turning
  forwards nothing).
- `/readyz`: the listeners are up (`listening()`), the store directory takes a write, the ingest
  workers run and archive, the InfluxDB forwarder is not stuck (pvtap/store/supervisor.py), and
  the MQTT publisher, when there is one, reaches its broker. 200 or 503, one line per check
  saying why.
- `/metrics`: Prometheus text format.

Every `stats_every_s` it also hands its counts to the ingest worker as a `pvtap_stats` record,
stored and delivered like any other: the pvtap health dashboard reads backlog and errors there.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from pvtap.config import ConfigError, HealthConfig, split_host_port
from pvtap.metrics import MAX_DEVICES, Collector, Contact, Providers, WorkerStats, mqtt_severity, severity
from pvtap.records import DOWN, UP, Origin, Record, now_utc

log = logging.getLogger("pvtap.health")

#: /healthz fails when the event loop has not turned for this long
LOOP_STALL_S = 30.0
#: a store probe result is reused this long (a busy /readyz must not turn into an fsync storm)
PROBE_CACHE_S = 1.0
STATS_MEASUREMENT = "pvtap_stats"
#: the origin protocol of pvtap's own records (not a device's)
STATS_ORIGIN = "pvtap"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str


class Check(Protocol):
    """One readiness condition."""

    def __call__(self) -> Verdict: ...


class Health:
    """The context object of one process's health: checks, providers, the server and the stats."""

    def __init__(self, process: str, config: HealthConfig) -> None:
        self.process = process  # "relay" or "enphase"
        self.config = config
        self.providers = Providers()
        self.checks: dict[str, Check] = {"listeners": self._listeners}
        self._listening: str | None = None
        self._beat: float | None = None  # monotonic time the event loop last turned
        self._server: http.server.ThreadingHTTPServer | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._send_stats: Callable[[Record], object] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(self.providers, process))

    # -- wiring (a few lines in each process) ------------------------------------------------

    def serve(self, listen: str, key: str) -> Health:
        """Serve the endpoints on `listen` (host:port; empty: not at all). Raises ConfigError
        naming `key` when the address cannot be used."""
        if not listen:
            return self
        host, port = split_host_port(listen)
        try:
            server = http.server.ThreadingHTTPServer((host, port), _handler(self))
        except OSError as exc:
            raise ConfigError(key, listen, f"cannot serve the health endpoints there: {exc.strerror or exc}",
                              f'use a free local port, or set {key} = "" to turn them off') from None
        server.daemon_threads = True
        self._server = server
        self._spawn(server.serve_forever, "pvtap-health")
        log.info("health: /healthz /readyz /metrics on http://%s/ (%s)", self.address, key)
        return self

    @property
    def address(self) -> str:
        """host:port the endpoints are served on ('' when off)."""
        if self._server is None:
            return ""
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def attach(self, stores: list[Path], workers: Callable[[], WorkerStats] | None) -> None:
        """What /readyz and /metrics watch besides the traffic: the stores (their directory must
        take writes; devices heard from in them) and the ingest workers' snapshot (None: none
        runs, e.g. the store could not be opened). Called again, it replaces them."""
        self.checks["store"] = StoreProbe(stores[0])
        self.providers.contacts[:] = [StoreContacts(path) for path in stores]
        self.providers.workers[:] = [workers] if workers is not None else []
        self.checks["ingest"] = self._ingest
        self.checks["forwarder"] = self._forwarder
        self.checks["mqtt"] = self._mqtt

    def watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let /healthz notice an event loop that stopped turning (a tick a second on it)."""
        def tick() -> None:
            self._beat = time.monotonic()
            if not self._stop.is_set():
                loop.call_later(1.0, tick)
        loop.call_soon_threadsafe(tick)

    def listening(self, detail: str) -> None:
        """The process's listeners are up: from now on it can be ready."""
        self._listening = detail

    def record_stats(self, send: Callable[[Record], object], schedule: Callable[..., object]) -> None:
        """Every stats_every_s, and once more in stop(), hand the counts as a pvtap_stats record to
        `send` (the channel to the ingest worker, which stores it like any record). The channel
        belongs to the event loop, so the periodic ones go through `schedule` (its
        `call_soon_threadsafe`); stop() runs there."""
        if self.config.stats_every_s > 0:
            self._send_stats = send
            self._spawn(lambda: self._stats_loop(schedule), "pvtap-stats")

    def stop(self) -> None:
        """Stop serving; a process that records its stats hands them over one last time. Call it
        on the event loop's thread (it sends on the loop's channel)."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(5)
        if self._send_stats is not None:
            self._hand_over(self._send_stats)
            self._send_stats = None

    # -- the answers ------------------------------------------------------------------------

    def alive(self) -> Verdict:
        if self._beat is None:
            return Verdict(True, "alive")
        stalled = time.monotonic() - self._beat
        if stalled > LOOP_STALL_S:
            return Verdict(False, f"the event loop has not turned for {stalled:.0f} s")
        return Verdict(True, "alive")

    def readiness(self) -> dict[str, Verdict]:
        out = {}
        for name, check in self.checks.items():
            try:
                out[name] = check()
            except Exception as exc:  # a broken check says so instead of breaking /readyz
                out[name] = Verdict(False, f"check failed: {type(exc).__name__}: {exc}")
        return out

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    def _listeners(self) -> Verdict:
        return Verdict(True, self._listening) if self._listening else Verdict(False, "starting")

    def _ingest(self) -> Verdict:
        stats = self.providers.read_workers()
        if not stats:
            return Verdict(False, "no ingest worker: the store could not be opened (see the log)")
        alive, workers = sum(w.alive for w in stats), sum(w.workers for w in stats)
        if alive < workers:
            return Verdict(False, f"{workers - alive} of {workers} ingest worker(s) down (restarted by pvtap)")
        if any(w.archive_failing for w in stats):
            return Verdict(False, "the store does not take the archived copies (full or failing disk; see the log)")
        backlog = sum(w.decode_backlog for w in stats)
        return Verdict(True, f"{workers} worker(s), {backlog} payload(s) left to decode")

    def _forwarder(self) -> Verdict:
        stats = self.providers.read_workers()
        worst = max((w.forwarder for w in stats), key=severity, default="off")
        waiting = sum(w.backlog for w in stats)
        error = next((w.forwarder_error for w in stats if w.forwarder == worst and w.forwarder_error), None)
        if worst in ("stuck", "restarting"):
            return Verdict(False, f"{worst}: {waiting} records waiting" + (f"; {error}" if error else "")
                           + "; see `pvtap status`")
        if worst == "off":
            return Verdict(True, "off ([influx] url is not set)")
        return Verdict(True, f"{worst}, {waiting} records waiting")

    def _mqtt(self) -> Verdict:
        """Not ready while the publisher cannot reach its broker or has died: what Home Assistant
        shows is going stale (nothing is lost; the records wait in the store)."""
        stats = self.providers.read_workers()
        worst = max((w.mqtt for w in stats), key=mqtt_severity, default="off")
        unread = sum(w.mqtt_backlog for w in stats)
        if worst == "off":
            return Verdict(True, "off ([mqtt] url is not set)")
        if worst == "connected":
            return Verdict(True, f"connected, {sum(w.mqtt_devices for w in stats)} device(s), "
                                 f"{sum(w.mqtt_published for w in stats)} message(s) published, {unread} record(s) "
                                 "not read yet")
        if worst == "connecting":
            return Verdict(True, "connecting to the broker")
        failing = next(w for w in stats if w.mqtt == worst)
        reason = {"failing": f"cannot publish to {failing.mqtt_broker or 'the broker'}",
                  "dead": "the publisher stopped on an unexpected error (see the log)",
                  "stopped": "stopped (pvtap is shutting down)"}.get(worst, worst)
        return Verdict(False, reason + (f": {failing.mqtt_error}" if failing.mqtt_error else "")
                       + f"; {unread} record(s) wait in the store for it; see `pvtap status`")

    # -- stats records ----------------------------------------------------------------------

    def stats_fields(self) -> dict[str, int]:
        """The counts now (cumulative since the process started), as pvtap_stats fields."""
        t = self.providers.read_traffic()
        workers = self.providers.read_workers()
        fields = {
            "connections_open": sum(t.open.values()),
            "connections": sum(t.closed.values()),
            "bytes_up": sum(n for (_, d), n in t.bytes.items() if d == UP),
            "bytes_down": sum(n for (_, d), n in t.bytes.items() if d == DOWN),
            "frames": sum(t.frames.values()) + sum(w.frames for w in workers),
        }
        if workers:
            fields.update(
                framing_errors=sum(w.framing_errors for w in workers),
                decode_errors=sum(w.decode_errors for w in workers),
                dropped_copies=sum(w.channel_dropped + w.archive_dropped for w in workers),
                ingest_queue=sum(w.buffered_bytes for w in workers),
                decode_backlog=sum(w.decode_backlog for w in workers),
                payloads=sum(w.payloads for w in workers), records=sum(w.records for w in workers),
                backlog=sum(w.backlog for w in workers), delivered=sum(w.delivered for w in workers),
                delivery_failures=sum(w.delivery_failures for w in workers))
        return fields

    def stats_record(self) -> Record:
        fields: dict[str, int | float | str | bool] = dict(self.stats_fields())
        return Record(STATS_MEASUREMENT, now_utc(), {"process": self.process}, fields, Origin(STATS_ORIGIN))

    def _stats_loop(self, schedule: Callable[..., object]) -> None:
        while not self._stop.wait(self.config.stats_every_s):
            send = self._send_stats
            if send is not None:
                try:
                    schedule(self._hand_over, send)
                except RuntimeError:  # the loop is closed: the process is ending
                    return

    def _hand_over(self, send: Callable[[Record], object]) -> None:
        try:
            send(self.stats_record())
        except Exception as exc:  # never fatal; the next one may go through
            log.warning("health: could not hand over the %s counts (%s: %s)", STATS_MEASUREMENT,
                        type(exc).__name__, exc)

    def _spawn(self, target: Callable[[], object], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)


# -- checks and providers over the store ---------------------------------------------------------

class StoreProbe:
    """Whether the store can be written: a small file is written, synced and removed in its
    directory (a read-only or full file system fails that), and the store file itself must be
    writable for this user."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._last: tuple[float, Verdict] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Verdict:
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < PROBE_CACHE_S:
                return self._last[1]
            verdict = self._probe()
            self._last = (time.monotonic(), verdict)
            return verdict

    def _probe(self) -> Verdict:
        directory = self.path.parent
        probe = directory / f".health-probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"\0" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(probe)
        except OSError as exc:
            return Verdict(False, f"{directory} does not take writes: {exc.strerror or exc}")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            return Verdict(False, f"{self.path} is not writable for this user")
        return Verdict(True, f"{self.path} writable")


class StoreContacts:
    """Last contact per device: the newest raw payload of each device in the store, found by
    index seeks on `raw(protocol, device)` alone (one per device, never a scan), so a scrape costs
    the same on a store of a thousand payloads or a hundred million, and devices heard from
    before a restart show too. Its own read-only connection per look."""

    def __init__(self, path: Path, limit: int = 4 * MAX_DEVICES) -> None:
        self.path = Path(path)
        self.limit = limit  # devices looked at, at most (a fleet belongs in InfluxDB)

    def __call__(self) -> Iterable[Contact]:
        if not self.path.exists():
            return []
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=2.0)
        try:
            return list(_newest_per_device(db, self.limit))
        finally:
            db.close()


def _newest_per_device(db: sqlite3.Connection, limit: int) -> Iterator[Contact]:
    """Walk the distinct (protocol, device) pairs through the index, newest payload of each."""
    row = db.execute("SELECT protocol, device FROM raw ORDER BY protocol, device LIMIT 1").fetchone()
    for _ in range(limit):
        if row is None:
            return
        protocol, device = row
        if device:
            (received_ns,) = db.execute("SELECT received_ns FROM raw WHERE protocol = ? AND device = ? "
                                        "ORDER BY id DESC LIMIT 1", row).fetchone()
            yield Contact(protocol, device, received_ns / 1e9)
        following = db.execute("SELECT device FROM raw WHERE protocol = ? AND device > ? ORDER BY device LIMIT 1",
                               row).fetchone()
        row = (protocol, following[0]) if following else db.execute(
            "SELECT protocol, device FROM raw WHERE protocol > ? ORDER BY protocol, device LIMIT 1",
            (protocol,)).fetchone()


# -- the HTTP side ---------------------------------------------------------------------------------

def _handler(health: Health) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == "/metrics":
                self._send(200, health.metrics(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                verdict = health.alive()
                self._send(200 if verdict.ok else 503, f"{'ok' if verdict.ok else 'FAIL'} {verdict.detail}\n")
            elif path == "/readyz":
                verdicts = health.readiness()
                ready = all(v.ok for v in verdicts.values())
                lines = [f"{'ok' if v.ok else 'FAIL'} {name}: {v.detail}" for name, v in verdicts.items()]
                self._send(200 if ready else 503, "\n".join([f"{health.process} {'ready' if ready else 'NOT READY'}",
                                                             *lines]) + "\n")
            else:
                self._send(404, "not found: try /healthz, /readyz or /metrics\n")

        def _send(self, status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8") -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not log lines
            pass

    return Handler
