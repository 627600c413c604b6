"""mitmproxy's side of `enphase.fallback_after`: what the Enphase addon knows of the cloud.

The hooks pass what mitmproxy reports about connections to the Enphase cloud (connecting,
connected, TLS done or failed, a response or an error) to `pvtap.enphase_fallback.CloudWatch`,
which holds the state machine; `answer_locally(flow)` is asked for each performance report.

Why the connection strategy changes: with mitmproxy's default `connection_strategy=eager`, a
transparent or reverse proxy connects to the cloud as soon as the Envoy connects, and closes
the Envoy's connection when that fails, before any request (and so any addon hook) is seen; in
regular mode it answers the CONNECT with a 502. While the cloud is in FALLBACK this addon sets
`connection_strategy=lazy`, so that the Envoy's connection is accepted and its report reaches
the request hook, where the cloud is tried once more and the report answered locally only if
that fails too. As soon as the cloud answers again the strategy is set back to what it was.

Only upstreams known to receive Enphase reports are watched: those a report was forwarded to,
those named by `enphase_hosts` (regular and reverse modes), and the addresses those names
resolve to (transparent mode, so a cloud already down at start-up is recognised too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.connection import Server
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.tls import TlsData
from mitmproxy.utils.asyncio_utils import create_task

from pvtap.enphase_fallback import (
    CloudWatch,
    Decision,
    Transition,
    plain_reason,
    probe,
    upstream_name,
    verifying_context,
)
from pvtap.records import Record

log = logging.getLogger("pvtap.enphase")

TICK = 1.0  # seconds between checks of the clock (overdue steps, fallback_after reached)


class CloudFallback:
    """The hooks that watch the cloud, and the decision for each performance report."""

    def __init__(self, store_record: Callable[[Record], None]) -> None:
        self.store_record = store_record  # where the enphase_fallback records go
        self.watch: CloudWatch | None = None  # None: fallback is off
        self.hosts: frozenset[str] = frozenset()
        self.known: set[str] = set()
        self._strategy_before: str | None = None  # what the user had before FALLBACK made it lazy
        self._probes: dict[str, asyncio.Task[str | None]] = {}
        self._ticker: asyncio.Task[None] | None = None

    def apply_settings(self, fallback_after: float, timeout: float, hosts: frozenset[str]) -> None:
        """Called by the Enphase addon whenever its settings change; 0 turns fallback off."""
        self.hosts = hosts
        if not fallback_after:
            self.watch = None
            if self._strategy_before is not None:
                self._sync_strategy()
            return
        if self.watch is None or (self.watch.fallback_after, self.watch.timeout) != (fallback_after, timeout):
            self.watch = CloudWatch(fallback_after=fallback_after, timeout=timeout)
            log.info("enphase: reports are answered here once the cloud has been unreachable for %g s "
                     "(a connect or TLS handshake may take %g s)", fallback_after, timeout)

    # -- lifecycle -------------------------------------------------------------------------

    def running(self) -> None:
        if self._ticker is None:
            self._ticker = create_task(self._tick(), name="enphase cloud fallback", keep_ref=True)
        if self.watch is not None:  # the names' addresses, for transparent mode: off the loop, never waited for
            loop = asyncio.get_running_loop()

            def resolve() -> None:
                found = _addresses(self.hosts)
                with contextlib.suppress(RuntimeError):  # the proxy stopped meanwhile
                    loop.call_soon_threadsafe(self.known.update, found)
            threading.Thread(target=resolve, name="enphase cloud addresses", daemon=True).start()

    def done(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def _tick(self) -> None:
        while True:
            if self.watch is not None:
                self._apply(self.watch.tick(time.time()))
            await asyncio.sleep(TICK)

    # -- evidence --------------------------------------------------------------------------

    def server_connect(self, data: ServerConnectionHookData) -> None:
        if (upstream := self._watched(data.server.address)) and self.watch:
            self._apply(self.watch.attempt(data.server.id, upstream, "connect", time.time()))

    def server_connected(self, data: ServerConnectionHookData) -> None:
        """Connected is not yet answered (a dead backend behind a live port accepts too): a TLS
        handshake or a response says that. The connect step is over, though."""
        if self._watched(data.server.address) and self.watch:
            self.watch.step_done(data.server.id)

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        if (upstream := self._watched(data.server.address)) and self.watch:
            self._apply(self.watch.failed(upstream, plain_reason(data.server.error or "connection failed"), time.time(),
                                          key=data.server.id))

    def tls_start_server(self, data: TlsData) -> None:
        if isinstance(server := data.conn, Server) and (upstream := self._watched(server.address)) and self.watch:
            self._apply(self.watch.attempt(server.id, upstream, "TLS handshake", time.time()))

    def tls_established_server(self, data: TlsData) -> None:
        if isinstance(server := data.conn, Server) and (upstream := self._watched(server.address)) and self.watch:
            self._apply(self.watch.answered(upstream, time.time(), key=server.id))

    def tls_failed_server(self, data: TlsData) -> None:
        if isinstance(server := data.conn, Server) and (upstream := self._watched(server.address)) and self.watch:
            self._apply(self.watch.failed(upstream, f"TLS: {server.error or 'handshake failed'}", time.time(),
                                          key=server.id))

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get("enphase_local"):
            return
        if (upstream := self._watched(flow.server_conn.address)) and self.watch:
            self._apply(self.watch.answered(upstream, time.time(), key=flow.server_conn.id))

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get("enphase_kind") is None or flow.metadata.get("enphase_local"):
            return  # only reports: an error elsewhere may be the client's
        if (upstream := self._watched(flow.server_conn.address)) and self.watch and flow.error:
            self._apply(self.watch.failed(upstream, plain_reason(flow.error.msg), time.time(), key=flow.server_conn.id))

    # -- the decision ----------------------------------------------------------------------

    async def answer_locally(self, flow: http.HTTPFlow) -> str | None:
        """For a performance report: why it must be answered here (the cloud is in FALLBACK and
        did not answer again just now), or None to forward it."""
        if self.watch is None:
            return None
        upstream = upstream_name(flow.server_conn.address)
        self.known.add(upstream)  # it carries reports
        decision, transitions = self.watch.decide(upstream, time.time())
        self._apply(transitions)
        if decision is Decision.FORWARD:
            return None
        reason = await self._probe(flow, upstream)
        if reason is None:
            self._apply(self.watch.answered(upstream, time.time()))
            return None
        self._apply(self.watch.failed(upstream, reason, time.time()))
        self.watch.answered_locally(upstream)
        return reason

    async def _probe(self, flow: http.HTTPFlow, upstream: str) -> str | None:
        """One probe per upstream at a time: reports arriving together share it."""
        assert self.watch is not None and flow.server_conn.address  # answer_locally checked
        task = self._probes.get(upstream)
        if task is None:
            host, port = flow.server_conn.address
            server_name = (flow.server_conn.sni or flow.request.pretty_host) if flow.request.scheme == "https" else None
            context = None
            if server_name is not None and "ssl_insecure" in ctx.options:  # check it as mitmproxy will
                opts = ctx.options
                context = verifying_context(insecure=opts.ssl_insecure, cafile=opts.ssl_verify_upstream_trusted_ca,
                                            capath=opts.ssl_verify_upstream_trusted_confdir)
            task = asyncio.ensure_future(probe(host, port, server_name=server_name, timeout=self.watch.timeout,
                                               context=context))
            self._probes[upstream] = task
            task.add_done_callback(lambda _: self._probes.pop(upstream, None))
        return await asyncio.shield(task)

    # -- helpers ---------------------------------------------------------------------------

    def _watched(self, address: Any) -> str | None:
        if self.watch is None or not address:
            return None
        upstream = upstream_name(address)
        if upstream in self.known or str(address[0]).lower() in self.hosts:
            return upstream
        return None

    def _apply(self, transitions: list[Transition]) -> None:
        for transition in transitions:
            log.warning("%s", transition.log_line())
            try:
                self.store_record(transition.record())
            except Exception:  # the decision stands even when the store is gone
                log.exception("enphase: could not store the %s record", transition.state.value)
        if transitions:
            self._sync_strategy()

    def _sync_strategy(self) -> None:
        """Lazy while an upstream is in FALLBACK (module docstring); back to the user's choice after."""
        if "connection_strategy" not in ctx.options:  # no proxy server (an addon test)
            return
        fallback = self.watch is not None and self.watch.in_fallback
        current = ctx.options.connection_strategy
        if fallback and current != "lazy":
            self._strategy_before = current
            log.info("enphase: connection_strategy=lazy while the cloud is unreachable (was %s)", current)
            ctx.options.update(connection_strategy="lazy")
        elif not fallback and self._strategy_before is not None:
            before, self._strategy_before = self._strategy_before, None
            log.info("enphase: connection_strategy=%s again", before)
            ctx.options.update(connection_strategy=before)


def _addresses(hosts: frozenset[str], port: int = 443) -> set[str]:
    """host:port for each address the names resolve to here (nothing for a name that does not)."""
    found: set[str] = set()
    for host in hosts:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            continue
        found.update(upstream_name((str(info[4][0]), port)) for info in infos)
    return found
