"""An Envoy-R (R3.x) simulator: posts `perf_report`s as the gateway does, for demos, tests and benches.

    pvtap simulate enphase --url https://reports.enphaseenergy.com --connect 127.0.0.1:8443

The wire form follows shared/reference/enphase.md §1: `POST /emu_reports/performance_report
?webcomm_version=3.0`, body = zlib(`body=<url-encoded XML>`), headers `Accept: */*`,
`Connection: close`, `Content-Type: application/x-deflate`, `Content-Length` and a Host with an
explicit `:443`, no User-Agent, and no certificate check (the Envoy does none). Reports carry
the envoy, events (set/clear pairs and one-shots with monotonic ids), device state, and one
5-minute interval and reading per microinverter per period, aligned to :00/:05, following a
daylight curve (sunrise 06:00, sunset 18:00 UTC; the placeholder site is at 0°N 0°E). Serials are
clearly fake placeholders (`9999000000xx`). A catch-up report carries up to 500 intervals and
500 readings, oldest first, as the Envoy drains a backlog.
"""

from __future__ import annotations

import argparse
import http.client
import math
import random
import socket
import ssl
import sys
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from xml.sax.saxutils import quoteattr

from pvtap.decode.enphase import ReportError, parse_xml, report_xml

PERIOD = 300  # seconds per interval (standard reporting)
MAX_RECORDS = 500  # intervals (and readings) per report at most, as seen in catch-up reports
REPORT_PATH = "/emu_reports/performance_report"
WEBCOMM_VERSION = "3.0"
PLACEHOLDER_ENVOY = "999900000000"
FIRST_MICRO = 999900000001
VENDOR_DOMAIN = "enphaseenergy.com"  # never posted to directly: simulated data must not reach the cloud
REPORT_DELAY = 7  # seconds between the end of the last period and the report's timestamp

ENVOY_ATTRIBUTES = {  # placeholders: a documentation IP (RFC 5737) and MAC (RFC 7042), 0°N 0°E
    "part_num": "800-00069-r05",
    "sw_version": "R3.12.34 (2e8bfe)",
    "ip_addr": "192.0.2.10",
    "mac_addr": "00:00:5e:00:53:01",
    "timezone": "Etc/UTC",
    "latitude": "0.0",
    "longitude": "0.0",
}
MICRO_PART_NUM = "800-00103-r05"
SLEEPING_FLAGS = 2097152  # the device condition_flags the 2012 sample shows next to a sleeping event


def micro_serial(index: int) -> str:
    return str(FIRST_MICRO + index)


@dataclass(frozen=True)
class SimInterval:
    id: int
    eqid: str
    end_date: int
    interval_duration: int
    stat_duration: int
    joules: int


@dataclass(frozen=True)
class SimReading:
    id: int
    eqid: str
    date: int
    duration: int
    ac_mv: int
    ac_mhz: int
    dc_mv: int
    dc_ma: int
    temperature_c: int
    joules: int
    flags: int = 0

    @property
    def stats(self) -> str:
        return f"{self.ac_mv},{self.ac_mhz},{self.dc_mv},{self.dc_ma},{self.temperature_c},0,0,{self.joules}"


@dataclass(frozen=True)
class SimEvent:
    id: int
    code: int
    state: int  # 0 one-shot, 1 set, 2 clear
    eqid: str
    date: int
    correlation_id: int | None = None


@dataclass(frozen=True)
class SimDevice:
    eqid: str
    condition_flags: int
    part_num: str = MICRO_PART_NUM
    device_type: int = 1
    admin_state: int = 1
    image_bits: int = 131072


@dataclass(frozen=True)
class SimReport:
    """One generated report and the values it carries (what a decoder must give back)."""

    report_timestamp: int
    envoy_serial: str
    intervals: tuple[SimInterval, ...]
    readings: tuple[SimReading, ...]
    events: tuple[SimEvent, ...]
    devices: tuple[SimDevice, ...]
    xml: bytes = field(repr=False)


