"""Shared helpers for the Enphase tests: the reference vectors, payload builders, exact record
comparison, and a recording HTTPS server (a real local server, never a vendor host)."""

from __future__ import annotations

import ssl
import threading
import urllib.parse
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pvtap.certs import self_signed, write_pair
from pvtap.records import DOWN, UP, Origin, RawPayload, Record

DEFLATE = "application/x-deflate"
RECEIVED = datetime(2024, 6, 21, 12, 0, 1, tzinfo=UTC)
REPORT_HOST = "reports.enphaseenergy.com"  # used as Host/SNI only; tests connect to 127.0.0.1

#: shared/reference/enphase.md §5 vector 1 (the 2012 post's anonymised values), verbatim.
VECTOR_1 = b"""<?xml version='1.0' encoding='utf-8'?>
<perf_report report_timestamp='1329134202'>
<envoy ip_addr='192.168.1.166' mac_addr='00:11:22:33:44:55' timezone='US/Eastern' part_num='800-00024-r04' sw_version='R3.0.0 (9720d7)' serial_num='123456115374' />
<event correlation_id='161' event_state='1' id='221' event_code='10009' eqid='123456102635' serial_num='123456102635' event_date='1329134118' />
<event event_state='0' id='227' event_code='509' eqid='123456104335' serial_num='123456104335' event_date='1329134152' />
<device image_bits='131072' device_type='1' admin_state='1' condition_flags='2097152' part_num='800-00103-r05' observed_flags='0' eqid='123456105321' control_bits='0'>
<channel channel_type='1' condition_flags='0' observed_flags='0' eqid='123456105321.1' control_bits='0' />
</device>
</perf_report>
"""  # noqa: E501 (the vector verbatim, one element a line)
VECTOR_1_SERIALS = ("123456115374", "123456102635", "123456104335", "123456105321")

#: The matching response (vector 1): events 221 to 228 in events_processed.
VECTOR_1_RESPONSE = (b'<?xml version="1.0" encoding="UTF-8"?>\n<perf_report_response status="success">\n'
                     b"  <events_processed>\n"
                     + b"".join(b'    <event id="%d"/>\n' % i for i in range(221, 229))
                     + b"  </events_processed>\n</perf_report_response>\n")

#: §2.5 and §2.6 synthetic examples (vector 2), in a report of the 2015 style.
VECTOR_2 = (b'<?xml version="1.0" encoding="UTF-8"?><perf_report report_timestamp="1700000107">'
            b'<interval interval_duration="300" stat_duration="295" end_date="1700000100" stats="60000" '
            b'id="1000001" eqid="999900000001.1"/>'
            b'<reading duration="300" stats="240000,50000,32000,6500,40,0,0,60000" date="1700000100" '
            b'id="2000001" flags="0" eqid="999900000001.1"/></perf_report>')


def wire_body(xml: bytes) -> bytes:
    """Vector 4: zlib(`body=` + quote(xml)), as the Envoy sends it."""
    return zlib.compress(b"body=" + urllib.parse.quote(xml).encode())


def request_raw(payload: bytes, content_type: str | None = DEFLATE, *, kind: str = "performance_report",
                query: str = "webcomm_version=3.0", connection: str = "flow-1") -> RawPayload:
    """A request payload as the addon builds it."""
    meta: dict[str, str | None] = {"method": "POST", "host": REPORT_HOST, "path": f"/emu_reports/{kind}",
                                   "query": query, "content_type": content_type}
    return RawPayload(Origin("enphase", "", connection, UP), kind, payload, RECEIVED, meta)


def response_raw(payload: bytes, content_type: str = "application/x-deflate; charset=utf-8", *,
                 status_code: int = 200, kind: str = "performance_report") -> RawPayload:
    meta: dict[str, str | int] = {"method": "POST", "host": REPORT_HOST, "path": f"/emu_reports/{kind}",
                                  "query": "webcomm_version=3.0", "content_type": content_type,
                                  "status_code": status_code}
    return RawPayload(Origin("enphase", "", "flow-1", DOWN), f"{kind}_response", payload, RECEIVED, meta)


def assert_records(actual: list[Record], expected: list[Record]) -> None:
    """Exact equality, field types included (1 == 1.0 in Python, not in InfluxDB)."""
    assert [_typed(r) for r in actual] == [_typed(r) for r in expected]


def _typed(record: Record) -> tuple:
    return (record.measurement, record.time, dict(record.tags),
            {k: (type(v).__name__, v) for k, v in record.fields.items()}, record.origin)


# -- a recording HTTPS server -----------------------------------------------------------------

@dataclass
class Received:
    requestline: str
    headers: list[tuple[str, str]]
    body: bytes
    server_name: str | None


@dataclass
class Answer:
    status: int = 200
    headers: list[tuple[str, str]] = field(
        default_factory=lambda: [("Content-Type", "application/x-deflate; charset=utf-8")])
    body: bytes = b""


class RecordingServer:
    """HTTPS on 127.0.0.1 (ephemeral port) that records each request exactly (request line,
    headers in order, body, TLS server name) and sends `answer`; a context manager."""

    def __init__(self, tmp_path: Path, answer: Answer | None = None, *, cert_name: str = REPORT_HOST) -> None:
        cert, key = self_signed(cert_name, [cert_name])
        self.cafile, keyfile = write_pair(tmp_path, f"server-{cert_name}", cert, key)
        self.answer = answer or Answer()
        self.received: list[Received] = []
        #: requests after this many wait for `release` before they are answered (None: none waits)
        self.hold_after: int | None = None
        self.release = threading.Event()
        self.arrived = threading.Condition()  # notified with each request received
        self._names: dict[int, str | None] = {}
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cafile, keyfile)
        context.sni_callback = self._sni
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server.arrived:
                    server.received.append(Received(self.requestline, list(self.headers.items()), body,
                                                    server._names.get(id(self.connection))))
                    server.arrived.notify_all()
                if server.hold_after is not None and len(server.received) > server.hold_after:
                    server.release.wait(30)
                self.send_response(server.answer.status)
                for name, value in server.answer.headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(server.answer.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(server.answer.body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                sock, peer = self.socket.accept()
                return context.wrap_socket(sock, server_side=True), peer

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        self._names[id(sslobj)] = name

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        """Until `count` requests have arrived."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.received) >= count, timeout), self.received

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
