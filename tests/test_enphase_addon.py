"""The Enphase mitmproxy addon in-process (mitmproxy.test.taddons): options, hooks, local mode.

The addon module is loaded exactly as mitmdump loads `-s addons/enphase.py`. The end-to-end
behaviour through a real mitmdump is in test_enphase_e2e.py.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import urllib.parse
import zlib
from pathlib import Path
from types import ModuleType

import pytest
from lxml import etree
from mitmproxy import exceptions, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.addons.script import load_script
from mitmproxy.test import taddons, tflow, tutils

from pvtap.decode.enphase import build_response
from pvtap.records import Record
from pvtap.store.local import LocalStore
from tests.conftest import REPO

ADDON_PATH = REPO / "addons" / "enphase.py"
_loaded = load_script(str(ADDON_PATH))  # None (and logged) when the script does not load
assert _loaded is not None, f"cannot load {ADDON_PATH}"
addon_module: ModuleType = _loaded

REPORT_PATH = "/emu_reports/performance_report"
# Placeholder serials and documentation addresses only (RFC 5737, locally administered MAC).
XML = (b"<?xml version='1.0' encoding='utf-8'?>"
       b"<perf_report report_timestamp='1700000200'>"
       b"<envoy serial_num='999900000099' ip_addr='192.0.2.5' mac_addr='02:00:00:00:00:01' "
       b"part_num='800-00024-r04' sw_version='R3.0.0 (000000)' timezone='UTC'/>"
       b"<event event_state='0' id='227' event_code='509' eqid='999900000001' event_date='1700000100'/>"
       b"<event event_state='1' id='228' correlation_id='161' event_code='10009' eqid='999900000002' "
       b"event_date='1700000150'/>"
       b'<interval interval_duration="300" stat_duration="295" end_date="1700000100" stats="60000" '
       b'id="1000001" eqid="999900000001.1"/>'
       b'<reading duration="300" stats="240000,50000,32000,6500,40,0,0,60000" date="1700000100" '
       b'id="2000001" flags="0" eqid="999900000001.1"/>'
       b"</perf_report>")
BODY = zlib.compress(b"body=" + urllib.parse.quote(XML).encode())


def report_flow(body: bytes = BODY, *, path: str = REPORT_PATH + "?webcomm_version=3.0", method: str = "POST",
                host: str = "reports.enphaseenergy.com", content_type: str = "application/x-deflate",
                response: http.Response | None = None) -> http.HTTPFlow:
    request = tutils.treq(method=method.encode(), scheme=b"https", host="127.0.0.1", port=443,
                          authority=b"", path=path.encode(), content=body,
                          headers=http.Headers(Host=host, Content_Type=content_type))
    return tflow.tflow(req=request, resp=response or False)


def cloud_response(ids: list[str]) -> http.Response:
    return tutils.tresp(status_code=200, content=build_response(ids),
                        headers=http.Headers(Content_Type="application/x-deflate; charset=utf-8"))


@pytest.fixture
def tap(data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh addon in a taddons context, storing in `data_dir`; stopped afterwards."""
    monkeypatch.delenv("PVTAP_CONFIG", raising=False)
    addon = addon_module.EnphaseTap()
    with taddons.context(Proxyserver(), addon) as tctx:  # Proxyserver: connection_strategy; it does not listen here
        tctx.configure(addon, enphase_data_dir=str(data_dir))
        addon.running()
        yield tctx, addon
        addon.done()


def wire_state(flow: http.HTTPFlow) -> tuple:
    """Everything about the request and response that is forwarded (bytes, headers, status)."""
    return flow.request.get_state(), flow.response.get_state() if flow.response else None


def stored(data_dir: Path) -> tuple[list, list]:
    with LocalStore(data_dir / "enphase.sqlite", readonly=True) as store:
        return list(store.raw_payloads()), [s.record for s in store.records()]


# -- the script --------------------------------------------------------------------------------

def test_script_loads_as_mitmdump_loads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PVTAP_CONFIG", raising=False)
    monkeypatch.setenv("PVTAP_DATA_DIR", str(tmp_path / "from-env"))
    with taddons.context() as tctx:
        module = tctx.script(str(ADDON_PATH))
        assert module is not None, "the script failed to load (see the log)"
        addon, fallback = module.addons
        assert isinstance(addon, module.EnphaseTap) and fallback is addon.fallback
        # loading ran configure, which validates but writes nothing (`mitmdump --options` loads it too)
        assert addon.settings.data_dir == tmp_path / "from-env"
        assert not (tmp_path / "from-env").exists()
        addon.running()  # as mitmdump does once it listens: now the store opens
        assert addon.store_path == tmp_path / "from-env" / "enphase.sqlite"
        assert addon.settings.hosts == frozenset({"reports.enphaseenergy.com"})
        assert not addon.settings.local_mode
        for name in ("pvtap_config", "enphase_data_dir", "enphase_local_mode", "enphase_hosts"):
            assert name in tctx.options
        addon.done()
    assert addon.channel is None


