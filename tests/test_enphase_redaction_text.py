"""Enphase redaction's text pass: serials pseudonymised and network attributes removed in the XML
text before the parse, the tree checks skipped when the text shows they have nothing to do, and
the text stored as it is when the tree was left unchanged. Each report redacts to exactly the
records the tree alone gives, and no identity survives in the stored bytes, however it is spelt."""

from __future__ import annotations

import pytest

from pvtap.decode.enphase import decode_raw, parse_xml, redact_raw
from pvtap.decode.enphase import redaction as enphase_redaction
from pvtap.privacy import Privacy, pseudonym
from pvtap.records import RawPayload, Record
from pvtap.simulate.enphase import Simulator, encode_body
from tests.enphase_support import VECTOR_1, VECTOR_2, assert_records, request_raw, wire_body

KEY = b"k" * 32
PRIVACIES = {"default": Privacy(), "pseudonyms": Privacy(pseudonym_key=KEY),
             "keep network": Privacy(keep_network_identity=True, pseudonym_key=KEY)}
SERIALS = (b"999900000000", b"999900000001")
NETWORK = (b"192.0.2.10", b"00:00:5e:00:53:01")
HEAD = b'<?xml version="1.0" encoding="UTF-8"?><perf_report report_timestamp="1700000107">'
ENVOY = b'<envoy serial_num="999900000000" ip_addr="192.0.2.10" mac_addr="00:00:5e:00:53:01" timezone="Etc/UTC"/>'
INTERVAL = (b'<interval interval_duration="300" stat_duration="295" end_date="1700000100" stats="60000" '
            b'id="1" eqid="999900000001.1"/>')

REPORTS = {
    "usual": HEAD + ENVOY + INTERVAL + b"</perf_report>",
    "a serial in another attribute": HEAD + ENVOY + INTERVAL.replace(b' id="1"', b' note="for 999900000001" id="1"')
    + b"</perf_report>",
    "an address in text": HEAD + ENVOY + INTERVAL + b"<note>gateway at 192.0.2.10</note></perf_report>",
    "a serial hidden by a character reference": HEAD + ENVOY
    + INTERVAL.replace(b' id="1"', b' note="99990000000&#49;" id="1"') + b"</perf_report>",
    "a serial in a comment": HEAD + ENVOY + b"<!-- 999900000001 at 192.0.2.10 -->" + INTERVAL + b"</perf_report>",
    "an address spelt with a reference": HEAD + ENVOY.replace(b'"192.0.2.10"', b'"192.0.2.1&#48;"') + INTERVAL
    + b"</perf_report>",
    "single quotes": HEAD + ENVOY.replace(b'"', b"'") + INTERVAL + b"</perf_report>",
    "an empty serial": HEAD + ENVOY + INTERVAL.replace(b'"999900000001.1"', b'""') + b"</perf_report>",
    "latin-1": HEAD.replace(b"UTF-8", b"iso-8859-1") + ENVOY + INTERVAL + b"</perf_report>",
}


def tree_only(raw: RawPayload, privacy: Privacy, monkeypatch: pytest.MonkeyPatch) -> RawPayload:
    """Redaction without the text pass: every check and write on the tree, then serialised."""
    with monkeypatch.context() as patch:
        patch.setattr(enphase_redaction._Scrubber, "identities_in_text", lambda self, xml: xml)
        patch.setattr(enphase_redaction, "plain_markup", lambda xml: False)
        return redact_raw(raw, privacy)


def assert_redacts_as_the_tree(xml: bytes, privacy: Privacy, monkeypatch: pytest.MonkeyPatch) -> RawPayload:
    raw = request_raw(wire_body(xml))
    redacted = redact_raw(raw, privacy)
    reference = tree_only(raw, privacy, monkeypatch)
    assert_records(decode_raw(redacted), decode_raw(reference))
    assert redacted.origin == reference.origin and redacted.meta == reference.meta
    return redacted


@pytest.mark.parametrize("privacy", PRIVACIES.values(), ids=PRIVACIES.keys())
@pytest.mark.parametrize("name", REPORTS)
def test_the_text_pass_redacts_as_the_tree_and_leaves_no_identity(name, privacy, monkeypatch):
    redacted = assert_redacts_as_the_tree(REPORTS[name], privacy, monkeypatch)
    if privacy.pseudonym_key:
        for serial in SERIALS:
            assert serial not in redacted.payload
    if not privacy.keep_network_identity:
        for value in (*NETWORK, b"192.0.2.1&#48;", b"ip_addr", b"mac_addr"):
            assert value not in redacted.payload
    assert_records(decode_raw(redacted), decode_raw(request_raw(redacted.payload, None)))  # as stored


@pytest.mark.parametrize("xml", [VECTOR_1, VECTOR_2], ids=["vector 1", "vector 2"])
@pytest.mark.parametrize("privacy", PRIVACIES.values(), ids=PRIVACIES.keys())
def test_reference_vectors_redact_as_the_tree(xml, privacy, monkeypatch):
    assert_redacts_as_the_tree(xml, privacy, monkeypatch)


def test_a_catch_up_whose_text_pass_did_everything_is_stored_as_that_text(monkeypatch):
    report = Simulator(micros=10, start=1718928000).next_report(500)
    raw = request_raw(encode_body(report.xml))
    privacy = PRIVACIES["pseudonyms"]
    redacted = redact_raw(raw, privacy)
    text = enphase_redaction._Scrubber(privacy).identities_in_text(report.xml)
    assert redacted.payload == text  # not serialised again
    assert b"ip_addr" not in text and b"999900000001" not in text
    assert_records(decode_raw(redacted), decode_raw(tree_only(raw, privacy, monkeypatch)))
    assert redact_raw(request_raw(redacted.payload, None), privacy).payload == redacted.payload  # idempotent


def test_identities_left_in_the_text_are_scrubbed_from_the_tree():
    redacted = redact_raw(request_raw(wire_body(REPORTS["a serial hidden by a character reference"])),
                          PRIVACIES["pseudonyms"])
    records: list[Record] = decode_raw(redacted)
    assert records[1].fields["note"] == pseudonym("999900000001", KEY)
    interval = parse_xml(redacted.payload).find("interval")
    assert interval is not None and interval.get("note") == pseudonym("999900000001", KEY)
    text = redact_raw(request_raw(wire_body(REPORTS["an address in text"])), Privacy())
    assert decode_raw(text)[-1].fields["text"] == "gateway at REDACTED"


def test_every_network_attribute_has_a_name_part_the_text_is_searched_for():
    for name in enphase_redaction.NETWORK_ATTRIBUTES:
        assert any(part in name.encode() for part in enphase_redaction._NETWORK_NAME_PARTS)
