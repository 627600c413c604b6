"""AlphaESS simulator ↔ stand-in cloud on loopback (no relay), and the LocalAnswerer."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from datetime import datetime, timedelta
from typing import TypedDict

import pytest

from pvtap.decode import alphaess as A
from pvtap.records import DOWN, UP, Origin, now_utc
from pvtap.simulate.alphaess import PLACEHOLDER_PASSWORD, PLACEHOLDER_SERIAL, run_simulator
from pvtap.simulate.alphaess_cloud import AlphaCloud
from tests.alphaess_support import BY_NAME, VECTORS
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(60)


class Timing(TypedDict):
    """run_simulator's timing arguments."""

    interval: float
    extended_every: float
    reconnect_delay: float
    ack_timeout: float


FAST: Timing = {"interval": 0.05, "extended_every": 0.12, "reconnect_delay": 0.05, "ack_timeout": 3}


def names(frames) -> list[str]:
    return [f.name for f in frames]


def decoded(data: bytes, direction: str) -> list:
    """The records a Tap + decoder get from one direction of a connection."""
    tap = A.Tap(Origin("alphaess", "", "sim"))
    payloads = tap.feed(direction, data, now_utc()) + tap.finish(now_utc())
    assert tap.rejected == 0 and all(p.kind == "frame" for p in payloads)
    return [r for p in payloads for r in A.decode_raw(p)]


# -- LocalAnswerer ----------------------------------------------------------------------------

def test_local_answerer_acks_every_request_exactly_like_the_cloud():
    requests = [BY_NAME[n].frame for n in ("login 1-1-2", "empty 1-1-0", "event log 1-1-9", "serial 1-1-3",
                                           "realtime 1-1-16")]
    requests += [A.encode_frame(1, t, b'{"SN":"AL0123456789012"}') for t in (4, 5)]
    requests.append(A.encode_frame(1, 12, b"Date,Time,SN\n2021/03/24,09:40:59,AL0123456789012\n"))
    expected = [BY_NAME[n].frame for n in ("ack 1-2-2", "ack 1-2-0", "ack 1-2-9", "ack 1-2-3",
                                           "ack 1-2-16 (TV test_checksum_is_valid)", "ack 1-2-4", "ack 1-2-5",
                                           "ack 1-2-12")]
    stream = b"".join(requests)
    for size in (len(stream), 1, 13):
        answerer = A.LocalAnswerer()
        answers = b"".join(answerer.feed(stream[i:i + size]) for i in range(0, len(stream), size))
        assert answers == b"".join(expected), size
        assert answerer.answered == len(expected)


def test_local_answerer_stays_silent_on_responses_garbage_and_ticks():
    answerer = A.LocalAnswerer()
    assert answerer.feed(BY_NAME["Resume ack 1-2-8"].frame) == b""  # the device answering a command
    assert answerer.feed(b"\x00garbage\xff") == b""
    assert answerer.feed(BY_NAME["realtime 1-1-16"].frame[:-1] + b"\x00") == b""  # bad CRC
    assert answerer.tick(0.0) == b"" and answerer.tick(1e9) == b""
    assert answerer.feed(BY_NAME["SDK system info 0x43"].frame) == A.ack_frame(0x43)  # same type, always
    for vector in VECTORS:
        if vector.name.startswith("ack 1-2-"):
            assert A.ack_frame(vector.type) == vector.frame


# -- simulator ↔ stand-in cloud -----------------------------------------------------------------

