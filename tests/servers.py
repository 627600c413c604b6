"""Real database servers for tests: Debian's `influxd` 1.6 and `victoria-metrics`.

Each runs as a real process in its own temporary directory, on an ephemeral port of 127.0.0.1
(several test runs share this machine), and is used as a context manager:

    with Influxd(tmp_path) as db:                 # database "pvtap" created
        db.write("m,t=a f=1 1700000000000000000")  # v1 /write, ns precision
        db.points("m")                              # [{"time": ns, "f": 1.0, "t": "a"}]
    with VictoriaMetrics(tmp_path) as vm:          # speaks InfluxDB's /api/v2/write
        vm.url                                      # give this to influxdb-client
        vm.export()                                 # [{"metric": {...}, "values": [...], "timestamps": [...]}]

`stop()` / `start()` restart a server on the same port with the same data (so a client keeps its
URL across an outage); `kill()` is SIGKILL. Influxd 1.6 has no `/api/v2/write` (that came with
1.8), so it is the reference for exact line protocol through v1 `/write`; VictoriaMetrics is the
`/api/v2/write` endpoint, keeps numeric fields only (`<measurement>_<field>` series, booleans as
1/0, strings as 0, timestamps in ms) and is run with deduplication so that the same point written
twice is one point, as in InfluxDB.

`ScriptedInflux` is a local HTTP server answering `/api/v2/write` with scripted statuses (429 with
Retry-After, 413, 422, 401, 500, a hang) for the error cases no real server produces on demand.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START_TIMEOUT = 30.0


class ServerError(RuntimeError):
    pass


class ServerProcess:
    """The lifecycle every real server the tests start shares: running, stop (SIGTERM, then SIGKILL
    if it lingers), kill (as a crash would), and `with` (start, then stop). A subclass sets `proc`
    and defines start()."""

    proc: subprocess.Popen | None = None

    def start(self) -> Any:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers. Data stays for the next start()."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ServerProcess):
    """A real server process on 127.0.0.1 with a data directory that survives stop/start."""

    name = "server"
    binary = ""

    def __init__(self, tmp_path: str | Path) -> None:
        if shutil.which(self.binary) is None:
            raise ServerError(f"{self.binary} is not installed (Debian package: see Makefile DEBIAN_PACKAGES)")
        self.dir = Path(tmp_path) / f"{self.name}-{os.getpid()}-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log = self.dir / "server.log"

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if not self.port:
            raise ServerError(f"{self.name} has not been started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> _Server:
        """Start (or restart on the port it had) and wait until it answers."""
        if self.running:
            return self
        offset = self._log.stat().st_size if self._log.exists() else 0
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.dir)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text(offset)[-3000:]}")
            if not self.port:
                self.port = self._discover_port(offset)
            if self.port and self._ready():
                return self
            time.sleep(0.05)
        self.kill()
        raise ServerError(f"{self.name} not ready within {START_TIMEOUT:.0f} s:\n{self.log_text(offset)[-3000:]}")

    def log_text(self, offset: int = 0) -> str:
        with open(self._log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")

    # -- HTTP ----------------------------------------------------------------------------------

    def http(self, method: str, path: str, params: dict[str, str] | None = None, body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _ready(self) -> bool:
        try:
            status, _ = self.http("GET", self._ready_path, timeout=1.0)
        except OSError:
            return False
        return status in (200, 204)

    # -- per server ----------------------------------------------------------------------------

    _ready_path = "/"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _discover_port(self, log_offset: int) -> int:
        raise NotImplementedError


class Influxd(_Server):
    """Debian's InfluxDB 1.6 (`influxd`): v1 `/write` and InfluxQL `/query`, no auth."""

    name = "influxd"
    binary = "influxd"
    _ready_path = "/ping"

    def __init__(self, tmp_path: str | Path, database: str = "pvtap") -> None:
        super().__init__(tmp_path)
        self.database = database

    def start(self) -> Influxd:
        super().start()
        self.query(f'CREATE DATABASE "{self.database}"', method="POST")
        return self

    def _command(self) -> list[str]:
        conf = self.dir / "influxd.conf"
        d = self.dir
        conf.write_text(f"""\
reporting-disabled = true
bind-address = "127.0.0.1:0"
[meta]
  dir = "{d / 'meta'}"
[data]
  dir = "{d / 'data'}"
  wal-dir = "{d / 'wal'}"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
""")
        return ["influxd", "run", "-config", str(conf)]

    def _discover_port(self, log_offset: int) -> int:
        found = re.search(r'msg="Listening on HTTP".*? addr=127\.0\.0\.1:(\d+)', self.log_text(log_offset))
        return int(found.group(1)) if found else 0

    # -- client side -----------------------------------------------------------------------

    def write(self, lines: str | bytes, db: str | None = None, precision: str = "ns") -> tuple[int, str]:
        """POST line protocol to v1 /write; returns (status, body)."""
        body = lines.encode() if isinstance(lines, str) else lines
        status, out = self.http("POST", "/write", {"db": db or self.database, "precision": precision}, body)
        return status, out.decode("utf-8", "replace")

    def query(self, q: str, db: str | None = None, method: str = "GET") -> list[dict[str, Any]]:
        """Run InfluxQL; returns the `results` list (times as ns integers). Raises on an error."""
        params = {"q": q, "epoch": "ns", "db": db or self.database}
        if method == "GET":
            status, out = self.http("GET", "/query", params)
        else:
            status, out = self.http("POST", "/query", body=urllib.parse.urlencode(params).encode(),
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})
        doc = json.loads(out or b"{}")
        if status != 200 or "error" in doc or any("error" in r for r in doc.get("results", [])):
            raise ServerError(f"influxd query {q!r} failed ({status}): {out[:500]!r}")
        return doc["results"]

    def points(self, measurement: str, db: str | None = None) -> list[dict[str, Any]]:
        """Every point of a measurement as {column: value} (tags and fields, `time` in ns)."""
        name = measurement.replace("\\", "\\\\").replace('"', '\\"')
        out: list[dict[str, Any]] = []
        for result in self.query(f'SELECT * FROM "{name}"', db):
            for series in result.get("series", []):
                out.extend(dict(zip(series["columns"], row)) for row in series["values"])
        return out

    def series_keys(self, db: str | None = None) -> list[str]:
        """The series keys (measurement and escaped tags, as InfluxDB parsed them)."""
        keys: list[str] = []
        for result in self.query("SHOW SERIES", db):
            for series in result.get("series", []):
                keys.extend(row[0] for row in series["values"])
        return sorted(keys)

    def field_types(self, measurement: str, db: str | None = None) -> dict[str, str]:
        name = measurement.replace("\\", "\\\\").replace('"', '\\"')
        types = {}
        for result in self.query(f'SHOW FIELD KEYS FROM "{name}"', db):
            for series in result.get("series", []):
                types.update({row[0]: row[1] for row in series["values"]})
        return types

    def measurements(self, db: str | None = None) -> list[str]:
        names: list[str] = []
        for result in self.query("SHOW MEASUREMENTS", db):
            for series in result.get("series", []):
                names.extend(row[0] for row in series["values"])
        return sorted(names)


