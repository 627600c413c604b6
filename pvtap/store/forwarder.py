"""The InfluxDB forwarder: drains a local store to InfluxDB, at least once, without losing a record.

The local store is the buffer. A background thread reads the records after the store's delivery
cursor, writes them with influxdb-client's synchronous v2 write API (`/api/v2/write`, which
InfluxDB 2.x, 1.8+ and 3 all accept) and moves the cursor only after the server accepted the
batch, in the same SQLite transaction that records the outcome. A crash between the two re-sends
the batch: every record always becomes the same line with its exact nanosecond timestamp, and
InfluxDB keeps one point per measurement, tag set and timestamp, so a re-send overwrites itself.

Per server answer (docs/influxdb.md): 2xx accepted; 413 splits the batch; 400/422 split it until
the offending records are alone, which go to the dead letters with the server's message while the
rest goes on; 401/403 (token) and 404 (bucket/org) keep everything and say so loudly; 429, 5xx,
timeouts and connection errors retry forever with capped exponential back-off and jitter,
honouring Retry-After. Nothing here runs on the forwarding path: the thread has its own SQLite
connection and never blocks the producer.

Embedding (the addon, the relay, `pvtap run`):

    forwarder = start_forwarder(store, config.influx)   # None when influx.url is empty
    ...
    if forwarder: forwarder.stop()                      # returns within ~4 s
"""

from __future__ import annotations

import email.utils
import fcntl
import json
import logging
import math
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.exceptions import InfluxDBError
from influxdb_client.client.write_api import SYNCHRONOUS

from pvtap.config import InfluxConfig
from pvtap.files import open_private
from pvtap.store.delivery import DeliveryLog, DeliveryStatus, Item, Rejection, read_status
from pvtap.store.local import LocalStore
from pvtap.store.rows import fields_from_json, tags_from_json
from pvtap.store.writable import LineMaker, Unwritable

log = logging.getLogger("pvtap.forward")

POLL_S = 0.2  # how often an idle forwarder looks for new records
PRUNE_EVERY_S = 10.0
PROGRESS_EVERY_S = 5.0
LOG_REPEAT_S = 60.0  # a failure that keeps happening is logged again at most this often
STOP_TIMEOUT_S = 4.0  # Docker's stop grace is 10 s


# -- how the server answered --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Failure:
    kind: str  # too_large, rejected, auth, config, throttled, server, network
    status: int | None
    message: str
    retry_after: float | None = None

    def describe(self) -> str:
        return f"{self.status} {self.message}" if self.status else self.message


class _RetryLater(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.describe())
        self.failure = failure


