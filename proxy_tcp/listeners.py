"""A listener: one configured address, its protocol and policy, and the connections it accepted.

Listening is the only place a transport appears: `transport = "tcp"` opens asyncio stream
servers; another transport (UDP, TLS termination) is a further branch of `start` and of the
connection it hands its peers to, while the policy and decode sides stay as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import ModuleType
from typing import TYPE_CHECKING, Callable

from pvtap.config import ConfigError, ListenerConfig, split_host_port

from .connection import Connection
from .pump import CHUNK
from .upstream import Endpoint, UpstreamError, UpstreamResolver

if TYPE_CHECKING:
    from .service import Relay

log = logging.getLogger("proxy_tcp.listener")

#: how long stopping waits for the open connections to close and write their records
STOP_GRACE = 8.0

#: One listener per supported device on the port it dials, for a relay configured with none:
#: forward to the vendor's cloud, answer locally while it cannot be reached.
DEFAULT_LISTENERS = (
    ListenerConfig(protocol="alphaess", listen="0.0.0.0:7777", policy="auto", upstream="www.alphaess.com:7777"),
)


def default_listeners() -> list[ListenerConfig]:
    return list(DEFAULT_LISTENERS)


class Listener:
    """Accepts device connections on one address and serves each as a `Connection`."""

    def __init__(self, config: ListenerConfig, key: Callable[[str], str], codec: ModuleType, relay: "Relay") -> None:
        self.config = config
        self.key = key  # names a setting of this listener in errors
        self.codec = codec
        self.relay = relay
        self.resolver = (UpstreamResolver(config.upstream, config.resolver, config.connect_timeout)
                         if config.policy in ("fixed", "auto") else None)
        self.endpoints: list[Endpoint] = []
        self.connections: dict[asyncio.Task, Connection] = {}
        self._server: asyncio.Server | None = None

    def __str__(self) -> str:
        target = {"fixed": f" → {self.config.upstream}", "auto": f" → {self.config.upstream} (else local answers)",
                  "transparent": " → original destination", "local": " → local answers"}[self.config.policy]
        where = ", ".join(map(str, self.endpoints)) or self.config.listen
        return f"{self.config.protocol} on {where} ({self.config.policy}{target})"

    async def start(self) -> None:
        host, port = split_host_port(self.config.listen)
        try:
            self._server = await asyncio.start_server(self._accept, None if host == "*" else host, port,
                                                      limit=CHUNK, reuse_address=True)
        except OSError as exc:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" if 0 < port < 1024 else ""
            raise ConfigError(self.key("listen"), self.config.listen, f"cannot listen there: {exc.strerror or exc}",
                              "use a free port on an address of this host" + hint) from None
        self.endpoints = [Endpoint.of(sock.getsockname()) for sock in self._server.sockets]

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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Hand the connection to a task of our own, so that stopping can cancel and await it."""
        if writer.get_extra_info("peername") is None:  # gone before we got to it
            writer.close()
            return
        connection = Connection(self, reader, writer)
        task = asyncio.create_task(connection.run(), name=connection.label)
        self.connections[task] = connection
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task) -> None:
        del self.connections[task]

    async def close(self) -> None:
        """Stop accepting, end every open connection (each writes its record), then close."""
        if self._server is None:
            return
        self._server.close()
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
        await self._server.wait_closed()
        self._server = None
