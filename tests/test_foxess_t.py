"""FoxESS T-series (foxess.md §3.5) and the M1/Q1 four-string rule (issue 10, items 2 and 3).

Frames are built from the §3.5 layout by the simulator's `t_realtime_payload` (both payload
versions) and must decode to the values they were built from: directly, and through the real
relay at every split offset of the frame, with a stand-in cloud receiving every byte unchanged.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from proxy_tcp import relay_running
from pvtap.config import ListenerConfig
from pvtap.decode import foxess
from pvtap.decode.foxess import build_frame, decode_raw, decode_t_realtime, redact_raw
from pvtap.privacy import Privacy
from pvtap.records import UP, Origin, RawPayload
from pvtap.simulate.foxess_cloud import FoxCloud
from pvtap.simulate.foxess_m1 import M1Telemetry, product_info_payload, telemetry_payload
from pvtap.simulate.foxess_t import TRealtime, run_bridge, t_realtime_payload
from pvtap.store.local import LocalStore
from tests.waiting import until

RECEIVED = datetime(2024, 6, 21, 12, 0, tzinfo=UTC)

VALUES = TRealtime(
    grid_power_w=-1234, generation_power_w=8765, load_power_w=4321,
    phases=[(231.4, 12.7, 50.01, 2921), (229.8, 12.6, 49.99, 2900), (232.0, 12.9, 50.02, 2944)],
    pv=[(612.3, 4.1), (598.7, 4.0), (577.5, 3.2), (0.0, 0.0)],
    boost_temperature_c=41, inverter_temperature_c=-3, ambient_temperature_c=24,
    today_yield_kwh=23.4, total_yield_kwh=123_456.7,
    fault_words=(0x00000001, 0x80000000, 0, 0xDEADBEEF, 0, 0, 7, 0xFFFFFFFF))


def expected(t: TRealtime) -> dict:
    """The record's fields, computed from the values (not from the decoder)."""
    fields: dict = {"grid_power_w": t.grid_power_w, "generation_power_w": t.generation_power_w,
                    "load_power_w": t.load_power_w}
    for phase, (volts, amps, hertz, watts) in zip("rst", t.phases):
        fields.update({f"phase_{phase}_voltage_v": volts, f"phase_{phase}_current_a": amps,
                       f"phase_{phase}_frequency_hz": hertz, f"phase_{phase}_power_w": watts})
    for n, (volts, amps) in enumerate(t.pv, start=1):
        fields.update({f"pv{n}_voltage_v": volts, f"pv{n}_current_a": amps, f"pv{n}_power_w": volts * amps})
    fields.update({"boost_temperature_c": float(t.boost_temperature_c),
                   "inverter_temperature_c": float(t.inverter_temperature_c),
                   "ambient_temperature_c": float(t.ambient_temperature_c),
                   "today_yield_kwh": t.today_yield_kwh, "total_yield_kwh": t.total_yield_kwh})
    fields.update({f"fault_word_{i}": word for i, word in enumerate(t.fault_words, start=1)})
    return fields


def frame_raw(frame: bytes, meta: dict | None = None) -> RawPayload:
    return RawPayload(Origin("foxess", "", "c1", UP), "frame", frame, RECEIVED, meta or {})


@pytest.mark.parametrize("version, length, frame_length", [(0, 152, 165), (1, 158, 171)])
def test_both_payload_versions_decode_to_the_values_they_were_built_from(version, length, frame_length):
    payload = t_realtime_payload(VALUES, version)
    frame = build_frame(foxess.REALTIME, payload, stamp=0x6650A2C0)
    assert (len(payload), len(frame)) == (length, frame_length)
    if version:  # the newer firmware inserts 6 bytes at the start; the rest is the version-0 block
        assert payload[6:] == t_realtime_payload(VALUES, 0)
    assert decode_t_realtime(payload) == pytest.approx(expected(VALUES))
    (record,) = decode_raw(redact_raw(frame_raw(frame, {"serial": "TSIMULATED00001"}), Privacy()))
    assert record.measurement == "foxess_t_realtime"
    assert record.tags == {"serial": "TSIMULATED00001", "payload_version": str(version)}
    assert dict(record.fields) == pytest.approx(expected(VALUES))


def test_fault_words_and_yields_are_read_at_their_offsets():
    block = bytearray(t_realtime_payload(VALUES, 0))
    assert block[116:148] == b"".join(w.to_bytes(4, "big") for w in VALUES.fault_words)  # frame bytes 125–156
    assert block[60:62] == (234).to_bytes(2, "big") and block[62:66] == (1_234_567).to_bytes(4, "big")
    fields = decode_t_realtime(bytes(block))
    assert (fields["fault_word_2"], fields["fault_word_4"], fields["fault_word_8"]) == (0x80000000, 0xDEADBEEF,
                                                                                       0xFFFFFFFF)
    assert (fields["today_yield_kwh"], fields["total_yield_kwh"]) == (23.4, 123_456.7)
    assert fields["inverter_temperature_c"] == -3.0  # temperatures are signed
    assert fields["pv1_power_w"] == pytest.approx(612.3 * 4.1)  # computed: the wire's power word reads 0


def test_other_realtime_lengths_are_not_taken_for_a_t_series():
    with pytest.raises(foxess.FrameError, match="152 or 158"):
        decode_t_realtime(bytes(232))


