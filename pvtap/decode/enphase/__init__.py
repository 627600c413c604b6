"""Enphase Envoy cloud reports (`perf_report`, R3.x firmware): bytes in, records out, no I/O.

The Envoy POSTs `/emu_reports/performance_report?webcomm_version=<v>` with a zlib-compressed
body (`Content-Type: application/x-deflate`, no Content-Encoding) that holds a form whose `body`
field is the URL-encoded XML; the cloud answers with a zlib-compressed `perf_report_response`
listing the event ids it took (shared/reference/enphase.md §1, §2). Everything here works on
copies of those bytes: the addon forwards the originals untouched.

Raw payloads (built by the addon): requests are kind `performance_report`, `task_complete` or
`emu_report` (see `report_kind`), direction UP; responses are `<kind>_response`, direction DOWN,
with `meta["status_code"]`. `redact_raw` turns them into what the store keeps, recorded in
`meta["encoding"]`:

- `"xml"`: the report parsed; the payload is the redacted XML (utf-8);
- anything that does not parse (not zlib, cut off, over the size bounds, XML that does not parse,
  the undocumented `task_complete`/`emu_report` bodies) was not positively redacted, so it is
  withheld: payload empty, its size, SHA-256 and the reason in meta (`pvtap.decode.withhold`);
  with `[privacy] keep_unredacted` it is kept as received instead (`"original"`).

`decode_raw` accepts both, bare XML and the original compressed form; for a withheld
performance report (or its response) it raises ReportError with the reason.

Measurements (tags: `envoy` = Envoy serial, `eqid` = device or channel; both low-cardinality):
`enphase_envoy`, `enphase_event`, `enphase_device`, `enphase_channel`, `enphase_interval`,
`enphase_reading`, `enphase_report_response` and `enphase_element` (anything unknown). Every
field has one type everywhere (InfluxDB rejects a field that changes type): ids, flags, counts,
joules and seconds are int; physical quantities (V, Hz, A, °C, W, Wh, degrees) are float;
everything else, and every attribute this module does not know, is str.

Read once: `redact_raw` redacts what it can in the text (serials, network attributes), parses
it, checks and redacts the tree, and stores the text (when the tree needed nothing more and the
text holds only what the tree does) or the tree's serialisation; the tree goes on in the
payload's `parsed` (`ReportReading`), so `decode_raw` does not parse again. `decode_raw` reads
the usual intervals and readings (nearly all of a catch-up) from the text by one regex (`rows`),
the rest from the tree.

Modules: `envelope` (paths, zlib, the form, safe XML, the cloud's answer), `redaction`
(`redact_raw`), `records` (`decode_raw`), `rows` (the text fast path); this package re-exports
their public names.
"""

from __future__ import annotations

from .envelope import (
    DEFLATE_CONTENT_TYPE,
    MAX_INFLATED,
    MAX_XML,
    PROTOCOL,
    REPORTS_PREFIX,
    PayloadTooLarge,
    ReportError,
    ReportReading,
    build_response,
    event_ids,
    inflate,
    inflated,
    is_deflate,
    looks_like_xml,
    parse_xml,
    report_kind,
    report_xml,
    split_form,
)
from .records import EVENT_CODES, EVENT_STATES, decode_raw
from .redaction import NETWORK_ATTRIBUTES, SERIAL_ATTRIBUTES, redact_raw

__all__ = [
    "DEFLATE_CONTENT_TYPE",
    "EVENT_CODES",
    "EVENT_STATES",
    "MAX_INFLATED",
    "MAX_XML",
    "NETWORK_ATTRIBUTES",
    "PROTOCOL",
    "REPORTS_PREFIX",
    "SERIAL_ATTRIBUTES",
    "PayloadTooLarge",
    "ReportError",
    "ReportReading",
    "build_response",
    "decode_raw",
    "event_ids",
    "inflate",
    "inflated",
    "is_deflate",
    "looks_like_xml",
    "parse_xml",
    "redact_raw",
    "report_kind",
    "report_xml",
    "split_form",
]
