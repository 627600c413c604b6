"""FoxESS records: frames and UDP datagrams to time-series points.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

from pvtap.records import FieldValue, Origin, RawPayload, Record

from ..withhold import is_withheld
from .framing import (
    BATTERY_SERIAL_SLOT,
    BATTERY_SERIALS,
    BLE_SET_WIFI,
    BLE_STATUS,
    BOOTSTRAP_STEP2,
    BOOTSTRAP_STEP3,
    BOOTSTRAP_STEPS,
    FIRMWARE_CHUNK,
    FIRMWARE_METADATA,
    FIRMWARE_PROGRESS,
    H1_REALTIME_LENGTH,
    HEADERS,
    HEARTBEAT,
    HUB_HEARTBEAT,
    HUB_LOGIN,
    HUB_LOGIN_ACK,
    M1_TELEMETRY_LENGTH,
    MODBUS_READ,
    MODBUS_WRITE,
    MODULE_INFO,
    PRODUCT_INFO,
    REALTIME,
    REGISTRATION,
    REPLY,
    Frame,
    FrameError,
    FrameReading,
    hub_channel,
    parse_frame,
)
from .payloads import (
    MESH_FIELDS,
    T_REALTIME_VERSIONS,
    battery_serials,
    decode_h1_realtime,
    decode_m1_telemetry,
    decode_module_info,
    decode_product_info,
    decode_t_realtime,
    hub_login,
    parse_firmware_metadata,
    parse_modbus,
    parse_registration,
    parse_wifi_setup,
    u16,
)


def _meta_int(raw: RawPayload, key: str, default: int) -> int:
    """An integer that redact_raw or the relay noted in `meta` (None is refused, as int() refuses it)."""
    value = raw.meta.get(key, default)
    if value is None:
        raise TypeError(f"meta {key!r} is None, expected an integer")
    return int(value)


def decode_raw(raw: RawPayload) -> list[Record]:
    """Records from a (redacted) payload: a frame, a UDP datagram, or nothing for garbage. A
    withheld frame (`pvtap.decode.withhold`) still gives its `foxess_unknown_frame` record from
    the function, family and length redact_raw noted."""
    if is_withheld(raw):
        if raw.kind == "datagram":
            raise ValueError(f"UDP datagram of {raw.meta.get('withheld_size')} bytes withheld: {raw.meta['withheld']}")
        if raw.kind == "frame" and "function" in raw.meta:
            return [_record("foxess_unknown_frame", raw, {"family": str(raw.meta.get("family", ""))},
                            {"function": _meta_int(raw, "function", 0),
                             "payload_length": _meta_int(raw, "payload_length", 0)})]
        return []
    if raw.kind == "frame":
        reading = raw.parsed_as(FrameReading)
        return decode_frame(reading.frame if reading is not None else parse_frame(raw.payload), raw)
    if raw.kind == "datagram":
        return presence_records(raw.payload, _meta_int(raw, "port", 0), raw.origin, raw.received)
    if raw.kind in ("garbage", "partial", "opaque"):
        return []
    raise ValueError(f"unknown FoxESS payload kind {raw.kind!r}")


def decode_frame(frame: Frame, raw: RawPayload) -> list[Record]:
    decoder = DECODERS.get(frame.function)
    if decoder is None:
        return [_record("foxess_unknown_frame", raw, {"family": f"{frame.family:02x}"},
                        {"function": frame.function, "payload_length": len(frame.payload)})]
    return decoder(frame, raw)


def _record(measurement: str, raw: RawPayload, tags: dict[str, str], fields: dict[str, FieldValue],
            serial: str = "", *, typed: bool = False) -> Record:
    """`typed`: the fields are a telemetry block's, typed by construction (`Record.typed`)."""
    serial = serial or str(raw.meta.get("serial", ""))
    return (Record.typed if typed else Record)(measurement, raw.received,
                                               {"serial": serial, **tags} if serial else tags, fields, raw.origin)


def _product_info(frame: Frame, raw: RawPayload) -> list[Record]:
    return [_record("foxess_product_info", raw, {}, decode_product_info(frame.payload))]


def _realtime(frame: Frame, raw: RawPayload) -> list[Record]:
    p = frame.payload
    if len(p) == M1_TELEMETRY_LENGTH:
        fields = decode_m1_telemetry(p, str(raw.meta.get("model", "")))
        return [_record("foxess_telemetry", raw, {"layout": "m1"}, fields, typed=True)]
    if len(p) == H1_REALTIME_LENGTH:
        return [_record("foxess_h1_realtime", raw, {}, decode_h1_realtime(p), typed=True)]
    if len(p) in T_REALTIME_VERSIONS:
        return [_record("foxess_t_realtime", raw, {"payload_version": str(T_REALTIME_VERSIONS[len(p)])},
                        decode_t_realtime(p), typed=True)]
    return [_record("foxess_unknown_frame", raw, {"family": f"{frame.family:02x}"},
                    {"function": frame.function, "payload_length": len(p)})]


