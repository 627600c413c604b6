"""The ingest worker as a process: it ends by itself when its parent dies (EOF on the channel,
PR_SET_PDEATHSIG), a worker that dies is restarted with back-off while copies in the gap are
dropped and counted, and a second writer of the same store is refused with a clear message."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from pvtap.config import ConfigError, InfluxConfig, load_config
from pvtap.ingest import channel as channel_module
from pvtap.ingest import priority, worker_state
from pvtap.ingest.channel import Channel, IngestStartError
from pvtap.ingest.priority import WORKER_NICENESS, full_cpu_for_the_stop
from pvtap.ingest.settings import WorkerSettings
from pvtap.privacy import Privacy
from pvtap.records import Origin, RawPayload
from pvtap.simulate.enphase import Simulator, encode_body
from pvtap.store.local import LocalStore
from tests.waiting import until, wait_until

pytestmark = pytest.mark.timeout(120)

T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)

PARENT = textwrap.dedent("""
    import sys, time
    from pvtap.config import InfluxConfig
    from pvtap.ingest.channel import Channel
    from pvtap.ingest.settings import WorkerSettings
    from pvtap.privacy import Privacy
    channel = Channel.process(WorkerSettings.of(sys.argv[1], Privacy(), InfluxConfig(), 1 << 20)).start(30)
    print(channel.ready["pid"], flush=True)
    time.sleep(600)  # a parent that only lives until the test kills it
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (its parent, killed here, cannot reap it)
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def is_alive(channel: Channel) -> bool:
    """Read afresh each time: the worker's state changes under the loop (mypy would narrow a property)."""
    return channel.alive


def frame(n: int) -> RawPayload:
    return RawPayload(Origin("enphase", "", f"flow-{n}", "up"), "task_complete", f"n={n}".encode(), T0)


def test_the_worker_ends_by_itself_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "relay.sqlite")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        assert alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not alive(worker), 30, what="the worker to end after its parent was killed")
    finally:
        parent.kill()
    with LocalStore(tmp_path / "relay.sqlite", readonly=True) as store:
        status = store.status()
        assert status is not None and not status.running  # it stopped cleanly, not killed


async def test_a_worker_that_dies_is_restarted_and_the_gap_is_counted(tmp_path):
    # keep_unredacted: the stand-in payloads (undocumented task_complete bodies) are stored as sent,
    # so the archive shows which copies arrived (by default only their size and SHA-256 would be)
    settings = WorkerSettings.of(tmp_path / "relay.sqlite", Privacy(keep_unredacted=True), InfluxConfig(), 1 << 20)
    channel = Channel.process(settings).start(wait_ready=30)
    channel.attach()
    try:
        for n in range(10):
            assert channel.payload(frame(n))
        await channel.idle()
        first = channel.ready["pid"]
        os.kill(first, signal.SIGKILL)
        await until(lambda: not is_alive(channel), what="the worker's EOF to reach the loop")
        gap = [channel.payload(frame(n)) for n in range(10, 15)]  # no worker: dropped, counted, never blocking
        assert gap == [False] * 5
        async with asyncio.timeout(30):
            while not (is_alive(channel) and channel.ready):
                channel.payload(frame(99))  # also what restarts it once the back-off passed
                await asyncio.sleep(0.05)
        assert channel.ready["pid"] != first
        for n in range(20, 30):
            assert channel.payload(frame(n))
        await channel.idle()
        stats = channel.stats()
    finally:
        channel.close(10)
    assert stats["worker_restarts"] == 1 and stats["worker_exits"] == 1
    assert stats["copies_lost"] == 0  # the killed worker had archived everything it got (idle() above)
    with LocalStore(tmp_path / "relay.sqlite", readonly=True) as store:
        kept = [s.raw.payload for s in store.raw_payloads()]
    assert kept[:10] == [f"n={n}".encode() for n in range(10)]
    assert kept[-10:] == [f"n={n}".encode() for n in range(20, 30)]
    assert stats["copies_dropped"] >= 5  # the gap, and any n=99 sent before the restart
    assert len(kept) == stats["copies_sent"]  # every copy that went over is archived


