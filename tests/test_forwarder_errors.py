"""The forwarder against a scripted local /api/v2/write server: every answer handled as stated.

429 + Retry-After waits exactly that long; 413 splits; 400/422 dead-letter only the offending
records; 401/403 keep the backlog and say so loudly; 500 and connection errors retry with
capped back-off; a hanging server times out, and stopping is quick even then.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvtap.certs import self_signed, write_pair
from pvtap.store.delivery import read_deadletters, read_status
from pvtap.store.forwarder import Forwarder, parse_retry_after
from pvtap.store.local import LocalStore
from tests.conftest import free_port
from tests.forwarder_support import config, expected_lines, forwarding, make_records, wait_until
from tests.servers import Reply, ScriptedInflux


@pytest.fixture
def store(data_dir: Path) -> Iterator[LocalStore]:
    s = LocalStore.for_process(data_dir, "relay")
    yield s
    s.close()


def fill(store: LocalStore, n: int, **kw) -> list:
    records = make_records(n, **kw)
    store.append(records)
    return records


def test_accepted_batches_move_the_cursor_and_carry_exact_lines(store):
    records = fill(store, 250)
    with ScriptedInflux() as server, forwarding(store, config(server.url)) as fwd:
        assert fwd.drain(10)
        assert server.accepted == expected_lines(records)
        assert [len(r.lines) for r in server.requests] == [100, 100, 50]  # batches by size, then by age
        state = read_status(store.path)
        assert (state.cursor, state.delivered, state.backlog, state.deadletters) == (250, 250, 0, 0)
        assert state.last_success_ns and state.last_error is None


@pytest.mark.parametrize("flavour, token, org, bucket", [
    ("InfluxDB 2.x", "an-api-token", "home", "pvtap"),
    ("InfluxDB 1.8", "pvuser:pvpass", "-", "solar/autogen"),
    ("InfluxDB 3", "apiv3_a-database-token", "-", "solar"),
])
def test_settings_for_each_influxdb_flavour(store, flavour, token, org, bucket):
    """The documented settings (docs/influxdb.md) produce the request each server expects."""
    records = fill(store, 3)
    with ScriptedInflux() as server, forwarding(store, config(server.url, token=token, org=org, bucket=bucket)) as fwd:
        assert fwd.drain(10)
    (request,) = server.requests
    assert request.path == "/api/v2/write"
    assert request.query == {"org": org, "bucket": bucket, "precision": "ns"}
    assert request.headers["authorization"] == f"Token {token}"
    assert request.lines == expected_lines(records)


def test_gzip_setting_compresses_the_body(store):
    records = fill(store, 20)
    with ScriptedInflux() as server, forwarding(store, config(server.url, gzip=True)) as fwd:
        assert fwd.drain(10)
    assert server.requests[0].headers["content-encoding"] == "gzip"
    assert server.accepted == expected_lines(records)


def test_429_waits_exactly_as_long_as_retry_after_says(store):
    records = fill(store, 10)

    def script(req, n):
        return Reply(429, b'{"message":"too many requests"}', {"Retry-After": "1"}) if n == 0 else Reply()

    with ScriptedInflux(script) as server, forwarding(store, config(server.url, retry_initial_s=0.01)) as fwd:
        assert fwd.drain(10)
    first, second = server.requests
    assert first.status == 429 and second.status == 204
    assert 0.95 <= second.received - first.received < 2.5  # not the 10 ms back-off
    assert server.accepted == expected_lines(records)


def test_retry_after_as_http_date_and_cap(store):
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    wait = parse_retry_after(future)
    assert wait is not None and 28 <= wait <= 31
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    fill(store, 1)
    # a server asking for an hour is held to influx.retry_after_max_s

    def script(req, n):
        return Reply(503, b"", {"Retry-After": "3600"}) if n == 0 else Reply()

    with ScriptedInflux(script) as server, forwarding(store, config(server.url, retry_after_max_s=0.5)) as fwd:
        assert fwd.drain(5)
    assert 0.45 <= server.requests[1].received - server.requests[0].received < 2.5  # not 3600 s


def test_413_splits_the_batch_until_it_fits(store):
    records = fill(store, 100)

    def script(req, n):
        return Reply(413, b'{"message":"request too large"}') if len(req.lines) > 30 else Reply()

    with ScriptedInflux(script) as server, forwarding(store, config(server.url)) as fwd:
        assert fwd.drain(10)
    sizes = [(len(r.lines), r.status) for r in server.requests]
    assert sizes[:3] == [(100, 413), (50, 413), (25, 204)]
    assert sorted(server.accepted) == sorted(expected_lines(records))
    assert len(server.accepted) == 100  # every record once
    assert read_status(store.path).deadletters == 0


def test_413_for_a_single_record_dead_letters_it(store):
    records = fill(store, 8)
    big = make_records(1, 100, tags={"note": "huge"})
    store.append(big)

    def script(req, n):
        return Reply(413, b'{"message":"request too large"}') if any("huge" in line for line in req.lines) else Reply()

    with ScriptedInflux(script) as server, forwarding(store, config(server.url)) as fwd:
        assert fwd.drain(10)
    assert sorted(server.accepted) == sorted(expected_lines(records))
    (dead,) = read_deadletters(store.path)
    assert (dead.record_id, dead.status, dead.message) == (9, 413, "request too large")


def test_422_moves_only_the_offending_record_to_the_dead_letters(store, caplog):
    before = fill(store, 6)
    bad = make_records(1, 6, tags={"quality": "bad"})
    store.append(bad)
    after = fill(store, 13, start=7)
    message = ('partial write: field type conflict: input field "p_w" on measurement "inverter" is type float, '
               'already exists as type integer dropped=1')

    def script(req, n):
        return (Reply(422, json.dumps({"code": "unprocessable entity", "message": message}).encode())
                if any("quality=bad" in line for line in req.lines) else Reply())

    with caplog.at_level(logging.WARNING, "pvtap.forward"), ScriptedInflux(script) as server, \
            forwarding(store, config(server.url)) as fwd:
        assert fwd.drain(10)
    good = expected_lines(before + after)
    assert sorted(set(server.accepted)) == sorted(good)  # every other record went on
    (dead,) = read_deadletters(store.path)
    assert (dead.record_id, dead.status, dead.message) == (7, 422, message)
    assert dead.line == expected_lines(before + bad)[-1]
    assert dead.record == bad[0]
    state = read_status(store.path)
    assert (state.cursor, state.backlog, state.delivered, state.deadletters) == (20, 0, 19, 1)
    assert "record #7 rejected (422)" in caplog.text


def test_400_finds_two_bad_records_among_many(store):
    records = make_records(40)
    bad_ids = {11, 29}
    records = [make_records(1, i, tags={"quality": "bad"})[0] if i + 1 in bad_ids else r for i, r in enumerate(records)]
    store.append(records)

    def script(req, n):
        return (Reply(400, b'{"message":"unable to parse"}')
                if any("quality=bad" in line for line in req.lines) else Reply())

    with ScriptedInflux(script) as server, forwarding(store, config(server.url, batch_size=40)) as fwd:
        assert fwd.drain(10)
    dead = read_deadletters(store.path)
    assert {d.record_id for d in dead} == bad_ids and {d.status for d in dead} == {400}
    good = [line for i, line in enumerate(expected_lines(records)) if i + 1 not in bad_ids]
    assert sorted(set(server.accepted)) == sorted(good)
    assert len(server.requests) < 30  # split, not one request per record


@pytest.mark.parametrize("status", [401, 403])
def test_token_refused_keeps_the_backlog_and_says_so(store, caplog, status):
    records = fill(store, 30)
    refusing = {"on": True}

    def script(req, n):
        return Reply(status, b'{"code":"unauthorized","message":"unauthorized access"}') if refusing["on"] else Reply()

    with caplog.at_level(logging.INFO, "pvtap.forward"), ScriptedInflux(script) as server, \
            forwarding(store, config(server.url)) as fwd:
        assert wait_until(lambda: len(server.requests) >= 3)
        state = read_status(store.path)
        assert (state.cursor, state.backlog, state.deadletters) == (0, 30, 0)
        assert state.last_error == f"{status} unauthorized access"
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1  # loud, but not once per retry
        assert "REFUSED THE TOKEN" in errors[0].getMessage() and "influx.token" in errors[0].getMessage()
        assert "30 records are kept" in errors[0].getMessage()
        refusing["on"] = False  # the token was fixed
        assert fwd.drain(10)
    assert server.accepted == expected_lines(records)
    assert "works again" in caplog.text


def test_404_bucket_not_found_keeps_the_backlog(store, caplog):
    fill(store, 5)

    def script(req, n):
        return Reply(404, b'{"code":"not found","message":"bucket \\"pvtap\\" not found"}') if n < 2 else Reply()

    with caplog.at_level(logging.ERROR, "pvtap.forward"), ScriptedInflux(script) as server, \
            forwarding(store, config(server.url)) as fwd:
        assert fwd.drain(10)
    assert len(server.accepted) == 5 and read_status(store.path).deadletters == 0
    assert 'bucket "pvtap" not found' in caplog.text and "influx.bucket" in caplog.text


def test_500_retries_with_capped_exponential_backoff(store):
    records = fill(store, 10)

    def script(req, n):
        return Reply(500, b'{"message":"internal error"}') if n < 7 else Reply()

    with ScriptedInflux(script) as server, \
            forwarding(store, config(server.url, retry_initial_s=0.1, retry_max_s=0.4)) as fwd:
        assert fwd.drain(20)
    times = [r.received for r in server.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    nominal = [0.1, 0.2, 0.4, 0.4, 0.4, 0.4, 0.4]  # doubling, capped at retry_max_s; jitter picks in [d/2, d]
    assert len(gaps) == 7
    assert all(gap >= d / 2 - 0.01 for gap, d in zip(gaps, nominal)), gaps
    assert sum(gaps) < sum(nominal) + 1.0, gaps  # uncapped doubling would take more than 6 s
    assert server.accepted == expected_lines(records)


def test_a_hanging_server_times_out_and_the_batch_is_sent_again_identically(store):
    records = fill(store, 10)

    def script(req, n):
        return Reply(204, delay=4) if n == 0 else Reply()

    with ScriptedInflux(script) as server, forwarding(store, config(server.url, timeout_s=0.3)) as fwd:
        assert fwd.drain(10)
        assert "timed out" in (read_status(store.path).last_error or "").lower()
    first, second = server.requests[:2]
    assert 0.2 <= second.received - first.received < 3  # the client gave up (0.3 s), did not wait 4 s
    assert first.lines == second.lines == expected_lines(records)  # a re-send is the same points (dedup)


def test_stop_is_quick_while_a_write_hangs(store):
    fill(store, 10)
    with ScriptedInflux(lambda req, n: Reply(204, delay=30)) as server:
        fwd = Forwarder(store, config(server.url, timeout_s=20)).start()
        assert wait_until(lambda: len(server.requests) == 1)
        t = time.monotonic()
        fwd.stop(1.0)
        assert time.monotonic() - t < 1.5
    assert read_status(store.path).cursor == 0  # nothing was marked delivered


def test_connection_refused_retries_until_the_server_appears(store):
    records = fill(store, 10)
    port = free_port()
    with forwarding(store, config(f"http://127.0.0.1:{port}", retry_max_s=0.1)) as fwd:
        assert wait_until(lambda: "refused" in (read_status(store.path).last_error or ""))
        tried = fwd.failed_attempts
        wait_until(lambda: fwd.failed_attempts >= tried + 3, what="three more refused attempts")
        assert read_status(store.path).backlog == 10
        with ScriptedInflux(port=port) as server:
            assert fwd.drain(10)
    assert server.accepted == expected_lines(records)


def test_tls_with_a_ca_file_and_without_verification(store, tmp_path):
    cert, key = self_signed("influxdb.test", ["127.0.0.1"], organization="pvtap test")
    cert_path, key_path = write_pair(tmp_path, "influx", cert, key)
    records = fill(store, 5)
    with ScriptedInflux(tls=(cert_path, key_path)) as server:
        assert server.url.startswith("https://")
        # verification on, CA unknown: refused, kept, retried
        with forwarding(store, config(server.url)) as fwd:
            assert wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in (read_status(store.path).last_error or ""))
            assert server.accepted == [] and read_status(store.path).backlog == 5
        with forwarding(store, config(server.url, ca_file=str(cert_path))) as fwd:
            assert fwd.drain(10)
        assert server.accepted == expected_lines(records)
        more = make_records(2, 5)
        store.append(more)
        with forwarding(store, config(server.url, verify_tls=False)) as fwd:
            assert fwd.drain(10)
        assert server.accepted == expected_lines(records + more)
