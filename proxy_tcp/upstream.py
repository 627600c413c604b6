"""Where a relayed connection goes, and where it must never go.

Invariant 5 (not an open relay) lives here: the relay connects only to its configured upstream
or to a redirected connection's original destination, and never back to itself — neither to
one of its own listening sockets (a loop) nor to another address of this host (what a DNS
override that also fools the relay's own resolver produces).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.resolver

from pvtap.config import split_host_port
from pvtap.ingest.framing import Outcome

if TYPE_CHECKING:
    from .tls import UpstreamTLS

#: getsockopt option number of SO_ORIGINAL_DST (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6).
SO_ORIGINAL_DST = 80
SOL_IPV6 = 41


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IP address and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def of(cls, sockname: tuple) -> Endpoint:
        return cls(_unmapped(sockname[0]), int(sockname[1]))


class UpstreamError(Exception):
    """The cloud could not be resolved or reached; `outcome` is the connection record's word for it."""

    outcome = Outcome.UPSTREAM_FAILED


class RefusedDestination(UpstreamError):
    """A destination the relay will not connect to."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


def _unmapped(host: str) -> str:
    """`::ffff:192.0.2.1` → `192.0.2.1`; scope ids dropped."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def is_local_address(host: str) -> bool:
    """True when this host owns the address: the kernel lets a socket bind to it only then."""
    ip = ipaddress.ip_address(host)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL):
                return False
            raise
    return True


class SelfGuard:
    """Knows the relay's own listening endpoints and names the reason a destination leads back
    to the relay. A loopback address on a port the relay does not listen on is allowed: that is
    an explicitly configured local service (a stand-in cloud, a tunnel), not a loop."""

    def __init__(self) -> None:
        self.listening: list[Endpoint] = []

    def reason(self, dest: Endpoint) -> str | None:
        ip = ipaddress.ip_address(_unmapped(dest.host))
        for own in self.listening:
            if own.port != dest.port:
                continue
            own_ip = ipaddress.ip_address(own.host)
            if own_ip == ip or (own_ip.is_unspecified and is_local_address(str(ip))):
                return f"{dest} is the relay's own listening address ({own}): connecting there would loop"
        if not ip.is_loopback and is_local_address(str(ip)):
            return f"{dest} is an address of this host, not the cloud"
        return None


class UpstreamResolver:
    """Resolves a configured `host:port` to the addresses to try, through the system resolver
    or, for DNS-override setups, a named DNS server (dnspython) that gives the real address."""

    def __init__(self, upstream: str, resolver: str = "", timeout: float = 10.0) -> None:
        self.upstream = upstream
        self.name, self.port = split_host_port(upstream)
        self.literal = _ip_or_none(self.name)
        self.resolver: dns.asyncresolver.Resolver | None = None
        if resolver and self.literal is None:
            server, port = _split_resolver(resolver)
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = [server]
            self.resolver.port = port
            self.resolver.lifetime = timeout

    async def resolve(self) -> list[Endpoint]:
        """The upstream's addresses, IPv4 first; UpstreamError when there are none."""
        if self.literal is not None:
            return [Endpoint(self.literal, self.port)]
        try:
            hosts = await (self._named() if self.resolver else self._system())
        except (OSError, dns.exception.DNSException) as exc:
            via = f" via {self.resolver.nameservers[0]}" if self.resolver else ""
            raise UpstreamError(f"cannot resolve {self.name}{via}: {exc}") from None
        if not hosts:
            raise UpstreamError(f"{self.name} has no address")
        return [Endpoint(h, self.port) for h in dict.fromkeys(hosts)]

    async def _system(self) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(self.name, self.port, type=socket.SOCK_STREAM)
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        return [_unmapped(str(info[4][0])) for info in infos]  # an IP address: str for AF_INET and AF_INET6

    async def _named(self) -> list[str]:
        assert self.resolver is not None
        hosts: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(self.name, rdtype)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            hosts.extend(rr.address for rr in answer)
        return hosts


def _ip_or_none(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _split_resolver(value: str) -> tuple[str, int]:
    """`192.0.2.53`, `192.0.2.53:5353`, `2001:db8::53`, `[2001:db8::53]:53` → (ip, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest.removeprefix(":") or 53)
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, int(port)
    return value, 53


def original_destination(sock: socket.socket) -> Endpoint | None:
    """Where the device meant to connect before a REDIRECT/DNAT on this host (SO_ORIGINAL_DST);
    None when the kernel knows no such translation. The call follows the socket's own family:
    the wrong one must not be tried (mitmproxy warns it can crash the runtime)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
            return Endpoint(_unmapped(socket.inet_ntop(socket.AF_INET6, raw[8:24])), int.from_bytes(raw[2:4], "big"))
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return Endpoint(socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big"))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            return None
        raise


async def open_upstream(endpoints: list[Endpoint], limit: int, tls: UpstreamTLS | None = None,
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Endpoint]:
    """Connect to the first endpoint that accepts — over TLS, checked, when the listener says
    so (proxy_tcp.tls) — the caller bounds the time."""
    errors = []
    for endpoint in endpoints:
        try:
            if tls is not None:
                reader, writer = await tls.open(endpoint, limit)
            else:
                reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, limit=limit)
            return reader, writer, endpoint
        except UpstreamError as exc:  # a certificate that is not the pinned one
            errors.append(f"{endpoint}: {exc}")
        except ssl.SSLError as exc:
            reason = getattr(exc, "verify_message", "") or exc.reason or exc
            errors.append(f"{endpoint}: TLS handshake failed: {reason}")
        except OSError as exc:
            errors.append(f"{endpoint}: {os.strerror(exc.errno) if exc.errno else exc}")
    raise UpstreamError("cannot connect to " + "; ".join(errors))
