"""AlphaESS battery ↔ cloud protocol (TCP 7777): frames, records, redaction, local answers.

Wire format (`shared/reference/alphaess.md` §1): `01 <B1> <B2> <LEN u32 BE> <body> <CRC16 BE>`,
B1 = 1 request/push, 2 response/ack (NOT the direction), B2 the message type, CRC-16/MODBUS over
header and body stored high byte first. Bodies are compact JSON with numbers as strings, CSV for
B2 = 12, empty for B2 = 0.

Pure: no sockets, no clocks (the caller passes the receive time; only the Tap consults the
host's time zone, see below). The relay uses `Tap` (decode side of one connection) and
`LocalAnswerer` (answers when there is no cloud); the ingest worker uses `redact_raw` and
`decode_raw`.

Records, tagged `serial` (from the frame, else the connection's device): `alphaess_realtime`
(1-1-16), `alphaess_extended` (1-1-5), `alphaess_backfill` (1-1-12, one per CSV row),
`alphaess_event` (1-1-9: an event log gives one per entry, tags `msg_type` and `code`; other
messages one with their text), `alphaess_command` (1-x-8, tag `kind` request/ack),
`alphaess_device` (the cloud's config 1-2-3 and the device's dump 1-1-4, tag `source`, values as
text) and `alphaess_login` (1-1-2). Acks, 1-1-0, 1-1-3 and unknown types give none; their raw
frames are kept.

Timestamps. The device clock is local time of an unknown zone, not NTP-synced, drifts (80 s after
weeks offline) and can be stuck in DST; samples are sometimes sent twice or several at once. So a
record's time is the device's own time converted with a per-connection clock offset, and the
device's clock reading is kept as the field `device_time` (ISO 8601, no zone, as the device said):

- the `Tap` measures, for every realtime (16) and extended (5) frame, `received - device time`;
  the offset is the smallest such lag seen on the connection so far, in whole seconds (delays
  and batching only ever add lag, so the minimum is the best estimate of zone + clock error);
- before the first realtime/extended frame of a connection (the CSV back-fill and the event log
  come right after login), the device clock is assumed to be the proxy host's local time zone
  (set `TZ` for a container);
- the offset used goes into the raw payload's meta (`clock_offset_s`, `clock`), so `decode_raw`
  stays pure and a replay stamps records exactly as the live decode did. Without that meta
  (payloads from elsewhere) realtime/extended use the frame's own lag and the rest take the
  device clock as UTC.

A sample sent twice thus lands on the same timestamp (InfluxDB keeps one point), a batch of
samples keeps its 10-s spacing, and a back-filled row lands at its own minute.

Field types are fixed per field name from the reference's field lists (InfluxDB rejects a field
that changes type): codes, bit fields and packed values are int, measurements float, `EmsStatus`
and `CSQ` text; keys the reference does not list are float. A value that does not parse as its
field's type is kept as text in `<name>_text`, so nothing is lost and no field flips type.

Redaction (`redact_raw`, before anything is stored or logged): `Password`, `License`, `Address`,
`ZipCode`, `PhoneNumber` always; `Country`, the MAC in `System` messages and a network address
used as device label unless `privacy.keep_network_identity`; with `privacy.pseudonym_key` every
serial (`SN`, `UserName`, `InvSN`, `BatterySN*`, …, the CSV serial column, the origin's device)
becomes its pseudonym. Only the secret values change: the redactor finds each key in the body's
text and replaces its value in place, so every other byte (repeated keys, order, spacing) stays,
and the frame gets a fresh CRC; an unchanged frame is stored byte for byte. What it cannot vouch
for is withheld (`pvtap.decode.withhold`: size + SHA-256 + reason, unless `[privacy]
keep_unredacted`): rejected bytes, a frame cut off at the end of a connection, an opaque
stream's sample, a body that is neither a JSON object nor the back-fill CSV, a CSV row without a
header or with more cells than it.

CRC-16/MODBUS comes from `fastcrc` (a compiled, stateless implementation: under a nanosecond a
byte, safe to call from the relay's worker threads).

Read once: the Tap hands each frame on as a `FrameReading` (the frame, its body parsed as JSON
on first use) in the payload's `parsed`; `redact_raw` passes it on (a new one for a changed
body) and `decode_raw` decodes from it, reading the bytes only for a payload without one.

Modules: `framing` (frames, CRC, the stream framer), `bodies` (JSON bodies and frame readings),
`records` (device clocks, field types, records), `redaction` (`redact_raw`), `tap` (the relay's
Tap and LocalAnswerer); this package re-exports their public names.
"""

from __future__ import annotations

from .bodies import Body, FrameReading, JsonObject, encode_json, numbered, read_frame, read_json
from .framing import (
    ACK_BODY,
    CRC_LEN,
    HEADER_LEN,
    KNOWN_TYPES,
    MAX_BODY,
    MAX_FRAME,
    PROTOCOL,
    REQUEST,
    RESPONSE,
    SYNC,
    AlphaFrame,
    Framer,
    Garbage,
    ack_frame,
    crc16,
    encode_frame,
    parse_frame,
)
from .records import (
    INT_FIELDS,
    TEXT_FIELDS,
    csv_rows,
    decode_raw,
    device_time,
    first_device_time,
    records_from_frame,
    typed_fields,
)
from .redaction import LOCATION_KEYS, SECRET_KEYS, SERIAL_KEYS, redact_raw
from .tap import LocalAnswerer, Tap

__all__ = [
    "ACK_BODY",
    "CRC_LEN",
    "HEADER_LEN",
    "INT_FIELDS",
    "KNOWN_TYPES",
    "LOCATION_KEYS",
    "MAX_BODY",
    "MAX_FRAME",
    "PROTOCOL",
    "REQUEST",
    "RESPONSE",
    "SECRET_KEYS",
    "SERIAL_KEYS",
    "SYNC",
    "TEXT_FIELDS",
    "AlphaFrame",
    "Body",
    "FrameReading",
    "Framer",
    "Garbage",
    "JsonObject",
    "LocalAnswerer",
    "Tap",
    "ack_frame",
    "crc16",
    "csv_rows",
    "decode_raw",
    "device_time",
    "encode_frame",
    "encode_json",
    "first_device_time",
    "numbered",
    "parse_frame",
    "read_frame",
    "read_json",
    "records_from_frame",
    "redact_raw",
    "typed_fields",
]
