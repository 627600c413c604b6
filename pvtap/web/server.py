"""The web view's HTTP server (aiohttp): the page, its JSON, and the export download.

Read-only by construction: only GET and HEAD are routed, and the stores are opened with
`mode=ro`. Every store read runs in a worker thread (`asyncio.to_thread`), so a long query never
stalls the server's own event loop; the server is a process of its own (`pvtap web`), so it
never shares a loop or a GIL with the relay or mitmproxy. Bound to loopback by default; any
other address needs `web.password` (pvtap/config/sections.py), checked here with HTTP basic authentication.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import logging
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from pvtap.cli.export import FORMATS, write_export
from pvtap.config import Config, mask_url
from pvtap.store.local import LocalStore
from pvtap.web import readings, series
from pvtap.web.stores import readable_stores

log = logging.getLogger("pvtap.web")

STATIC = Path(__file__).resolve().parent / "static"
NS = 1_000_000_000
MAX_RANGE_S = 400 * 86_400  # a year and then some: longer requests are refused, not slow
WARM_RANGE_S = 366 * 86_400  # computed into the hourly cache at start, so the year view is quick at once
#: health is read at most this often: `pvtap status`'s InfluxDB backlog counts the undelivered
#: records, which on a never-forwarded store of a year is a walk through all of them
HEALTH_EVERY_S = 10.0
EXPORT_TYPES = {"csv": ("text/csv", "csv"), "lp": ("text/plain", "lp"), "json": ("application/x-ndjson", "jsonl")}
SECURITY_HEADERS = {
    # the page loads nothing from anywhere else: no CDN, no inline script
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class WebContext:
    """What every handler needs: the config, where the stores are, the chart cache."""

    config: Config
    data_dir: Path
    cache: series.HourlyCache = field(default_factory=series.HourlyCache)
    index: readings.DeviceIndex = field(default_factory=readings.DeviceIndex)
    _health: tuple[float, list[dict[str, Any]]] = (0.0, [])
    _health_lock: threading.Lock = field(default_factory=threading.Lock)

    def stores(self) -> list[Path]:
        return readable_stores(self.data_dir)

    def health(self, paths: list[Path], now_ns: int) -> list[dict[str, Any]]:
        """The stores' health, read again when older than HEALTH_EVERY_S (or the refresh, if longer)."""
        with self._health_lock:
            read_at, found = self._health
            if time.monotonic() - read_at >= max(HEALTH_EVERY_S, self.config.web.refresh_s) or \
                    [h["store"] for h in found] != [p.name for p in paths]:
                self._health = (time.monotonic(), readings.health(paths, now_ns))
            return self._health[1]


CONTEXT = web.AppKey("context", WebContext)


def make_app(config: Config, data_dir: Path | None = None) -> web.Application:
    ctx = WebContext(config, Path(data_dir or config.data_dir))
    app = web.Application(middlewares=[_headers, _authenticate(config.web.password)])
    app[CONTEXT] = ctx
    app.router.add_get("/", _index)
    app.router.add_get("/api/live", _live)
    app.router.add_get("/api/chart", _chart)
    app.router.add_get("/api/energy", _energy)
    app.router.add_get("/export", _export)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    app.cleanup_ctx.append(_warm_up)
    return app


# -- middlewares ------------------------------------------------------------------------------

@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    response.headers.update(SECURITY_HEADERS)
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"
    if isinstance(response, web.HTTPException) and response.status >= 400:
        raise response
    return response


def _authenticate(password: str) -> Middleware:
    """HTTP basic authentication with the one password from config (any user name); none when
    no password is set (then the view listens on loopback only: pvtap/config/sections.py refuses otherwise)."""
    expected = password.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected and not _password_ok(request.headers.get("Authorization", ""), expected):
            raise web.HTTPUnauthorized(text="pvtap web: this view needs the password from web.password\n",
                                       headers={"WWW-Authenticate": 'Basic realm="pvtap", charset="UTF-8"'})
        return await handler(request)
    return check


def _password_ok(header: str, expected: bytes) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        _, _, given = base64.b64decode(encoded.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, expected)


# -- handlers ---------------------------------------------------------------------------------

