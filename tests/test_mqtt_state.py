"""What becomes a Home Assistant sensor, and how device state is folded: exact values from decoded
reference vectors, counters that never go down, Enphase's running energy total, discovery payloads."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from pvtap.decode import alphaess, enphase
from pvtap.mqtt.catalog import DeviceRef, extract, sensors_of
from pvtap.mqtt.discovery import Topics, bridge_config, clearing, sensor_config
from pvtap.mqtt.state import DeviceState, fold
from pvtap.privacy import Privacy
from pvtap.records import UP, Origin, RawPayload, Record
from tests.alphaess_support import VECTORS
from tests.enphase_support import RECEIVED, VECTOR_1, VECTOR_2, request_raw

T0 = datetime(2024, 6, 21, 12, 0, tzinfo=UTC)
TOPICS = Topics("pvtap", "homeassistant", "relay")
BATTERY = DeviceRef("alphaess", "AL0123456789012")


def record(measurement: str, fields: dict, tags: dict | None = None, at: datetime = T0) -> Record:
    protocol = measurement.partition("_")[0]
    return Record(measurement, at, tags or {"serial": BATTERY.serial}, fields, Origin(protocol))


def folded(*records: Record) -> dict[DeviceRef, DeviceState]:
    """The devices after folding `records` as one step of the publisher (in record-time order)."""
    devices: dict[DeviceRef, DeviceState] = {}
    readings = []
    for r in records:
        found = extract(r)
        for facts in found.facts:
            devices.setdefault(facts.device, DeviceState(facts.device)).learn(facts)
        readings += found.readings
    fold(devices, readings)
    return devices


# -- the catalog, on decoded reference vectors ---------------------------------------------------

def test_alphaess_realtime_vector_gives_the_curated_powers_and_soc():
    vector = next(v for v in VECTORS if v.name.startswith("realtime"))
    raw = RawPayload(Origin("alphaess", "", "c1", UP), "frame", vector.frame, RECEIVED, {})
    (rec,) = alphaess.decode_raw(alphaess.redact_raw(raw, Privacy()))
    state = folded(rec)[BATTERY]
    time = rec.time.isoformat(timespec="seconds").replace("+00:00", "Z")
    assert state.payload() == {"time": time, "battery_power": 539.44, "grid_power": -4.0, "load_power": 420.0,
                               "pv_power": 0.0, "soc": 38.0}


def test_enphase_vector_2_gives_power_energy_and_readings_per_microinverter():
    records = enphase.decode_raw(request_raw(VECTOR_2))
    devices = folded(*records)
    micro = devices[DeviceRef("enphase", "999900000001")]
    # stats 60000 J over 300 s: 200 W, 16.67 Wh; reading 240 V AC, 32 V DC, 40 °C
    assert micro.payload() == {"time": "2023-11-14T22:15:00Z", "power": 200.0, "energy": round(60000 / 3600, 6),
                               "ac_voltage": 240.0, "dc_voltage": 32.0, "temperature": 40.0}
    assert micro.kind == "Microinverter"


def test_enphase_vector_1_names_the_envoy_and_its_microinverter_model():
    devices = folded(*enphase.decode_raw(request_raw(VECTOR_1)))
    envoy = devices[DeviceRef("enphase", "123456115374")]
    assert (envoy.kind, envoy.model, envoy.firmware) == ("Envoy", "800-00024-r04", "R3.0.0 (9720d7)")
    assert envoy.payload() == {"time": "2012-02-13T11:56:42Z", "last_report": "2012-02-13T11:56:42Z"}
    micro = devices[DeviceRef("enphase", "123456105321")]
    assert (micro.model, micro.parent) == ("800-00103-r05", envoy.device)
    assert micro.values == {}  # device state only: nothing to publish for it yet


def test_a_field_that_did_not_parse_leaves_its_sum_out():
    state = folded(record("alphaess_realtime", {"Ppv1": 100.0, "Ppv2_text": "n/a", "Pbat": 5.0}))[BATTERY]
    assert "pv_power" not in state.values and state.values["battery_power"].value == 5.0


def test_foxess_layouts():
    m1 = record("foxess_telemetry", {"ac_power_w": 310, "pv1_power_w": 160, "pv1_voltage_v": 33.5,
                                     "pv2_power_w": 150, "pv2_voltage_v": 32.0, "temperature_c": 41.5,
                                     "generation_total_kwh": 1234.5, "export_power_w": -3, "sequence": 7},
                {"serial": "M1SIM0001", "layout": "m1"})
    state = folded(m1)[DeviceRef("foxess", "M1SIM0001")]
    assert state.payload() == {"time": "2024-06-21T12:00:00Z", "power": 310, "pv1_power": 160, "pv1_voltage": 33.5,
                               "pv2_power": 150, "pv2_voltage": 32.0, "temperature": 41.5, "energy": 1234.5}
    assert state.sensors["energy"].state_class == "total_increasing" and state.sensors["energy"].unit == "kWh"


# -- folding ---------------------------------------------------------------------------------------

def test_a_late_record_never_replaces_a_newer_value():
    new = record("alphaess_realtime", {"Pbat": 100.0}, at=T0)
    old = record("alphaess_backfill", {"Pbat": -50.0}, at=T0 - timedelta(minutes=5))
    state = folded(new, old)[BATTERY]
    assert state.values["battery_power"].value == 100.0


def counter(*values: float, step: timedelta = timedelta(minutes=5)) -> DeviceState:
    records = [record("alphaess_extended", {"EpvTotal": v}, at=T0 + i * step) for i, v in enumerate(values)]
    return folded(*records)[BATTERY]


def test_a_counter_never_goes_down():
    state = counter(100.0, 100.5, 99.0, 101.0)  # 99.0: a wrong value
    assert state.values["pv_energy"].value == 101.0
    assert state.refused == 1


def test_a_counter_never_jumps_beyond_what_any_device_could_produce():
    # 5 minutes at 200 kW at most is 16.7 kWh: a jump of 10000 kWh is a misread word
    state = counter(100.0, 10100.0, 100.2)
    assert state.values["pv_energy"].value == 100.2 and state.refused == 1


def test_a_counter_reset_is_taken_once_confirmed():
    state = counter(5000.0, 3.0, 3.1, 3.2, 3.3)  # the device was replaced: from 3.2 on it is believed
    assert state.values["pv_energy"].value == 3.3
    assert state.refused == 2


def test_a_counter_value_older_than_the_published_one_is_ignored():
    state = folded(record("alphaess_extended", {"EpvTotal": 10.0}, at=T0),
                   record("alphaess_backfill", {"EpvTotal": 9.0}, at=T0 - timedelta(minutes=1)))[BATTERY]
    assert state.values["pv_energy"].value == 10.0 and state.refused == 0


def interval(end: datetime, joules: int, duration: int = 300, eqid: str = "999900000001.1") -> Record:
    return Record("enphase_interval", end, {"envoy": "999900000000", "eqid": eqid},
                  {"interval_duration_s": duration, "energy_j": joules, "energy_wh": joules / 3600,
                   "avg_power_w": joules / duration}, Origin("enphase"))


def test_enphase_energy_is_a_running_total_that_counts_each_interval_once():
    micro = DeviceRef("enphase", "999900000001")
    first, second = interval(T0, 36000), interval(T0 + timedelta(minutes=5), 72000)
    state = folded(first, second, second, first)[micro]  # sent again (a retried report)
    assert state.values["energy"].value == (36000 + 72000) / 3600
    assert state.values["power"].value == 240.0


def test_enphase_roll_up_counts_once_and_gives_no_power():
    micro = DeviceRef("enphase", "999900000001")
    end = T0 + timedelta(hours=6)
    rollup, last = interval(end, 3_600_000, duration=6 * 3600), interval(end, 36000)
    state = folded(last, rollup)[micro]  # the same end: the roll-up covers the 5 minutes
    assert state.values["energy"].value == 1000.0
    assert state.values["power"].value == 120.0  # the 5-minute interval's, not the roll-up's day average
    state = folded(interval(end - timedelta(hours=1), 3600), rollup)[micro]
    assert state.values["energy"].value == 1.0  # the roll-up overlaps what was counted: skipped


def test_second_channel_gets_its_own_sensors():
    state = folded(interval(T0, 3600, eqid="999900000001.2"))[DeviceRef("enphase", "999900000001")]
    assert set(state.values) == {"power_ch2", "energy_ch2"}


def test_state_survives_json_round_trip():
    state = counter(100.0, 99.0)  # one suspect pending
    again = DeviceState.from_json(state.device, json.loads(json.dumps(state.to_json())))
    assert again.to_json() == state.to_json()


# -- discovery ------------------------------------------------------------------------------------

#: what Home Assistant's MQTT sensor needs, and what pvtap promises in each config
REQUIRED = {"name", "unique_id", "state_topic", "value_template", "availability", "device", "origin"}


def test_sensor_configs_have_what_home_assistant_requires():
    devices = folded(*enphase.decode_raw(request_raw(VECTOR_2)),
                     record("alphaess_extended", {"Pbat": 1.0, "SOC": 50.0, "EpvTotal": 10.0, "Einput": 1.0}))
    ids = set()
    for state in devices.values():
        for sensor in state.sensors.values():
            config = sensor_config(TOPICS, state, sensor)
            assert set(config) >= REQUIRED, sensor.key
            assert config["state_topic"] == f"pvtap/{state.device.vendor}/{state.device.serial}/state"
            assert config["value_template"] == f"{{{{ value_json.{sensor.key} }}}}"
            assert [a["topic"] for a in config["availability"]] == [
                "pvtap/bridge/relay/availability", f"pvtap/{state.device.vendor}/{state.device.serial}/availability"]
            assert config["device"]["identifiers"] == [f"pvtap_{state.device.vendor}_{state.device.serial}"]
            assert config["device"]["serial_number"] == state.device.serial
            if sensor.counter:
                assert (config["device_class"], config["state_class"]) == ("energy", "total_increasing")
                assert config["unit_of_measurement"] in ("Wh", "kWh")
            ids.add(config["unique_id"])
    assert len(ids) == sum(len(s.sensors) for s in devices.values())


def test_bridge_config_and_clearing():
    assert bridge_config(TOPICS)["state_topic"] == "pvtap/bridge/relay/availability"
    topics = [t for t, payload in clearing(TOPICS, BATTERY, set()) if payload is None]
    assert f"homeassistant/sensor/pvtap_alphaess_{BATTERY.serial}/pv_energy/config" in topics
    assert len(topics) == len(sensors_of("alphaess")) + 2