async def test_session_login_backfill_config_realtime_extended():
    async with AlphaCloud() as cloud:
        result = await run_simulator("127.0.0.1", cloud.port, count=6, **FAST)
        await cloud.wait_for(lambda: not any(s.open for s in cloud.sessions))

    # both sides saw exactly the same bytes
    [session] = result.sessions
    [cloud_session] = cloud.sessions
    assert bytes(session.sent) == bytes(cloud_session.received) and result.sent == cloud.received
    assert bytes(session.received) == bytes(cloud_session.sent) and result.received == cloud.sent

    # the reference's session flow: login, 0, event log, Resume → ack + back-fill, serial → config, data
    sent = names(session.frames_sent)
    assert sent[:9] == ["1-1-2", "1-1-0", "1-1-9", "1-2-8", "1-1-12", "1-1-12", "1-1-12", "1-1-3", "1-1-4"]
    assert set(sent[9:]) == {"1-1-16", "1-1-5"} and sent.count("1-1-16") == 6 and sent.count("1-1-5") >= 1
    assert session.logged_in and result.reconnects == 0
    assert result.counts["1-1-16"] == 6 and result.backfill_rows == 9
    requests = [f for f in session.frames_sent if f.b1 == A.REQUEST]
    assert result.acked == len(requests) and result.unanswered == 0
    assert names(session.frames_received) == ["1-2-2", "1-1-8", "1-2-0", "1-2-9", "1-2-12", "1-2-12", "1-2-12",
                                              "1-2-3", "1-2-4"] + [f"1-2-{f.type}" for f in requests[8:]]
    [resume] = result.commands
    assert resume["Command"] == "Resume" and resume["Parameter2"] == "5"
    ack = json.loads(session.frames_sent[3].body)
    assert ack == {"Command": "Resume", "CmdIndex": resume["CmdIndex"], "Status": "Success"}

    # what the frames hold decodes to plausible records with the placeholder serial
    records = decoded(result.sent, UP)
    by = {m: [r for r in records if r.measurement == m] for m in {r.measurement for r in records}}
    assert {m: len(v) for m, v in by.items()} == {
        "alphaess_login": 1, "alphaess_event": 2, "alphaess_command": 1, "alphaess_backfill": 9,
        "alphaess_device": 1, "alphaess_realtime": 6, "alphaess_extended": sent.count("1-1-5")}
    assert {r.tags["serial"] for r in records if "serial" in r.tags} == {PLACEHOLDER_SERIAL}
    for r in by["alphaess_realtime"]:
        assert 10.0 <= r.fields["SOC"] <= 100.0 and r.fields["Ppv1"] >= 0
    rows = [datetime.fromisoformat(r.fields["device_time"]) for r in by["alphaess_backfill"]]
    assert [b - a for a, b in itertools.pairwise(rows)] == [timedelta(minutes=1)] * 8
    since = datetime.strptime(resume["Parameter1"], "%Y/%m/%d %H:%M:%S")
    assert rows[0] == since + timedelta(minutes=1)
    down = decoded(result.received, DOWN)
    assert [(r.measurement, r.tags.get("source") or r.tags.get("kind")) for r in down] == [
        ("alphaess_command", "request"), ("alphaess_device", "cloud")]


async def test_the_cloud_breaks_the_connection_and_the_device_comes_back_without_login():
    async with AlphaCloud() as cloud:
        run = asyncio.create_task(run_simulator("127.0.0.1", cloud.port, count=8, **FAST))
        await cloud.wait_for(lambda: len(cloud.frames("1-1-16")) >= 3)
        await cloud.disconnect_all()
        result = await run
        await cloud.wait_for(lambda: not any(s.open for s in cloud.sessions))

    assert len(result.sessions) == len(cloud.sessions) == 2 and result.reconnects == 1
    first, second = result.sessions
    assert first.logged_in and not second.logged_in
    assert names(cloud.sessions[0].frames)[0] == "1-1-2"
    again = names(cloud.sessions[1].frames)
    assert "1-1-2" not in again and again[0] == "1-1-16"  # straight back to data
    assert result.counts["1-1-16"] == 8 and result.counts["1-1-2"] == 1
    # a break loses what was in flight: the cloud got a prefix of the first connection, all of the second
    assert bytes(first.sent).startswith(bytes(cloud.sessions[0].received))
    assert bytes(second.sent) == bytes(cloud.sessions[1].received)
    # the serial comes from the data on a connection without login
    tap = A.Tap(Origin("alphaess", "", "second"))
    tap.feed(UP, bytes(second.sent), now_utc())
    assert tap.origin.device == PLACEHOLDER_SERIAL


