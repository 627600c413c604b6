"""TLS on either side of a relayed connection, knowing nothing of protocols.

A listener with `tls_cert`/`tls_key` terminates the devices' TLS. Connections are accepted as raw
sockets and handed, unread, to the TLS layer (proxy_tcp/accept.py), so no handshake byte is read as
cleartext on either event loop, and a failed handshake still ends with a log line and a connection
record. With
`upstream_tls` the relay speaks TLS to the cloud and checks it as the listener says: a SHA-256
pin of its certificate, a CA file, or — only when `upstream_insecure` is set — not at all. The
splice and the decoder see application bytes, which pass unmodified; only the TLS records differ
on the two sides.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from pvtap.certs import parse_subject, self_signed, sha256_fingerprint, write_files
from pvtap.config import ConfigError, ListenerConfig, split_host_port
from pvtap.records import Record

from .alerts import PinMismatch
from .upstream import Endpoint, UpstreamError

log = logging.getLogger("proxy_tcp.tls")

def normalized_pin(pin: str) -> str:
    """`AB:CD:…` or `abcd…` → `abcd…`, the form sha256_fingerprint gives."""
    return pin.replace(":", "").strip().lower()


def in_data_dir(listener: ListenerConfig, data_dir: str | Path) -> ListenerConfig:
    """The listener with a relative `tls_cert`/`tls_key` taken in the data directory (where
    `pvtap certs` writes), so the same config works wherever the relay is started."""
    paths = {name: str(Path(data_dir) / value) for name in ("tls_cert", "tls_key")
             if (value := getattr(listener, name)) and not Path(value).is_absolute()}
    if not paths:
        return listener
    return dataclasses.replace(listener, tls_cert=paths.get("tls_cert", listener.tls_cert),
                               tls_key=paths.get("tls_key", listener.tls_key))


def device_context(config: ListenerConfig, key: Callable[[str], str]) -> ssl.SSLContext:
    """The server side towards devices. A pair that does not exist yet is generated (self-signed
    RSA, `tls_subject`); one half missing or an unusable file is a ConfigError."""
    cert, private = Path(config.tls_cert), Path(config.tls_key)
    if not cert.exists() and not private.exists():
        try:
            subject = parse_subject(config.tls_subject)
        except ValueError as exc:
            raise ConfigError(key("tls_subject"), config.tls_subject, str(exc),
                              "write it as /C=CN/O=Example/CN=name") from None
        pem, key_pem = self_signed(sans=[subject["common_name"]], key_type="rsa", days=36500, **subject)
        write_files(cert, private, pem, key_pem)
        log.warning("generated a self-signed certificate for %s: %s (key %s, sha256 %s); devices that check "
                    "certificates will refuse it", config.listen, cert, private, sha256_fingerprint(pem))
    for name, path in (("tls_cert", cert), ("tls_key", private)):
        if not path.is_file():
            raise ConfigError(key(name), str(path), "no such file (its other half exists)",
                              "give both files of the pair, or remove both to have the relay generate a pair")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, private)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(key("tls_cert"), str(cert), f"cannot use it with {private} ({exc})",
                          "point tls_cert and tls_key at a PEM certificate and its private key") from None
    return context


@dataclasses.dataclass(frozen=True)
class UpstreamTLS:
    """How the relay opens and checks a TLS connection to the cloud for one listener."""

    context: ssl.SSLContext
    pin: str  # lowercase hex SHA-256 of the certificate, or ""
    server_hostname: str | None  # the upstream's name for SNI and the CA check, None: the address
    alarm: PinMismatch | None = None  # with a pin: what a mismatch tells a person (proxy_tcp.alerts)

    @classmethod
    def of(cls, config: ListenerConfig, alerts: Callable[[Record], None]) -> UpstreamTLS | None:
        if not config.upstream_tls:
            return None
        if config.upstream_ca_file:
            context = ssl.create_default_context(cafile=config.upstream_ca_file)
        else:  # the pin is checked after the handshake, or the user chose upstream_insecure
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        name = split_host_port(config.upstream)[0] if config.upstream else None
        pin = normalized_pin(config.upstream_pin_sha256)
        return cls(context, pin, name, PinMismatch(config, alerts) if pin else None)

    async def open(self, endpoint: Endpoint, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect, handshake and check the pin; UpstreamRefused when the certificate is not the
        pinned one (the connection is closed before a byte is sent)."""
        reader, writer = await asyncio.open_connection(
            endpoint.host, endpoint.port, limit=limit, ssl=self.context,
            server_hostname=self.server_hostname or endpoint.host)
        if self.pin:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            seen = hashlib.sha256(der).hexdigest() if der else "none"
            if seen != self.pin:
                writer.transport.abort()
                if self.alarm is not None:
                    self.alarm.mismatch(str(endpoint), seen)
                raise UpstreamRefused(f"its certificate has SHA-256 {seen}, not the pinned {self.pin} "
                                      "(upstream_pin_sha256)")
            if self.alarm is not None:
                self.alarm.passed()
        return reader, writer


class UpstreamRefused(UpstreamError):
    """The cloud answered, but with a certificate the listener does not accept."""
