"""The messages between a forwarding process (relay, mitmdump) and its ingest worker.

One stream socket (a socketpair; the worker may be a process or, in tests and embedding, a
thread), length-prefixed binary messages so that a copied chunk crosses without being parsed or
re-encoded: a 5-byte header (body length u32, type u8) and the body. Control messages carry a
small JSON document; a chunk carries only numbers and the bytes.

forwarding process → worker                     worker → forwarding process
  SETTINGS  json (first message: what to do)       READY     json (store opened) or FAILED json
  OPEN      conn u32, json (id, protocol, …)       OPAQUE    conn u32 (stop sending its copies)
  CHUNK     conn u32, direction u8, ns i64, bytes  SNAPSHOT  json (the worker's counts)
  CLOSE     conn u32, json (the connection record) SYNCED    token u32
  PAYLOAD   json length u32, json, bytes           ARCHIVED  copies u64, bytes u64: the first n copies
            (a whole payload: the addon, UDP)                this worker got, and their bytes, are archived
  RECORD    json (a record of the forwarding process's own, e.g. the addon's enphase_fallback)
  COUNTS    json (the forwarding side's own counts: copies dropped, …)
  SYNC      token u32 (answered once all before it is archived and decoded)
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

from pvtap.records import DOWN, UP, Origin, RawPayload, Record, from_ns, to_ns
from pvtap.store.rows import record_from_row, record_row

HEADER = struct.Struct("<IB")
_CONN = struct.Struct("<I")
_CHUNK = struct.Struct("<IBq")
_PAYLOAD = struct.Struct("<I")
_ARCHIVED = struct.Struct("<QQ")
#: a message longer than this is a broken stream, not a copy (chunks are at most 256 KiB)
MAX_BODY = 64 * 1024 * 1024
DIRECTIONS = (UP, DOWN, "")


class Kind(enum.IntEnum):
    SETTINGS = 1
    OPEN = 2
    CHUNK = 3
    CLOSE = 4
    PAYLOAD = 5
    COUNTS = 6
    SYNC = 7
    RECORD = 8
    READY = 20
    FAILED = 21
    OPAQUE = 22
    SNAPSHOT = 23
    SYNCED = 24
    ARCHIVED = 25


class WireError(ValueError):
    """The stream is not made of these messages: the other end is not a pvtap of this version."""


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def message(kind: Kind, *parts: bytes) -> list[bytes]:
    """A message as buffers to send (header first), without copying the parts."""
    size = sum(len(p) for p in parts)
    return [HEADER.pack(size, kind), *parts]


def control(kind: Kind, doc: Any) -> list[bytes]:
    return message(kind, _json(doc))


def with_conn(kind: Kind, conn: int, doc: Any = None) -> list[bytes]:
    return message(kind, _CONN.pack(conn), *(() if doc is None else (_json(doc),)))


def chunk(conn: int, direction: str, time_ns: int, data: bytes) -> list[bytes]:
    return message(Kind.CHUNK, _CHUNK.pack(conn, DIRECTIONS.index(direction), time_ns), data)


def archived(copies: int, size: int) -> list[bytes]:
    return message(Kind.ARCHIVED, _ARCHIVED.pack(copies, size))


def read_archived(body: bytes) -> tuple[int, int]:
    """(copies, bytes): the first copies the worker got, archived, and their payloads' bytes."""
    copies, size = _ARCHIVED.unpack_from(body)
    return copies, size


def payload(raw: RawPayload) -> list[bytes]:
    o = raw.origin
    head = _json({"protocol": o.protocol, "device": o.device, "connection": o.connection, "direction": o.direction,
                  "kind": raw.kind, "received_ns": to_ns(raw.received), "meta": dict(raw.meta)})
    return message(Kind.PAYLOAD, _PAYLOAD.pack(len(head)), head, raw.payload)


def record(r: Record) -> list[bytes]:
    return control(Kind.RECORD, list(record_row(r)))


# -- reading ----------------------------------------------------------------------------------

class Reader:
    """Splits received bytes into (kind, body) messages; keeps a partial one for the next feed."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Kind, bytes]]:
        buffer = self._buffer
        buffer += data
        out: list[tuple[Kind, bytes]] = []
        offset, end = 0, len(buffer)
        while end - offset >= HEADER.size:
            size, kind = HEADER.unpack_from(buffer, offset)
            if size > MAX_BODY:
                raise WireError(f"a message of {size} bytes")
            if end - offset - HEADER.size < size:
                break
            try:
                kind = Kind(kind)
            except ValueError:
                raise WireError(f"unknown message type {kind}") from None
            start = offset + HEADER.size
            offset = start + size
            out.append((kind, bytes(buffer[start:offset])))
        del buffer[:offset]
        return out

    @property
    def pending(self) -> int:
        return len(self._buffer)


def doc(body: bytes) -> Any:
    return json.loads(body)


def conn_of(body: bytes) -> tuple[int, Any]:
    """The connection number and the JSON document after it (None if there is none)."""
    rest = body[_CONN.size:]
    return _CONN.unpack_from(body)[0], json.loads(rest) if rest else None


def read_chunk(body: bytes) -> tuple[int, str, int, bytes]:
    conn, direction, time_ns = _CHUNK.unpack_from(body)
    return conn, DIRECTIONS[direction], time_ns, body[_CHUNK.size:]


def read_record(body: bytes) -> Record:
    return record_from_row(json.loads(body))


def read_payload(body: bytes) -> RawPayload:
    (size,) = _PAYLOAD.unpack_from(body)
    head = json.loads(body[_PAYLOAD.size:_PAYLOAD.size + size])
    origin = Origin(head["protocol"], head["device"], head["connection"], head["direction"])
    return RawPayload(origin, head["kind"], body[_PAYLOAD.size + size:], from_ns(head["received_ns"]), head["meta"])
