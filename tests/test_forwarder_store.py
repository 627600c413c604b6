"""Delivery state in the store: dead letters and requeue, the field-type rule, the disk bound,
`pvtap status` / `pvtap deadletters` / `pvtap forward`, one forwarder per store, progress."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvtap.cli import main
from pvtap.records import Origin, RawPayload, Record
from pvtap.store import forwarder as forwarder_module
from pvtap.store.delivery import DeliveryLog, read_deadletters, read_status
from pvtap.store.forwarder import Forwarder
from pvtap.store.local import LocalStore
from tests.conftest import REPO
from tests.forwarder_support import T0, config, expected_lines, forwarding, make_records, mark_delivered, wait_until
from tests.servers import Reply, ScriptedInflux


@pytest.fixture
def store(data_dir: Path) -> Iterator[LocalStore]:
    s = LocalStore.for_process(data_dir, "relay")
    yield s
    s.close()


def write_config(tmp_path: Path, url: str, data_dir: Path, **extra) -> Path:
    influx = {"url": url, "token": "test-token", "org": "-", "bucket": "pvtap", "batch_size": 50,
              "batch_age_s": 0.05, "retry_initial_s": 0.05, "retry_max_s": 0.2, **extra}
    body = f'data_dir = "{data_dir}"\n[influx]\n' + "".join(
        f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n" for k, v in influx.items())
    path = tmp_path / "pvtap.toml"
    path.write_text(body)
    return path


# -- dead letters --------------------------------------------------------------------------------

def test_dead_letters_are_listed_and_requeued(store, tmp_path, data_dir, capsys):
    good = make_records(5)
    bad = make_records(1, 5, tags={"quality": "bad"})
    store.append(good + bad)
    rejecting = {"on": True}

    def script(req, n):
        return (Reply(400, b'{"message":"field type conflict"}')
                if rejecting["on"] and any("quality=bad" in line for line in req.lines) else Reply())

    with ScriptedInflux(script) as server:
        cfg_path = write_config(tmp_path, server.url, data_dir)
        with forwarding(store, config(server.url)) as fwd:
            assert fwd.drain(10)
            assert main(["--config", str(cfg_path), "deadletters"]) == 0
            out = capsys.readouterr()
            assert "relay.sqlite #1  record #6" in out.out and "HTTP 400" in out.out
            assert "field type conflict" in out.out and expected_lines(good + bad)[-1] in out.out
            assert "1 dead letters" in out.err
            assert main(["--config", str(cfg_path), "deadletters", "list", "--json"]) == 0
            (entry,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            assert entry["record_id"] == 6 and entry["status"] == 400 and entry["tags"]["quality"] == "bad"

            rejecting["on"] = False  # the bucket's schema was fixed
            assert main(["--config", str(cfg_path), "deadletters", "requeue", "--all"]) == 0
            assert "requeued 1 dead letters" in capsys.readouterr().out
            assert wait_until(lambda: read_deadletters(store.path) == [])
        assert sorted(set(server.accepted)) == sorted(expected_lines(good + bad))
        state = read_status(store.path)
        assert (state.delivered, state.deadletters, state.requeued) == (6, 0, 0)


def test_requeued_dead_letter_rejected_again_stays_with_the_new_message(store):
    store.append(make_records(1, tags={"quality": "bad"}))
    messages = iter([b'{"message":"first refusal"}', b'{"message":"second refusal"}'])
    with ScriptedInflux(lambda req, n: Reply(422, next(messages))) as server, \
            forwarding(store, config(server.url)):
        assert wait_until(lambda: len(read_deadletters(store.path)) == 1)
        delivery = DeliveryLog(store.path)
        assert delivery.requeue([1]) == 1
        delivery.close()
        assert wait_until(lambda: read_deadletters(store.path)[0].message == "second refusal")
    (dead,) = read_deadletters(store.path)
    assert not dead.requeued and dead.status == 422 and len(server.requests) == 2


# -- what is written -----------------------------------------------------------------------------

def rec(fields: dict, i: int = 0, measurement: str = "battery", tags: dict | None = None) -> Record:
    return Record(measurement, T0.replace(second=i), tags or {"serial": "SN-TEST-0002"}, fields, Origin("alphaess"))


def test_field_types_stay_as_first_written_across_restarts(store):
    store.append([
        rec({"soc": 45, "p_w": 120.5, "mode": "charge"}, 0),   # soc integer, p_w float, mode string
        rec({"soc": 46.0, "p_w": 121, "mode": "idle"}, 1),      # whole float -> integer; int -> float
        rec({"soc": 46.5}, 2),                                  # a fraction for an integer field: refused
        rec({"mode": 3}, 3),                                    # a number for a string field: refused
        rec({"p_w": True}, 4),                                  # a boolean for a float field: refused
    ])
    with ScriptedInflux() as server:
        with forwarding(store, config(server.url)) as fwd:
            assert fwd.drain(10)
        assert server.accepted == [
            'battery,serial=SN-TEST-0002 mode="charge",p_w=120.5,soc=45i 1793491200000000000',
            'battery,serial=SN-TEST-0002 mode="idle",p_w=121,soc=46i 1793491201000000000',
        ]
        dead = read_deadletters(store.path)
        assert [(d.record_id, d.status) for d in dead] == [(3, None), (4, None), (5, None)]
        assert dead[0].message == ("field 'soc' of 'battery' was first written as integer; this value 46.5 is "
                                   "float, and InfluxDB rejects a field that changes type")
        # the rule survives a restart: the types are kept in the store
        store.append([rec({"soc": 47.0, "p_w": 7}, 6)])
        with forwarding(store, config(server.url)) as fwd:
            assert fwd.drain(10)
        assert server.accepted[-1] == 'battery,serial=SN-TEST-0002 p_w=7,soc=47i 1793491206000000000'


def test_names_line_protocol_cannot_carry_are_refused_locally(store):
    ok = make_records(2)
    unwritable = [
        rec({"v": 1.0}, 10, tags={"site": "ends with \\"}),
        rec({"v": 1.0}, 11, tags={"site": "a\\,b"}),
        rec({"v": 1.0}, 12, measurement="#comment"),
        rec({"v\nx": 1.0}, 13),
        rec({"big": 2**64}, 14),
    ]
    store.append(ok + unwritable)
    with ScriptedInflux() as server, forwarding(store, config(server.url)) as fwd:
        assert fwd.drain(10)
    assert server.accepted == expected_lines(ok)
    dead = read_deadletters(store.path)
    assert [d.record_id for d in dead] == [3, 4, 5, 6, 7] and {d.status for d in dead} == {None}
    assert "backslash" in dead[0].message and "backslash" in dead[1].message
    assert "comment" in dead[2].message and "line break" in dead[3].message and "64-bit" in dead[4].message


# -- the disk bound ------------------------------------------------------------------------------

def fill_with_raw(store: LocalStore, payloads: int, per_payload: int = 5) -> None:
    for p in range(payloads):
        raw = RawPayload(Origin("alphaess", "SN-TEST-0001"), "frame", os.urandom(4000), T0)
        raw_id = store.add_raw(raw)
        store.append(make_records(per_payload, p * per_payload), raw_id=raw_id)


def test_prune_takes_delivered_rows_first_then_logs_dropped_undelivered(store, caplog):
    fill_with_raw(store, 200)  # ~1000 records, ~1 MB of raw payloads
    mark_delivered(store.path, 600)
    delivery = DeliveryLog(store.path)
    size = delivery.used_bytes()
    assert size > 900_000
    with caplog.at_level(logging.INFO, "pvtap.forward"):
        # room for the undelivered part: only delivered rows go
        pruned_delivered, pruned_undelivered = delivery.prune(int(size * 0.6), "drop")
        assert pruned_delivered == pytest.approx(600, abs=100) and pruned_undelivered == 0
        state = read_status(store.path)
        assert state.backlog == 400 and state.dropped == 0
        assert delivery.used_bytes() <= size * 0.6
        remaining = [r.id for r in LocalStore(store.path, readonly=True).records()]
        assert remaining[-400:] == list(range(601, 1001))  # every undelivered record is still there
        assert "ERROR" not in caplog.text

        # a bound below the backlog: the oldest undelivered go too, and that is an error with the count
        assert delivery.prune(200_000, "later") == (0, 0)  # delivery works: no loss, no error
        assert "ERROR" not in caplog.text
        _, dropped = delivery.prune(200_000, "drop")
        assert dropped > 0 and delivery.used_bytes() <= 200_000
        state = read_status(store.path)
        assert state.dropped == dropped and state.backlog == 400 - dropped
        assert state.cursor == 600 + dropped  # the cursor moved past what was dropped
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and f"DROPPED {dropped} undelivered records" in errors[0]
    delivery.close()


def test_prune_keeps_undelivered_when_told_to_and_says_so(store, caplog):
    fill_with_raw(store, 100)
    delivery = DeliveryLog(store.path)
    with caplog.at_level(logging.ERROR, "pvtap.forward"):
        assert delivery.prune(100_000, "keep") == (0, 0)
    assert read_status(store.path).backlog == 500
    assert "500 undelivered records are kept" in caplog.text
    delivery.close()


def test_forwarder_enforces_the_bound_while_delivering(store, monkeypatch):
    monkeypatch.setattr(forwarder_module, "PRUNE_EVERY_S", 0.1)
    fill_with_raw(store, 300)
    with ScriptedInflux() as server, forwarding(store, config(server.url, max_store_mb=1)) as fwd:
        assert fwd.drain(10)
        assert wait_until(lambda: read_status(store.path).size_bytes <= 2**20)
    state = read_status(store.path)
    assert state.dropped == 0 and len(server.accepted) == 1500  # only delivered rows were pruned


# -- seeing it ---------------------------------------------------------------------------------

def test_status_shows_backlog_success_error_rate_and_dead_letters(store, tmp_path, data_dir, capsys):
    store.append(make_records(20))
    store.append(make_records(1, 20, tags={"quality": "bad"}))
    LocalStore.for_process(data_dir, "enphase").close()  # a store no forwarder has seen

    def script(req, n):
        return (Reply(503, b'{"message":"busy"}') if n == 0 else Reply(422, b'{"message":"bad point"}')
                if any("quality=bad" in line for line in req.lines) else Reply())

    with ScriptedInflux(script) as server:
        with forwarding(store, config(server.url)) as fwd:
            assert fwd.drain(10)
        store.append(make_records(7, 30))  # waiting
        cfg = write_config(tmp_path, server.url, data_dir)
        assert main(["--config", str(cfg), "status", "--json"]) == 0
        enphase, relay = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert enphase["store"] == "enphase.sqlite" and not enphase["forwarded"] and enphase["backlog"] == 0
        assert relay["backlog"] == 7 and relay["oldest_id"] == 22
        assert relay["oldest_time_ns"] == make_records(1, 30)[0].time_ns
        assert relay["delivered"] == 20 and relay["deadletters"] == 1
        assert relay["last_error"] == "503 busy" and relay["last_success_ns"] > relay["last_error_ns"] - 1
        assert relay["rate_1m"] == pytest.approx(20 / 60)
        assert main(["--config", str(cfg), "status"]) == 0
        out = capsys.readouterr().out
        assert f"InfluxDB: {server.url} (org -, bucket pvtap)" in out
        assert "backlog        7 records, oldest #22 from 2026-11-01T00:00:30Z" in out
        assert "last error" in out and "503 busy (since recovered)" in out
        assert "rate           0.3 records/s over 1 min" in out
        assert "dead letters   1  -> pvtap deadletters" in out
        assert "enphase.sqlite" in out and "never forwarded" in out


def test_a_long_drain_logs_progress(store, caplog, monkeypatch):
    monkeypatch.setattr(forwarder_module, "PROGRESS_EVERY_S", 0.2)
    store.append(make_records(400))
    with caplog.at_level(logging.INFO, "pvtap.forward"), \
            ScriptedInflux(lambda req, n: Reply(204, delay=0.03)) as server, \
            forwarding(store, config(server.url, batch_size=10)) as fwd:
        assert fwd.drain(20)
    progress = [r.getMessage() for r in caplog.records if "draining backlog" in r.getMessage()]
    assert progress and "records/s" in progress[0] and "waiting, about" in progress[0]


def test_one_forwarder_per_store(store, caplog):
    store.append(make_records(5))
    with caplog.at_level(logging.INFO, "pvtap.forward"), ScriptedInflux() as server:
        first = Forwarder(store, config(server.url)).start()
        assert first.drain(10)
        second = Forwarder(store, config(server.url)).start()
        assert wait_until(lambda: "another process is forwarding this store" in caplog.text)
        store.append(make_records(5, 5))
        assert first.drain(10)
        first.stop()
        store.append(make_records(5, 10))
        assert second.drain(10)  # took over once the first let go
        second.stop()
    assert server.accepted == expected_lines(make_records(15))  # each record once, in order


def test_forward_command_drains_every_store_once(tmp_path, data_dir):
    for name, n in (("enphase", 30), ("relay", 70)):
        with LocalStore.for_process(data_dir, name) as s:
            s.append(make_records(n, measurement=name))
    with ScriptedInflux() as server:
        cfg = write_config(tmp_path, server.url, data_dir)
        proc = subprocess.run([sys.executable, "-m", "pvtap", "--config", str(cfg), "forward", "--once",
                               "--timeout", "20"], capture_output=True, text=True, cwd=REPO, timeout=60,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        assert "delivered 100 records" in proc.stderr
        assert sorted(server.accepted) == sorted(expected_lines(make_records(30, measurement="enphase"))
                                                 + expected_lines(make_records(70, measurement="relay")))


def test_forward_command_without_url_names_the_setting(tmp_path, data_dir):
    proc = subprocess.run([sys.executable, "-m", "pvtap", "--data-dir", str(data_dir), "forward"],
                          capture_output=True, text=True, cwd=REPO, timeout=60, env={**os.environ, "PVTAP_CONFIG": ""},
                          check=False)
    assert proc.returncode == 2 and "influx.url is not set" in proc.stderr


@pytest.mark.parametrize("prune_undelivered", [True, False])
def test_forwarder_drops_undelivered_only_while_delivery_fails(store, caplog, monkeypatch, prune_undelivered):
    monkeypatch.setattr(forwarder_module, "PRUNE_EVERY_S", 0.1)
    fill_with_raw(store, 300)  # ~1.3 MB, all undelivered

    def script(req, n):
        return Reply(500, b'{"message":"down"}')

    with caplog.at_level(logging.ERROR, "pvtap.forward"), ScriptedInflux(script) as server, \
            forwarding(store, config(server.url, max_store_mb=1, prune_undelivered=prune_undelivered)):
        assert wait_until(lambda: "undelivered" in caplog.text)
    state = read_status(store.path)
    if prune_undelivered:
        assert state.dropped > 0 and state.backlog == 1500 - state.dropped
        assert state.size_bytes <= 2**20
        assert f"DROPPED {state.dropped} undelivered records" in caplog.text
    else:
        assert state.dropped == 0 and state.backlog == 1500
        assert "1500 undelivered records are kept" in caplog.text
