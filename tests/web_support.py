"""Stores with known contents for the web view's tests: an AlphaESS battery behind the relay and
an Envoy with two microinverters behind the addon, as the decoders store them (placeholders only)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from pvtap.ingest.framing import ConnectionRecord
from pvtap.records import DOWN, UP, Origin, RawPayload, Record, to_ns
from pvtap.store.local import LocalStore

ALPHA = "ALSIM0000000001"
ENVOY = "999900000000"
MICROS = ("999900000001.1", "999900000002.1")


def alpha_fields(i: int) -> dict[str, float | str]:
    """Realtime fields of frame i: PV 1000+10i (Ppv1+Ppv2+PmeterDC), SoC 50+i/2."""
    return {"Ppv1": 600.0 + 10 * i, "Ppv2": 390.0, "PmeterDC": 10.0, "PrealL1": 500.0, "PrealL2": 0.0, "PrealL3": 0.0,
            "PmeterL1": 120.0, "PmeterL2": -20.0, "PmeterL3": 0.0, "Pbat": -300.0 - i, "SOC": 50 + i / 2,
            "device_time": "2024-06-01T12:00:00"}


def add_alpha(store: LocalStore, start: datetime, count: int, every: timedelta = timedelta(seconds=10),
              serial: str = ALPHA, first: int = 0) -> list[Record]:
    """`count` realtime frames, each archived with its record (and the cloud's ack, down)."""
    origin = Origin("alphaess", serial, "c1", UP)
    records = []
    for i in range(first, first + count):
        when = start + i * every
        record = Record("alphaess_realtime", when, {"serial": serial}, alpha_fields(i), origin)
        store.add_raw(RawPayload(origin, "frame", b"\x01\x01\x10up", when), records=[record])
        store.add_raw(RawPayload(Origin("alphaess", serial, "c1", DOWN), "frame", b"\x01\x02\x10ack", when))
        records.append(record)
    return records


def add_alpha_identity(store: LocalStore, when: datetime, serial: str = ALPHA) -> None:
    origin = Origin("alphaess", serial, "c1", DOWN)
    store.add_raw(RawPayload(origin, "frame", b"\x01\x02\x03cfg", when), records=[Record(
        "alphaess_device", when, {"serial": serial, "source": "cloud"},
        {"Minv": "SMILE5-INV", "Mbat": "SMILE5-BAT", "EMSVersion": "SIM-EMS-1.0", "InvVersion": "SIM-INV-1.0"},
        origin)])


def add_connection(store: LocalStore, when: datetime, action: str, cloud_error: str = "",
                   serial: str = ALPHA) -> None:
    record = ConnectionRecord(id="c1", protocol="alphaess", listener="0.0.0.0:7777", policy="auto", started=when,
                              peer="-", upstream="" if cloud_error else "192.0.2.1:7777", action=action,
                              outcome="device_closed", cloud_error=cloud_error, device=serial)
    store.append([record.to_record(store_peer=False)])


def add_envoy(store: LocalStore, end: datetime, powers: tuple[float, float], temperatures: tuple[float, float],
              answered_locally: bool = False, cloud_unreachable: str = "") -> None:
    """One performance report: an interval and a reading per microinverter ending at `end`, and the answer."""
    origin = Origin("enphase", ENVOY, "flow-1", UP)
    tags = {"envoy": ENVOY}
    records = [Record("enphase_envoy", end, tags, {"part_num": "800-00069-r05", "sw_version": "R3.12.34 (sim)"},
                      origin)]
    for eqid, power, temperature in zip(MICROS, powers, temperatures):
        records.append(Record("enphase_interval", end, {**tags, "eqid": eqid},
                              {"interval_duration_s": 300, "energy_wh": power * 300 / 3600, "avg_power_w": power},
                              origin))
        records.append(Record("enphase_reading", end, {**tags, "eqid": eqid},
                              {"temperature_c": temperature, "ac_voltage_v": 239.9}, origin))
    store.add_raw(RawPayload(origin, "performance_report", b"<perf_report/>", end), records=records)
    meta: dict[str, str | int | bool] = {"status_code": 200}
    if answered_locally:
        meta["answered_locally"] = True
    if cloud_unreachable:
        meta["cloud_unreachable"] = cloud_unreachable
    store.add_raw(RawPayload(Origin("enphase", ENVOY, "flow-1", DOWN), "performance_report_response", b"ok",
                             end, meta=meta))


def stores(data_dir: Path) -> tuple[LocalStore, LocalStore]:
    return LocalStore.for_process(data_dir, "relay"), LocalStore.for_process(data_dir, "enphase")


def ns(moment: datetime) -> int:
    return to_ns(moment)
