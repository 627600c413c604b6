"""Helpers for the health and metrics tests: HTTP GETs, a process whose log is read as it comes,
a real Prometheus (Debian's `prometheus`) and a DNS stand-in that answers only when told.

    with Prometheus(tmp_path, ["127.0.0.1:9108"]) as prom:
        prom.wait_value('pvtap_bytes_total{protocol="alphaess",direction="up"}', 1234)
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import dns.message
import dns.rdatatype
import dns.rrset

from tests.conftest import free_port
from tests.servers import _Server
from tests.waiting import wait_until as wait_until  # re-exported: the name its tests import

HEALTH_LINE = re.compile(r"health: /healthz /readyz /metrics on http://(?P<address>[^/\s]+)/")


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class LoggedProcess:
    """A subprocess whose combined output is read line by line as it comes (`expect`)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(argv, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """The first line from here on matching `pattern`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None if time.monotonic() > deadline else ""
            if line is None:
                raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


class Prometheus(_Server):
    """Debian's Prometheus scraping `targets` (host:port) every second."""

    name = "prometheus"
    binary = "prometheus"
    _ready_path = "/-/ready"

    def __init__(self, tmp_path: str | Path, targets: list[str]) -> None:
        super().__init__(tmp_path)
        self.targets = targets

    def _command(self) -> list[str]:
        self.port = self.port or free_port()
        config = self.dir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [{"job_name": "pvtap", "static_configs": [{"targets": self.targets}]}],
        }))
        return ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def _discover_port(self, log_offset: int) -> int:
        return self.port

    def query(self, promql: str) -> list[dict]:
        status, body = self.http("GET", "/api/v1/query", {"query": promql})
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            raise AssertionError(f"prometheus query {promql!r} failed ({status}): {body[:300]!r}")
        return doc["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def wait_value(self, promql: str, expected: float, timeout: float = 30.0) -> None:
        """Until the query returns exactly one series whose value is `expected`."""
        try:
            wait_until(lambda: self.value(promql) == expected, timeout, what=f"{promql} == {expected}")
        except AssertionError:
            raise AssertionError(f"{promql}: {self.query(promql)} after {timeout} s, expected {expected}") from None

    def targets_up(self) -> dict[str, str]:
        _, body = self.http("GET", "/api/v1/targets")
        return {t["scrapeUrl"]: t["health"] for t in json.loads(body)["data"]["activeTargets"]}


class HeldDNS(asyncio.DatagramProtocol):
    """A DNS server on 127.0.0.1 that keeps every A query unanswered until `release()`, then
    answers it (and later ones) with `names`."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.asked = asyncio.Event()
        self.held: list[tuple[bytes, tuple]] = []
        self.released = False
        self.transport: asyncio.DatagramTransport | None = None

    async def __aenter__(self) -> HeldDNS:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.transport is not None
        self.transport.close()

    @property
    def address(self) -> str:
        assert self.transport is not None
        return f"127.0.0.1:{self.transport.get_extra_info('sockname')[1]}"

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.asked.set()
        if self.released:
            self._answer(data, addr)
        else:
            self.held.append((data, addr))

    def release(self) -> None:
        self.released = True
        for data, addr in self.held:
            self._answer(data, addr)
        self.held.clear()

    def _answer(self, data: bytes, addr: tuple) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        response = dns.message.make_response(query)
        name = question.name.to_text().rstrip(".")
        if question.rdtype == dns.rdatatype.A and name in self.names:
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", self.names[name]))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


def url_of(address: str, path: str) -> str:
    return f"http://{address}{path}"