async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _live(request: web.Request) -> web.Response:
    """Devices with their current values, and health: what the page refreshes every few seconds."""
    ctx = request.app[CONTEXT]
    offset_s = _utc_offset(request)

    def read() -> dict[str, Any]:
        now_ns = time.time_ns()
        day_start_ns = ((now_ns // NS + offset_s) // 86_400 * 86_400 - offset_s) * NS
        paths = ctx.stores()
        return {"now": now_ns / NS, "refresh_s": ctx.config.web.refresh_s,
                "silent_after_s": ctx.config.web.silent_after_s,
                "pseudonymized": ctx.config.privacy.pseudonymize_serials,
                "influx": mask_url(ctx.config.influx.url) or None, "mqtt": mask_url(ctx.config.mqtt.url) or None,
                "data_dir": str(ctx.data_dir),
                "devices": [readings.as_json(d)
                            for d in readings.devices(paths, ctx.config, day_start_ns, now_ns, ctx.index)],
                "health": ctx.health(paths, now_ns)}
    return _json(await asyncio.to_thread(read))


async def _chart(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    since_ns, until_ns = _range(request)
    doc = await asyncio.to_thread(series.chart, ctx.stores(), ctx.cache, since_ns, until_ns)
    return _json(doc)


async def _energy(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    since_ns, until_ns = _range(request)
    doc = await asyncio.to_thread(series.energy_per_day, ctx.stores(), ctx.cache, since_ns, until_ns,
                                  time.time_ns(), _utc_offset(request))
    return _json(doc)


async def _export(request: web.Request) -> web.StreamResponse:
    """The records of the shown range, as `pvtap export` writes them, streamed as they are read."""
    ctx = request.app[CONTEXT]
    fmt = request.query.get("format", "csv")
    if fmt not in FORMATS:
        raise web.HTTPBadRequest(text=f"format must be one of {', '.join(FORMATS)}\n")
    since_ns, until_ns = _range(request)
    content_type, suffix = EXPORT_TYPES[fmt]
    name = f"pvtap-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(since_ns // NS))}.{suffix}"
    response = web.StreamResponse(headers={"Content-Type": f"{content_type}; charset=utf-8",
                                           "Content-Disposition": f'attachment; filename="{name}"'})
    await response.prepare(request)
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=16)
    stop = threading.Event()
    filters = {"since_ns": since_ns, "until_ns": until_ns, "measurements": ()}
    writer = threading.Thread(target=_export_into, args=(ctx.stores(), fmt, filters, chunks, stop),
                              name="web-export", daemon=True)
    writer.start()
    try:
        while (chunk := await asyncio.to_thread(chunks.get)) is not None:
            if isinstance(chunk, BaseException):
                log.error("the download of %s failed: %s", request.query_string, chunk)
                if request.transport is not None:
                    request.transport.abort()  # no end of the chunked body: the browser shows it failed
                return response
            await response.write(chunk)
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                chunks.get_nowait()  # let a blocked writer see `stop`
    await response.write_eof()
    return response


class _Chunks(io.StringIO):
    """A text stream that hands ~64 KiB chunks to the server, waiting while it is behind."""

    def __init__(self, chunks: queue.Queue, stop: threading.Event) -> None:
        super().__init__()
        self.chunks, self.stop = chunks, stop
        self.parts: list[str] = []
        self.size = 0

    def write(self, text: str) -> int:
        if self.stop.is_set():
            raise BrokenPipeError("the browser went away")
        self.parts.append(text)
        self.size += len(text)
        if self.size >= 65536:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self.parts:
            self.chunks.put("".join(self.parts).encode())
            self.parts, self.size = [], 0


def _export_into(paths: list[Path], fmt: str, filters: dict, chunks: queue.Queue, stop: threading.Event) -> None:
    out = _Chunks(chunks, stop)
    try:
        with ExitStack() as stack:
            stores = [stack.enter_context(LocalStore(p, readonly=True)) for p in paths]
            write_export(stores, fmt, filters, out)
        out.flush()
        chunks.put(None)
    except BrokenPipeError:
        pass
    except Exception as exc:  # the download ends short and the log says why
        chunks.put(exc)


# -- helpers ----------------------------------------------------------------------------------

def _json(doc: dict[str, Any]) -> web.Response:
    return web.Response(text=series.dumps(doc), content_type="application/json")


def _range(request: web.Request) -> tuple[int, int]:
    """`since` and `until` (unix seconds) from the query: default the last 24 h, at most MAX_RANGE_S."""
    now = time.time()
    try:
        until = float(request.query.get("until", now))
        since = float(request.query.get("since", until - 86_400))
    except ValueError:
        raise web.HTTPBadRequest(text="since and until are unix seconds\n") from None
    if not since < until:
        raise web.HTTPBadRequest(text="since must be before until\n")
    if until - since > MAX_RANGE_S:
        raise web.HTTPBadRequest(text=f"at most {MAX_RANGE_S // 86_400} days at once\n")
    return int(since * NS), int(until * NS)


def _utc_offset(request: web.Request) -> int:
    """The browser's UTC offset in seconds (`tz`, minutes east of UTC), for "today" and days."""
    try:
        minutes = int(request.query.get("tz", "0"))
    except ValueError:
        raise web.HTTPBadRequest(text="tz is the UTC offset in minutes\n") from None
    if not -16 * 60 <= minutes <= 16 * 60:
        raise web.HTTPBadRequest(text="tz is the UTC offset in minutes (-960 to 960)\n")
    return minutes * 60


async def _warm_up(app: web.Application) -> AsyncIterator[None]:
    """Fill the hourly cache for the last year in the background, so the year view is quick at once."""
    ctx = app[CONTEXT]

    def warm() -> None:
        started = time.monotonic()
        now_ns = time.time_ns()
        paths = ctx.stores()
        series.chart(paths, ctx.cache, now_ns - WARM_RANGE_S * NS, now_ns)
        log.info("charts ready: the last year of %d store(s) summed by the hour in %.1f s",
                 len(paths), time.monotonic() - started)
    task = asyncio.create_task(asyncio.to_thread(warm))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def bind(host: str, port: int) -> socket.socket:
    """The listening socket: `*` is every IPv4 and IPv6 address, as for the relay's listeners."""
    if host == "*":
        return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


async def serve(config: Config, sock: socket.socket, data_dir: Path | None = None,
                ready: Callable[[], None] = lambda: None) -> None:
    """Serve the web view on a bound socket until cancelled; `ready()` once it accepts."""
    runner = web.AppRunner(make_app(config, data_dir), access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        ready()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
