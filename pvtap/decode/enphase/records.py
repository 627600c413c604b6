"""Enphase records: a (redacted) report or response to time-series points.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta

from lxml import etree

from pvtap.records import FieldValue, Origin, RawPayload, Record, utc_from_unix

from ..withhold import is_withheld
from .envelope import PROTOCOL, ReportError, ReportReading, inflated, parse_xml, split_form
from .rows import usual_rows

EVENT_STATES = {0: "one-shot", 1: "set", 2: "clear"}
#: Event codes with a public meaning (reference §2.3, from larsks' constants.py).
EVENT_CODES = {
    101: "Grid instability",
    509: "Power on reset",
    512: "DC power too low",
    10000: "Microinverter failed to report",
    10009: "Microinverter sleeping",
}


# -- decoding ---------------------------------------------------------------------------------

def decode_raw(raw: RawPayload) -> list[Record]:
    """The records of a (redacted) report or response. Raises ReportError for a performance
    report or its response that cannot be read; other /emu_reports/ kinds (whose format is not
    public) give [] unless they hold a report this module knows."""
    strict = raw.kind.startswith("performance_report")
    if is_withheld(raw):
        if strict:
            raise ReportError(f"payload withheld: {raw.meta['withheld']}")
        return []
    reading = raw.parsed_as(ReportReading)
    if reading is not None:
        root, xml = reading.root, reading.source
    else:
        try:
            xml, _ = split_form(inflated(raw))
            root = parse_xml(xml)
        except ReportError:
            if strict:
                raise
            return []
    if root.tag == "perf_report":
        return _Report(root, raw, xml).records()
    if root.tag == "perf_report_response":
        return _response_records(root, raw)
    if strict:
        raise ReportError(f"unexpected root element <{root.tag!s}> in a {raw.kind}")
    return []


def _response_records(root: etree._Element, raw: RawPayload) -> list[Record]:
    """The cloud's answer. It carries no time of its own, so its record is stamped with the
    proxy's receive time (`raw.received`) — the one exception to report time."""
    origin = raw.origin
    ids = [i for i in (e.get("id") for e in root.iter("event")) if i is not None]
    fields: dict[str, FieldValue] = {
        "status": root.get("status", ""), "events_acknowledged": len(ids), "event_ids": ",".join(ids)}
    status_code = raw.meta.get("status_code")
    if isinstance(status_code, int) and not isinstance(status_code, bool):
        fields["http_status"] = status_code
    fields.update(_unknown(root.attrib, {"status"}, fields))
    tags = {"envoy": origin.device} if origin.device else {}
    records = [Record("enphase_report_response", raw.received, tags, fields, origin)]
    elements = _Elements(raw.received, tags, origin)
    for el in root.iterdescendants():
        if isinstance(el.tag, str) and el.tag not in ("events_processed", "event"):
            elements.add(el)
    return records + elements.records