# -- options -----------------------------------------------------------------------------------

def test_options_default_to_the_pvtap_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PVTAP_CONFIG", raising=False)
    config = tmp_path / "pvtap.toml"
    config.write_text(f'data_dir = "{tmp_path / "cfg-data"}"\n[enphase]\nhosts = ["envoy-sink.example"]\n')
    addon = addon_module.EnphaseTap()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, pvtap_config=str(config))
        addon.running()
        assert addon.store_path == tmp_path / "cfg-data" / "enphase.sqlite"
        assert addon.settings.hosts == frozenset({"envoy-sink.example"})
        # an option that is set wins over the config; a new data dir reopens the store while running
        tctx.configure(addon, enphase_data_dir=str(tmp_path / "opt-data"),
                       enphase_hosts=["Reports.EnphaseEnergy.com", "b.example"])
        assert addon.store_path == tmp_path / "opt-data" / "enphase.sqlite"
        assert addon.channel.sync(30)  # the new worker runs
        assert addon.settings.hosts == frozenset({"reports.enphaseenergy.com", "b.example"})
        addon.done()


@pytest.mark.parametrize("options, words", [
    ({"enphase_hosts": []}, ["enphase_hosts", "[]", "Fix:"]),
    ({"enphase_hosts": ["  "]}, ["enphase_hosts", "Fix:"]),
    ({"pvtap_config": "/nonexistent/pvtap.toml"},
     ["pvtap_config", "/nonexistent/pvtap.toml", "does not exist", "Fix:"]),
    ({"enphase_local_mode": True}, ["connection_strategy", "'eager'", "lazy", "Fix:"]),
])
def test_bad_options_are_rejected_in_configure(tap, options: dict, words: list[str]) -> None:
    tctx, addon = tap
    before = addon.settings
    with pytest.raises(exceptions.OptionsError) as info:
        tctx.configure(addon, **options)
    for word in words:
        assert word in str(info.value)
    assert addon.settings == before  # rejected: nothing changed
    for name, value in options.items():
        assert getattr(tctx.options, name) != value  # and mitmproxy rolled the option back


def test_a_data_dir_that_cannot_be_a_directory_is_rejected(tap, tmp_path: Path) -> None:
    tctx, addon = tap
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    with pytest.raises(exceptions.OptionsError) as info:
        tctx.configure(addon, enphase_data_dir=str(a_file / "data"))
    assert f"enphase_data_dir = {str(a_file / 'data')!r}: {a_file} is a file, not a directory. Fix:" in str(info.value)


@pytest.mark.parametrize("toml, words", [
    ("[enphase]\nhosts = []\n", ["enphase.hosts", "at least one host"]),
    ("[enphase\n", ["not valid TOML"]),
    ("[enphase]\nlocal_mod = true\n", ["enphase.local_mod", "did you mean enphase.local_mode"]),
])
def test_a_bad_config_file_is_rejected_naming_the_key(tap, tmp_path: Path, toml: str, words: list[str]) -> None:
    tctx, addon = tap
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    with pytest.raises(exceptions.OptionsError) as info:
        tctx.configure(addon, pvtap_config=str(config))
    assert f"pvtap_config = {str(config)!r}" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_local_mode_from_the_config_needs_a_lazy_connection_strategy(tap, tmp_path: Path) -> None:
    tctx, addon = tap
    config = tmp_path / "local.toml"
    config.write_text("[enphase]\nlocal_mode = true\n")
    with pytest.raises(exceptions.OptionsError, match="connection_strategy"):
        tctx.configure(addon, pvtap_config=str(config))
    tctx.configure(addon, pvtap_config=str(config), connection_strategy="lazy")
    assert addon.settings.local_mode


# -- hooks -------------------------------------------------------------------------------------

