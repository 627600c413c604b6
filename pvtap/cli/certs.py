"""`pvtap certs`: the certificate the relay presents to FoxESS M1 inverters, and pins for upstreams."""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path

from cryptography import x509

from pvtap.certs import foxess_pair, sha256_fingerprint
from pvtap.config import Config, split_host_port

FOXESS_STEM = "foxess-monitor"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "certs", help="make the FoxESS listener certificate; get a server's SHA-256 pin",
        description="Certificate tooling. Private keys are written with mode 0600 and belong in the data "
                    "directory, never in a repository (see certs/README.md).")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    foxess = actions.add_parser(
        "foxess", help="generate the certificate the relay presents on TCP 14431",
        description="Generate a self-signed RSA certificate and key for the FoxESS M1 listener (TLS on TCP "
                    "14431), with a subject like the FoxESS cloud's own (C=CN, ST=JiangSu, L=Wuxi, O=FoxESS, "
                    "CN=monitor). The M1 does not check the certificate; the relay presents it, decodes, and "
                    "re-encrypts to the cloud. Prints the paths, the SHA-256 fingerprint and the listener "
                    "settings to use. An existing pair is kept unless --force is given.")
    foxess.add_argument("--out", type=Path, metavar="DIR",
                        help="directory for foxess-monitor.crt/.key (default: <data_dir>/certs)")
    foxess.add_argument("--force", action="store_true", help="replace an existing certificate and key")
    foxess.set_defaults(func=run_foxess)

    pin = actions.add_parser(
        "fingerprint", help="print the SHA-256 pin of a certificate file or a TLS server",
        description="Print the SHA-256 fingerprint of a certificate (PEM or DER file), or of the certificate a "
                    "TLS server presents at HOST:PORT (fetched without checking it). Use it as a listener's "
                    "upstream_pin_sha256, after making sure you reached the server you meant to.")
    pin.add_argument("target", metavar="HOST:PORT|FILE", help="a certificate file, or a TLS server's address")
    pin.add_argument("--timeout", type=float, default=10.0, metavar="S", help="connect timeout (default 10 s)")
    pin.set_defaults(func=run_fingerprint)


def run_foxess(args: argparse.Namespace, config: Config) -> int:
    out = args.out or Path(config.data_dir) / "certs"
    cert_path, key_path = out / f"{FOXESS_STEM}.crt", out / f"{FOXESS_STEM}.key"
    if cert_path.exists() and key_path.exists() and not args.force:
        print("kept the existing pair (use --force to replace it):")
    else:
        cert_path, key_path = foxess_pair(out, FOXESS_STEM)
        print("generated:")
    cert = cert_path.read_bytes()
    print(f"  certificate  {cert_path}")
    print(f"  key          {key_path}  (mode {key_path.stat().st_mode & 0o777:04o})")
    print(f"  subject      {x509.load_pem_x509_certificate(cert).subject.rfc4514_string()}")
    print(f"  sha256       {sha256_fingerprint(cert)}")
    print()
    print("The relay's default FoxESS M1 listener uses <data_dir>/certs/foxess-monitor.crt/.key. To configure")
    print("one yourself (pin the cloud with `pvtap certs fingerprint <cloud address>:14431`):")
    print("  [[relay.listeners]]")
    print('  protocol = "foxess"')
    print('  listen = "0.0.0.0:14431"')
    print('  policy = "auto"')
    print('  upstream = "8.209.116.72:14431"')
    print(f'  tls_cert = "{cert_path}"')
    print(f'  tls_key = "{key_path}"')
    print("  upstream_tls = true")
    print('  upstream_pin_sha256 = "<the cloud\'s SHA-256>"')
    return 0


def run_fingerprint(args: argparse.Namespace, config: Config) -> int:
    target = Path(args.target)
    try:
        if target.is_file():
            pem_or_der = target.read_bytes()
        else:
            host, port = _address(args.target)
            pem_or_der = ssl.get_server_certificate((host, port), timeout=args.timeout).encode()
        fingerprint = sha256_fingerprint(pem_or_der)
        cert = (x509.load_pem_x509_certificate(pem_or_der) if pem_or_der.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(pem_or_der))
    except (TimeoutError, OSError, ssl.SSLError) as exc:
        print(f"pvtap certs fingerprint: could not get a certificate from {args.target}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"pvtap certs fingerprint: {args.target} holds no readable certificate ({exc})", file=sys.stderr)
        return 1
    print(f"sha256   {fingerprint}")
    print(f"subject  {cert.subject.rfc4514_string()}")
    print(f"expires  {cert.not_valid_after_utc:%Y-%m-%d}")
    return 0


def _address(text: str) -> tuple[str, int]:
    try:
        host, port = split_host_port(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a file nor HOST:PORT") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"{text!r} is neither a file nor HOST:PORT")
    return host, port