class _Report:
    """One `perf_report` decoded into records, in document order after the envoy record."""

    def __init__(self, root: etree._Element, raw: RawPayload, xml: bytes) -> None:
        self.root = root
        try:
            self.timestamp = _int(root, "report_timestamp")
            self.time = utc_from_unix(self.timestamp)
        except _ELEMENT_ERRORS as exc:  # every report record needs it: nothing to stamp them with
            raise ReportError(f"perf_report without a usable report_timestamp ({exc})") from None
        self.envoy = next(root.iter("envoy"), None)
        serial = self.envoy.get("serial_num", "") if self.envoy is not None else ""
        self.origin = Origin(PROTOCOL, serial or raw.origin.device, raw.origin.connection, raw.origin.direction)
        self.tags = {"envoy": serial} if serial else {}
        self.elements = _Elements(self.time, self.tags, self.origin)
        self._times: dict[int, datetime] = {}
        self._tags: dict[str, Mapping[str, str]] = {}
        self._interval_rows, self._reading_rows = self._text_rows(xml)

    def _text_rows(self, xml: bytes) -> tuple[Iterator[list[int | str] | None], Iterator[list[int | str] | None]]:
        """The rows `rows.usual_rows` reads from the text, one per interval and reading element
        in document order; none (every element read from the tree) unless the text has exactly
        as many of each as the tree."""
        rows = usual_rows(xml)
        if rows is None or len(rows[0]) != _COUNT_INTERVALS(self.root) or len(rows[1]) != _COUNT_READINGS(self.root):
            return iter(()), iter(())
        return iter(rows[0]), iter(rows[1])

    def records(self) -> list[Record]:
        out: list[Record] = []
        counts = dict.fromkeys(_DECODERS, 0)
        decoded: set[etree._Element] = set()
        intervals, readings = self._interval_rows, self._reading_rows  # (looked up once: a thousand elements)
        interval_from_text, reading_from_text = self._interval_from_text, self._reading_from_text
        for el in self.root.iterdescendants():
            tag = el.tag
            decoder = _DECODERS.get(tag)  # type: ignore[arg-type]  # (a non-element's tag is a function: None)
            if decoder is None:
                if isinstance(tag, str) and el is not self.envoy \
                        and not (tag == "message_params" and el.getparent() in decoded):  # (part of its event)
                    self.elements.add(el)
                continue
            try:
                if tag == "interval" and (row := next(intervals, None)) is not None:
                    out.append(interval_from_text(*row))  # type: ignore[arg-type]
                elif tag == "reading" and (row := next(readings, None)) is not None:
                    out.append(reading_from_text(*row))  # type: ignore[arg-type]
                else:
                    out.append(decoder(self, el))
            except _ELEMENT_ERRORS as exc:
                self.elements.add(el, f"{type(exc).__name__}: {exc}")
            else:
                counts[tag] += 1  # type: ignore[index]
                if tag == "event":
                    decoded.add(el)
        return [self._envoy_record(counts), *out, *self.elements.records]

    def _envoy_record(self, counts: Mapping[str, int]) -> Record:
        """The report itself: the Envoy's identity (as redaction left it), the root attributes and
        how many records of each type the report held (a large count means a catch-up)."""
        fields: dict[str, FieldValue] = {"report_timestamp": self.timestamp}
        fields.update(_unknown(self.root.attrib, {"report_timestamp"}, fields))
        if self.envoy is not None:
            for name, value in self.envoy.attrib.items():
                if name in ("latitude", "longitude"):
                    number = _float_or_none(value)
                    if number is None:
                        fields[f"{name}_text"] = value
                    else:
                        fields[name] = number
                elif name != "serial_num":
                    fields[name] = value
        fields.update({f"{kind}_count": n for kind, n in counts.items()})
        return Record("enphase_envoy", self.time, self.tags, fields, self.origin)

    def _event(self, el: etree._Element) -> Record:
        """An event at its own `event_date`, shifted by (id mod 10⁶) µs.

        InfluxDB keeps one point per measurement + tags + timestamp, and event_date has one-second
        resolution: two events with the same eqid and code in the same second (a quick set and
        clear) would otherwise overwrite each other. The id is unique and monotonic, so the
        offset keeps them apart deterministically, keeps the point inside its stated second,
        orders events within a second by id, and makes an event the Envoy sends again (same id)
        the same point. Tagging the id instead would create a new series per event."""
        event_id = _int(el, "id")
        code = _int(el, "event_code")
        state = _int(el, "event_state")
        fields: dict[str, FieldValue] = {
            "id": event_id, "event_code": code, "state": EVENT_STATES.get(state, f"unknown-{state}"),
            "state_code": state}
        for name in ("correlation_id", "message_key"):
            if el.get(name) is not None:
                fields[name] = _int(el, name)
        serial = el.get("serial_num")
        if serial is not None:
            fields["serial_num"] = serial
        if code in EVENT_CODES:
            fields["description"] = EVENT_CODES[code]
        params = el.find("message_params")
        if params is not None:
            fields["message_params"] = params.text or ""
        fields.update(_unknown(el.attrib, _EVENT_ATTRIBUTES, fields))
        time = utc_from_unix(_int(el, "event_date")) + timedelta(microseconds=event_id % 1_000_000)
        return self._record("enphase_event", time, el.get("eqid"), fields, code=str(code))

    def _device(self, el: etree._Element) -> Record:
        fields = self._state_fields(el, _DEVICE_INTS, {"part_num"})
        return self._record("enphase_device", self.time, el.get("eqid"), fields)

    def _channel(self, el: etree._Element) -> Record:
        fields = self._state_fields(el, _CHANNEL_INTS, set())
        return self._record("enphase_channel", self.time, el.get("eqid"), fields)

    def _state_fields(self, el: etree._Element, ints: frozenset[str], strs: set[str]) -> dict[str, FieldValue]:
        fields: dict[str, FieldValue] = {name: _int(el, name) for name in sorted(ints) if el.get(name) is not None}
        fields.update({name: value for name in sorted(strs) if (value := el.get(name)) is not None})
        fields.update(_unknown(el.attrib, ints | strs | {"eqid"}, fields))
        if not fields:
            raise ValueError("no state attributes")
        return fields

    def _interval(self, el: etree._Element) -> Record:
        """Energy of one channel over one interval ending at `end_date`. `stats` is one integer,
        joules (webcomm 4.6.0); a comma list (possibly the 3.0 form, meaning unconfirmed) is kept
        as the text `stats`. Intervals of one channel with the same end_date (a catch-up roll-up
        ending with a 5-minute one) are one InfluxDB point; filter on interval_duration_s.
        (`records` reads those in the usual layout from the text: `_interval_from_text`; this
        reads any element, each attribute by name.)"""
        a = dict(el.items())
        duration = _int(a, "interval_duration", el)
        fields: dict[str, FieldValue] = {"id": _int(a, "id", el), "interval_duration_s": duration}
        if "stat_duration" in a:
            fields["stat_duration_s"] = _int(a, "stat_duration", el)
        stats = a.get("stats", "")
        if stats and "," not in stats:
            joules = _int64(stats)
            fields["energy_j"] = joules
            fields["energy_wh"] = joules / 3600
            if duration > 0:
                fields["avg_power_w"] = joules / duration
        elif stats:
            fields["stats"] = stats
        if not _INTERVAL_ATTRIBUTES.issuperset(a):
            fields.update(_unknown(a, _INTERVAL_ATTRIBUTES, fields))
        return self._record("enphase_interval", self._time(_int(a, "end_date", el)), a.get("eqid"), fields)

    def _interval_from_text(self, seconds: int, stat_seconds: int, end_date: int, joules: int, record_id: int,
                            eqid: str) -> Record:
        """`_interval` of a row in the usual layout (`rows.INTERVAL`): integers within 64 bits."""
        fields: dict[str, FieldValue] = {
            "id": record_id, "interval_duration_s": seconds, "stat_duration_s": stat_seconds, "energy_j": joules,
            "energy_wh": joules / 3600}
        if seconds > 0:
            fields["avg_power_w"] = joules / seconds
        return Record.trusted("enphase_interval", self._time(end_date), self._eqid_tags(eqid), fields, self.origin)

    def _reading(self, el: etree._Element) -> Record:
        """Electrical readings of one channel over `duration` seconds ending at `date`.

        stats = AC mV, AC mHz, DC mV, DC mA, °C, two unknown counters, and (8-value form) joules
        over the duration (reference §2.6). The two unknowns are kept as `stats_5`/`stats_6`: they
        may be pwrConvErrSecs/pwrConvMaxErrCycles, but that is unverified. (`records` reads those
        in the usual layout from the text: `_reading_from_text`; this reads any element, each
        attribute by name.)"""
        a = dict(el.items())
        stats = _int64s(a.get("stats", ""))
        if len(stats) < 5:
            raise ValueError(f"reading stats has {len(stats)} values, expected at least 5")
        duration = _int(a, "duration", el)
        fields: dict[str, FieldValue] = {
            "id": _int(a, "id", el),
            "duration_s": duration,
            "ac_voltage_v": stats[0] / 1000,
            "ac_frequency_hz": stats[1] / 1000,
            "dc_voltage_v": stats[2] / 1000,
            "dc_current_a": stats[3] / 1000,
            "temperature_c": float(stats[4]),
        }
        if "flags" in a:
            fields["flags"] = _int(a, "flags", el)
        count = len(stats)
        if count > 5:
            fields["stats_5"] = stats[5]
        if count > 6:
            fields["stats_6"] = stats[6]
        if count > 7:
            fields["energy_j"] = stats[7]
            if duration > 0:
                fields["avg_power_w"] = stats[7] / duration
        for index in range(8, count):
            fields[f"stats_{index}"] = stats[index]
        if not _READING_ATTRIBUTES.issuperset(a):
            fields.update(_unknown(a, _READING_ATTRIBUTES, fields))
        return self._record("enphase_reading", self._time(_int(a, "date", el)), a.get("eqid"), fields)

    def _reading_from_text(self, seconds: int, ac_mv: int, ac_mhz: int, dc_mv: int, dc_ma: int, temperature: int,
                           stats_5: int, stats_6: int, joules: int, date: int, record_id: int, flags: int,
                           eqid: str) -> Record:
        """`_reading` of a row in the usual layout (`rows.usual_rows`): integers within 64 bits."""
        fields: dict[str, FieldValue] = {
            "id": record_id, "duration_s": seconds, "ac_voltage_v": ac_mv / 1000, "ac_frequency_hz": ac_mhz / 1000,
            "dc_voltage_v": dc_mv / 1000, "dc_current_a": dc_ma / 1000, "temperature_c": float(temperature),
            "flags": flags, "stats_5": stats_5, "stats_6": stats_6, "energy_j": joules}
        if seconds > 0:
            fields["avg_power_w"] = joules / seconds
        return Record.trusted("enphase_reading", self._time(date), self._eqid_tags(eqid), fields, self.origin)

    def _eqid_tags(self, eqid: str) -> Mapping[str, str]:
        """The tags of a channel's records: one dict per eqid, shared by its records (a catch-up
        names each channel in a hundred elements; a record's tags are never changed)."""
        tags = self._tags.get(eqid)
        if tags is None:
            tags = self._tags[eqid] = {**self.tags, "eqid": eqid} if eqid else dict(self.tags)
        return tags

    def _time(self, unix: int) -> datetime:
        """A report's intervals and readings share a few dozen timestamps: each is made once."""
        time = self._times.get(unix)
        if time is None:
            time = self._times[unix] = utc_from_unix(unix)
        return time

    def _record(self, measurement: str, time: datetime, eqid: str | None, fields: dict[str, FieldValue],
                **extra_tags: str) -> Record:
        """A known element's record. Its fields are typed by construction (`Record.typed`): ints
        within 64 bits (`_int64`), floats from them by arithmetic, attribute text as str."""
        tags = {**self.tags, "eqid": eqid} if eqid else dict(self.tags)
        if extra_tags:
            tags.update(extra_tags)
        return Record.typed(measurement, time, tags, fields, self.origin)