def classify(status: int, message: str, retry_after: float | None) -> Failure:
    if status == 413:
        return Failure("too_large", status, message)
    if status in (400, 422):
        return Failure("rejected", status, message)
    if status in (401, 403):
        return Failure("auth", status, message)
    if status == 429 or (status == 503 and retry_after is not None):
        return Failure("throttled", status, message, retry_after)
    if status >= 500:
        return Failure("server", status, message, retry_after)
    return Failure("config", status, message, retry_after)  # 404 bucket/org not found, 405, ...


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _error_text(exc: InfluxDBError) -> str:
    body = getattr(exc, "body", None)
    if body is None and exc.response is not None:
        body = getattr(exc.response, "data", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = ""
    if body:
        try:
            doc = json.loads(body)
            text = str(doc.get("message") or doc.get("error") or body) if isinstance(doc, dict) else body
        except ValueError:
            text = body
    text = text or getattr(exc, "reason", None) or str(exc.message)
    return " ".join(str(text).split())[:500]


# -- the forwarder ------------------------------------------------------------------------------

class Forwarder:
    """Drains one local store to InfluxDB from a background thread.

    `store` is a LocalStore (its path is used; the forwarder opens its own connections) or a
    path. Only one forwarder at a time works on a store (an flock on `<store>.forward.lock`,
    released by the kernel even on kill -9); another one waits for it.
    """

    def __init__(self, store: LocalStore | str | Path, config: InfluxConfig, *, poll_s: float = POLL_S) -> None:
        if not config.url:
            raise ValueError("influx.url is empty: there is nowhere to forward to")
        self.path = Path(store.path if isinstance(store, LocalStore) else store)
        self.config = config
        self.poll_s = poll_s
        self.destination = f"{config.url} org={config.org} bucket={config.bucket}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._delivery: DeliveryLog | None = None
        self._client: InfluxDBClient | None = None
        self._types: dict[tuple[str, str], str] = {}
        self._failures = 0
        self._failing_since: float | None = None
        self._last_logged: dict[str, float] = {}  # per failure kind of the writes
        self._step_logged: dict[str, float] = {}  # per failing guarded step
        self._waiting_since: float | None = None
        self._drain: tuple[float, int] | None = None  # (monotonic start, records delivered since)
        self._last_progress = 0.0
        self.delivered = 0  # records accepted by this instance
        self.failed_attempts = 0  # failed write attempts by this instance (each is retried; for /metrics)
        self.dead_lettered = 0
        self.died_of: str | None = None  # the error that ended the thread, if one did

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Forwarder:
        self._thread = threading.Thread(target=self._run, name=f"pvtap-forward-{self.path.stem}", daemon=True)
        self._thread.start()
        return self

    def stop_soon(self) -> None:
        """Ask the thread to stop without waiting (to stop several forwarders at once)."""
        self._stop.set()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop soon; True when the thread ended. Everything not yet accepted stays in the store.
        A write hanging in the server is abandoned (the daemon thread dies with the process) and
        its batch is sent again next time."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s: a write to %s is still in flight after %.1f s; abandoning it, its records stay "
                        "undelivered and are sent again on the next start", self.path.name, self.config.url, timeout)
            return False
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> DeliveryStatus:
        return read_status(self.path)

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is waiting (backlog and requeued dead letters); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = read_status(self.path)
            if state.backlog == 0 and state.requeued == 0:
                return True
            time.sleep(0.05)
        return False

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if not self._wait_for_lock():
                return
            while not self._open():
                if self._stop.wait(self.config.retry_max_s):
                    return
            self._loop()
        except Exception as exc:
            self.died_of = f"{type(exc).__name__}: {exc}"
            log.exception("%s: the forwarder stopped on an unexpected error; records stay in the store",
                          self.path.name)
        finally:
            for obj in (self._client, self._delivery):
                if obj is not None:
                    try:
                        obj.close()
                    except Exception:
                        pass
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _open(self) -> bool:
        """Open the store's delivery state and the client; False (logged) when the store cannot
        be opened yet (a full or read-only disk): the caller tries again later."""
        try:
            LocalStore(self.path).close()  # make sure the records schema exists
            self._delivery = DeliveryLog(self.path)
            self._types = self._delivery.field_types()
        except Exception as exc:
            if self._delivery is not None:
                self._delivery.close()
                self._delivery = None
            log.error("%s: cannot open the store for forwarding (%s: %s); trying again in %.0f s", self.path.name,
                      type(exc).__name__, exc, self.config.retry_max_s)
            return False
        self._client = self._make_client()
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        log.info("%s: forwarding to %s (%d records waiting)", self.path.name, self.destination, self._backlog())
        return True

    def _wait_for_lock(self) -> bool:
        lock_path = self.path.with_name(self.path.name + ".forward.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_private(lock_path)
        told = False
        while not self._stop.is_set():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd
                return True
            except BlockingIOError:
                if not told:
                    log.info("%s: another process is forwarding this store; waiting for it to stop", self.path.name)
                    told = True
                self._stop.wait(1.0)
        os.close(fd)
        return False

    @property
    def _state(self) -> DeliveryLog:
        """The store's delivery state: open from a successful _open() until the forwarder stops."""
        assert self._delivery is not None, "the forwarder has not opened its store"
        return self._delivery

    def _make_client(self) -> InfluxDBClient:
        c = self.config
        kwargs: dict[str, Any] = {"verify_ssl": c.verify_tls}
        if not c.verify_tls:
            log.warning("%s: TLS certificate verification is OFF for %s (influx.verify_tls = false)",
                        self.path.name, c.url)
            warnings.filterwarnings("once", category=urllib3.exceptions.InsecureRequestWarning)
        if c.ca_file:
            kwargs["ssl_ca_cert"] = c.ca_file
        # influxdb-client annotates `token: str = None`: None (no token configured) is its own default
        return InfluxDBClient(url=c.url, token=c.token or None, org=c.org,  # type: ignore[arg-type]
                              timeout=int(c.timeout_s * 1000), enable_gzip=c.gzip, **kwargs)

    def _loop(self) -> None:
        """Every step is guarded: an SQLite error (a full disk is when pruning runs) is logged and
        retried with back-off, never the end of the thread."""
        next_prune = 0.0
        next_forget = time.monotonic() + 600
        while not self._stop.is_set():
            now = time.monotonic()
            if self.config.max_store_mb and now >= next_prune:
                next_prune = now + PRUNE_EVERY_S
                self._guarded("pruning", self._prune)
            if now >= next_forget:
                next_forget = now + 600
                self._guarded("forgetting old batch sizes", self._state.forget_old_batches)
            try:
                pause = self._cycle()
            except _RetryLater as retry:
                pause = self._failed(retry.failure)
            except Exception as exc:  # e.g. the disk; keep going, never lose the store
                log.exception("%s: delivery cycle failed", self.path.name)
                pause = self._failed(Failure("internal", None, f"{type(exc).__name__}: {exc}"))
            if pause:
                self._stop.wait(pause)

    def _guarded(self, what: str, step: Callable[[], object]) -> None:
        """Run a step besides the writes; its failures are logged at most every LOG_REPEAT_S
        (kept apart from the writes' failures, which a delivered batch forgets), its recovery once."""
        try:
            step()
        except Exception as exc:
            now = time.monotonic()
            if now - self._step_logged.get(what, -LOG_REPEAT_S) >= LOG_REPEAT_S:
                self._step_logged[what] = now
                log.error("%s: %s failed (%s: %s); forwarding goes on, tried again later", self.path.name, what,
                          type(exc).__name__, exc)
        else:
            if self._step_logged.pop(what, None) is not None:
                log.info("%s: %s works again", self.path.name, what)

    def _prune(self) -> None:
        """Keep the store under influx.max_store_mb. Undelivered records are only ever dropped
        while delivery is failing: when it works they become delivered, then prunable, soon."""
        if self._failures == 0:
            undelivered = "later"
        else:
            undelivered = "drop" if self.config.prune_undelivered else "keep"
        self._state.prune(self.config.max_store_mb * 2**20, undelivered)

    def _cycle(self) -> float:
        """One step of work; returns how long to pause before the next (0: go on at once)."""
        size = self.config.batch_size
        requeued = self._state.requeued(size)
        if requeued:
            self._deliver(requeued, requeue=True)
            return 0.0
        items = self._state.pending(size)
        if not items:
            self._waiting_since = None
            self._drain = None
            return self.poll_s
        if len(items) < size:
            now = time.monotonic()
            if self._waiting_since is None:
                self._waiting_since = now
            waited = now - self._waiting_since
            if waited < self.config.batch_age_s:
                return min(self.poll_s, self.config.batch_age_s - waited)
        elif self._drain is None:
            self._drain = (time.monotonic(), 0)
        self._deliver(items, requeue=False)
        self._waiting_since = None
        self._progress(len(items))
        return 0.0

    def _deliver(self, items: list[Item], *, requeue: bool) -> None:
        prepared: list[tuple[Item, str | None, str | None]] = []
        maker = LineMaker(self._types)
        for item in items:
            time_ns, measurement, tags, fields = item.row[:4]
            try:
                line = maker.line(measurement, tags_from_json(tags), fields_from_json(fields), time_ns)
                prepared.append((item, line, None))
            except Unwritable as exc:
                prepared.append((item, None, str(exc)))
        if maker.new:
            self._state.remember_types(maker.new)
            self._types.update(maker.new)
        self._send(prepared, requeue)

    def _send(self, prepared: list[tuple[Item, str | None, str | None]], requeue: bool) -> None:
        """Send a run of items; on 413/400/422 split it in halves, down to single records."""
        refused = [Rejection(item, None, problem, None) for item, _, problem in prepared if problem]
        sendable = [(item, line) for item, line, _ in prepared if line is not None]
        failure = self._post([line for _, line in sendable]) if sendable else None
        if failure is None:
            self._commit([p[0] for p in prepared], refused, requeue)
            return
        if failure.kind not in ("too_large", "rejected"):
            raise _RetryLater(failure)
        if len(sendable) == 1:
            item, line = sendable[0]
            why = "too large for the server" if failure.kind == "too_large" else "rejected"
            log.warning("%s: record #%d %s (%s); moved to the dead letters: %s", self.path.name, item.key, why,
                        failure.status, failure.message)
            self._commit([p[0] for p in prepared], [*refused, Rejection(item, failure.status, failure.message, line)],
                         requeue)
            return
        # split so that each half gets half of the sendable records
        middle = sendable[len(sendable) // 2][0]
        cut = next(i for i, p in enumerate(prepared) if p[0] is middle)
        self._send(prepared[:cut], requeue)
        self._send(prepared[cut:], requeue)

    def _commit(self, items: Sequence[Item], rejected: list[Rejection], requeue: bool) -> None:
        if requeue:
            self._state.commit_requeued(items, rejected, self.destination)
        else:
            self._state.commit_records(items, rejected, self.destination)
        for r in rejected:
            if r.status is None:
                log.warning("%s: record #%d not written (%s); moved to the dead letters", self.path.name,
                            r.item.key, r.message)
        accepted = len(items) - len(rejected)
        self.delivered += accepted
        self.dead_lettered += len(rejected) if not requeue else 0
        if self._failures:
            log.info("%s: delivery to %s works again after %d failed attempts in %.0f s", self.path.name,
                     self.config.url, self._failures, time.monotonic() - (self._failing_since or time.monotonic()))
        self._failures = 0
        self._failing_since = None
        self._last_logged.clear()

    def _post(self, lines: list[str]) -> Failure | None:
        try:
            self._write_api.write(bucket=self.config.bucket, org=self.config.org, record="\n".join(lines),
                                  # WritePrecision.NS is the str "ns", but write() annotates the class
                                  write_precision=WritePrecision.NS)  # type: ignore[arg-type]
            return None
        except InfluxDBError as exc:
            response = exc.response
            status = getattr(exc, "status", None) or getattr(response, "status", None)
            if status is None:
                return Failure("network", None, _error_text(exc))
            return classify(int(status), _error_text(exc), parse_retry_after(exc.retry_after))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Failure("network", None, f"{type(exc).__name__}: {exc}")

    def _failed(self, failure: Failure) -> float:
        """Note a failure, log it (not every time), and return the back-off before the next try."""
        self._failures += 1
        self.failed_attempts += 1
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        c = self.config
        delay = min(c.retry_max_s, c.retry_initial_s * 2 ** min(self._failures - 1, 60))
        delay = random.uniform(delay / 2, delay)  # jitter: forwarders restarted together spread out
        if failure.retry_after is not None:
            delay = min(failure.retry_after, c.retry_after_max_s)
        try:
            self._state.note_error(failure.describe(), self.destination)
        except Exception:
            log.exception("%s: could not record the delivery error", self.path.name)
        last = self._last_logged.get(failure.kind)
        if last is None or now - last >= LOG_REPEAT_S:
            self._last_logged[failure.kind] = now
            waiting = self._backlog()
            if failure.kind == "auth":
                log.error("%s: InfluxDB at %s REFUSED THE TOKEN (%s): check influx.token (InfluxDB 1.8: "
                          "user:password) and its write permission on bucket %r. %d records are kept and "
                          "retried every %.0f s", self.path.name, c.url, failure.describe(), c.bucket, waiting,
                          c.retry_max_s)
            elif failure.kind == "config":
                log.error("%s: InfluxDB at %s answered %s: check influx.url, influx.org (%r) and influx.bucket "
                          "(%r). %d records are kept and retried", self.path.name, c.url, failure.describe(),
                          c.org, c.bucket, waiting)
            else:
                log.warning("%s: write to %s failed (%s); %d records waiting, attempt %d, next in %.1f s",
                            self.path.name, c.url, failure.describe(), waiting, self._failures, delay)
        return delay

    def _backlog(self) -> int:
        """For log lines only: -1 when the store cannot say (a log line must not fail)."""
        try:
            return self._state.backlog()
        except Exception:
            return -1

    def _progress(self, sent: int) -> None:
        """Log progress while a backlog drains (full batches back to back)."""
        if self._drain is None:
            return
        start, done = self._drain
        done += sent
        self._drain = (start, done)
        now = time.monotonic()
        if now - start >= PROGRESS_EVERY_S and now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            waiting = self._backlog()
            rate = done / (now - start)
            log.info("%s: draining backlog: %d delivered in %.0f s (%.0f records/s), %d waiting, about %.0f s left",
                     self.path.name, done, now - start, rate, waiting, waiting / rate if rate else float("inf"))


def start_forwarder(store: LocalStore | str | Path, config: InfluxConfig) -> Forwarder | None:
    """Start forwarding `store` when InfluxDB is configured; None when influx.url is empty."""
    if not config.url:
        return None
    return Forwarder(store, config).start()