class VictoriaMetrics(_Server):
    """Debian's `victoria-metrics`: accepts InfluxDB `/api/v2/write` (any token, org, bucket),
    exports through `/api/v1/export`. Deduplicates points with the same series and timestamp."""

    name = "victoria-metrics"
    binary = "victoria-metrics"
    _ready_path = "/health"

    def _command(self) -> list[str]:
        return ["victoria-metrics", f"-storageDataPath={self.dir / 'data'}",
                f"-httpListenAddr=127.0.0.1:{self.port}", "-retentionPeriod=100y",
                "-dedup.minScrapeInterval=1ms", "-loggerLevel=WARN"]

    def _discover_port(self, log_offset: int) -> int:
        """VictoriaMetrics does not log the port it got for :0; find its listening socket."""
        assert self.proc is not None
        inodes = set()
        try:
            for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
                target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            return 0
        with open("/proc/net/tcp") as fh:
            for line in fh.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:
                    return int(parts[1].split(":")[1], 16)
        return 0

    def flush(self) -> None:
        """Make everything received so far visible to export."""
        self.http("GET", "/internal/force_flush")

    def export(self, match: str = '{__name__!=""}') -> list[dict[str, Any]]:
        """Every series matching `match`: {"metric": {"__name__": "<measurement>_<field>",
        <tags>}, "values": [...], "timestamps": [ms, ...]}."""
        self.flush()
        status, out = self.http("GET", "/api/v1/export", {"match[]": match}, timeout=30.0)
        if status != 200:
            raise ServerError(f"victoria-metrics export failed ({status}): {out[:500]!r}")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def samples(self, match: str = '{__name__!=""}') -> dict[tuple[str, tuple[tuple[str, str], ...], int], float]:
        """{(series name, sorted tags, timestamp ms): value} for every exported sample."""
        out = {}
        for series in self.export(match):
            labels = dict(series["metric"])
            name = labels.pop("__name__")
            key = tuple(sorted(labels.items()))
            for ts, value in zip(series["timestamps"], series["values"]):
                out[(name, key, ts)] = value
        return out

    def count(self, match: str = '{__name__!=""}') -> int:
        return sum(len(series["timestamps"]) for series in self.export(match))


# -- a scripted stand-in for error cases ---------------------------------------------------------

@dataclass
class Reply:
    """What the scripted server answers: status, body, headers, and a delay before answering."""

    status: int = 204
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class WriteRequest:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    lines: list[str]
    received: float  # time.monotonic()
    status: int = 0  # what it was answered


class ScriptedInflux:
    """A real local HTTP server (stdlib, in a thread) that answers `/api/v2/write` as a test says.

    `respond(request, n)` gets the parsed request and how many came before it and returns a
    Reply (default: 204 for everything). `requests` records every request with its answer;
    `accepted` is every line of every 2xx-answered request, in order. With `tls=(cert, key)`
    it speaks HTTPS.
    """

    def __init__(self, respond: Callable[[WriteRequest, int], Reply] | None = None,
                 tls: tuple[Path, Path] | None = None, port: int = 0) -> None:
        self.respond = respond or (lambda request, n: Reply())
        self.port = port
        self.requests: list[WriteRequest] = []
        self._lock = threading.Lock()
        self._tls = tls
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self._server.server_address[1]}"

    @property
    def accepted(self) -> list[str]:
        with self._lock:
            return [line for r in self.requests if 200 <= r.status < 300 for line in r.lines]

    def start(self) -> ScriptedInflux:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = WriteRequest(parsed.path, dict(urllib.parse.parse_qsl(parsed.query)),
                                       {k.lower(): v for k, v in self.headers.items()},
                                       body.decode().split("\n") if body else [], time.monotonic())
                with outer._lock:
                    n = len(outer.requests)
                    outer.requests.append(request)
                if parsed.path == "/api/v2/write":
                    reply = outer.respond(request, n)
                else:
                    reply = Reply(404, b'{"message":"not found"}')
                if reply.delay:
                    time.sleep(reply.delay)
                request.status = reply.status
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    if reply.body:
                        self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:  # the client gave up (timeout) before the answer
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        if self._tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self._tls[0]), str(self._tls[1]))
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="scripted-influx")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ScriptedInflux:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