#: What a malformed known element raises (missing or non-integer attribute, a date out of range):
#: the element is then kept as an `enphase_element` with the error.
_ELEMENT_ERRORS = (ValueError, KeyError, OverflowError, OSError)
_EVENT_ATTRIBUTES = frozenset({"id", "event_code", "event_state", "correlation_id", "eqid", "serial_num",
                               "event_date", "message_key"})
_DEVICE_INTS = frozenset({"condition_flags", "observed_flags", "control_bits", "image_bits", "device_type",
                          "admin_state"})
_CHANNEL_INTS = frozenset({"condition_flags", "observed_flags", "control_bits", "channel_type"})
_INTERVAL_ATTRIBUTES = frozenset({"id", "eqid", "end_date", "interval_duration", "stat_duration", "stats"})
_READING_ATTRIBUTES = frozenset({"id", "eqid", "date", "duration", "flags", "stats"})

_COUNT_INTERVALS = etree.XPath("count(//interval)")
_COUNT_READINGS = etree.XPath("count(//reading)")

_DECODERS: dict[str, Callable[[_Report, etree._Element], Record]] = {
    "event": _Report._event,
    "device": _Report._device,
    "channel": _Report._channel,
    "interval": _Report._interval,
    "reading": _Report._reading,
}


class _Elements:
    """`enphase_element` records for elements this module does not know (or could not read):
    their attributes and text as str fields, tagged with the element name and its ordinal among
    same-named elements of the payload, so two of them never collide into one point. Wrapper
    elements without attributes or text add nothing and are skipped."""

    def __init__(self, time: datetime, tags: Mapping[str, str], origin: Origin) -> None:
        self.time, self.tags, self.origin = time, tags, origin
        self.records: list[Record] = []
        self._seen: dict[str, int] = {}

    def add(self, el: etree._Element, error: str | None = None) -> None:
        tag = el.tag
        assert isinstance(tag, str), "an element, not a comment or processing instruction"
        fields: dict[str, FieldValue] = dict(el.attrib)
        text = (el.text or "").strip()
        if text:
            fields["text"] = text
        if not fields and error is None:
            return
        if error is not None:
            fields["decode_error"] = error
        parent = el.getparent()
        if parent is not None:
            fields["parent"] = str(parent.tag)  # the parent of a parsed element: its tag is a str already
        n = self._seen.get(tag, 0)
        self._seen[tag] = n + 1
        tags = {**self.tags, "element": tag, "n": str(n)}
        self.records.append(Record("enphase_element", self.time, tags, fields, self.origin))


