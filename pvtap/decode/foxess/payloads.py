"""FoxESS payload parsers: pure functions from a frame's payload to values (reference vectors in the tests).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from pvtap.records import FieldValue

from .framing import (
    BATTERY_SERIAL_SLOT,
    H1_PRODUCT_INFO_LENGTH,
    H1_REALTIME_LENGTH,
    M1_TELEMETRY_LENGTH,
    MODBUS_READ,
    MODBUS_WRITE,
    REPLY,
    Frame,
    FrameError,
)

#: ESP-MESH `join_me_req` fields kept as presence fields: JSON key → (field, type).
MESH_FIELDS: dict[str, tuple[str, type]] = {
    "router": ("rssi_dbm", int), "vendor_id": ("vendor_id", int), "mesh_id": ("mesh_id", str),
    "temp_mesh_id": ("temp_mesh_id", str), "fix_root": ("fix_root", bool),
    "node_number": ("node_number", int), "max_node_number": ("max_node_number", int),
}

_VERSION = re.compile(rb"^v?\d+(\.\d+)+$")
_PRINTABLE_RUN = re.compile(rb"[\x21-\x7e]{4,}")

# -- payload parsers (pure; tested against the reference vectors) ------------------------------

def _cstr(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("ascii", "replace").strip()


def u16(p: bytes, offset: int) -> int:
    return int.from_bytes(p[offset:offset + 2], "big")


def s16(p: bytes, offset: int) -> int:
    return int.from_bytes(p[offset:offset + 2], "big", signed=True)


def _length_prefixed(p: bytes, offset: int, what: str) -> tuple[bytes, int]:
    """(the string at `offset` preceded by its length byte, the offset after it)."""
    if offset >= len(p):
        raise FrameError(f"{what}: payload ends before its length byte")
    end = offset + 1 + p[offset]
    if end > len(p):
        raise FrameError(f"{what}: length {p[offset]} runs past the payload")
    return p[offset + 1:end], end


@dataclass(frozen=True, slots=True)
class Registration:
    prefix: bytes
    serial: str
    firmware: str
    serial_span: tuple[int, int]  # where the serial's length byte and text sit in the payload


def parse_registration(p: bytes) -> Registration:
    """0x2A: `01 00 01 31`, length-prefixed serial, length-prefixed datalogger firmware, padding."""
    serial, after = _length_prefixed(p, 4, "registration serial")
    firmware = b""
    if after < len(p) and p[after]:
        firmware, _ = _length_prefixed(p, after, "registration firmware")
    return Registration(p[:4], serial.decode("ascii", "replace"), firmware.decode("ascii", "replace"), (4, after))


_M1_WORDS = struct.Struct(f">{M1_TELEMETRY_LENGTH // 2}H")
#: M1/Q1 models with four PV inputs (foxess_local_gateway: "Q1 PV3/PV4 unvalidated").
FOUR_STRING_MODELS = ("Q1",)


def decode_m1_telemetry(p: bytes, model: str = "") -> dict[str, FieldValue]:
    """The 238-byte M1/Q1 telemetry block (foxess_local_gateway `telemetry.py` offsets), read
    as big-endian words in one unpack.

    Temperature is read signed (an unsigned read turns −1 °C into 2047 °C); export power is
    negated as foxess_local_gateway does. PV3/PV4 are included when the model is a four-string
    one (`Q1-…`, from the connection's product info), when the string count says ≥ 4, or when
    any of their values is non-zero: four-string models report them with other counts.
    """
    if len(p) != M1_TELEMETRY_LENGTH:
        raise FrameError(f"M1 telemetry is {M1_TELEMETRY_LENGTH} bytes, got {len(p)}")
    w = _M1_WORDS.unpack(p)  # w[i] is the word at byte offset 2 * i
    state, pv_strings = w[77], w[78]
    ac, export, temperature = w[3], w[1], w[31]
    fields: dict[str, FieldValue] = {  # one literal (PV3/PV4 follow when present: field order means nothing)
        "ac_power_w": ac - 0x10000 if ac & 0x8000 else ac,
        "export_power_w": -(export - 0x10000 if export & 0x8000 else export),
        "ac_voltage_v": w[6] / 32,
        "ac_current_a": w[7] / 512,
        "frequency_hz": w[8] / 128,
        "pv1_voltage_v": w[18] / 256, "pv1_current_a": w[19] / 512, "pv1_power_w": w[20],
        "pv2_voltage_v": w[21] / 256, "pv2_current_a": w[22] / 512, "pv2_power_w": w[23],
        "temperature_c": (temperature - 0x10000 if temperature & 0x8000 else temperature) / 32,
        "sequence": w[33],
        "generation_total_kwh": (w[35] | w[36] << 16) / 128,
        "export_total_kwh": (w[37] | w[38] << 16) / 128,
        "fault_word_1": w[49], "fault_word_2": w[50], "fault_word_3": w[51], "fault_word_4": w[52],
        "fault_word_5": w[53],
        "state": state,
        "state_text": _STATES.get(state, "unknown"),
        "pv_strings": pv_strings,
    }
    if pv_strings >= 4 or w[24] or w[25] or w[26] or w[27] or w[28] or w[29] or \
            (model and model.upper().startswith(FOUR_STRING_MODELS)):
        fields.update({"pv3_voltage_v": w[24] / 256, "pv3_current_a": w[25] / 512, "pv3_power_w": w[26],
                       "pv4_voltage_v": w[27] / 256, "pv4_current_a": w[28] / 512, "pv4_power_w": w[29]})
    return fields


_STATES = {2: "standby", 4: "running"}


def decode_h1_realtime(p: bytes) -> dict[str, FieldValue]:
    """The first 13 words of the H1 dongle's 226-byte realtime block, read as FoxESS H1 input
    registers 11000–11011 (0.1 scaling) plus the grid frequency (0.01 Hz) — an inference from one
    published sample (foxess.md §3.6); the rest of the block stays in the raw frame."""
    if len(p) != H1_REALTIME_LENGTH:
        raise FrameError(f"H1 realtime is {H1_REALTIME_LENGTH} bytes, got {len(p)}")
    return {
        "pv1_voltage_v": u16(p, 0) / 10, "pv1_current_a": s16(p, 2) / 10, "pv1_power_w": s16(p, 4),
        "pv2_voltage_v": u16(p, 6) / 10, "pv2_current_a": s16(p, 8) / 10, "pv2_power_w": s16(p, 10),
        "battery_voltage_v": u16(p, 12) / 10, "battery_current_a": s16(p, 14) / 10,
        "grid_voltage_v": u16(p, 18) / 10, "grid_current_a": s16(p, 20) / 10, "grid_power_w": s16(p, 22),
        "frequency_hz": u16(p, 24) / 100,
    }


#: T-series realtime payloads (foxess.md §3.5): version 0, and version 1 (newer firmware), which
#: inserts 6 bytes at the start. The 232-byte payload of 245-byte frames has no public layout.
T_REALTIME_VERSIONS = {152: 0, 158: 1}
_T_WORDS = struct.Struct(">31h i")  # 31 signed words, then the total yield (s32)
_T_FAULTS = struct.Struct(">8I")
_T_FAULTS_AT = 125 - 9  # frame bytes 125–156: after the 9-byte frame header
_T_PHASES = ("r", "s", "t")


def decode_t_realtime(p: bytes) -> dict[str, FieldValue]:
    """The T-series realtime block (foxess.md §3.5, after TSER-L `inverter_payload.py` and
    TSER-A `foxess_t_series.h`): grid, generation and load power; per phase R/S/T voltage (0.1 V),
    current (0.1 A), frequency (0.01 Hz) and power; PV1–PV4 voltage and current (0.1) with power
    computed as V × I (the wire's power words read 0); boost, inverter and ambient temperature;
    today's (s16) and total (s32) yield in 0.1 kWh; 8 fault words (u32)."""
    version = T_REALTIME_VERSIONS.get(len(p))
    if version is None:
        raise FrameError(f"T-series realtime is {' or '.join(map(str, T_REALTIME_VERSIONS))} bytes, got {len(p)}")
    at = 6 * version
    *w, total = _T_WORDS.unpack_from(p, at)
    fields: dict[str, FieldValue] = {"grid_power_w": w[0], "generation_power_w": w[1], "load_power_w": w[2]}
    for i, phase in enumerate(_T_PHASES):
        v, a, hz, watts = w[3 + 4 * i:7 + 4 * i]
        fields[f"phase_{phase}_voltage_v"] = v / 10
        fields[f"phase_{phase}_current_a"] = a / 10
        fields[f"phase_{phase}_frequency_hz"] = hz / 100
        fields[f"phase_{phase}_power_w"] = watts
    for n in range(4):
        volts, amps = w[15 + 3 * n] / 10, w[16 + 3 * n] / 10
        fields[f"pv{n + 1}_voltage_v"] = volts
        fields[f"pv{n + 1}_current_a"] = amps
        fields[f"pv{n + 1}_power_w"] = volts * amps
    fields["boost_temperature_c"] = float(w[27])
    fields["inverter_temperature_c"] = float(w[28])
    fields["ambient_temperature_c"] = float(w[29])
    fields["today_yield_kwh"] = w[30] / 10
    fields["total_yield_kwh"] = total / 10
    for i, word in enumerate(_T_FAULTS.unpack_from(p, _T_FAULTS_AT + at)):
        fields[f"fault_word_{i + 1}"] = word
    return fields


#: Every 0x02 payload length with a known layout: M1/Q1, H1, T-series.
REALTIME_LENGTHS = frozenset({M1_TELEMETRY_LENGTH, H1_REALTIME_LENGTH, *T_REALTIME_VERSIONS})


def decode_product_info(p: bytes) -> dict[str, FieldValue]:
    """0x01: the H1's fixed 40-byte layout, or the M1's NUL-separated strings at 0/32/42/76."""
    if len(p) == H1_PRODUCT_INFO_LENGTH:
        return {"master_version": _cstr(p[0:6]), "slave_version": _cstr(p[6:12]),
                "manager_version": _cstr(p[12:18]), "model": p[22:38].decode("ascii", "replace").strip(),
                "rated_power_w": u16(p, 38)}
    if len(p) >= 80:
        return {"module_version": _cstr(p[0:32]), "product": _cstr(p[32:42]), "model": _cstr(p[42:76]),
                "firmware": _cstr(p[76:])}
    return {"strings": "|".join(run.decode() for run in _PRINTABLE_RUN.findall(p))}


def decode_module_info(p: bytes) -> tuple[dict[str, FieldValue], str]:
    """0x06 → (fields, serial or ""): the M1's NUL-terminated module id (`M10200`), or the H1's
    6-character protocol version followed by the inverter serial."""
    if b"\0" in p or len(p) <= 6:
        return {"module_id": _cstr(p)}, ""
    return {"protocol_version": p[:6].decode("ascii", "replace")}, p[6:].decode("ascii", "replace").strip()


def battery_serials(p: bytes, slot: int = BATTERY_SERIAL_SLOT) -> list[str]:
    """0x03: fixed-width serial slots, zero-filled when empty."""
    slots = (p[i:i + slot] for i in range(0, len(p), slot))
    return [s for s in (_cstr(s.replace(b" ", b"\0")) for s in slots) if s]


@dataclass(frozen=True, slots=True)
class ModbusMessage:
    operation: str  # "read" or "write"
    message: str  # "request", "reply" or "exception"
    unit: int
    function: int  # the Modbus function code (0x03, 0x04, 0x06, 0x10; | 0x80 for exceptions)
    register: int | None = None
    count: int | None = None
    values: tuple[int, ...] = ()
    exception: int | None = None


def parse_modbus(frame: Frame) -> ModbusMessage:
    """The Modbus PDU in 0x11/0x12 (requests) and 0x91/0x92 (replies): unit id, no Modbus CRC."""
    p, code = frame.payload, frame.function
    operation = "read" if code & 0x7F == MODBUS_READ else "write"
    if len(p) < 3:
        raise FrameError(f"Modbus payload of {len(p)} bytes is too short")
    unit, fn = p[0], p[1]
    if fn & 0x80:
        return ModbusMessage(operation, "exception", unit, fn, exception=p[2])
    if code == MODBUS_READ or (code == MODBUS_WRITE | REPLY and fn == 0x10):
        _need(p, 6, "request")
        return ModbusMessage(operation, "request" if code < REPLY else "reply", unit, fn, u16(p, 2), u16(p, 4))
    if code == MODBUS_READ | REPLY:
        data = p[3:3 + p[2]]
        if len(data) != p[2]:
            raise FrameError(f"Modbus reply announces {p[2]} data bytes, carries {len(data)}")
        return ModbusMessage(operation, "reply", unit, fn, count=len(data) // 2, values=_words(data))
    if fn == 0x06:  # write single: request and echoed reply look the same
        _need(p, 6, "write")
        return ModbusMessage(operation, "request" if code < REPLY else "reply", unit, fn, u16(p, 2), 1,
                             (u16(p, 4),))
    if fn == 0x10:
        _need(p, 7, "write multiple")
        return ModbusMessage(operation, "request", unit, fn, u16(p, 2), u16(p, 4), _words(p[7:7 + p[6]]))
    raise FrameError(f"Modbus function {fn:#04x} is not decoded")


def _words(data: bytes) -> tuple[int, ...]:
    return tuple(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data) - 1, 2))


def _need(p: bytes, n: int, what: str) -> None:
    if len(p) < n:
        raise FrameError(f"Modbus {what} needs {n} bytes, got {len(p)}")


@dataclass(frozen=True, slots=True)
class FirmwareMetadata:
    transfer_id: str
    image_size: int
    image_crc: int
    filename: str
    serial: str
    timeout_s: int
    serial_span: tuple[int, int]


def parse_firmware_metadata(p: bytes) -> FirmwareMetadata:
    """0x21: `<id:5> <size u32> <image CRC u16> <len> name 00 <len> serial <timeout u16>`."""
    if len(p) < 12:
        raise FrameError(f"firmware metadata of {len(p)} bytes is too short")
    name, after = _length_prefixed(p, 11, "firmware file name")
    start = after + 1  # a NUL follows the name
    serial, end = _length_prefixed(p, start, "firmware target serial")
    if end + 2 > len(p):
        raise FrameError("firmware metadata ends before its timeout")
    return FirmwareMetadata(p[:5].hex(), int.from_bytes(p[5:9], "big"), u16(p, 9), name.decode("ascii", "replace"),
                            serial.decode("ascii", "replace"), u16(p, end), (start, end))


def parse_wifi_setup(p: bytes) -> tuple[str, str, tuple[int, int]]:
    """BLE 0x3B set-WiFi: (ssid, password, span of both in the payload). Datalogger form `02 <len>
    ssid <len> pw`; M1 form `03 f3 ba 40 <len> ssid <len> pw`."""
    start = 4 if p[:1] == b"\x03" else 1
    ssid, after = _length_prefixed(p, start, "WiFi SSID")
    password, end = _length_prefixed(p, after, "WiFi password")
    return ssid.decode("utf-8", "replace"), password.decode("utf-8", "replace"), (start, end)


def hub_login(p: bytes) -> tuple[str, str]:
    """(serial, firmware) from a hub login. The write-up gives no byte layout, only that the
    payload holds the serial (`60M…`) and firmware (`v1.31`), so both are found by pattern."""
    runs = _PRINTABLE_RUN.findall(p)
    serial = next((r for r in runs if not _VERSION.match(r)), b"")
    firmware = next((r for r in runs if _VERSION.match(r)), b"")
    return serial.decode(), firmware.decode()

