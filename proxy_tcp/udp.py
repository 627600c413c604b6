"""UDP listeners (`transport = "udp"`): datagrams are listened to, never forwarded or answered.

Devices broadcast presence on the LAN (the FoxESS M1: ESP-MESH on 6364, a heartbeat on 3334);
a broadcast reaches whoever listens, so there is nothing to forward. Each datagram becomes one
raw payload of kind "datagram" (meta `port`: the listener's port) for the ingest worker, which
redacts, stores and decodes it with the protocol's `redact_raw`/`decode_raw` — a malformed one is
a decode error there: counted, kept, never fatal. The relay knows no protocol here either. The
first datagram of each sender is logged; closing logs the counts.
"""

from __future__ import annotations

import asyncio
import logging

from pvtap.config import ListenerConfig
from pvtap.privacy import Privacy
from pvtap.records import UP, Origin, RawPayload, now_utc

from .pump import CopySink
from .upstream import Endpoint

log = logging.getLogger("proxy_tcp.udp")

#: senders remembered for the "first datagram from" log line
MAX_SENDERS = 1024


class Datagrams(asyncio.DatagramProtocol):
    """The receiving side of one UDP listener, with its counts."""

    def __init__(self, config: ListenerConfig, sink: CopySink, privacy: Privacy) -> None:
        self.config = config
        self.sink = sink
        self.privacy = privacy
        self.port = 0  # the bound port, known once listening
        self.datagrams = 0
        self.bytes = 0
        self.dropped = 0  # the channel to the ingest worker was full or down
        self.errors = 0
        self._senders: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.port = Endpoint.of(transport.get_extra_info("sockname")).port

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.datagrams += 1
        self.bytes += len(data)
        sender = Endpoint.of(addr)
        if sender.host not in self._senders and len(self._senders) < MAX_SENDERS:
            self._senders.add(sender.host)
            log.info("%s udp %s: first datagram from %s (%d B)", self.config.protocol, self.port, sender, len(data))
        device = sender.host if self.privacy.keep_network_identity else ""
        origin = Origin(protocol=self.config.protocol, device=device, connection=f"udp-{self.port}", direction=UP)
        if not self.sink.payload(RawPayload(origin, "datagram", data, now_utc(), {"port": self.port})):
            self.dropped += 1

    def error_received(self, exc: Exception) -> None:
        self.errors += 1
        log.debug("%s udp %s: %s", self.config.protocol, self.port, exc)

    def summary(self) -> str:
        return (f"{self.config.protocol} udp {self.port}: {self.datagrams} datagrams, {self.bytes} B from "
                f"{len(self._senders)} sender(s), {self.dropped} dropped (ingest busy or down), "
                f"{self.errors} socket errors")
