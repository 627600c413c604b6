"""Self-signed certificates for the stand-in clouds, the demo and the FoxESS TLS listener.

Private keys are written with mode 0600 and never committed (see .gitignore and certs/README.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(common_name: str, sans: list[str] | None = None, *, organization: str = "",
                days: int = 3650) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for `common_name`; `sans` may hold DNS names and IPs."""
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    name = x509.Name(attrs)
    alt_names: list[x509.GeneralName] = []
    for san in sans or [common_name]:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            alt_names.append(x509.DNSName(san))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_pair(directory: str | Path, stem: str, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    """Write `<stem>.crt` (0644) and `<stem>.key` (0600); returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def sha256_fingerprint(cert_pem_or_der: bytes) -> str:
    """The certificate's SHA-256 fingerprint as lowercase hex, the form pins are written in."""
    if cert_pem_or_der.lstrip().startswith(b"-----"):
        cert = x509.load_pem_x509_certificate(cert_pem_or_der)
    else:
        cert = x509.load_der_x509_certificate(cert_pem_or_der)
    return cert.fingerprint(hashes.SHA256()).hex()
