"""`pvtap status` shows, per store, the ingest worker, its decode backlog and dropped copies, and
a forwarder that is stuck (from the status row the worker writes every few seconds)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from pvtap.cli import main
from pvtap.records import Origin, RawPayload
from pvtap.store.local import IngestStatus, LocalStore

T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)


def test_status_shows_backlog_dropped_copies_and_a_stuck_forwarder(data_dir, capsys):
    with LocalStore.for_process(data_dir, "relay") as store:
        store.archive([RawPayload(Origin("alphaess"), "frame", b"x", T0) for _ in range(3)])
        store.write_status(IngestStatus(running=True, pid=4242, dropped_copies=17, decode_backlog=3,
                                        forwarder="stuck", forwarder_error="no progress for 301 s"))
    assert main(["--data-dir", str(data_dir), "status"]) == 0
    out = capsys.readouterr().out
    assert "  ingest worker  running (pid 4242), status from " in out
    assert "  decode backlog 3 payloads\n" in out
    assert "  dropped copies 17 (ingest was busy or down; forwarding was not affected)" in out
    assert "  forwarder      STUCK: no progress for 301 s" in out
    assert main(["--data-dir", str(data_dir), "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ingest"]["decode_backlog"] == 3 and doc["ingest"]["dropped_copies"] == 17
    assert doc["ingest"]["forwarder"] == "stuck"


def test_a_stopped_worker_with_a_backlog_says_when_it_is_decoded(data_dir, capsys):
    with LocalStore.for_process(data_dir, "enphase") as store:
        store.archive([RawPayload(Origin("enphase"), "performance_report", b"x", T0)])
        store.write_status(IngestStatus(running=False, pid=1, dropped_copies=0, decode_backlog=1))
    assert main(["--data-dir", str(data_dir), "status"]) == 0
    out = capsys.readouterr().out
    assert "  ingest worker  stopped " in out
    assert "  decode backlog 1 payloads (decoded when pvtap runs again)" in out
    assert "  dropped copies 0\n" in out and "forwarder      " not in out


def test_connections_and_decode_errors_from_the_status_row(data_dir, capsys):
    with LocalStore.for_process(data_dir, "relay") as store:
        store.write_status(IngestStatus(running=True, pid=7, dropped_copies=0, decode_backlog=0,
                                        counts={"connections": 12, "connections_open": 2, "decode_errors": 3}))
    assert main(["--data-dir", str(data_dir), "status"]) == 0
    out = capsys.readouterr().out
    assert "  connections    12 relayed, 2 open\n" in out
    assert "  decode errors  3 (their payloads are kept: pvtap replay decodes them again)\n" in out