@pytest.mark.slow
@pytest.mark.parametrize("version", [0, 1])
async def test_every_split_offset_through_the_relay(data_dir, version):
    """One connection carries the frame once per split offset k: the first k bytes, then (after
    the stand-in cloud has them, so the relay read them apart) the rest."""
    store = LocalStore.for_process(data_dir, "relay")
    frames = []
    try:
        async with FoxCloud(tls=False) as cloud:
            listener = ListenerConfig(protocol="foxess", listen="127.0.0.1:0", policy="fixed",
                                      upstream=f"127.0.0.1:{cloud.port}")
            async with relay_running([listener], store=store, privacy=Privacy()) as relay:
                port = relay.listeners[0].endpoints[0].port
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                session = await cloud.wait_session()
                sent = 0
                payload = t_realtime_payload(VALUES, version)
                for k in range(1, len(payload) + foxess.OVERHEAD):
                    frame = build_frame(foxess.REALTIME, payload, stamp=k)
                    frames.append(frame)
                    for part in (frame[:k], frame[k:]):
                        writer.write(part)
                        await writer.drain()
                        sent += len(part)
                        await session.wait_received(sent)
                writer.close()
                await writer.wait_closed()
                await session.closed.wait()
                await until(lambda: not relay.connections, what="the relay to end every connection")
        assert bytes(session.received) == b"".join(frames)  # forwarded unchanged
        # the relay has stopped: its ingest worker archived and decoded everything
        records = [s.record for s in store.records(measurements=["foxess_t_realtime"])]
        assert len(records) == len(frames) == len(payload) + foxess.OVERHEAD - 1
        for record in records:
            assert record.tags == {"payload_version": str(version)}
            assert dict(record.fields) == pytest.approx(expected(VALUES))
        (connection,) = [s.record for s in store.records(measurements=["pvtap_connection"])]
        assert connection.fields["rejected"] == 0 and connection.fields["frames"] == len(frames)
    finally:
        store.close()


@pytest.mark.slow
async def test_the_simulated_bridge_into_a_local_listener(data_dir):
    """How it runs for real: the bridge connects to a listener with policy local; nothing answers."""
    store = LocalStore.for_process(data_dir, "relay")
    try:
        listener = ListenerConfig(protocol="foxess", listen="127.0.0.1:0", policy="local")
        async with relay_running([listener], store=store, privacy=Privacy()) as relay:
            port = relay.listeners[0].endpoints[0].port
            assert await run_bridge("127.0.0.1", port, count=3, interval=0, version=1, seed=5) == 3
            await until(lambda: not relay.connections, what="the relay to end every connection")
        records = [s.record for s in store.records(measurements=["foxess_t_realtime"])]
        assert len(records) == 3 and {r.tags["payload_version"] for r in records} == {"1"}
        assert all(isinstance(r.fields["generation_power_w"], int) for r in records)
    finally:
        store.close()


def test_the_simulator_command_explains_itself():
    out = subprocess.run([sys.executable, "-m", "pvtap", "simulate", "foxess-t", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "RS485-to-TCP bridge" in out and "--payload-version" in out


# -- M1/Q1 four strings ---------------------------------------------------------------------------

def m1(pv: list, pv_strings: int) -> bytes:
    values = M1Telemetry(ac_power_w=800, export_power_w=0, ac_voltage_v=230.0, ac_current_a=3.5, frequency_hz=50.0,
                         pv=pv, temperature_c=30.0, sequence=1, generation_total_kwh=10.0, export_total_kwh=0.0,
                         pv_strings=pv_strings)
    return build_frame(foxess.REALTIME, telemetry_payload(values))


FOUR = [(30.5, 2.0, 61), (31.0, 2.5, 77), (29.5, 1.5, 44), (32.0, 3.0, 96)]


def test_a_q1_frame_with_pv3_pv4_values_and_a_string_count_of_2_yields_them():
    (record,) = decode_raw(frame_raw(m1(FOUR, pv_strings=2)))
    assert record.fields["pv_strings"] == 2
    for n, (volts, amps, watts) in enumerate(FOUR, start=1):
        assert (record.fields[f"pv{n}_voltage_v"], record.fields[f"pv{n}_current_a"],
                record.fields[f"pv{n}_power_w"]) == (volts, amps, watts)


def test_two_strings_with_zero_pv3_pv4_stay_two_unless_the_model_has_four():
    two = [*FOUR[:2], (0.0, 0.0, 0), (0.0, 0.0, 0)]
    (record,) = decode_raw(frame_raw(m1(two, pv_strings=2)))
    assert "pv3_voltage_v" not in record.fields and "pv4_power_w" not in record.fields
    # a Q1 named by the connection's product info: the Tap carries the model to the telemetry
    tap = foxess.Tap(Origin("foxess", "", "c1"))
    info = build_frame(foxess.PRODUCT_INFO, product_info_payload(model="Q1-2000-E"))
    payloads = tap.feed(UP, info + m1(two, pv_strings=2), RECEIVED)
    assert payloads[1].meta["model"] == "Q1-2000-E"
    (telemetry,) = decode_raw(redact_raw(payloads[1], Privacy()))
    assert (telemetry.fields["pv3_voltage_v"], telemetry.fields["pv4_power_w"]) == (0.0, 0)
    # and a string count of 4 says so by itself
    (counted,) = decode_raw(frame_raw(m1(two, pv_strings=4)))
    assert counted.fields["pv4_current_a"] == 0.0


def test_the_default_m1_record_is_unchanged():
    (record,) = decode_raw(frame_raw(m1(FOUR[:2], pv_strings=2)))
    names = {f"pv{n}_{q}" for n in (1, 2) for q in ("voltage_v", "current_a", "power_w")}
    assert {k for k in record.fields if k.startswith("pv")} == names | {"pv_strings"}