async def test_the_device_drops_its_connection_itself_and_reconnects():
    async with AlphaCloud(resume=False) as cloud:
        result = await run_simulator("127.0.0.1", cloud.port, count=5, break_after=2, **FAST)
        await cloud.wait_for(lambda: not any(s.open for s in cloud.sessions))
    assert [names(s.frames).count("1-1-16") for s in cloud.sessions] == [2, 2, 1]
    assert [s.logged_in for s in result.sessions] == [True, False, False]
    assert result.commands == [] and result.backfill_rows == 0 and result.unanswered == 0


async def test_a_command_sent_on_request_is_acknowledged():
    async with AlphaCloud(resume=False) as cloud:
        run = asyncio.create_task(run_simulator("127.0.0.1", cloud.port, count=6, **FAST))
        await cloud.wait_for(lambda: len(cloud.frames("1-1-16")) >= 2)
        sent = await cloud.send_command("SetConfig")
        result = await run
    command = json.loads(A.parse_frame(sent).body)
    assert result.commands == [command]
    [ack] = cloud.frames("1-2-8")
    assert json.loads(ack.body) == {"Command": "SetConfig", "CmdIndex": command["CmdIndex"], "Status": "Success"}
    assert result.backfill_rows == 0  # only Resume asks for back-fill


async def test_the_simulator_against_a_local_answerer_alone():
    """Without any cloud, pvtap's local answers keep the battery streaming."""
    exchanged = {"in": bytearray(), "out": bytearray()}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answerer = A.LocalAnswerer()
        while data := await reader.read(65536):
            exchanged["in"] += data
            reply = answerer.feed(data)
            exchanged["out"] += reply
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await run_simulator("127.0.0.1", port, count=4, **FAST)
    assert result.unanswered == 0 and result.acked == sum(result.counts.values())
    assert result.counts["1-1-16"] == 4 and result.commands == []
    assert result.sent == bytes(exchanged["in"]) and result.received == bytes(exchanged["out"])
    assert all(f.body == A.ACK_BODY and f.b1 == A.RESPONSE for f in result.sessions[0].frames_received)


async def test_a_first_connection_that_fails_raises():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectionError, match=f"cannot connect to 127.0.0.1:{port}"):
        await run_simulator("127.0.0.1", port, count=1)


# -- the command line -------------------------------------------------------------------------

async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "pvtap", "simulate", "alphaess", *args,
                                                   cwd=REPO, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None  # communicate() waited for the exit
    return process.returncode, out.decode(), err.decode()


async def test_cli_streams_to_the_cloud_and_prints_frames_and_a_count():
    async with AlphaCloud() as cloud:
        code, out, err = await run_cli("--port", str(cloud.port), "--interval", "0.05", "--count", "3")
    assert code == 0, err
    assert len(cloud.frames("1-1-16")) == 3 and len(cloud.frames("1-1-2")) == 1
    lines = out.splitlines()
    assert "alphaess-sim: → 1-1-2 login (88 B)" in lines and "alphaess-sim: ← 1-2-16 ack (20 B)" in lines
    assert lines[-1].startswith("alphaess-sim: sent ") and "realtime 3" in lines[-1] and "0 unanswered" in lines[-1]
    assert PLACEHOLDER_PASSWORD not in out + err


async def test_cli_help_and_a_clear_error_when_nothing_listens():
    code, out, _ = await run_cli("--help")
    assert code == 0 and "--extended-every" in out and "Resume" in out
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    code, out, err = await run_cli("--port", str(port), "--count", "1")
    assert code == 1 and f"cannot connect to 127.0.0.1:{port}" in err and "--host/--port" in err