class Simulator:
    """Successive reports of one Envoy with `micros` microinverters, starting at `start` (Unix
    seconds, aligned down to 5 minutes). Each `next_report()` covers the next 5-minute period;
    `next_report(intervals=N)` makes a catch-up report of N intervals and N readings. Values are
    deterministic for a given seed."""

    def __init__(self, *, micros: int = 4, start: int | None = None, seed: int = 1,
                 envoy_serial: str = PLACEHOLDER_ENVOY, events_rate: float = 0.02) -> None:
        if micros < 1:
            raise ValueError("a simulated Envoy needs at least one microinverter")
        self.envoy_serial = envoy_serial
        self.micros = [micro_serial(i) for i in range(micros)]
        self.clock = (int(time.time()) if start is None else int(start)) // PERIOD * PERIOD
        self.events_rate = events_rate
        self._rng = random.Random(seed)
        self._peaks = [self._rng.uniform(220.0, 260.0) for _ in self.micros]  # W per micro in full sun
        self._sleeping = [self._power(i, self.clock) == 0 for i in range(micros)]
        self._next_interval_id = 1000001
        self._next_reading_id = 2000001
        self._next_event_id = 1
        self._backlog: list[tuple[SimInterval, SimReading]] = []
        self._events: list[SimEvent] = []
        self._changed: set[int] = set(range(micros))  # devices to report: all in the first report
        self._sleep_event: dict[int, int] = {}  # micro index → id of its open sleeping (set) event
        self._events.extend(self._event(509, 0, eqid, self.clock) for eqid in self.micros)  # power on reset

    def next_report(self, intervals: int | None = None) -> SimReport:
        """The next report: `intervals` intervals and as many readings (default: one period for
        every micro), oldest first, plus the events and device changes of the periods covered."""
        count = len(self.micros) if intervals is None else intervals
        if count < 1:
            raise ValueError("a report needs at least one interval")
        while len(self._backlog) < count:
            self._advance()
        taken, self._backlog = self._backlog[:count], self._backlog[count:]
        events, self._events = tuple(self._events), []
        devices = tuple(SimDevice(self.micros[i], SLEEPING_FLAGS if self._sleeping[i] else 0)
                        for i in sorted(self._changed))
        self._changed = set()
        report = SimReport(
            report_timestamp=self.clock + REPORT_DELAY, envoy_serial=self.envoy_serial,
            intervals=tuple(i for i, _ in taken), readings=tuple(r for _, r in taken),
            events=events, devices=devices, xml=b"")
        return replace(report, xml=render(report))

    def next_due(self, intervals: int | None = None) -> int:
        """The report_timestamp of `next_report(intervals)`: a real Envoy cannot post a report
        before then, so neither does `pvtap simulate enphase`."""
        count = len(self.micros) if intervals is None else intervals
        periods = max(0, -(-(count - len(self._backlog)) // len(self.micros)))
        return self.clock + periods * PERIOD + REPORT_DELAY

    # -- one period ------------------------------------------------------------------------

    def _advance(self) -> None:
        end = self.clock + PERIOD
        clouds = self._rng.uniform(0.6, 1.0)
        for index, eqid in enumerate(self.micros):
            power = self._power(index, end) * clouds
            self._state_events(index, eqid, end, power)
            joules = round(power * PERIOD)
            interval = SimInterval(self._next_interval_id, f"{eqid}.1", end, PERIOD,
                                   PERIOD - self._rng.randint(2, 7), joules)
            self._backlog.append((interval, self._reading(eqid, end, power, joules)))
            self._next_interval_id += 1
        self.clock = end

    def _power(self, index: int, moment: int) -> float:
        """AC power of one micro at a moment on a clear day: a sine from 06:00 to 18:00 UTC."""
        hour = (moment % 86400) / 3600
        daylight = math.sin(math.pi * (hour - 6) / 12) if 6 < hour < 18 else 0.0
        return self._peaks[index] * daylight

    def _reading(self, eqid: str, end: int, power: float, joules: int) -> SimReading:
        rng = self._rng
        temperature = round(15 + power / 8 + rng.uniform(-1, 1))
        if power > 0:
            dc_mv = round(36000 - 80 * (temperature - 25) + rng.uniform(-400, 400))
            dc_ma = round(power / 0.96 / dc_mv * 1_000_000)
        else:
            dc_mv = dc_ma = 0
        reading = SimReading(
            id=self._next_reading_id, eqid=f"{eqid}.1", date=end, duration=PERIOD,
            ac_mv=round(rng.gauss(240000, 1200)), ac_mhz=round(rng.gauss(50000, 15)),
            dc_mv=dc_mv, dc_ma=dc_ma, temperature_c=temperature, joules=joules)
        self._next_reading_id += 1
        return reading

    def _state_events(self, index: int, eqid: str, end: int, power: float) -> None:
        """Sleeping (10009) set at dusk and cleared at dawn; now and then a short DC-power-too-low
        (512) set/clear pair whose correlation ids point at each other, as in the 2015 capture."""
        sleeping = power == 0
        if sleeping != self._sleeping[index]:
            if sleeping:
                self._sleep_event[index] = self._next_event_id
                self._events.append(self._event(10009, 1, eqid, end - 60))
            else:
                self._events.append(self._event(10009, 2, eqid, end - 240, self._sleep_event.pop(index, None)))
            self._sleeping[index] = sleeping
            self._changed.add(index)
        elif not sleeping and self._rng.random() < self.events_rate:
            set_id, clear_id = self._next_event_id, self._next_event_id + 1
            self._events.append(self._event(512, 1, eqid, end - 200, clear_id))
            self._events.append(self._event(512, 2, eqid, end - 170, set_id))
            self._changed.add(index)

    def _event(self, code: int, state: int, eqid: str, date: int, correlation_id: int | None = None) -> SimEvent:
        event = SimEvent(self._next_event_id, code, state, eqid, date, correlation_id)
        self._next_event_id += 1
        return event


def render(report: SimReport) -> bytes:
    """The report's XML in the 2015 (R3.12) style: double quotes, UTF-8 declaration, no
    whitespace; envoy, intervals, readings, events, devices."""
    parts = ['<?xml version="1.0" encoding="UTF-8"?>', f'<perf_report report_timestamp="{report.report_timestamp}">']
    envoy = " ".join(f"{k}={quoteattr(v)}" for k, v in
                     {"serial_num": report.envoy_serial, **ENVOY_ATTRIBUTES}.items())
    parts.append(f"<envoy {envoy}/>")
    parts.extend(
        f'<interval interval_duration="{i.interval_duration}" stat_duration="{i.stat_duration}" '
        f'end_date="{i.end_date}" stats="{i.joules}" id="{i.id}" eqid="{i.eqid}"/>' for i in report.intervals)
    parts.extend(
        f'<reading duration="{r.duration}" stats="{r.stats}" date="{r.date}" id="{r.id}" flags="{r.flags}" '
        f'eqid="{r.eqid}"/>' for r in report.readings)
    for e in report.events:
        correlation = f' correlation_id="{e.correlation_id}"' if e.correlation_id is not None else ""
        parts.append(f'<event{correlation} event_state="{e.state}" id="{e.id}" event_code="{e.code}" '
                     f'eqid="{e.eqid}" serial_num="{e.eqid}" event_date="{e.date}"/>')
    for d in report.devices:
        parts.append(
            f'<device image_bits="{d.image_bits}" device_type="{d.device_type}" admin_state="{d.admin_state}" '
            f'condition_flags="{d.condition_flags}" part_num="{d.part_num}" observed_flags="0" eqid="{d.eqid}" '
            f'control_bits="0"><channel channel_type="1" condition_flags="0" observed_flags="0" '
            f'eqid="{d.eqid}.1" control_bits="0"/></device>')
    parts.append("</perf_report>")
    return "".join(parts).encode("utf-8")


def build_report_xml(*, micros: int = 4, intervals: int | None = None, start: int | None = None, seed: int = 1,
                     envoy_serial: str = PLACEHOLDER_ENVOY) -> bytes:
    """The XML of a first report from a fresh simulated Envoy (see Simulator)."""
    return Simulator(micros=micros, start=start, seed=seed, envoy_serial=envoy_serial).next_report(intervals).xml


def encode_body(xml: bytes) -> bytes:
    """The request body as the Envoy sends it: zlib(`body=` + URL-encoded XML)."""
    return zlib.compress(b"body=" + urllib.parse.quote(xml).encode("ascii"))


# -- posting ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimResponse:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes  # exactly as received (no content decoding)


def post_report(url: str, body: bytes, *, connect: tuple[str, int] | None = None,
                proxy: tuple[str, int] | None = None, cafile: str | None = None, timeout: float = 30) -> SimResponse:
    """POST a report body to `url` with the Envoy's exact headers and return the answer.

    `connect` dials that address instead of the URL's host while keeping the URL's Host header
    and TLS server name (like curl --connect-to); `proxy` tunnels through an HTTP CONNECT proxy.
    The server certificate is not checked unless `cafile` is given, as the Envoy checks none."""
    if connect and proxy:
        raise ValueError("give connect or proxy, not both")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"url {url!r}: expected https://host[:port]/path")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    tls = _tls_context(cafile) if parts.scheme == "https" else None

    conn: http.client.HTTPConnection
    if proxy:
        conn = _connection(tls, proxy[0], proxy[1], timeout)
        conn.set_tunnel(host, port)
    else:
        conn = _connection(tls, host, port, timeout)
        if connect:
            sock = socket.create_connection(connect, timeout=timeout)
            conn.sock = tls.wrap_socket(sock, server_hostname=host) if tls else sock
    try:
        conn.putrequest("POST", target, skip_host=True, skip_accept_encoding=True)
        for name, value in (("Accept", "*/*"), ("Connection", "close"), ("Content-Type", "application/x-deflate"),
                            ("Content-Length", str(len(body))), ("Host", host_header)):
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return SimResponse(response.status, response.reason, tuple(response.getheaders()), data)
    finally:
        conn.close()


def _connection(tls: ssl.SSLContext | None, host: str, port: int, timeout: float) -> http.client.HTTPConnection:
    if tls is None:
        return http.client.HTTPConnection(host, port, timeout=timeout)
    return http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)