async def test_report_and_response_are_copied_and_the_flow_is_untouched(tap, data_dir: Path) -> None:
    tctx, addon = tap
    response = cloud_response(["227", "228"])
    flow = report_flow(response=response)
    before = wire_state(flow)
    await tctx.cycle(addon, flow)
    assert addon.channel.sync(30)
    assert wire_state(flow) == before

    raws, records = stored(data_dir)
    up, down = (r.raw for r in raws)
    assert (up.kind, up.origin.direction, up.origin.connection) == ("performance_report", "up", flow.id)
    assert (down.kind, down.origin.direction, down.origin.connection) == \
        ("performance_report_response", "down", flow.id)
    assert up.meta["method"] == "POST" and up.meta["host"] == "reports.enphaseenergy.com"
    assert (up.meta["path"], up.meta["query"]) == (REPORT_PATH, "webcomm_version=3.0")
    assert up.meta["content_type"] == "application/x-deflate"
    assert down.meta["status_code"] == 200
    assert b"192.0.2.5" not in up.payload and b"02:00:00:00:00:01" not in up.payload  # redacted before the store
    assert all(r.decode_error is None for r in raws)
    by_measurement: dict[str, list[Record]] = {}
    for record in records:
        by_measurement.setdefault(record.measurement, []).append(record)
    assert {m: len(rs) for m, rs in by_measurement.items()} == {
        "enphase_envoy": 1, "enphase_event": 2, "enphase_interval": 1, "enphase_reading": 1,
        "enphase_report_response": 1}
    interval = by_measurement["enphase_interval"][0]
    assert interval.fields["energy_j"] == 60000 and interval.fields["avg_power_w"] == 200.0
    assert interval.tags == {"envoy": "999900000099", "eqid": "999900000001.1"}
    reading = by_measurement["enphase_reading"][0]
    assert reading.fields["ac_voltage_v"] == 240.0 and reading.fields["temperature_c"] == 40.0
    assert by_measurement["enphase_report_response"][0].fields["event_ids"] == "227,228"


@pytest.mark.parametrize("flow_args", [
    {"method": "GET"},
    {"host": "api.enphaseenergy.com"},
    {"path": "/performance_report?x=1"},
    {"path": "/emu_reportsX/performance_report"},
])
async def test_other_traffic_is_neither_copied_nor_touched(tap, data_dir: Path, flow_args: dict) -> None:
    tctx, addon = tap
    flow = report_flow(response=cloud_response([]), **flow_args)
    before = flow.get_state()
    await tctx.cycle(addon, flow)
    assert addon.channel.sync(30)
    assert addon.channel.stats()["copies_sent"] == 0
    assert flow.get_state() == before


@pytest.mark.parametrize("path, kind", [
    ("/emu_reports/performance_report?webcomm_version=99.1.0-never-seen", "performance_report"),
    ("/emu_reports/performance_report", "performance_report"),
    ("/emu_reports/task_complete?id=7", "task_complete"),
    ("/emu_reports/something_new", "emu_report"),
])
async def test_matching_is_by_path_only(tap, data_dir: Path, path: str, kind: str) -> None:
    tctx, addon = tap
    await tctx.cycle(addon, report_flow(body=b"opaque" if kind != "performance_report" else BODY, path=path,
                                        response=tutils.tresp(content=b"")))
    assert addon.channel.sync(30)
    raws, records = stored(data_dir)
    assert [r.raw.kind for r in raws] == [kind, f"{kind}_response"]
    if kind != "performance_report":  # undocumented bodies: size + hash only, no records
        assert (raws[0].raw.payload, raws[0].raw.meta["withheld_size"]) == (b"", len(b"opaque"))
        assert records == []


async def test_a_decode_failure_is_counted_and_kept_raw_and_the_flow_untouched(tap, data_dir: Path, caplog) -> None:
    tctx, addon = tap
    corrupt = b"x\x9c" + b"\x00not zlib at all"
    flow = report_flow(body=corrupt, response=tutils.tresp(status_code=400, content=b"bad"))
    before = wire_state(flow)
    with caplog.at_level(logging.INFO):
        await tctx.cycle(addon, flow)
        assert addon.channel.sync(30)
        assert wire_state(flow) == before
        assert addon.channel.stats()["decode_errors"] == 2  # the report and the cloud's 400 answer
        raws, records = stored(data_dir)
        assert raws[0].raw.payload == b"" and raws[0].raw.meta["withheld_size"] == len(corrupt)
        assert [r.decode_error is not None for r in raws] == [True, True]
        assert records == []
        addon.done()
    assert any("2 payloads handed to the ingest worker" in m and "0 dropped" in m for m in caplog.messages)


async def test_one_log_line_per_report(tap, caplog) -> None:
    tctx, addon = tap
    flow = report_flow(response=cloud_response(["227", "228"]))
    with caplog.at_level(logging.INFO, logger="pvtap.enphase"):
        await tctx.cycle(addon, flow)
    lines = [m for m in caplog.messages if flow.id in m]
    assert len(lines) == 1
    assert "performance_report from peer#1 " in lines[0]  # not the address: store_network_identity is off
    assert flow.client_conn.peername[0] not in lines[0]
    assert flow.response is not None and flow.response.raw_content is not None
    assert f"{len(BODY)} bytes up, forwarded, 200 {len(flow.response.raw_content)} bytes down" in lines[0]


# -- local mode --------------------------------------------------------------------------------

