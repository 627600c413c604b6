"""Conditions a person must act on, made loud without flooding: an ERROR line when one starts and
again every `repeat` seconds while it lasts (with the count since), an INFO line when it ends, and
a `pvtap_alert` record each time. The relay stores no record itself: the records go to its ingest
worker over the channel (`CopySink.record`), which stores them; `pvtap status` shows them.

The one condition today: the upstream of a listener pinned with `upstream_pin_sha256` presents
another certificate. The relay then never sends it a byte — the device is answered locally
(policy auto) or refused — so the vendor's cloud stops getting data while the device looks fine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pvtap.config import ListenerConfig
from pvtap.records import Origin, Record, now_utc

log = logging.getLogger("proxy_tcp.alerts")

MEASUREMENT = "pvtap_alert"
PIN_MISMATCH = "upstream_pin_mismatch"
#: seconds between repeats of an alert's log line while the condition lasts
REPEAT = 600.0


class PinMismatch:
    """The pin check of one listener's upstream, as an alert."""

    def __init__(self, listener: ListenerConfig, emit: Callable[[Record], None], *,
                 repeat: float = REPEAT, clock: Callable[[], float] = time.monotonic) -> None:
        self.listener = listener
        self.emit = emit  # where its records go to be stored (the relay's CopySink.record); never blocks
        self.repeat = repeat
        self.clock = clock
        self.active = False
        self.count = 0  # connections that met the wrong certificate since the alert was last logged
        self._last_logged = 0.0
        self._lock = threading.Lock()

    def mismatch(self, endpoint: str, seen: str) -> None:
        """A connection met certificate `seen` at `endpoint`; log now if due."""
        with self._lock:
            self.count += 1
            now = self.clock()
            if self.active and now - self._last_logged < self.repeat:
                return
            since = None if not self.active else now - self._last_logged
            self.active, self._last_logged = True, now
            message = self.message(endpoint, seen, since)
            log.error("%s", message)
            self.emit(self._record(True, message, {"endpoint": endpoint, "seen_sha256": seen,
                                                   "connections": self.count}))
            self.count = 0

    def passed(self) -> None:
        """A connection met the pinned certificate: the alert, if any, is over."""
        with self._lock:
            if not self.active:
                return
            self.active, self.count = False, 0
            message = (f"{self._name()}: the upstream {self.listener.upstream} presents the pinned certificate "
                       "again; forwarding to it")
            log.info("%s", message)
            self.emit(self._record(False, message, {}))

    def message(self, endpoint: str, seen: str, since: float | None = None) -> str:
        """The alert's line; `since`: seconds since it was last logged (None: it just started)."""
        l = self.listener  # noqa: E741
        outcome = ("the device is answered locally and the cloud gets NO data" if l.policy == "auto"
                   else "the device's connections are refused")
        still = "" if since is None else f"; still so: {self.count} connection(s) in the last {since / 60:.0f} min"
        return (f"{self._name()}: the upstream {endpoint} presents a certificate with SHA-256 {seen}, not the pinned "
                f"{l.upstream_pin_sha256.replace(':', '').lower()} (upstream_pin_sha256): {outcome}{still}. "
                f"Inspect it with `pvtap certs fingerprint {endpoint}`; if it is the real cloud, set "
                f"upstream_pin_sha256 of this listener to it ([[relay.listeners]], docs/foxess.md)")

    def _name(self) -> str:
        return f"{self.listener.protocol} listener on {self.listener.listen}"

    def _record(self, active: bool, message: str, fields: dict[str, str | int]) -> Record:
        tags = {"alert": PIN_MISMATCH, "protocol": self.listener.protocol, "listener": self.listener.listen}
        return Record(MEASUREMENT, now_utc(), tags,
                      {"active": active, "message": message, "upstream": self.listener.upstream, **fields},
                      Origin(protocol=self.listener.protocol))
