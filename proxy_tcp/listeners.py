"""A listener: one configured address, its protocol and policy, and the connections it accepted.

Who gets a connection slot is decided in accept, before a byte is read or a TLS handshake
starts (proxy_tcp/admission.py): sources outside `allow_from` and connections beyond
`max_connections` are reset at once and counted.

Listening is the only place a transport appears: `transport = "tcp"` opens asyncio stream
servers, `transport = "udp"` a datagram endpoint that only listens (proxy_tcp/udp.py). With
`tls_cert` the listener accepts raw sockets instead (proxy_tcp/accept.py), so that nothing is
read before the connection terminates the device's TLS, on either event loop; `upstream_tls`
makes it re-encrypt to the cloud (proxy_tcp/tls.py). The policy and decode sides stay as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from pvtap.config import ConfigError, ListenerConfig, split_host_port
from pvtap.decode import StreamCodec
from pvtap.decode.alphaess import vendor as alpha
from pvtap.decode.foxess import vendor as fox

from .accept import SocketServer
from .admission import AllowList, Refusal, Refusals, reset, reset_socket
from .connection import Connection
from .pump import CHUNK
from .tls import UpstreamTLS, device_context
from .udp import Datagrams
from .upstream import Endpoint, UpstreamError, UpstreamResolver

if TYPE_CHECKING:
    from .service import Relay

#: connections the kernel holds before accept (capped by net.core.somaxconn): after a power cut a
#: whole fleet reconnects at once, and asyncio's default of 100 would drop their SYNs, so that
#: each waits out TCP's retransmit (1 s, 3 s, …)
LISTEN_BACKLOG = 4096

log = logging.getLogger("proxy_tcp.listener")

#: how long stopping waits for the open connections to close (more than CLOSE_GRACE; service.py adds up the graces)
STOP_GRACE = 8.0

#: One listener per supported device on the port it dials, for a relay configured with none:
#: forward to the vendor's cloud, answer locally while it cannot be reached.
DEFAULT_LISTENERS = (
    ListenerConfig(protocol="alphaess", listen=f"0.0.0.0:{alpha.PORT}", policy="auto", upstream=alpha.CLOUD),
    # FoxESS H1/H3/KH WiFi dongle: cleartext.
    ListenerConfig(protocol="foxess", listen=f"0.0.0.0:{fox.H_SERIES_PORT}", policy="auto",
                   upstream=fox.H_SERIES_CLOUD),
    # FoxESS M1: TLS terminated with a `pvtap certs foxess` pair (generated if missing) and
    # re-encrypted to the cloud address foxess_local_gateway relays to, pinned to the cloud's
    # self-signed certificate as that project documents it.
    ListenerConfig(protocol="foxess", listen=f"0.0.0.0:{fox.M1_PORT}", policy="auto", upstream=fox.M1_CLOUD,
                   tls_cert="certs/foxess-monitor.crt", tls_key="certs/foxess-monitor.key",
                   tls_subject=fox.M1_CLOUD_SUBJECT, upstream_tls=True, upstream_pin_sha256=fox.M1_CLOUD_PIN_SHA256),
    # FoxESS M1 hub channel (no hub product is known): answered as the forum write-up's server did.
    ListenerConfig(protocol="foxess", listen=f"0.0.0.0:{fox.HUB_PORT}", policy="local"),
    # FoxESS M1 broadcasts: ESP-MESH join_me_req and the heartbeat.
    ListenerConfig(protocol="foxess", listen=f"0.0.0.0:{fox.MESH_PORT}", transport="udp", policy="local"),
    ListenerConfig(protocol="foxess", listen=f"0.0.0.0:{fox.HEARTBEAT_PORT}", transport="udp", policy="local"),
)


def default_listeners() -> list[ListenerConfig]:
    return list(DEFAULT_LISTENERS)


class Listener:
    """Accepts device connections on one address and serves each as a `Connection`."""

    def __init__(self, config: ListenerConfig, key: Callable[[str], str], codec: StreamCodec, relay: Relay) -> None:
        self.config = config
        self.key = key  # names a setting of this listener in errors
        self.codec = codec
        self.relay = relay
        self.resolver = (UpstreamResolver(config.upstream, config.resolver, config.connect_timeout)
                         if config.policy in ("fixed", "auto") else None)
        self.device_tls: ssl.SSLContext | None = None  # set by start() when tls_cert is configured
        self.upstream_tls = UpstreamTLS.of(config, alerts=relay.copies.record)  # pin alerts: stored by ingest
        self.endpoints: list[Endpoint] = []
        self.connections: dict[asyncio.Task, Connection] = {}
        self.allow = AllowList(config.allow_from)
        self.refusals = Refusals(lambda: str(self), config.max_connections)
        self._server: asyncio.Server | None = None  # a plain TCP listener's
        self._tls_server: SocketServer | None = None  # a TLS listener's
        self.datagrams: Datagrams | None = None  # transport = "udp"
        self._udp: asyncio.DatagramTransport | None = None

    def __str__(self) -> str:
        target = {"fixed": f" → {self.config.upstream}", "auto": f" → {self.config.upstream} (else local answers)",
                  "transparent": " → original destination", "local": " → local answers"}[self.config.policy]
        where = ", ".join(map(str, self.endpoints)) or self.config.listen
        if self.config.transport == "udp":
            return f"{self.config.protocol} on udp {where} (listen only)"
        tls = (" tls" if self.device_tls else "") + (" → tls" if self.upstream_tls else "")
        return f"{self.config.protocol} on {where}{tls} ({self.config.policy}{target})"

    async def start(self) -> None:
        host, port = split_host_port(self.config.listen)
        if self.config.tls_cert:
            self.device_tls = await asyncio.to_thread(device_context, self.config, self.key)
        try:
            if self.config.transport == "udp":
                self.datagrams = datagrams = Datagrams(self.config, self.relay.copies, self.relay.privacy,
                                                       self.relay.peers, self.allow)
                self._udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                    lambda: datagrams, local_addr=("0.0.0.0" if host == "*" else host, port))
                self.endpoints = [Endpoint.of(self._udp.get_extra_info("sockname"))]
                return
            address = None if host == "*" else host
            if self.device_tls is not None:
                self._tls_server = await SocketServer.start(address, port, self._accept_tls, backlog=LISTEN_BACKLOG)
            else:
                self._server = await asyncio.start_server(self._accept, address, port, limit=CHUNK,
                                                          reuse_address=True, backlog=LISTEN_BACKLOG)
        except OSError as exc:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" if 0 < port < 1024 else ""
            raise ConfigError(self.key("listen"), self.config.listen, f"cannot listen there: {exc.strerror or exc}",
                              "use a free port on an address of this host" + hint) from None
        server: SocketServer | asyncio.Server | None = self._tls_server or self._server
        assert server is not None  # one of them was started above
        self.endpoints = [Endpoint.of(sock.getsockname()) for sock in server.sockets]

    async def check_upstream(self) -> None:
        """At start-up: refuse an upstream that resolves back to the relay (a DNS override seen
        by the relay's own resolver). A name that does not resolve now is retried per connection."""
        if self.resolver is None:
            return
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                targets = await self.resolver.resolve()
        except (UpstreamError, TimeoutError) as exc:
            log.warning("%s: cannot resolve the upstream now (%s); trying again for each connection%s", self,
                        exc or "timeout", ", answering locally meanwhile" if self.config.policy == "auto" else "")
            return
        for target in targets:
            reason = self.relay.guard.reason(target)
            if reason:
                fix = (f"set {self.key('resolver')} to a DNS server that gives the cloud's real address, or set "
                       f"{self.key('upstream')} to the cloud's IP address")
                if self.config.resolver:
                    fix = f"set {self.key('resolver')} to a DNS server that is not overridden"
                raise ConfigError(self.key("upstream"), self.config.upstream, f"resolves to {reason}", fix)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A plain listener's connection, called synchronously as it is made: admit or reset it."""
        peername = writer.get_extra_info("peername")
        if peername is None:  # gone before we got to it
            writer.close()
        elif self._refused(peername):
            reset(writer)
        else:
            self._serve(Connection(self, peername, (reader, writer)))

    def _accept_tls(self, sock: socket.socket, peername: tuple) -> None:
        """A TLS listener's connection, a socket nothing has read from: admit or reset it before
        any TLS work; the connection hands it to the TLS layer."""
        if self._refused(peername):
            reset_socket(sock)
        else:
            self._serve(Connection(self, peername, sock))

    def _refused(self, peername: tuple) -> bool:
        """allow_from and max_connections: True (counted and logged) when the peer gets no slot."""
        host = Endpoint.of(peername).host
        refusal = (Refusal.NOT_ALLOWED if not self.allow.allows(host)
                   else Refusal.LIMIT if len(self.connections) >= self.config.max_connections else None)
        if refusal is not None:
            self.refusals.note(refusal, self.relay.peers.name(host))
        return refusal is not None

    def _serve(self, connection: Connection) -> None:
        """Serve in a task of our own, so that stopping can cancel and await it."""
        task = asyncio.create_task(connection.run(), name=connection.label)
        self.connections[task] = connection
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task) -> None:
        del self.connections[task]

    async def close(self) -> None:
        """Stop accepting, end every open connection (each writes its record), then close."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
            assert self.datagrams is not None  # made with the UDP transport
            log.info("%s", self.datagrams.summary())
        if self._server is None and self._tls_server is None:
            return
        if self._server is not None:
            self._server.close()
        if self._tls_server is not None:
            await self._tls_server.close()
            self._tls_server = None
        self.refusals.close()
        tasks = list(self.connections)
        for connection in self.connections.values():
            connection.stop()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_GRACE)
            for task in late:  # closing took too long: no record for these
                log.error("%s: connection %s did not close within %g s", self, task.get_name(), STOP_GRACE)
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
