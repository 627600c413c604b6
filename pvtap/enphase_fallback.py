"""When the Enphase cloud is gone: decide when the addon answers reports itself (`enphase.fallback_after`).

The addon feeds this state machine what mitmproxy tells it about each connection to the cloud
(connecting, connected, TLS done or failed, an answer or an error) and asks it, for each
`performance_report`, whether to forward it or to answer it locally. Per upstream (host:port):

    REACHABLE ──failure──► UNREACHABLE ──unreachable for fallback_after──► FALLBACK
        ▲                      │                                             │
        └──────the cloud answers (a connection, a TLS handshake, a response)─┘

- REACHABLE and UNREACHABLE forward every report: a cloud that blinks costs the Envoy an error,
  and the Envoy keeps the report and sends it again later. Nothing is answered locally.
- FALLBACK tries the cloud again for each report (`probe`, at most `timeout` seconds) and only
  answers locally when that fails too, so a cloud that answers is never bypassed.
- A failure is a refused connection, a DNS or TLS failure, an error before the cloud's answer,
  or no answer within `timeout` (a connection or handshake still pending then counts as failed).

Each change of state is one `Transition`: one log line and one `enphase_fallback` record, never
one per report. Pure apart from `probe` (a socket, no mitmproxy); times are Unix seconds passed in.
"""

from __future__ import annotations

import asyncio
import enum
import os
import re
import socket
import ssl
from collections.abc import Hashable
from dataclasses import dataclass, field

from pvtap.records import Origin, Record, utc_from_unix

MEASUREMENT = "enphase_fallback"


class CloudState(enum.Enum):
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"  # failing; reports are still forwarded
    FALLBACK = "fallback"  # unreachable for fallback_after: reports are answered locally


class Decision(enum.Enum):
    FORWARD = "forward"
    PROBE = "probe"  # try the cloud now; answer locally unless it answers


@dataclass(frozen=True)
class Transition:
    """One change of an upstream's state, with why."""

    upstream: str
    state: CloudState
    previous: CloudState
    at: float
    since: float  # when the cloud was first found unreachable in this episode
    reason: str  # the latest failure; "answered" when it is back
    answered_locally: int  # reports answered locally in the episode
    fallback_after: float

    @property
    def unreachable_s(self) -> float:
        return max(0.0, self.at - self.since)

    def log_line(self) -> str:
        if self.state is CloudState.UNREACHABLE:
            return (f"enphase: cloud {self.upstream} unreachable ({self.reason}); reports are still forwarded "
                    f"and answered locally only after {self.fallback_after:g} s of this")
        if self.state is CloudState.FALLBACK:
            return (f"enphase: cloud {self.upstream} unreachable for {self.unreachable_s:.0f} s ({self.reason}): "
                    "answering performance reports locally, trying the cloud again for each")
        return (f"enphase: cloud {self.upstream} answers again after {self.unreachable_s:.0f} s unreachable "
                f"({self.answered_locally} report(s) answered locally): forwarding")

    def record(self) -> Record:
        fields: dict[str, int | float | str | bool] = {
            "previous": self.previous.value, "reason": self.reason, "unreachable_s": round(self.unreachable_s, 3),
            "answered_locally": self.answered_locally, "fallback_after_s": self.fallback_after}
        return Record(MEASUREMENT, utc_from_unix(self.at), {"upstream": self.upstream, "state": self.state.value},
                      fields, Origin(protocol="enphase"))


@dataclass
class _Upstream:
    state: CloudState = CloudState.REACHABLE
    since: float = 0.0
    reason: str = ""
    answered_locally: int = 0


@dataclass
class _Pending:
    upstream: str
    deadline: float
    what: str  # "connect" or "TLS handshake"