def _battery_serials(frame: Frame, raw: RawPayload) -> list[Record]:
    serials = battery_serials(frame.payload, _meta_int(raw, "serial_slot", BATTERY_SERIAL_SLOT))
    return [_record("foxess_battery_serials", raw, {}, {"battery_count": len(serials),
                                                        "battery_serials": ",".join(serials)})]


def _module_info(frame: Frame, raw: RawPayload) -> list[Record]:
    fields, serial = decode_module_info(frame.payload)
    return [_record("foxess_module_info", raw, {}, fields, serial)]


def _registration(frame: Frame, raw: RawPayload) -> list[Record]:
    reg = parse_registration(frame.payload)
    return [_record("foxess_registration", raw, {}, {"datalogger_firmware": reg.firmware}, reg.serial)]


def _bootstrap(frame: Frame, raw: RawPayload) -> list[Record]:
    step = BOOTSTRAP_STEPS[frame.function & 0x7F]
    message = "ack" if frame.function & REPLY else "request"
    return [_record("foxess_bootstrap", raw, {"step": step, "message": message}, {"payload": frame.payload.hex()})]


def _modbus(frame: Frame, raw: RawPayload) -> list[Record]:
    m = parse_modbus(frame)
    register = m.register if m.register is not None else raw.meta.get("request_register")
    count = m.count if m.count is not None else raw.meta.get("request_count")
    fields: dict[str, FieldValue] = {"stamp": frame.stamp, "unit": m.unit, "modbus_function": m.function}
    if register is not None:
        fields["register"] = int(register)
    if count is not None:
        fields["count"] = int(count)
    if m.values:
        fields["values"] = ",".join(map(str, m.values))
    if m.exception is not None:
        fields["exception"] = m.exception
    records = [_record("foxess_modbus", raw, {"operation": m.operation, "message": m.message}, fields)]
    if m.message == "reply" and m.values and register is not None:  # a fact, not an intent
        records += [_record("foxess_register", raw, {"register": str(int(register) + i), "source": m.operation},
                            {"value": value}) for i, value in enumerate(m.values)]
    return records


def _firmware(frame: Frame, raw: RawPayload) -> list[Record]:
    p, code = frame.payload, frame.function
    transfer = {"transfer_id": p[:5].hex()}
    if code == FIRMWARE_METADATA:
        md = parse_firmware_metadata(p)
        return [_record("foxess_firmware", raw, {"stage": "metadata"},
                        {**transfer, "image_size": md.image_size, "image_crc": md.image_crc,
                         "filename": md.filename, "timeout_s": md.timeout_s}, md.serial)]
    if code == FIRMWARE_CHUNK:
        if len(p) < 7:
            raise FrameError(f"firmware chunk of {len(p)} bytes has no index")
        size = _meta_int(raw, "firmware_chunk_bytes", len(p) - 7)
        return [_record("foxess_firmware", raw, {"stage": "chunk"},
                        {**transfer, "index": u16(p, 5), "chunk_bytes": size})]
    if code == FIRMWARE_CHUNK | REPLY and len(p) >= 8:
        return [_record("foxess_firmware", raw, {"stage": "chunk_ack"}, {**transfer, "next_index": u16(p, 5)})]
    if code == FIRMWARE_CHUNK | REPLY:
        return [_record("foxess_firmware", raw, {"stage": "final_ack"}, {**transfer, "status": p[5:].hex()})]
    if code == FIRMWARE_PROGRESS:
        if len(p) < 7:
            raise FrameError(f"firmware progress of {len(p)} bytes has no percentage")
        return [_record("foxess_firmware", raw, {"stage": "progress"}, {**transfer, "percent": p[6]})]
    return [_record("foxess_firmware", raw, {"stage": "metadata_ack"}, {**transfer, "status": p[5:].hex()})]


_WIFI_STATUS = {0: "not connected", 3: "connected to server", 4: "transparent transmission"}