def _tls_context(cafile: str | None) -> ssl.SSLContext:
    if cafile:
        return ssl.create_default_context(cafile=cafile)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- command line -----------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "enphase", help="an Envoy-R posting perf_reports (zlib form, XML) over HTTPS",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Post performance reports as an Envoy-R (R3.x) does: zlib-compressed form with the XML in "
                    "'body', Content-Type application/x-deflate, Host with an explicit :443, no User-Agent, "
                    "no certificate check. Reports hold one 5-minute interval and reading per microinverter "
                    "(daylight curve, 06:00-18:00 UTC), events and device state, with placeholder serials "
                    "(9999000000xx). Simulated time advances 5 minutes per report.",
        epilog="examples:\n"
               "  # through pvtap's mitmproxy on this machine, keeping the real Host header and SNI\n"
               "  pvtap simulate enphase --url https://reports.enphaseenergy.com --connect 127.0.0.1:8443\n"
               "  # one 500-interval catch-up report to a test server\n"
               "  pvtap simulate enphase --url https://127.0.0.1:8444 --micros 20 --intervals 500\n"
               "  # a live-looking Envoy: a report every 5 minutes until interrupted\n"
               "  pvtap simulate enphase --url https://reports.enphaseenergy.com --connect 127.0.0.1:8443 "
               "--reports 0\n\n"
               f"A URL without a path gets {REPORT_PATH}?webcomm_version=<version>.")
    parser.add_argument("--url", required=True,
                        help="where to post, e.g. https://reports.enphaseenergy.com (the Host header and TLS "
                             "server name come from it)")
    parser.add_argument("--connect", type=_address, metavar="HOST:PORT",
                        help="dial this address instead of the URL's host, like curl --connect-to")
    parser.add_argument("--proxy", type=_address, metavar="HOST:PORT", help="HTTP CONNECT proxy to tunnel through")
    parser.add_argument("--cafile", help="check the server certificate against this CA file (default: no check, "
                                         "as the Envoy)")
    parser.add_argument("--micros", type=_at_least(1), default=4, metavar="N",
                        help="microinverters behind the Envoy (default 4)")
    parser.add_argument("--intervals", type=_records, metavar="N",
                        help=f"intervals (and readings) per report, 1-{MAX_RECORDS}; more than --micros makes a "
                             "catch-up report spanning several periods (default: one period, = --micros)")
    parser.add_argument("--reports", type=_at_least(0), default=1, metavar="N",
                        help="reports to send; 0 = until interrupted (default 1)")
    parser.add_argument("--every", type=float, metavar="SECONDS",
                        help="pause between reports (default: 300 with --reports 0, else 0)")
    parser.add_argument("--start", type=_moment, metavar="TIME",
                        help="simulated time of the first period, ISO 8601 (2024-06-21T09:00Z) or Unix seconds "
                             "(default: so that the last report ends now). Reports are never posted before their "
                             "time: once simulated time reaches the clock, one follows every 5 minutes")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the values (default 1)")
    parser.add_argument("--webcomm-version", default=WEBCOMM_VERSION,
                        help=f"webcomm_version in the query of a URL without a path (default {WEBCOMM_VERSION})")
    parser.add_argument("--timeout", type=float, default=30, metavar="SECONDS", help="per-request timeout (default 30)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: object = None) -> int:
    if args.connect and args.proxy:
        print("pvtap simulate enphase: give --connect or --proxy, not both", file=sys.stderr)
        return 2
    url = report_url(args.url, args.webcomm_version)
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if (host == VENDOR_DOMAIN or host.endswith("." + VENDOR_DOMAIN)) and not (args.connect or args.proxy):
        print(f"pvtap simulate enphase: --url {args.url} would post simulated reports to the real Enphase cloud. "
              "Fix: add --connect HOST:PORT (pvtap or a test server) to keep that Host header but dial elsewhere, "
              "or --proxy HOST:PORT.", file=sys.stderr)
        return 2
    per_report = args.intervals or args.micros
    periods = -(-per_report // args.micros)
    start = args.start
    if start is None:  # the last report ends now; running until interrupted starts with the current period
        now = int(time.time()) // PERIOD * PERIOD
        start = now - periods * PERIOD * max(args.reports, 1)
    every = args.every if args.every is not None else (PERIOD if args.reports == 0 else 0)
    simulator = Simulator(micros=args.micros, start=start, seed=args.seed)
    total = f"/{args.reports}" if args.reports else ""
    posted = answered = acknowledged = 0
    in_flight = caught_up = False
    print(f"posting to {url}" + (f" via {args.connect[0]}:{args.connect[1]}" if args.connect else "")
          + (f" through proxy {args.proxy[0]}:{args.proxy[1]}" if args.proxy else "")
          + f": {args.micros} micros, {per_report} intervals per report", flush=True)
    try:
        while args.reports == 0 or posted < args.reports:
            if posted and every:
                time.sleep(every)
            ahead = simulator.next_due(args.intervals) - time.time()
            if ahead > 0:  # simulated time never runs ahead of the wall clock (tail would hide newer records)
                if not caught_up:
                    due = datetime.fromtimestamp(simulator.next_due(args.intervals), UTC)
                    print(f"caught up with the clock: the next report is due at {due:%H:%M:%S} UTC, then one every "
                          f"{PERIOD // 60} minutes, as an Envoy posts them", flush=True)
                    caught_up = True
                time.sleep(ahead)
            report = simulator.next_report(args.intervals)
            body = encode_body(report.xml)
            what = (f"sent {len(body)} bytes ({len(report.intervals)} intervals, {len(report.readings)} readings, "
                    f"{len(report.events)} events)")
            in_flight = True
            try:
                response = post_report(url, body, connect=args.connect, proxy=args.proxy, cafile=args.cafile,
                                       timeout=args.timeout)
            except (OSError, http.client.HTTPException) as exc:
                in_flight = False
                posted += 1
                print(f"report {posted}{total}: FAILED: {what}; {type(exc).__name__}: {exc}", flush=True)
                continue
            in_flight = False  # (a Ctrl-C during the post leaves it set: that report is not counted)
            posted += 1
            acked = _acknowledged(response)
            if 200 <= response.status < 300:
                answered += 1
            acknowledged += acked or 0
            print(f"report {posted}{total}: {response.status} {response.reason}; {what}; received "
                  f"{len(response.body)} bytes, {'?' if acked is None else acked} events acknowledged", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted{'; the report being posted is not counted' if in_flight else ''}", flush=True)
    print(f"{posted} report{'' if posted == 1 else 's'} posted, {answered} answered 2xx, "
          f"{posted - answered} failed or refused; {acknowledged} events acknowledged", flush=True)
    return 0 if posted == answered else 1


def report_url(url: str, webcomm_version: str = WEBCOMM_VERSION) -> str:
    """`url`, with the performance-report path and query added when it has no path."""
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        query = urllib.parse.urlencode({"webcomm_version": webcomm_version})
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, REPORT_PATH, query, ""))
    return url


def _acknowledged(response: SimResponse) -> int | None:
    """How many events the answer acknowledges; None when it is not a readable perf_report_response."""
    content_type = next((v for k, v in response.headers if k.lower() == "content-type"), None)
    try:
        root = parse_xml(report_xml(response.body, content_type)[0])
    except ReportError:
        return None
    return sum(1 for e in root.iter("event") if e.get("id") is not None) if root.tag == "perf_report_response" else None


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT with a port 1-65535 (IPv6 as [::1]:8443)")
    return host.strip("[]"), int(port)


def _at_least(minimum: int):
    def check(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return number
    return check


def _records(value: str) -> int:
    number = _at_least(1)(value)
    if number > MAX_RECORDS:
        raise argparse.ArgumentTypeError(f"{value}: an Envoy sends at most {MAX_RECORDS} intervals per report")
    return number


def _moment(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected ISO 8601 (2024-06-21T09:00Z) or Unix seconds") from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