def niceness(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[16])


def test_the_worker_yields_the_cpu_to_its_forwarding_process(tmp_path):
    channel = Channel.process(WorkerSettings.of(tmp_path / "relay.sqlite", Privacy(), InfluxConfig(), 1 << 20))
    channel.start(wait_ready=30)
    try:
        assert os.sched_getscheduler(channel.ready["pid"]) == os.SCHED_OTHER
        assert niceness(channel.ready["pid"]) == min(19, niceness(os.getpid()) + WORKER_NICENESS)
    finally:
        channel.close(10)


def test_an_idle_priority_worker_runs_only_on_idle_cpu_time(tmp_path):
    settings = WorkerSettings.of(tmp_path / "relay.sqlite", Privacy(), InfluxConfig(), 1 << 20, cpu_priority="idle")
    channel = Channel.process(settings)
    channel.start(wait_ready=30)
    try:
        assert os.sched_getscheduler(channel.ready["pid"]) == os.SCHED_IDLE
        assert os.sched_getscheduler(os.getpid()) == os.SCHED_OTHER  # the forwarding side keeps its priority
    finally:
        channel.close(10)


def threads_of(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


@pytest.mark.parametrize("priority", ["low", "idle"])
def test_at_the_stop_the_worker_gets_its_full_share_of_the_cores(tmp_path, priority, monkeypatch):
    """Once forwarding is over, a worker starved by other work must still archive the last copies
    within its grace: the channel's hang-up puts every thread of the worker back to the normal
    policy at the forwarding side's niceness (two busy loops made tests/test_stop_with_backlog.py
    lose copies at the stop before)."""
    settings = WorkerSettings.of(tmp_path / "relay.sqlite", Privacy(), InfluxConfig(), 1 << 20, cpu_priority=priority)
    channel = Channel.process(settings)
    channel.start(wait_ready=30)
    pid, own = channel.ready["pid"], os.getpriority(os.PRIO_PROCESS, 0)
    yielding = (os.SCHED_IDLE, own) if priority == "idle" else (os.SCHED_OTHER, min(19, own + WORKER_NICENESS))
    calls = []

    def spy(worker: object) -> bool:
        calls.append(worker)
        return full_cpu_for_the_stop(worker)

    monkeypatch.setattr(channel_module, "full_cpu_for_the_stop", spy)
    try:
        wait_until(lambda: len(threads_of(pid)) >= 4, 10, what="the reader, archiver, decoder and ticker threads")
        assert {(os.sched_getscheduler(t), os.getpriority(os.PRIO_PROCESS, t)) for t in threads_of(pid)} == {yielding}
        assert full_cpu_for_the_stop(channel.worker)
        assert {(os.sched_getscheduler(t), os.getpriority(os.PRIO_PROCESS, t)) for t in threads_of(pid)} == {
            (os.SCHED_OTHER, own)}
    finally:
        worker = channel.worker
        channel.close(10)
    assert calls == [worker]  # the hang-up did it
    assert not full_cpu_for_the_stop(threading.current_thread())  # a worker thread: its process is ours


def test_the_cpu_priority_comes_from_the_config(tmp_path):
    (tmp_path / "idle.toml").write_text('[ingest]\ncpu_priority = "idle"\n')
    idle = load_config(tmp_path / "idle.toml", env={})
    assert WorkerSettings.of_config(tmp_path / "relay.sqlite", Privacy(), idle).cpu_priority == "idle"
    default = load_config(None, env={})
    assert WorkerSettings.of_config(tmp_path / "relay.sqlite", Privacy(), default).cpu_priority == "adaptive"
    (tmp_path / "bad.toml").write_text('[ingest]\ncpu_priority = "high"\n')
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "bad.toml", env={})
    assert error.value.key == "ingest.cpu_priority" and "adaptive, idle, low" in error.value.problem


