"""UDP listeners (`transport = "udp"`): datagrams are listened to, never forwarded or answered.

Devices broadcast presence on the LAN (the FoxESS M1: ESP-MESH on 6364, a heartbeat on 3334);
a broadcast reaches whoever listens, so there is nothing to forward. Each datagram becomes one
raw payload of kind "datagram" (meta `port`: the listener's port) for the ingest worker, which
redacts, stores and decodes it with the protocol's `redact_raw`/`decode_raw` — a malformed one is
a decode error there: counted, kept, never fatal. The relay knows no protocol here either. The
first datagram of each sender is logged (named as the privacy settings allow); closing logs the
counts.

Anyone on the LAN can send datagrams, from any source address it likes, as fast as it likes.
Before a datagram reaches the sink, senders outside `allow_from` are dropped, and each source
gets `udp_max_rate` datagrams a second (a token bucket per source); the excess is dropped and
counted. The per-source table is bounded (`MAX_SOURCES`, least recently seen forgotten first).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from pvtap.config import ListenerConfig
from pvtap.peers import PeerNames
from pvtap.privacy import Privacy
from pvtap.records import UP, Origin, RawPayload, now_utc

from .admission import AllowList
from .pump import CopySink
from .upstream import Endpoint

log = logging.getLogger("proxy_tcp.udp")

#: senders remembered for the "first datagram from" log line
MAX_SENDERS = 1024
#: sources whose token buckets are kept
MAX_SOURCES = 4096


class SourceRates:
    """A token bucket per source: `rate` datagrams a second, bursts up to one second's worth
    (at least one datagram). A source forgotten to make room starts again with a full bucket:
    bounded memory costs at most one burst more per forgotten source."""

    def __init__(self, rate: float, capacity: int = MAX_SOURCES) -> None:
        self.rate = rate
        self.burst = max(rate, 1.0)
        self.capacity = capacity
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source → (tokens, when)

    def allow(self, source: str, now: float) -> bool:
        tokens, then = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if len(self._buckets) >= self.capacity:
            self._buckets.popitem(last=False)
        self._buckets[source] = (tokens, now)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


class Datagrams(asyncio.DatagramProtocol):
    """The receiving side of one UDP listener, with its counts."""

    def __init__(self, config: ListenerConfig, sink: CopySink, privacy: Privacy, peers: PeerNames | None = None,
                 allow: AllowList | None = None) -> None:
        self.config = config
        self.sink = sink
        self.privacy = privacy
        self.peers = peers or PeerNames(privacy)
        self.allow = allow or AllowList(config.allow_from)
        self.rates = SourceRates(config.udp_max_rate)
        self.port = 0  # the bound port, known once listening
        self.datagrams = 0
        self.bytes = 0
        self.not_allowed = 0  # from a source outside allow_from
        self.over_rate = 0  # beyond udp_max_rate of their source
        self.dropped = 0  # the channel to the ingest worker was full or down
        self.errors = 0
        self._senders: set[str] = set()
        self._limited: set[str] = set()  # sources told about once in the log

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.port = Endpoint.of(transport.get_extra_info("sockname")).port

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.datagrams += 1
        self.bytes += len(data)
        sender = Endpoint.of(addr)
        if not self._admit(sender.host):
            return
        if sender.host not in self._senders and len(self._senders) < MAX_SENDERS:
            self._senders.add(sender.host)
            log.info("%s udp %s: first datagram from %s (%d B)", self.config.protocol, self.port,
                     self.peers.endpoint(sender.host, sender.port), len(data))
        device = sender.host if self.privacy.keep_network_identity else ""
        origin = Origin(protocol=self.config.protocol, device=device, connection=f"udp-{self.port}", direction=UP)
        if not self.sink.payload(RawPayload(origin, "datagram", data, now_utc(), {"port": self.port})):
            self.dropped += 1

    def _admit(self, host: str) -> bool:
        """Allowed source and within its rate; else counted (and the first time, logged)."""
        if not self.allow.allows(host):
            self.not_allowed += 1
            if self.not_allowed == 1:
                log.warning("%s udp %s: dropping datagrams from %s, which is not in allow_from (counted; the "
                            "summary at the end says how many)", self.config.protocol, self.port,
                            self.peers.name(host))
            return False
        if self.rates.allow(host, time.monotonic()):
            return True
        self.over_rate += 1
        if host not in self._limited and len(self._limited) < MAX_SENDERS:
            self._limited.add(host)
            log.warning("%s udp %s: %s sends more than %g datagrams a second (udp_max_rate): dropping the excess "
                        "(counted)", self.config.protocol, self.port, self.peers.name(host), self.config.udp_max_rate)
        return False

    def error_received(self, exc: Exception) -> None:
        self.errors += 1
        log.debug("%s udp %s: %s", self.config.protocol, self.port, exc)

    def summary(self) -> str:
        return (f"{self.config.protocol} udp {self.port}: {self.datagrams} datagrams, {self.bytes} B from "
                f"{len(self._senders)} sender(s), {self.over_rate} over udp_max_rate, {self.not_allowed} not in "
                f"allow_from, {self.dropped} dropped (ingest busy or down), {self.errors} socket errors")