def _ble(frame: Frame, raw: RawPayload) -> list[Record]:
    p = frame.payload
    if frame.function == BLE_SET_WIFI:
        if not p:
            return [_record("foxess_wifi_setup", raw, {"message": "ack"}, {"ssid": ""})]
        ssid, _, _ = parse_wifi_setup(p)
        return [_record("foxess_wifi_setup", raw, {"message": "set"}, {"ssid": ssid})]
    query = {4: "connection_status", 6: "ssid_list"}.get(p[0], f"{p[0]:#04x}") if p else "empty"
    if len(p) == 4 and p[0] == 4:
        return [_record("foxess_wifi_status", raw, {"query": query, "message": "reply"},
                        {"status": p[3], "status_text": _WIFI_STATUS.get(p[3], "unknown")})]
    return [_record("foxess_wifi_status", raw, {"query": query, "message": "request" if len(p) == 1 else "reply"},
                    {"payload_length": len(p)})]


def _heartbeat(frame: Frame, raw: RawPayload) -> list[Record]:
    channel = hub_channel(frame)
    if channel is None:
        return [_record("foxess_heartbeat", raw, {}, {"device_clock": frame.stamp, "payload": frame.payload.hex()})]
    op = frame.stamp & 0xFF
    tags = {"channel": channel}
    if op == HUB_LOGIN:
        serial, firmware = hub_login(frame.payload)
        return [_record("foxess_hub_login", raw, tags, {"firmware": firmware}, serial)]
    if op == HUB_HEARTBEAT and frame.payload == HUB_LOGIN_ACK:
        return [_record("foxess_hub_ack", raw, tags, {"payload": frame.payload.hex()})]
    if op == HUB_HEARTBEAT:
        return [_record("foxess_hub_heartbeat", raw, tags, {"payload": frame.payload.hex()})]
    return [_record("foxess_hub_unknown", raw, tags, {"op": op, "payload_length": len(frame.payload)})]


DECODERS: dict[int, Callable[[Frame, RawPayload], list[Record]]] = {
    PRODUCT_INFO: _product_info, REALTIME: _realtime, BATTERY_SERIALS: _battery_serials,
    MODULE_INFO: _module_info, REGISTRATION: _registration,
    REGISTRATION | REPLY: _bootstrap, BOOTSTRAP_STEP2: _bootstrap, BOOTSTRAP_STEP2 | REPLY: _bootstrap,
    BOOTSTRAP_STEP3: _bootstrap, BOOTSTRAP_STEP3 | REPLY: _bootstrap,
    MODBUS_READ: _modbus, MODBUS_WRITE: _modbus, MODBUS_READ | REPLY: _modbus, MODBUS_WRITE | REPLY: _modbus,
    FIRMWARE_METADATA: _firmware, FIRMWARE_METADATA | REPLY: _firmware, FIRMWARE_CHUNK: _firmware,
    FIRMWARE_CHUNK | REPLY: _firmware, FIRMWARE_PROGRESS: _firmware,
    BLE_STATUS: _ble, BLE_SET_WIFI: _ble, HEARTBEAT: _heartbeat,
}


# -- UDP presence ----------------------------------------------------------------------------

def presence_records(datagram: bytes, port: int, origin: Origin, received: datetime) -> list[Record]:
    """An M1 broadcast as presence: the ESP-MESH `join_me_req` JSON (UDP 6364: MAC, RSSI, mesh
    ids) or the 0xFF heartbeat frame (UDP 3334: its rising clock). Recognised by content, not by
    port; anything else raises ValueError (the ingest worker counts it and keeps a sample)."""
    tags = {"port": str(port)} if port else {}
    if datagram[:1] == b"{":
        try:
            message = json.loads(datagram)
        except ValueError as exc:
            raise ValueError(f"UDP datagram is not valid JSON: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("payload", {}), dict):
            raise ValueError("UDP JSON is not an ESP-MESH message object")
        body = message.get("payload", {})
        fields: dict[str, FieldValue] = {}
        for key, (name, kind) in MESH_FIELDS.items():
            if key in body and body[key] is not None:
                fields[name] = kind(body[key])
        for key in ("seq",):
            if isinstance(message.get(key), int):
                fields[key] = message[key]
        if "monkey" in message:
            fields["monkey"] = str(message["monkey"])
        if not fields:
            fields["payload_length"] = len(datagram)
        mac = {"mac": str(body["mac"])} if body.get("mac") else {}
        return [Record("foxess_presence", received,
                       {**tags, "source": "mesh", "message": str(message.get("type", "")), **mac}, fields, origin)]
    if datagram[:2] in HEADERS:
        frame = parse_frame(datagram)
        return [Record("foxess_presence", received, {**tags, "source": "heartbeat"},
                       {"device_clock": frame.stamp, "function": frame.function, "payload": frame.payload.hex()},
                       origin)]
    raise ValueError(f"UDP datagram of {len(datagram)} bytes is neither ESP-MESH JSON nor a FoxESS frame")