@pytest.mark.slow  # waits WRITER_LOCK_WAIT_S for the first writer to let go
def test_a_second_writer_of_a_store_is_refused_naming_the_fix(tmp_path):
    settings = WorkerSettings.of(tmp_path / "relay.sqlite", Privacy(), InfluxConfig(), 1 << 20)
    first = Channel.process(settings).start(wait_ready=30)
    try:
        with pytest.raises(IngestStartError) as error:
            Channel.process(settings).start(wait_ready=60)
        assert f"{tmp_path / 'relay.sqlite'} is being written by another pvtap process (pid " in str(error.value)
        assert "give each relay or mitmproxy its own data_dir" in str(error.value)
    finally:
        first.close(10)


def test_copies_a_worker_killed_at_the_stop_had_not_archived_are_counted_as_lost(tmp_path):
    """The parent knows what it sent and what the worker said it archived (ARCHIVED after each
    group commit): a worker killed after its grace leaves at most the difference unarchived, and
    the count reaches the log, the channel's stats and the store's status row. (What the channel
    holds back is bounded by what the worker archives within its grace, so here the worker stops
    dead, SIGSTOP, once it archived some copies, with more sent to it.)"""
    store = tmp_path / "enphase.sqlite"
    simulator = Simulator(micros=3, start=1699956000, seed=5)
    body = encode_body(simulator.next_report(intervals=1500).xml)
    meta = {"method": "POST", "host": "reports.enphaseenergy.com", "path": "/emu_reports/performance_report",
            "query": "", "content_type": "application/x-deflate"}
    channel = Channel.process(WorkerSettings.of(store, Privacy(), InfluxConfig(), 64 << 20)).start(wait_ready=30)
    offered = itertools.count()

    def offer() -> None:
        n = next(offered)
        channel.payload(RawPayload(Origin("enphase", "", f"flow-{n}", "up"), "performance_report", body, T0, meta))

    def archived_some() -> bool:
        offer()
        return channel.stats().get("copies_archived", 0) > 0

    wait_until(archived_some, 30, what="the worker to archive some copies")
    os.kill(channel.ready["pid"], signal.SIGSTOP)
    for _ in range(20):
        offer()
    assert not channel.close(timeout=1.0)  # killed, stopped as it is
    stats = channel.stats()
    assert stats["copies_sent"] + stats["copies_dropped"] == next(offered)  # not taken in time: dropped
    assert stats["copies_lost"] > 0
    with LocalStore(store, readonly=True) as s:
        archived = s.count_raw()
        status = s.status()
    # an upper bound: a kill between a group commit and its ARCHIVED counts that commit as lost
    assert 0 < stats["copies_sent"] - stats["copies_lost"] <= archived <= stats["copies_sent"]
    assert status is not None
    assert status.counts["lost_at_stop"] == status.counts["parent_copies_lost"] == stats["copies_lost"]