async def test_local_mode_answers_with_an_acknowledgement_and_stores_both(tap, data_dir: Path) -> None:
    tctx, addon = tap
    tctx.configure(addon, enphase_local_mode=True, connection_strategy="lazy")
    flow = report_flow()
    await tctx.cycle(addon, flow)
    assert addon.channel.sync(30)
    assert flow.response is not None and flow.response.status_code == 200
    assert flow.response.headers["Content-Type"] == "application/x-deflate; charset=utf-8"
    assert flow.response.raw_content == build_response(["227", "228"])
    answer = etree.fromstring(zlib.decompress(flow.response.raw_content))
    assert answer.get("status") == "success"
    assert [e.get("id") for e in answer.iter("event")] == ["227", "228"]
    raws, records = stored(data_dir)
    assert [r.raw.kind for r in raws] == ["performance_report", "performance_report_response"]
    assert raws[1].raw.meta["answered_locally"] is True
    assert sum(r.measurement == "enphase_interval" for r in records) == 1


@pytest.mark.parametrize("body", [b"x\x9c\x00garbage", b""])
async def test_local_mode_acknowledges_nothing_for_an_unreadable_report(tap, body: bytes) -> None:
    tctx, addon = tap
    tctx.configure(addon, enphase_local_mode=True, connection_strategy="lazy")
    flow = report_flow(body=body)
    await tctx.cycle(addon, flow)
    assert flow.response is not None
    assert flow.response.status_code == 200
    assert flow.response.raw_content == build_response([])
    assert flow.request.raw_content == body


async def test_local_mode_answers_task_complete_with_an_empty_200(tap, data_dir: Path) -> None:
    tctx, addon = tap
    tctx.configure(addon, enphase_local_mode=True, connection_strategy="lazy")
    flow = report_flow(body=b"done=1", path="/emu_reports/task_complete",
                       content_type="application/x-www-form-urlencoded")
    await tctx.cycle(addon, flow)
    assert addon.channel.sync(30)
    assert flow.response is not None
    assert (flow.response.status_code, flow.response.raw_content) == (200, b"")
    raws, _ = stored(data_dir)
    assert [(r.raw.kind, r.raw.payload, r.raw.meta["withheld_size"]) for r in raws] == \
        [("task_complete", b"", len(b"done=1")), ("task_complete_response", b"", 0)]


async def test_a_store_that_cannot_be_opened_does_not_stop_forwarding(tmp_path: Path, caplog) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "enphase.sqlite").mkdir(parents=True)  # a directory where the database file belongs
    addon = addon_module.EnphaseTap()
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(addon, enphase_data_dir=str(data_dir), enphase_local_mode=True, connection_strategy="lazy")
        with caplog.at_level(logging.ERROR):
            addon.running()
        assert addon.channel is None
        assert any("reports are forwarded but NOT stored" in m for m in caplog.messages)
        flow = report_flow()
        await tctx.cycle(addon, flow)  # no exception, and local mode still answers
        assert flow.response is not None
        assert flow.response.raw_content == build_response(["227", "228"])
        addon.done()


# -- configure never waits for the worker (issue 9 F8) ---------------------------------------------

def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat: "T" while it is stopped."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


async def test_a_new_data_dir_returns_from_configure_while_the_old_worker_is_blocked(tap, data_dir: Path,
                                                                                      tmp_path: Path) -> None:
    """The old worker is stopped (SIGSTOP: it reads, archives and answers nothing) with reports
    queued for it; configure to another data dir returns while it is still stopped, and once it
    may go on (SIGCONT) it archives those reports in the old store and exits by itself."""
    tctx, addon = tap
    assert addon.channel.sync(30)
    old = addon.channel
    pid = old.worker.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        for n in range(3):
            await tctx.cycle(addon, report_flow(response=cloud_response([str(n)])))
        assert old.stats()["copies_sent"] + old.stats()["buffered_bytes"] > 0

        tctx.configure(addon, enphase_data_dir=str(tmp_path / "other-data"))
        assert addon.channel is not old and addon.store_path == tmp_path / "other-data" / "enphase.sqlite"
        assert old.worker is not None and old.worker.poll() is None and process_state(pid) == "T"  # still blocked
    finally:
        os.kill(pid, signal.SIGCONT)
    closing = [t for t in threading.enumerate() if t.name == "pvtap-enphase ingest-close"]
    assert len(closing) == 1
    closing[0].join(60)
    assert not closing[0].is_alive()
    raws, records = stored(data_dir)
    assert [r.raw.kind for r in raws] == ["performance_report", "performance_report_response"] * 3
    assert sum(r.measurement == "enphase_report_response" for r in records) == 3
    assert old.counts.copies_lost == 0 and old.counts.copies_dropped == 0

    await tctx.cycle(addon, report_flow(response=cloud_response(["9"])))
    assert addon.channel.sync(30)
    assert len(stored(tmp_path / "other-data")[0]) == 2  # the new worker writes the new store
