"""FoxESS 7E7E/7F7F frames: the M1/Q1 microinverter (TLS 14431, hub 6666, UDP 6364/3334) and
the H1/H3/KH WiFi dongle (cleartext 10001). Facts and sources: shared/reference/foxess.md.

Frame: `7E 7E | function | stamp u32 BE | length u16 BE | payload | CRC-16/MODBUS LE | E7 E7`
(or `7F 7F … F7 F7`; the tail follows the header). The CRC covers function … payload. Bytes 3–6
are the sender's clock or a sequence — never an identity and never trusted as UTC — so every record
is timed by the proxy's receive time and devices are named by the serial a 0x2A/0x06 frame (or
a hub login) reveals. A reply sets bit 7 of the request's function code; the family (7E/7F)
says nothing about direction, the socket side does.

One package serves every FoxESS channel: the frame format is the same on all of them, and the
cases the local answerer handles (M1 bootstrap, hub logins and heartbeats) never overlap. UDP
datagrams arrive as RawPayloads of kind "datagram" and become presence records.

Read once: the splitter checks and parses each frame; the Tap hands it on as a `FrameReading`
in the payload's `parsed`, which `redact_raw` and `decode_raw` use instead of the bytes.

Modules: `framing` (frames, CRC, splitter, function codes), `payloads` (pure payload parsers),
`records` (`decode_raw`), `redaction` (`redact_raw`), `tap` (the relay's Tap and LocalAnswerer);
this package re-exports their public names.
"""

from __future__ import annotations

from .framing import (
    BATTERY_SERIAL_SLOT,
    BATTERY_SERIALS,
    BLE_SET_WIFI,
    BLE_STATUS,
    BOOTSTRAP_ACKS,
    BOOTSTRAP_STEP2,
    BOOTSTRAP_STEP3,
    BOOTSTRAP_STEPS,
    FIRMWARE_CHUNK,
    FIRMWARE_METADATA,
    FIRMWARE_PROGRESS,
    H1_PRODUCT_INFO_LENGTH,
    H1_REALTIME_LENGTH,
    HEADERS,
    HEARTBEAT,
    HUB_CHANNELS,
    HUB_HEARTBEAT,
    HUB_LOGIN,
    HUB_LOGIN_ACK,
    M1_TELEMETRY_LENGTH,
    MAX_FRAME,
    MAX_GARBAGE_RUN,
    MODBUS_READ,
    MODBUS_WRITE,
    MODULE_INFO,
    OPAQUE_SAMPLE,
    OVERHEAD,
    PRODUCT_INFO,
    PROTOCOL,
    REALTIME,
    REGISTRATION,
    REPLY,
    TAILS,
    Frame,
    FrameError,
    FrameReading,
    FrameSplitter,
    build_frame,
    crc16,
    hub_channel,
    parse_frame,
    read_frame,
)
from .payloads import (
    FOUR_STRING_MODELS,
    MESH_FIELDS,
    REALTIME_LENGTHS,
    T_REALTIME_VERSIONS,
    FirmwareMetadata,
    ModbusMessage,
    Registration,
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
    s16,
    u16,
)
from .records import DECODERS, decode_frame, decode_raw, presence_records
from .redaction import redact_raw
from .tap import LocalAnswerer, Tap, serial_in

__all__ = [
    "BATTERY_SERIALS",
    "BATTERY_SERIAL_SLOT",
    "BLE_SET_WIFI",
    "BLE_STATUS",
    "BOOTSTRAP_ACKS",
    "BOOTSTRAP_STEP2",
    "BOOTSTRAP_STEP3",
    "BOOTSTRAP_STEPS",
    "DECODERS",
    "FIRMWARE_CHUNK",
    "FIRMWARE_METADATA",
    "FIRMWARE_PROGRESS",
    "FOUR_STRING_MODELS",
    "H1_PRODUCT_INFO_LENGTH",
    "H1_REALTIME_LENGTH",
    "HEADERS",
    "HEARTBEAT",
    "HUB_CHANNELS",
    "HUB_HEARTBEAT",
    "HUB_LOGIN",
    "HUB_LOGIN_ACK",
    "M1_TELEMETRY_LENGTH",
    "MAX_FRAME",
    "MAX_GARBAGE_RUN",
    "MESH_FIELDS",
    "MODBUS_READ",
    "MODBUS_WRITE",
    "MODULE_INFO",
    "OPAQUE_SAMPLE",
    "OVERHEAD",
    "PRODUCT_INFO",
    "PROTOCOL",
    "REALTIME",
    "REALTIME_LENGTHS",
    "REGISTRATION",
    "REPLY",
    "TAILS",
    "T_REALTIME_VERSIONS",
    "FirmwareMetadata",
    "Frame",
    "FrameError",
    "FrameReading",
    "FrameSplitter",
    "LocalAnswerer",
    "ModbusMessage",
    "Registration",
    "Tap",
    "battery_serials",
    "build_frame",
    "crc16",
    "decode_frame",
    "decode_h1_realtime",
    "decode_m1_telemetry",
    "decode_module_info",
    "decode_product_info",
    "decode_raw",
    "decode_t_realtime",
    "hub_channel",
    "hub_login",
    "parse_firmware_metadata",
    "parse_frame",
    "parse_modbus",
    "parse_registration",
    "parse_wifi_setup",
    "presence_records",
    "read_frame",
    "redact_raw",
    "s16",
    "serial_in",
    "u16",
]