def test_a_second_sigterm_keeps_the_first_ones_stop_deadline(tmp_path, monkeypatch):
    """Ctrl-C pressed twice, or a supervisor's SIGTERM repeated, must not put the worker's stop off."""
    clock = [1000.0]
    monkeypatch.setattr(worker_state, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        state = worker_state.WorkerState(ours, WorkerSettings(store=str(tmp_path / "relay.sqlite")))
        state.request_stop()
        clock[0] += state.settings.archive_grace_s - 0.5
        state.request_stop()
        assert not state.past_stop_deadline()
        clock[0] += 1.0
        assert state.past_stop_deadline()


def policies(pid: int) -> set[tuple[int, int]]:
    return {(os.sched_getscheduler(t), os.getpriority(os.PRIO_PROCESS, t)) for t in threads_of(pid)}


def test_an_adaptive_worker_runs_on_idle_time_while_it_keeps_up_and_at_nice_10_once_behind(tmp_path, monkeypatch):
    """ingest.cpu_priority = "adaptive": the channel (which the worker's starvation cannot stop)
    gives the worker idle CPU time only while it keeps up, and nice 10 back once copies sent a
    while ago are still not archived; nothing is lost either way."""
    monkeypatch.setattr(priority, "CALM_S", 0.5)
    monkeypatch.setattr(priority, "BEHIND_S", 0.5)
    store = tmp_path / "relay.sqlite"
    settings = WorkerSettings.of(store, Privacy(), InfluxConfig(), 1 << 20, cpu_priority="adaptive")
    channel = Channel.process(settings).start(wait_ready=30)
    pid, own = channel.ready["pid"], os.getpriority(os.PRIO_PROCESS, 0)
    low, idle = {(os.SCHED_OTHER, min(19, own + WORKER_NICENESS))}, {(os.SCHED_IDLE, min(19, own + WORKER_NICENESS))}
    numbers = itertools.count()

    def forwarding() -> set[tuple[int, int]]:
        """What the relay's loop does meanwhile: a copy now and then, the back-channel read."""
        assert channel.payload(frame(next(numbers)))
        channel.stats()
        return policies(pid)

    try:
        wait_until(lambda: len(threads_of(pid)) >= 4, 10, what="the reader, archiver, decoder and ticker threads")
        assert policies(pid) == low  # it starts at nice 10
        wait_until(lambda: forwarding() == idle, 10, what="idle time once it kept up for CALM_S")
        os.kill(pid, signal.SIGSTOP)  # starved: it takes and archives nothing
        try:
            wait_until(lambda: forwarding() == low, 10, what="nice 10 once copies wait longer than BEHIND_S")
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: forwarding() == idle, 10, what="idle time again once it caught up")
        assert channel.priority is not None and channel.priority.switches == 3
    finally:
        assert channel.close(10)
    with LocalStore(store, readonly=True) as s:
        assert s.count_raw() == next(numbers)  # every copy archived


def test_adaptive_priority_goes_back_to_nice_10_when_the_worker_falls_behind_in_any_way(monkeypatch):
    """Each sign of a worker behind, on a real process standing in for it: copies sent a while
    ago not archived, a quarter of what the channel may hold for it unarchived, a long decode backlog."""
    clock = [100.0]
    monkeypatch.setattr(priority, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    stand_in = subprocess.Popen(["sleep", "60"])
    own = os.getpriority(os.PRIO_PROCESS, 0)
    low, idle = (os.SCHED_OTHER, min(19, own + WORKER_NICENESS)), (os.SCHED_IDLE, min(19, own + WORKER_NICENESS))
    adaptive = priority.AdaptivePriority()
    try:
        adaptive.started(stand_in)

        copies = {"sent": 0, "archived": 0}  # counts only grow, as the channel's do

        def after(seconds: float, fill: float = 0.0, **counts: int) -> tuple[int, int]:
            clock[0] += seconds
            copies.update(counts)
            adaptive.check(copies["sent"], copies["archived"], lambda: fill)
            return os.sched_getscheduler(stand_in.pid), os.getpriority(os.PRIO_PROCESS, stand_in.pid)

        def not_archived() -> tuple[int, int]:
            assert after(0.2, sent=copies["sent"] + 10) == idle  # just sent: not behind yet
            return after(priority.BEHIND_S)

        def decoding_behind() -> tuple[int, int]:
            adaptive.decode_backlog = priority.BEHIND_DECODING + 1
            return after(0.2)

        signs = [not_archived, lambda: after(0.2, fill=priority.BEHIND_SHARE + 0.01), decoding_behind]
        after(0.2)  # calm from here
        for sign in signs:
            assert after(priority.CALM_S - 0.1) != idle  # not calm for long enough yet
            assert after(0.2) == idle
            assert sign() == low
            adaptive.decode_backlog = 0
            after(priority.BEHIND_S + 0.2, archived=copies["sent"])  # caught up: calm from here
        assert adaptive.switches == 6
    finally:
        stand_in.kill()
        stand_in.wait()
