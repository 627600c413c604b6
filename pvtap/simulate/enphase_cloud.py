"""A stand-in for reports.enphaseenergy.com: a real local HTTPS server speaking the report protocol.

Tests, `pvtap demo` and the bench put mitmproxy in front of this server instead of the real
cloud, which is never contacted. It answers `performance_report` with a zlib
`perf_report_response` acknowledging the posted event ids (as the 2012 capture shows), answers
`task_complete` with an empty 200 (its real answer is not public), and records every request
exactly as it arrived (method, target, headers, body bytes) together with what it answered, so a
test can prove the proxy forwarded both directions unchanged.

Run it on its own (the bench does, to keep it out of the measuring process):

    python -m pvtap.simulate.enphase_cloud --port 8444
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pvtap.certs import self_signed, write_pair
from pvtap.decode.enphase import build_response, event_ids, report_kind

log = logging.getLogger("pvtap.simulate.enphase_cloud")

HOSTNAME = "reports.enphaseenergy.com"
RESPONSE_CONTENT_TYPE = "application/x-deflate; charset=utf-8"


@dataclass(frozen=True)
class Exchange:
    """One request as the stand-in received it, and what it answered."""

    method: str
    target: str  # path and query exactly as on the request line
    headers: tuple[tuple[str, str], ...]  # in order, as received
    body: bytes
    status: int
    response_headers: tuple[tuple[str, str], ...]  # all of them, in order
    response_body: bytes
    acknowledged: tuple[str, ...]  # event ids in the perf_report_response

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class EnphaseCloud:
    """The stand-in cloud, serving HTTPS on a thread; use as a context manager or start()/stop().

    `cert_dir` receives `enphase-cloud.crt`/`.key` (self-signed for reports.enphaseenergy.com,
    127.0.0.1 and localhost); without it a temporary directory is used and removed on stop().
    `on_exchange` is called (on the server thread) after each answered request.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, cert_dir: str | Path | None = None,
                 on_exchange: Callable[[Exchange], None] | None = None) -> None:
        self._own_dir = cert_dir is None
        self.cert_dir = Path(tempfile.mkdtemp(prefix="pvtap-enphase-cloud-") if cert_dir is None else cert_dir)
        cert, key = self_signed(HOSTNAME, [HOSTNAME, "127.0.0.1", "localhost"], organization="pvtap stand-in cloud")
        self.cafile, keyfile = write_pair(self.cert_dir, "enphase-cloud", cert, key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cafile, keyfile)
        self.on_exchange = on_exchange
        #: while set, every request is answered with this HTTP status (a cloud that is up but failing)
        self.failing: int | None = None
        self.exchanges: list[Exchange] = []
        self.connections = 0  # TCP connections accepted, so a test can prove none was made
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler, self, context)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"https://{host}:{port}"

    def start(self) -> EnphaseCloud:
        self._thread = threading.Thread(target=self._server.serve_forever, name="enphase-cloud", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        if self._own_dir:
            shutil.rmtree(self.cert_dir, ignore_errors=True)

    def __enter__(self) -> EnphaseCloud:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def received(self) -> list[Exchange]:
        """A snapshot of every exchange so far, oldest first."""
        with self._lock:
            return list(self.exchanges)

    def _record(self, exchange: Exchange) -> None:
        with self._lock:
            self.exchanges.append(exchange)

    def _answered(self, exchange: Exchange) -> None:
        if self.on_exchange is not None:
            self.on_exchange(exchange)

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1


def answer(method: str, path: str, content_type: str,
           body: bytes) -> tuple[int, list[tuple[str, str]], bytes, list[str]]:
    """What the stand-in answers: (status, headers, body, acknowledged event ids)."""
    if method != "POST":
        return 405, [("Allow", "POST"), ("Content-Type", "text/plain")], b"only POST\n", []
    kind = report_kind(path)
    if kind == "performance_report":
        try:
            ids = event_ids(body, content_type)
        except Exception as exc:  # the real server's answer to garbage is unknown; a 400 is plausible
            return 400, [("Content-Type", "text/plain")], f"unreadable report: {type(exc).__name__}\n".encode(), []
        return 200, [("Content-Type", RESPONSE_CONTENT_TYPE)], build_response(ids), ids
    if kind == "task_complete":
        return 200, [("Content-Type", "text/plain")], b"", []
    return 404, [("Content-Type", "text/plain")], b"not found\n", []


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, cloud: EnphaseCloud, context: ssl.SSLContext) -> None:
        self.cloud, self.context = cloud, context
        super().__init__(address, handler)

    def get_request(self):
        sock, peer = self.socket.accept()
        self.cloud._connected()
        # The handshake happens on the handler thread, so a slow client cannot stall accept().
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), peer

    def handle_error(self, request, client_address) -> None:
        log.debug("stand-in cloud: connection from %s failed", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Apache"
    server: _Server

    def do_POST(self) -> None:
        self._exchange()

    def do_GET(self) -> None:
        self._exchange()

    def do_PUT(self) -> None:
        self._exchange()

    def _exchange(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.partition("?")[0]
        failing = self.server.cloud.failing
        if failing is not None:
            ids: list[str] = []
            status, headers, payload = failing, [("Content-Type", "text/plain")], b"temporarily failing\n"
        else:
            status, headers, payload, ids = answer(self.command, path, self.headers.get("Content-Type", ""), body)
        headers = [("Server", self.server_version), ("Date", self.date_time_string()), *headers,
                   ("Content-Length", str(len(payload)))]
        exchange = Exchange(
            method=self.command, target=self.path, headers=tuple(self.headers.items()), body=body,
            status=status, response_headers=tuple(headers), response_body=payload, acknowledged=tuple(ids))
        self.server.cloud._record(exchange)  # before the answer: whoever got it finds the exchange in received()
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        self.server.cloud._answered(exchange)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("stand-in cloud: " + format, *args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pvtap.simulate.enphase_cloud",
        description="Serve a stand-in for reports.enphaseenergy.com over HTTPS (self-signed certificate) "
                    "until interrupted. Point mitmproxy's reverse mode at it; it is never the real cloud.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    parser.add_argument("--cert-dir", type=Path,
                        help="where to write enphase-cloud.crt/.key (default: a temporary directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EnphaseCloud(args.host, args.port, cert_dir=args.cert_dir) as cloud:
        print(f"stand-in Enphase cloud listening on {cloud.url} (certificate {cloud.cafile})", flush=True)
        stop.wait()
        print(f"stand-in Enphase cloud: {len(cloud.exchanges)} requests on {cloud.connections} connections", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
