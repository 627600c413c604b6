"""The data commands: `pvtap tail` (and --follow), `pvtap devices`, `pvtap export` (lp, csv,
json, filters, files, progress; line protocol read back from a real InfluxDB 1.6) and
`pvtap replay` (idempotent, and updating the store after a decoder change)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import pvtap.decode.enphase as enphase
from pvtap.cli import main
from pvtap.cli._common import ago, parse_when
from pvtap.ingest import Ingest
from pvtap.privacy import Privacy
from pvtap.records import FieldValue, Origin, RawPayload, Record, now_utc
from pvtap.simulate.enphase import build_report_xml, encode_body
from pvtap.store.local import LocalStore

from .conftest import REPO

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
ENVOY = Origin("enphase", "SIM-ENVOY-1", "flow-1", "up")
ALPHA = Origin("alphaess", "SIM-ALPHA-1", "conn-1", "up")

R1 = Record("enphase_reading", T0, {"envoy": "SIM-ENVOY-1", "eqid": "SIM-MICRO-1.1"},
            {"ac_voltage_v": 239.4, "temperature_c": 41.0, "energy_j": 61209, "producing": True}, ENVOY)
R2 = Record("alpha_rt", T0 + timedelta(minutes=1), {"serial": "SIM-ALPHA-1"},
            {"soc": 57, "power_w": -1250.5, "mode": 'self-use, "eco" é'}, ALPHA)
R3 = Record("enphase_reading", T0 + timedelta(minutes=2), {"envoy": "SIM-ENVOY-1", "eqid": "SIM-MICRO-2.1"},
            {"ac_voltage_v": 240.0, "temperature_c": 39.5, "energy_j": 0, "producing": False}, ENVOY)
R4 = Record("enphase_event", T0 + timedelta(minutes=3, microseconds=500_000), {"envoy": "SIM-ENVOY-1", "code": "509"},
            {"code": 509, "description": "Power on reset"}, ENVOY)

TAIL = {  # by record number
    1: "2024-06-01T12:00:00Z  enphase_reading  envoy=SIM-ENVOY-1,eqid=SIM-MICRO-1.1  "
        "ac_voltage_v=239.4 temperature_c=41.0 energy_j=61209 producing=true",
    2: '2024-06-01T12:01:00Z  alpha_rt  serial=SIM-ALPHA-1  soc=57 power_w=-1250.5 mode="self-use, \\"eco\\" é"',
    3: "2024-06-01T12:02:00Z  enphase_reading  envoy=SIM-ENVOY-1,eqid=SIM-MICRO-2.1  "
        "ac_voltage_v=240.0 temperature_c=39.5 energy_j=0 producing=false",
    4: '2024-06-01T12:03:00.500000Z  enphase_event  code=509,envoy=SIM-ENVOY-1  code=509 description="Power on reset"',
}

LP = {  # by record number
    1: "enphase_reading,envoy=SIM-ENVOY-1,eqid=SIM-MICRO-1.1 "
        "ac_voltage_v=239.4,energy_j=61209i,producing=true,temperature_c=41 1717243200000000000",
    2: 'alpha_rt,serial=SIM-ALPHA-1 mode="self-use, \\"eco\\" é",power_w=-1250.5,soc=57i 1717243260000000000',
    3: "enphase_reading,envoy=SIM-ENVOY-1,eqid=SIM-MICRO-2.1 "
        "ac_voltage_v=240,energy_j=0i,producing=false,temperature_c=39.5 1717243320000000000",
    4: 'enphase_event,code=509,envoy=SIM-ENVOY-1 code=509i,description="Power on reset" 1717243380500000000',
}


@pytest.fixture
def stores(data_dir: Path) -> Path:
    """Two stores; the enphase one written out of time order (R3 before R1)."""
    with LocalStore.for_process(data_dir, "enphase") as s:
        raw_id = s.add_raw(RawPayload(ENVOY, "performance_report", b"<perf_report/>", T0 + timedelta(minutes=5)))
        s.append([R3, R1, R4], raw_id=raw_id)
    with LocalStore.for_process(data_dir, "relay") as s:
        s.append([R2])
    return data_dir


def pvtap(capsys, data_dir: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--data-dir", str(data_dir), *args])
    out, err = capsys.readouterr()
    return code, out, err


# -- tail ---------------------------------------------------------------------------------------

def test_tail_shows_latest_records_in_time_order_across_stores(capsys, stores):
    code, out, err = pvtap(capsys, stores, "tail")
    assert code == 0 and err == ""
    assert out.splitlines() == [TAIL[1], TAIL[2], TAIL[3], TAIL[4]]
    assert pvtap(capsys, stores, "tail", "-n", "2")[1].splitlines() == [TAIL[3], TAIL[4]]
    assert pvtap(capsys, stores, "tail", "-n", "0")[1] == ""
    assert pvtap(capsys, stores, "tail", "--measurement", "alpha_rt", "--measurement", "enphase_event")[1] \
        .splitlines() == [TAIL[2], TAIL[4]]


def test_tail_defaults_to_the_20_latest(capsys, data_dir):
    with LocalStore.for_process(data_dir, "relay") as s:
        s.append([Record("alpha_rt", T0 + timedelta(seconds=10 * i), {}, {"i": i}, ALPHA) for i in range(25)])
    lines = pvtap(capsys, data_dir, "tail")[1].splitlines()
    assert [line.rsplit("=", 1)[1] for line in lines] == [str(i) for i in range(5, 25)]
    assert lines[0] == "2024-06-01T12:00:50Z  alpha_rt  -  i=5"


def test_tail_without_stores_names_the_directory(capsys, data_dir):
    code, out, err = pvtap(capsys, data_dir, "tail")
    assert code == 1 and out == ""
    assert f"no local store (*.sqlite) in {data_dir}" in err and "--data-dir" in err


def test_tail_rejects_bad_arguments(capsys, data_dir):
    for args in (["-n", "-1"], ["-n", "many"], ["--follow", "--interval", "0"]):
        with pytest.raises(SystemExit) as info:
            main(["--data-dir", str(data_dir), "tail", *args])
        assert info.value.code == 2
    assert "is not a count" in capsys.readouterr().err


class Follower:
    """`pvtap tail --follow` as a real process; its stdout and stderr lines arrive on queues."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PVTAP_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pvtap", "--data-dir", str(data_dir), "tail", "--follow", "--interval", "0.05",
             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: queue.Queue[str] = queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(stream, q), daemon=True)
                         for stream, q in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, into: queue.Queue) -> None:
        for line in stream:
            into.put(line.rstrip("\n"))

    def take(self, n: int, timeout: float = 10.0) -> list[str]:
        return [self.lines.get(timeout=timeout) for _ in range(n)]

    def interrupt(self) -> list[str]:
        """Ctrl-C; returns what was left unread on stdout (nothing, if nothing was repeated)."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(10) == 0
        for reader in self._readers:
            reader.join(10)
        return list(self.lines.queue)


def test_tail_follow_prints_each_new_record_once(stores):
    follower = Follower(stores, "-n", "2")
    try:
        assert follower.take(2) == [TAIL[3], TAIL[4]]
        r5 = Record("enphase_reading", T0 - timedelta(days=1), {"envoy": "SIM-ENVOY-1"}, {"energy_j": 5}, ENVOY)
        r6 = Record("enphase_reading", T0 + timedelta(hours=1), {"envoy": "SIM-ENVOY-1"}, {"energy_j": 6}, ENVOY)
        with LocalStore.for_process(stores, "enphase") as s:
            s.append([r5, r6])  # new arrivals print in arrival order, whatever their time
        assert follower.take(2) == [
            "2024-05-31T12:00:00Z  enphase_reading  envoy=SIM-ENVOY-1  energy_j=5",
            "2024-06-01T13:00:00Z  enphase_reading  envoy=SIM-ENVOY-1  energy_j=6"]
        (stores / "foxess.sqlite").touch()  # a producer starting: the file is there, its tables not yet
        # the follower (polling every 0.05 s) must meet the half-made store: its polls leave no trace to
        # wait on, so this is the scenario's duration, not a synchronisation (the take below waits)
        time.sleep(0.3)
        with LocalStore.for_process(stores, "foxess") as s:  # a store that did not exist at start
            s.append([Record("foxess_rt", T0, {"sn": "SIM-FOX-1"}, {"pv_w": 812.0}, Origin("foxess", "SIM-FOX-1"))])
        assert follower.take(1) == ["2024-06-01T12:00:00Z  foxess_rt  sn=SIM-FOX-1  pv_w=812.0"]
        assert follower.interrupt() == []  # nothing printed twice
    finally:
        follower.proc.kill()


def test_tail_follow_waits_for_the_first_store_and_filters(data_dir):
    follower = Follower(data_dir, "--measurement", "alpha_rt")
    try:
        assert follower.errors.get(timeout=10) == f"pvtap tail: waiting for records in {data_dir} (Ctrl-C to stop)"
        with LocalStore.for_process(data_dir, "relay") as s:
            s.append([R1, R2])
        assert follower.take(1) == [TAIL[2]]
        assert follower.interrupt() == []
    finally:
        follower.proc.kill()


# -- devices ------------------------------------------------------------------------------------

@pytest.fixture
def device_stores(data_dir: Path) -> tuple[Path, datetime]:
    now = now_utc().replace(microsecond=0)
    with LocalStore.for_process(data_dir, "enphase") as s:
        first = s.add_raw(RawPayload(ENVOY, "performance_report", b"1", now - timedelta(minutes=20)))
        s.add_raw(RawPayload(ENVOY, "performance_report", b"2", now - timedelta(minutes=5, seconds=10)))
        s.append([R1, R3, R4], raw_id=first)
        s.add_raw(RawPayload(Origin("enphase", "", "flow-9", "up"), "emu_report", b"?", now - timedelta(days=3)))
    with LocalStore.for_process(data_dir, "relay") as s:
        s.append([Record("alpha_rt", now - timedelta(hours=2, minutes=5), {}, {"soc": 50}, ALPHA)])
        s.add_raw(RawPayload(Origin("enphase", "SIM-ENVOY-1"), "frame", b"x", now - timedelta(hours=1)))
    return data_dir, now


def test_devices_table(capsys, device_stores):
    data_dir, now = device_stores
    code, out, err = pvtap(capsys, data_dir, "devices")
    assert code == 0 and err == ""
    stamp = lambda delta: (now - delta).isoformat().replace("+00:00", "Z")  # noqa: E731
    rows = [line.split() for line in out.splitlines()]
    assert rows == [
        ["VENDOR", "SERIAL", "LAST", "CONTACT", "(UTC)", "RECORDS", "RAW", "PAYLOADS"],
        ["alphaess", "SIM-ALPHA-1", stamp(timedelta(hours=2, minutes=5)), "2", "h", "ago", "1", "0"],
        ["enphase", "(unknown)", stamp(timedelta(days=3)), "3", "d", "ago", "0", "1"],
        ["enphase", "SIM-ENVOY-1", stamp(timedelta(minutes=5, seconds=10)), "5", "min", "ago", "3", "3"],
    ]


def test_devices_json(capsys, device_stores):
    data_dir, now = device_stores
    _, out, _ = pvtap(capsys, data_dir, "devices", "--json")
    devices = json.loads(out)
    for d in devices:
        assert d.pop("seconds_since_contact") == pytest.approx(
            (now - datetime.fromisoformat(d["last_contact"])).total_seconds(), abs=60)
    assert devices == [
        {"vendor": "alphaess", "serial": "SIM-ALPHA-1", "records": 1, "raw_payloads": 0,
         "last_contact": (now - timedelta(hours=2, minutes=5)).isoformat().replace("+00:00", "Z")},
        {"vendor": "enphase", "serial": "", "records": 0, "raw_payloads": 1,
         "last_contact": (now - timedelta(days=3)).isoformat().replace("+00:00", "Z")},
        {"vendor": "enphase", "serial": "SIM-ENVOY-1", "records": 3, "raw_payloads": 3,
         "last_contact": (now - timedelta(minutes=5, seconds=10)).isoformat().replace("+00:00", "Z")},
    ]


def test_export_names_what_exists_when_a_filter_names_nothing(stores):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PVTAP_")}

    def export(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pvtap", "--data-dir", str(stores), "export", *args],
                              capture_output=True, text=True, env=env, check=False)

    done = export("--measurement", "enphase_readings")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("pvtap export: no record of measurement 'enphase_readings'; measurements in the stores: "
                           "alpha_rt, enphase_event, enphase_reading\n")
    done = export("--device", "SIM-ENVOY-2", "--vendor", "foxess", "--format", "csv")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("pvtap export: no record of device 'SIM-ENVOY-2'; devices in the stores: SIM-ALPHA-1, "
                           "SIM-ENVOY-1; no record of vendor 'foxess'; vendors in the stores: alphaess, enphase\n")


def test_tail_filters_by_device_and_vendor(capsys, stores):
    assert pvtap(capsys, stores, "tail", "--device", "SIM-ENVOY-1", "-n", "2") == (0, f"{TAIL[3]}\n{TAIL[4]}\n", "")
    assert pvtap(capsys, stores, "tail", "--vendor", "alphaess") == (0, f"{TAIL[2]}\n", "")
    assert pvtap(capsys, stores, "tail", "--vendor", "fox") == (
        2, "", "pvtap tail: no record of vendor 'fox'; vendors in the stores: alphaess, enphase\n")


FOX_CONNECTION = "c-0000f0c5"


@pytest.fixture
def fox_store(data_dir: Path) -> Path:
    """A FoxESS H1 connection: its version frame comes before the frame that names its serial."""
    def origin(device: str) -> Origin:
        return Origin("foxess", device, FOX_CONNECTION, "up")

    with LocalStore.for_process(data_dir, "relay") as s:
        early = s.add_raw(RawPayload(origin(""), "frame", b"0x01", T0))
        s.append([Record("foxess_product_info", T0, {}, {"model": "H1-3.7-E"}, origin(""))], raw_id=early)
        named = s.add_raw(RawPayload(origin("H1SIM"), "frame", b"0x06", T0 + timedelta(seconds=1)))
        s.append([Record("foxess_module_info", T0 + timedelta(seconds=1), {"serial": "H1SIM"},
                         {"protocol_version": "H10600"}, origin("H1SIM"))], raw_id=named)
        s.add_raw(RawPayload(Origin("foxess", "", "udp-3334", "up"), "datagram", b"hb", T0 + timedelta(seconds=2)))
    return data_dir


def test_devices_lists_a_device_once_with_what_its_connection_sent_before_naming_it(capsys, fox_store):
    _, out, _ = pvtap(capsys, fox_store, "devices", "--json")
    assert [(d["vendor"], d["serial"], d["records"], d["raw_payloads"]) for d in json.loads(out)] == [
        ("foxess", "", 0, 1),  # a broadcast: no connection names a device
        ("foxess", "H1SIM", 2, 2)]
    code, out, _ = pvtap(capsys, fox_store, "export", "--device", "H1SIM", "--format", "json")
    assert code == 0
    assert [json.loads(line)["measurement"] for line in out.splitlines()] == ["foxess_product_info",
                                                                              "foxess_module_info"]


def test_devices_with_empty_stores(capsys, data_dir):
    LocalStore.for_process(data_dir, "enphase").close()
    assert pvtap(capsys, data_dir, "devices") == (0, f"no devices seen yet in {data_dir}\n", "")
    assert pvtap(capsys, data_dir, "devices", "--json") == (0, "[]\n", "")


@pytest.mark.parametrize("seconds, text", [
    (0, "0 s ago"), (59.9, "59 s ago"), (60, "1 min ago"), (7199, "119 min ago"), (7200, "2 h ago"),
    (47 * 3600, "47 h ago"), (48 * 3600, "2 d ago"), (-5, "in the future"),
])
def test_ago(seconds, text):
    assert ago(seconds) == text


# -- export -------------------------------------------------------------------------------------

def test_export_line_protocol(capsys, stores):
    code, out, err = pvtap(capsys, stores, "export")
    assert code == 0
    assert out.splitlines() == [LP[1], LP[2], LP[3], LP[4]]  # time order over both stores
    assert err == "exported 4 records (lp) to stdout in 0.0 s\n"


CSV_HEADER = ("time,measurement,code,envoy,eqid,serial,"
              "ac_voltage_v,code_field,description,energy_j,mode,power_w,producing,soc,temperature_c")


def test_export_csv(capsys, stores):
    code, out, _ = pvtap(capsys, stores, "export", "--format", "csv")
    assert code == 0
    assert out.splitlines() == [
        CSV_HEADER,
        "2024-06-01T12:00:00Z,enphase_reading,,SIM-ENVOY-1,SIM-MICRO-1.1,,239.4,,,61209,,,true,,41.0",
        '2024-06-01T12:01:00Z,alpha_rt,,,,SIM-ALPHA-1,,,,,"self-use, ""eco"" é",-1250.5,,57,',
        "2024-06-01T12:02:00Z,enphase_reading,,SIM-ENVOY-1,SIM-MICRO-2.1,,240.0,,,0,,,false,,39.5",
        "2024-06-01T12:03:00.500000Z,enphase_event,509,SIM-ENVOY-1,,,,509,Power on reset,,,,,,",
    ]
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows[1]["mode"] == 'self-use, "eco" é'


def test_export_json_keeps_types(capsys, stores):
    _, out, _ = pvtap(capsys, stores, "export", "--format", "json")
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs[0] == {"time": "2024-06-01T12:00:00Z", "time_ns": 1717243200000000000, "measurement": "enphase_reading",
                       "tags": {"envoy": "SIM-ENVOY-1", "eqid": "SIM-MICRO-1.1"},
                       "fields": {"ac_voltage_v": 239.4, "temperature_c": 41.0, "energy_j": 61209, "producing": True}}
    assert [type(v) for v in docs[0]["fields"].values()] == [float, float, int, bool]
    assert [(d["measurement"], d["time_ns"]) for d in docs] == [(r.measurement, r.time_ns) for r in (R1, R2, R3, R4)]
    assert docs[1]["fields"] == R2.fields and docs[3]["time"] == "2024-06-01T12:03:00.500000Z"
    assert 'self-use, \\"eco\\" é' in out.splitlines()[1]  # UTF-8 as is, not \u escapes


@pytest.mark.parametrize("args, expected", [
    (["--since", "2024-06-01T12:01:00Z"], [2, 3, 4]),  # inclusive
    (["--until", "2024-06-01T12:02:00Z"], [1, 2]),  # exclusive
    (["--since", "2024-06-01T14:01:00+02:00", "--until", "2024-06-01T12:03:00"], [2, 3]),  # offset; naive = UTC
    (["--since", "2024-06-01"], [1, 2, 3, 4]),
    (["--measurement", "enphase_reading"], [1, 3]),
    (["--measurement", "alpha_rt", "--measurement", "enphase_event"], [2, 4]),
    (["--measurement", "enphase_reading", "--since", "2024-06-01T12:00:00.000001Z"], [3]),
    (["--vendor", "alphaess"], [2]),
    (["--vendor", "alphaess", "--vendor", "enphase"], [1, 2, 3, 4]),
    (["--device", "SIM-ENVOY-1"], [1, 3, 4]),
    (["--device", "SIM-ENVOY-1", "--measurement", "enphase_event"], [4]),
    (["--device", "SIM-ALPHA-1", "--vendor", "enphase"], []),  # both exist, no record is both
    (["--measurement", "alpha_rt", "--until", "2024-06-01T12:00:30Z"], []),  # exists, not in that time
])
def test_export_filters(capsys, stores, args, expected):
    code, out, err = pvtap(capsys, stores, "export", *args)
    assert code == 0
    assert out.splitlines() == [LP[r] for r in expected]
    assert err.startswith(f"exported {len(expected)} records (lp) to stdout")


def test_export_relative_times(capsys, data_dir):
    now = now_utc()
    records = [Record("m", now - timedelta(hours=h), {}, {"h": h}, ALPHA) for h in (26, 3, 1)]
    with LocalStore.for_process(data_dir, "relay") as s:
        s.append(records)
    out = lambda *args: [json.loads(x)["fields"]["h"] for x in  # noqa: E731
                         pvtap(capsys, data_dir, "export", "--format", "json", *args)[1].splitlines()]
    assert out("--since", "2h") == [1]
    assert out("--since", "1d") == [3, 1]
    assert out("--since", "2d", "--until", "90m") == [26, 3]
    assert out("--since", "4h", "--until", "150min") == [3]


def test_parse_when():
    now = datetime(2024, 6, 8, 12, tzinfo=UTC)
    assert parse_when("7d", now) == datetime(2024, 6, 1, 12, tzinfo=UTC)
    assert parse_when("1.5h", now) == datetime(2024, 6, 8, 10, 30, tzinfo=UTC)
    assert parse_when("90s", now) == datetime(2024, 6, 8, 11, 58, 30, tzinfo=UTC)
    assert parse_when("1w", now) == datetime(2024, 6, 1, 12, tzinfo=UTC)
    assert parse_when("2024-06-01T12:00:00Z") == datetime(2024, 6, 1, 12, tzinfo=UTC)
    assert parse_when("2024-06-01 14:00+02:00") == datetime(2024, 6, 1, 12, tzinfo=UTC)
    for bad in ("yesterday", "7 days", "-2h", "2024-13-01"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a time"):
            parse_when(bad, now)


def test_export_argument_errors(capsys, stores):
    with pytest.raises(SystemExit) as info:
        main(["--data-dir", str(stores), "export", "--since", "yesterday"])
    assert info.value.code == 2
    assert "argument --since: 'yesterday' is not a time" in capsys.readouterr().err
    code, out, err = pvtap(capsys, stores, "export", "--since", "2024-06-02", "--until", "2024-06-01")
    assert (code, out) == (2, "")
    assert "--since 2024-06-02T00:00:00Z is not before --until 2024-06-01T00:00:00Z" in err
    code, _, err = pvtap(capsys, stores.parent / "elsewhere", "export")
    assert code == 1 and "no local store" in err
    missing = stores.parent / "no-such-dir" / "out.lp"
    code, _, err = pvtap(capsys, stores, "export", "-o", str(missing))
    assert code == 1 and f"pvtap export: cannot write {missing}: No such file or directory" in err


def test_export_to_file_with_progress(capsys, stores, tmp_path):
    target = tmp_path / "out" / "all.csv"
    target.parent.mkdir()
    code, out, err = pvtap(capsys, stores, "export", "--format", "csv", "-o", str(target), "--progress")
    assert code == 0 and out == ""
    assert target.read_text(encoding="utf-8").splitlines()[0] == CSV_HEADER
    assert len(target.read_text(encoding="utf-8").splitlines()) == 5
    assert os.listdir(target.parent) == ["all.csv"]  # no partial file left behind
    assert "exporting: 4/4 (100%)" in err
    assert err.rstrip().endswith(f"exported 4 records (csv) to {target} in 0.0 s")
    # without --progress and with stderr not a terminal: only the count
    pvtap(capsys, stores, "export", "-o", str(target))
    assert target.read_text(encoding="utf-8").splitlines() == [LP[1], LP[2], LP[3], LP[4]]


def test_export_failure_leaves_no_file(capsys, stores, tmp_path, monkeypatch):
    target = tmp_path / "all.lp"
    target.write_text("previous export\n")

    def broken(record):
        raise RuntimeError("disk full")

    monkeypatch.setattr("pvtap.cli.export.to_line", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["--data-dir", str(stores), "export", "-o", str(target)])
    assert os.listdir(tmp_path) == ["all.lp", "data"]
    assert target.read_text() == "previous export\n"  # the old file is untouched


def test_export_streams(capsys, data_dir, tmp_path):
    """3,000 records (600 kB of JSON) go out within a small, constant amount of memory: nothing
    is loaded whole (the records alone would take about 3 MB as Python objects)."""
    with LocalStore.for_process(data_dir, "enphase") as s:
        for batch in range(3):
            s.append([Record("enphase_reading", T0 + timedelta(seconds=batch * 1000 + i), {"eqid": f"SIM-{i % 8}"},
                             {"energy_j": i, "note": "x" * 100}, ENVOY) for i in range(1000)])
    pvtap(capsys, data_dir, "export", "--format", "json", "-o", str(tmp_path / "warm.json"))  # imports done
    tracemalloc.start()
    try:
        code, _, err = pvtap(capsys, data_dir, "export", "--format", "json", "-o", str(tmp_path / "all.json"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 0 and err.startswith("exported 3,000 records (json)")
    size = (tmp_path / "all.json").stat().st_size
    assert size > 600_000
    assert peak < 300_000, f"peak {peak:,} bytes for a {size:,}-byte export"


# -- export → a real InfluxDB 1.6 ----------------------------------------------------------------

TRICKY_FIELDS: dict[str, FieldValue] = {
    "quotes": 'say "hi", it\'s = fine',
    "backslash": "C:\\pv\\log\\",
    "unicode": "Überschuss ☀ 日本",
    "newline": "line one\nline two\ttabbed",
    "empty": "",
    "looks_numeric": "12",
    "int64_max": 2**63 - 1,
    "int64_min": -(2**63),
    "zero": 0,
    "tenth": 0.1,
    "whole_float": 41.0,
    "negative": -1250.5,
    "tiny": 5e-324,
    "huge": 1.7976931348623157e308,
    "big_whole_float": 1e16,
    "on": True,
    "off": False,
}
INFLUX_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string"}


@pytest.mark.slow
def test_exported_line_protocol_reads_back_exactly_from_influxdb(capsys, data_dir, tmp_path):
    from .servers import Influxd

    moment = datetime(2024, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
    tricky = Record("pv power,total é", moment, {"site": "dach süd, west=1", "serial": "SIM-1", "note": "a\\b"},
                    TRICKY_FIELDS, ENVOY)
    plain = [Record("alpha_rt", T0 + timedelta(seconds=10 * i), {"serial": "SIM-ALPHA-1"},
                    {"soc": 50 + i, "power_w": 100.0 * i}, ALPHA) for i in range(3)]
    with LocalStore.for_process(data_dir, "enphase") as s:
        s.append([tricky, R1, R3])
    with LocalStore.for_process(data_dir, "relay") as s:
        s.append([*plain, R2])
    export = tmp_path / "export.lp"
    assert pvtap(capsys, data_dir, "export", "-o", str(export))[0] == 0

    with Influxd(tmp_path) as db:
        status, body = db.write(export.read_bytes())
        assert (status, body) == (204, "")
        assert db.measurements() == ["alpha_rt", "enphase_reading", "pv power,total é"]

        (point,) = db.points("pv power,total é")
        assert point.pop("time") == tricky.time_ns
        assert {k: point.pop(k) for k in tricky.tags} == dict(tricky.tags)
        assert point == TRICKY_FIELDS
        types = db.field_types("pv power,total é")
        assert types == {k: INFLUX_TYPES[type(v)] for k, v in TRICKY_FIELDS.items()}

        readings = db.points("enphase_reading")
        assert [(p["time"], p["eqid"], p["ac_voltage_v"], p["temperature_c"], p["energy_j"], p["producing"])
                for p in readings] == [
            (R1.time_ns, "SIM-MICRO-1.1", 239.4, 41.0, 61209, True),
            (R3.time_ns, "SIM-MICRO-2.1", 240.0, 39.5, 0, False)]
        assert db.field_types("enphase_reading") == {"ac_voltage_v": "float", "energy_j": "integer",
                                                     "producing": "boolean", "temperature_c": "float"}
        alpha = db.points("alpha_rt")
        assert [(p["time"], p["soc"], p["power_w"], p["mode"]) for p in alpha] == [
            (plain[0].time_ns, 50, 0.0, None), (plain[1].time_ns, 51, 100.0, None),
            (plain[2].time_ns, 52, 200.0, None), (R2.time_ns, 57, -1250.5, 'self-use, "eco" é')]
        # a filter on an escaped tag value finds the point
        (result,) = db.query("""SELECT "unicode" FROM "pv power,total é" WHERE "site" = 'dach süd, west=1'""")
        assert result["series"][0]["values"] == [[tricky.time_ns, "Überschuss ☀ 日本"]]


# -- replay ----------------------------------------------------------------------------------------

def dump(path: Path) -> list[str]:
    """Every table's rows, as SQL, in id order: equal dumps mean byte-identical rows."""
    db = sqlite3.connect(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def rows(path: Path, sql: str, *args: object) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def report_payload(start: int, micros: int = 2) -> RawPayload:
    xml = build_report_xml(micros=micros, start=start)
    return RawPayload(Origin("enphase", "", f"flow-{start}", "up"), "performance_report", encode_body(xml),
                      T0, {"content_type": "application/x-deflate", "path": "/emu_reports/performance_report"})


@pytest.fixture
def recorded(data_dir: Path) -> Path:
    """An enphase store filled the way the addon fills it: three simulated reports, one body
    that does not inflate (kept raw with its error), and a payload of a protocol nobody decodes."""
    with LocalStore.for_process(data_dir, "enphase") as store:
        ingest = Ingest(store, Privacy())
        for start in (1717243200, 1717243200 + 3600, 1717243200 + 7200):
            ingest.process(report_payload(start))
        ingest.process(RawPayload(Origin("enphase", "", "flow-x", "up"), "performance_report", b"\x78\x9cgarbage",
                                  T0, {"content_type": "application/x-deflate"}))
        store.add_raw(RawPayload(Origin("sunnyboy", "SIM-SMA-1"), "frame", b"\x00\x01", T0))
        assert ingest.counts.decode_errors == 1
    return data_dir / "enphase.sqlite"


def test_replay_with_the_same_decoders_changes_nothing_twice(capsys, recorded):
    before = dump(recorded)
    records = rows(recorded, "SELECT COUNT(*) FROM records")[0][0]
    assert records > 30
    for _ in range(2):
        code, out, err = pvtap(capsys, recorded.parent, "replay")
        assert code == 0 and err == ""
        assert out == (f"enphase.sqlite: 5 payloads: 0 changed, 4 unchanged, 1 decode errors; records {records} -> "
                       f"{records}; 1 skipped (no decoder for sunnyboy)\n")
        assert dump(recorded) == before


def test_replay_after_a_decoder_change_updates_records(capsys, recorded, monkeypatch):
    original = enphase.decode_raw
    before = rows(recorded, "SELECT id, raw_id, fields FROM records ORDER BY id")
    errors_before = rows(recorded, "SELECT id, decode_error FROM raw ORDER BY id")
    first_report = errors_before[0][0]

    def newer(raw):  # a decoder fix: intervals gain a field, the first report now fails
        records = original(raw)
        if raw.origin.connection == "flow-1717243200":
            raise enphase.ReportError("stricter check")
        return [Record(r.measurement, r.time, r.tags, {**r.fields, "fixed": True}, r.origin)
                if r.measurement == "enphase_interval" else r for r in records]

    monkeypatch.setattr(enphase, "decode_raw", newer)
    code, out, _ = pvtap(capsys, recorded.parent, "replay")
    assert code == 0
    per_report = len(before) // 3
    assert out == (f"enphase.sqlite: 5 payloads: 3 changed, 1 unchanged, 2 decode errors; records {len(before)} -> "
                   f"{2 * per_report}; 1 skipped (no decoder for sunnyboy)\n")
    after = rows(recorded, "SELECT id, raw_id, fields FROM records ORDER BY id")
    assert all(raw_id != first_report for _, raw_id, _ in after)
    intervals = rows(recorded, "SELECT fields FROM records WHERE measurement='enphase_interval'")
    assert len(intervals) == 4 and all(json.loads(f)["fixed"] is True for (f,) in intervals)
    assert min(i for i, *_ in after) > max(i for i, *_ in before)  # rewritten rows get new ids
    assert rows(recorded, "SELECT decode_error FROM raw WHERE id=?", first_report) == [
        ("ReportError: stricter check",)]

    settled = dump(recorded)
    assert pvtap(capsys, recorded.parent, "replay")[1].startswith(
        "enphase.sqlite: 5 payloads: 0 changed, 4 unchanged, 2 decode errors")
    assert dump(recorded) == settled

    monkeypatch.setattr(enphase, "decode_raw", original)  # the fix reverted: back to the first decode
    code, out, _ = pvtap(capsys, recorded.parent, "replay")
    assert out.startswith(f"enphase.sqlite: 5 payloads: 3 changed, 1 unchanged, 1 decode errors; records "
                          f"{2 * per_report} -> {len(before)}")
    assert [(raw_id, fields) for _, raw_id, fields in rows(recorded, "SELECT id, raw_id, fields FROM records "
                                                                     "ORDER BY raw_id, id")] == \
        [(raw_id, fields) for _, raw_id, fields in sorted(before, key=lambda r: (r[1], r[0]))]
    assert rows(recorded, "SELECT id, decode_error FROM raw ORDER BY id") == errors_before


def test_replay_store_selection_and_progress(capsys, recorded, data_dir):
    with LocalStore.for_process(data_dir, "relay") as s:
        s.append([R2])
    code, out, err = pvtap(capsys, data_dir, "replay", "--store", "relay", "--progress")
    assert code == 0
    assert out == "relay.sqlite: 0 payloads: 0 changed, 0 unchanged, 0 decode errors; records 1 -> 1\n"
    code, out, err = pvtap(capsys, data_dir, "replay", "--progress")
    assert out.splitlines()[-1].startswith("total: 5 payloads: 0 changed, 4 unchanged, 1 decode errors; records ")
    assert "replaying enphase.sqlite: 5/5 (100%)" in err
    code, out, err = pvtap(capsys, data_dir, "replay", "--store", "nonesuch")
    assert code == 1 and out == ""
    assert "no store named nonesuch" in err and "stores there: enphase, relay" in err


def test_replay_interrupted_keeps_what_it_did(capsys, recorded, monkeypatch):
    original = enphase.decode_raw
    calls = []

    def changed_then_interrupted(raw):
        calls.append(raw)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [Record(r.measurement, r.time, r.tags, {**r.fields, "v2": 1}, r.origin) for r in original(raw)]

    monkeypatch.setattr(enphase, "decode_raw", changed_then_interrupted)
    code, out, err = pvtap(capsys, recorded.parent, "replay")
    assert (code, out) == (130, "")
    assert "enphase.sqlite: interrupted after 2 payloads: 1 changed, 0 unchanged" in err
    assert "run replay again to finish" in err
    first, second = (raw_id for (raw_id,) in rows(recorded, "SELECT id FROM raw ORDER BY id LIMIT 2"))
    assert all("v2" in json.loads(f) for (f,) in rows(recorded, "SELECT fields FROM records WHERE raw_id=?", first))
    assert not any("v2" in json.loads(f) for (f,) in rows(recorded, "SELECT fields FROM records WHERE raw_id=?",
                                                          second))
