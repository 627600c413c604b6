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
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pvtap.decode.foxess.vendor import M1_CLOUD_SUBJECT


def self_signed(common_name: str, sans: list[str] | None = None, *, organization: str = "",
                days: int = 3650, key_type: str = "ec", country: str = "", state: str = "",
                locality: str = "") -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for `common_name`; `sans` may hold DNS names and IPs.
    `key_type` "rsa" (2048 bit) suits clients that offer only ECDHE-RSA suites (the FoxESS M1)."""
    key = rsa.generate_private_key(65537, 2048) if key_type == "rsa" else ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(oid, value) for oid, value in (
        (NameOID.COUNTRY_NAME, country), (NameOID.STATE_OR_PROVINCE_NAME, state),
        (NameOID.LOCALITY_NAME, locality), (NameOID.ORGANIZATION_NAME, organization)) if value]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
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
    return write_files(directory / f"{stem}.crt", directory / f"{stem}.key", cert_pem, key_pem)


def write_files(cert_path: str | Path, key_path: str | Path, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    """Write a certificate (0644) and its private key (0600) where given, creating directories."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    for directory in {cert_path.parent, key_path.parent}:
        directory.mkdir(parents=True, exist_ok=True)
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


_SUBJECT_KEYS = {"C": "country", "ST": "state", "L": "locality", "O": "organization", "CN": "common_name"}


def parse_subject(text: str) -> dict[str, str]:
    """`/C=CN/ST=JiangSu/L=Wuxi/O=FoxESS/CN=monitor` (OpenSSL's form) → self_signed keywords;
    ValueError for anything else. CN is required."""
    subject: dict[str, str] = {}
    for part in text.strip().strip("/").split("/"):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in _SUBJECT_KEYS or not value.strip():
            raise ValueError(f"{part!r} is not one of {', '.join(f'{k}=value' for k in _SUBJECT_KEYS)}")
        subject[_SUBJECT_KEYS[name.strip()]] = value.strip()
    if "common_name" not in subject:
        raise ValueError("the subject needs a CN=")
    return subject


#: The subject the FoxESS cloud presents on TCP 14431 (foxess_local_gateway `cert.py`).
FOXESS_SUBJECT = M1_CLOUD_SUBJECT


def foxess_pair(directory: str | Path, stem: str = "foxess-monitor") -> tuple[Path, Path]:
    """A certificate/key for the FoxESS 14431 listener, written as `<stem>.crt`/`<stem>.key` (0600):
    RSA (the M1 offers ECDHE-RSA suites only), a subject like the cloud's own, valid 100 years
    like the cloud's. The M1 does not check it; the subject just keeps the exchange unremarkable."""
    cert, key = self_signed(sans=["monitor", "*.foxesscloud.com"], days=36500, key_type="rsa",
                            **parse_subject(FOXESS_SUBJECT))
    return write_pair(directory, stem, cert, key)