@dataclass
class CloudWatch:
    """The reachability of each cloud upstream, from the evidence the addon passes in.

    `attempt(key, upstream, what, now)` starts a step the cloud must complete within `timeout`
    (a connect, a TLS handshake); `answered`/`failed` end it (`key` None: evidence without a
    step, e.g. a response). Every call first expires overdue steps. Each call returns the
    transitions it caused, oldest first.
    """

    fallback_after: float
    timeout: float
    _upstreams: dict[str, _Upstream] = field(default_factory=dict)
    _pending: dict[Hashable, _Pending] = field(default_factory=dict)
    _expired: set[Hashable] = field(default_factory=set)  # steps already failed by their deadline

    def state(self, upstream: str) -> CloudState:
        return self._upstreams.get(upstream, _Upstream()).state

    @property
    def in_fallback(self) -> bool:
        return any(u.state is CloudState.FALLBACK for u in self._upstreams.values())

    def attempt(self, key: Hashable, upstream: str, what: str, now: float) -> list[Transition]:
        out = self.tick(now)
        self._pending[key] = _Pending(upstream, now + self.timeout, what)
        return out

    def step_done(self, key: Hashable) -> None:
        """The step ended without saying whether the cloud answers (e.g. a TCP connect before TLS)."""
        self._pending.pop(key, None)

    def answered(self, upstream: str, now: float, key: Hashable | None = None) -> list[Transition]:
        out = self.tick(now)
        self._pending.pop(key, None)
        self._expired.discard(key)
        entry = self._upstreams.setdefault(upstream, _Upstream())
        if entry.state is not CloudState.REACHABLE:
            out.append(self._change(upstream, entry, CloudState.REACHABLE, now, "answered"))
            entry.answered_locally = 0
        return out

    def failed(self, upstream: str, reason: str, now: float, key: Hashable | None = None) -> list[Transition]:
        out = self.tick(now)
        if key is not None and self._pending.pop(key, None) is None and key in self._expired:
            self._expired.discard(key)
            return out  # already counted when its deadline passed
        return out + self._failure(upstream, reason, now)

    def decide(self, upstream: str, now: float) -> tuple[Decision, list[Transition]]:
        out = self.tick(now)
        state = self.state(upstream)
        return (Decision.PROBE if state is CloudState.FALLBACK else Decision.FORWARD), out

    def answered_locally(self, upstream: str) -> None:
        self._upstreams.setdefault(upstream, _Upstream()).answered_locally += 1

    def tick(self, now: float) -> list[Transition]:
        """Expire overdue steps and promote upstreams unreachable for fallback_after."""
        out: list[Transition] = []
        for key, pending in list(self._pending.items()):
            if pending.deadline <= now:
                del self._pending[key]
                if len(self._expired) >= 4096:  # bounded: a step's late end comes soon, if ever
                    self._expired.clear()
                self._expired.add(key)
                out += self._failure(pending.upstream, f"no answer to the {pending.what} within {self.timeout:g} s",
                                     pending.deadline)
        for upstream, entry in self._upstreams.items():
            if entry.state is CloudState.UNREACHABLE and now - entry.since >= self.fallback_after:
                out.append(self._change(upstream, entry, CloudState.FALLBACK, now, entry.reason))
        return out

    def _failure(self, upstream: str, reason: str, at: float) -> list[Transition]:
        entry = self._upstreams.setdefault(upstream, _Upstream())
        entry.reason = reason
        if entry.state is not CloudState.REACHABLE:
            return []
        entry.since = at
        return [self._change(upstream, entry, CloudState.UNREACHABLE, at, reason)]

    def _change(self, upstream: str, entry: _Upstream, state: CloudState, at: float, reason: str) -> Transition:
        transition = Transition(upstream, state, entry.state, at, entry.since, reason, entry.answered_locally,
                                self.fallback_after)
        entry.state = state
        return transition


_ERRNO = re.compile(r"\[Errno (-?\d+)\]")


def plain_reason(message: str) -> str:
    """"[Errno 111] Connect call failed ('192.0.2.1', 443)" → "Connection refused" (what a person
    looks for); other messages as they are."""
    match = _ERRNO.match(message)
    return os.strerror(int(match[1])) if match and int(match[1]) > 0 else message


def upstream_name(address: tuple[str, int] | None) -> str:
    """host:port as the transitions name it ([v6]:port for IPv6)."""
    if not address:
        return "?"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def verifying_context(*, insecure: bool, cafile: str | None = None, capath: str | None = None) -> ssl.SSLContext:
    """A client context that accepts the certificates mitmproxy accepts upstream (its options
    ssl_insecure, ssl_verify_upstream_trusted_ca/_confdir; certifi's CAs when neither is set):
    a cloud whose certificate mitmproxy rejects is a cloud that cannot be reached."""
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if cafile is None and capath is None:
        import certifi  # mitmproxy's own default, and one of its dependencies

        cafile = certifi.where()
    return ssl.create_default_context(cafile=cafile, capath=capath)


async def probe(host: str, port: int, *, server_name: str | None, timeout: float,
                context: ssl.SSLContext | None = None) -> str | None:
    """Try the cloud: connect, and with `server_name` also complete a TLS handshake, within
    `timeout` seconds. None when it answered, else why not. `context` checks the certificate as
    mitmproxy would (`verifying_context`); without it the certificate is not checked."""
    if server_name is not None and context is None:
        context = verifying_context(insecure=True)
    elif server_name is None:
        context = None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=context,
                                                      server_hostname=server_name if context else None)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except socket.gaierror as exc:
        return f"DNS: {exc.strerror or exc}"
    except ssl.SSLError as exc:
        return f"TLS: {exc.reason or exc}"
    except OSError as exc:  # asyncio's message is "Connect call failed (...)": say which failure
        return os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
    return None