def _unknown(attrib: Mapping[str, str] | etree._Attrib, known: frozenset[str] | set[str],
             taken: Mapping[str, FieldValue]) -> dict[str, str]:
    """Attributes this module does not know, as str fields under their own names (a later
    version that learns one gives its typed value a new name, so the type never flips)."""
    return {name: value for name, value in attrib.items() if name not in known and name not in taken}


def _int(source: etree._Element | Mapping[str, str], name: str, el: etree._Element | None = None) -> int:
    """An integer attribute of an element (or of its attributes, `el` naming it in errors)."""
    value = source.get(name)
    if value is not None:
        try:
            number = int(value)
        except ValueError:
            pass
        else:
            if len(value) <= 18 or -(2**63) <= number < 2**63:  # 18 characters: within 64 bits
                return number
    tag = (el if el is not None else source).tag  # type: ignore[union-attr]
    if value is None:
        raise KeyError(f"<{tag!s}> has no {name}")
    try:
        return _int64(value)
    except ValueError as exc:
        raise ValueError(f"<{tag!s}> {name}: {exc}") from None


def _int64(text: str) -> int:
    """An integer InfluxDB can store (a bigger one would make it reject the whole write)."""
    number = int(text)
    if len(text) > 18 and not -(2**63) <= number < 2**63:  # 18 characters: within 64 bits
        raise ValueError(f"{text!r} is out of the 64-bit range")
    return number


def _int64s(text: str) -> list[int]:
    """A comma list of `_int64`s, converted and range-checked in C."""
    items = text.split(",")
    try:
        numbers = list(map(int, items))
    except ValueError:
        numbers = []  # the first bad item raises below, as the items are read in turn
    if numbers and min(numbers) >= -(2**63) and max(numbers) < 2**63:
        return numbers
    return [_int64(item) for item in items]


def _float_or_none(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None
