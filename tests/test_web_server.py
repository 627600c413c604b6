"""The web view's server: the page and its JSON over real sockets, read-only, no resource from
elsewhere (CSP), the export download equal to `pvtap export`, and the password: refused at
start-up when the LAN is opened without one, 401 for requests without it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from pvtap.cli import main
from pvtap.config import Config, PrivacyConfig, WebConfig
from pvtap.web.server import STATIC, bind, serve

from .conftest import REPO
from .web_support import ALPHA, ENVOY, add_alpha, add_envoy, stores

T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)
PASSWORD = "placeholder-pass-1"


@asynccontextmanager
async def web_view(config: Config, data_dir: Path) -> AsyncIterator[str]:
    sock = bind("127.0.0.1", 0)
    ready = asyncio.Event()
    task = asyncio.create_task(serve(config, sock, data_dir, ready=ready.set))
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
def filled(data_dir: Path) -> Path:
    relay, enphase = stores(data_dir)
    with relay, enphase:
        add_alpha(relay, T0, 30)
        add_envoy(enphase, T0 + timedelta(seconds=25), (100.0, 150.0), (30.0, 31.0))
    return data_dir


async def test_page_json_and_headers(filled):
    async with web_view(Config(), filled) as url, aiohttp.ClientSession() as http:
        async with http.get(url + "/") as response:
            assert response.status == 200
            page = await response.text()
            assert response.headers["Content-Security-Policy"].startswith("default-src 'self';")
        # everything the page loads is its own: no http(s):// reference anywhere in it
        assert re.findall(r'(?:src|href)="([^"]+)"', page) == [
            "data:,", "/static/uPlot.min.css", "/static/style.css", "/static/uPlot.iife.min.js", "/static/app.js",
            "/export?format=csv", "/export?format=lp"]
        for name in ("uPlot.min.css", "style.css", "uPlot.iife.min.js", "app.js"):
            async with http.get(f"{url}/static/{name}") as response:
                assert response.status == 200 and await response.read() == (STATIC / name).read_bytes()
        async with http.get(url + "/api/live?tz=60") as response:
            live = await response.json()
            assert response.headers["Cache-Control"] == "no-store"
        assert [(d["vendor"], d["serial"]) for d in live["devices"]] == [("alphaess", ALPHA), ("enphase", ENVOY)]
        assert live["pseudonymized"] is False
        assert [h["store"] for h in live["health"]] == ["enphase.sqlite", "relay.sqlite"]
        query = f"since={T0.timestamp()}&until={(T0 + timedelta(hours=1)).timestamp()}"
        async with http.get(f"{url}/api/chart?{query}") as response:
            chart = await response.json()
        soc = next(s for s in chart["series"] if s["quantity"] == "soc_pct")
        assert [v for v in soc["values"] if v is not None] == [50 + i / 2 for i in range(30)]
        async with http.get(f"{url}/api/energy?{query}&tz=0") as response:
            assert (await response.json())["days"] == [T0.replace(hour=0).timestamp()]


@pytest.mark.parametrize(("query", "problem"), [
    ("since=10&until=5", "since must be before until"), ("since=x", "since and until are unix seconds"),
    ("since=0&until=40000000", "at most 400 days at once"), ("tz=9999", "tz is the UTC offset")])
async def test_bad_ranges_are_400_with_the_reason(filled, query, problem):
    async with web_view(Config(), filled) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/api/chart?{query}" if "tz" not in query else f"{url}/api/live?{query}") as r:
            assert r.status == 400 and problem in await r.text()


async def test_read_only_only_get(filled):
    before = {p.name: p.read_bytes() for p in filled.iterdir() if p.suffix == ".sqlite"}
    async with web_view(Config(), filled) as url, aiohttp.ClientSession() as http:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            async with http.request(method, url + "/api/live") as response:
                assert response.status == 405
        async with http.get(url + "/api/live"):
            pass
        async with http.get(url + "/static/../../config.py") as response:
            assert response.status == 404
    assert {p.name: p.read_bytes() for p in filled.iterdir() if p.suffix == ".sqlite"} == before


@pytest.mark.parametrize("fmt", ["csv", "lp"])
async def test_the_download_is_pvtap_export_of_the_shown_range(filled, fmt, capsys):
    since, until = T0 + timedelta(seconds=15), T0 + timedelta(minutes=4)
    assert main(["--data-dir", str(filled), "export", "--format", fmt, "--since", since.isoformat(),
                 "--until", until.isoformat()]) == 0
    expected = capsys.readouterr().out
    assert expected.count("\n") > 20
    async with web_view(Config(), filled) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/export?format={fmt}&since={since.timestamp()}&until={until.timestamp()}") as r:
            assert r.status == 200
            assert r.headers["Content-Disposition"] == (
                f'attachment; filename="pvtap-20240601T120015Z.{"csv" if fmt == "csv" else "lp"}"')
            assert await r.text() == expected


def _basic(password: str, user: str = "anyone") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_the_page_says_when_serials_are_pseudonyms(filled):
    config = Config(privacy=PrivacyConfig(pseudonymize_serials=True))
    async with web_view(config, filled) as url, aiohttp.ClientSession() as http:
        async with http.get(url + "/api/live") as response:
            assert (await response.json())["pseudonymized"] is True
    assert "serials are pseudonyms (privacy.pseudonymize_serials)" in (STATIC / "app.js").read_text()


async def test_with_a_password_every_request_needs_it(filled):
    config = Config(web=WebConfig(listen="0.0.0.0:8080", password=PASSWORD))
    async with web_view(config, filled) as url, aiohttp.ClientSession() as http:
        for path in ("/", "/api/live", "/api/chart", "/api/energy", "/export?format=csv", "/static/app.js"):
            for headers in ({}, _basic("wrong-password"), {"Authorization": "Bearer " + PASSWORD},
                            {"Authorization": "Basic !!!"}):
                async with http.get(url + path, headers=headers) as response:
                    assert response.status == 401, (path, headers)
                    assert response.headers["WWW-Authenticate"] == 'Basic realm="pvtap", charset="UTF-8"'
                    assert "web.password" in await response.text()
            async with http.get(url + path, headers=_basic(PASSWORD)) as response:
                assert response.status == 200, path


def test_the_vendored_chart_library_is_the_pinned_npm_file():
    notes = (STATIC / "VENDORED.md").read_text()
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        digest = hashlib.sha256((STATIC / name).read_bytes()).hexdigest()
        assert f"of `{name}`: `{digest}`" in notes
    assert (STATIC / "uPlot.LICENSE").read_text().startswith("The MIT License")


# -- the command ------------------------------------------------------------------------------

def pvtap(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pvtap", *args], cwd=REPO, text=True,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.parametrize("how", ["env", "flag"])
def test_opened_to_the_lan_without_a_password_it_refuses_to_start(data_dir, how):
    env = {"PVTAP_WEB_LISTEN": "0.0.0.0:0"} if how == "env" else {}
    args = ["--listen", "0.0.0.0:0"] if how == "flag" else []
    proc = pvtap("--data-dir", str(data_dir), "web", *args, env={**env, "PVTAP_WEB_PASSWORD": ""})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    assert "web.password" in err and "opens the web view to the LAN" in err and out == ""


def test_pvtap_web_serves_until_sigterm(filled):
    proc = pvtap("--data-dir", str(filled), "web", "--listen", "0.0.0.0:0", env={"PVTAP_WEB_PASSWORD": PASSWORD})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.match(r"web view ready on http://0\.0\.0\.0:(\d+)/ \(read-only; stores in ", line)
        assert match, line
        port = int(match[1])

        async def fetch() -> tuple[int, int]:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/api/live") as without:
                    pass
                async with http.get(f"http://127.0.0.1:{port}/api/live", headers=_basic(PASSWORD)) as with_:
                    assert [d["serial"] for d in (await with_.json())["devices"]] == [ALPHA, ENVOY]
                return without.status, with_.status
        assert asyncio.run(fetch()) == (401, 200)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


async def test_a_download_that_fails_ends_as_a_failure_not_a_short_file(filled, monkeypatch):
    def failing(stores, fmt, filters, out, advance=None):
        out.write("x" * 200_000)
        raise ValueError("the disk said no")
    monkeypatch.setattr("pvtap.web.server.write_export", failing)
    async with web_view(Config(), filled) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/export?format=csv") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
