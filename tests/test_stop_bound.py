"""A stop never loses what the channel accepted (issue 14, raw first): the copies the forwarding
side holds for its worker, and those it sent that the worker has not archived yet, are bounded
by what the worker archives within its stop grace, measured as it runs (pvtap/ingest/backlog.py).
Beyond that bound copies are dropped and counted, as for a full buffer."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pvtap.cli.status import describe_ingest
from pvtap.config import InfluxConfig
from pvtap.ingest import backlog
from pvtap.ingest.backlog import ArchiveCost
from pvtap.ingest.channel import Channel
from pvtap.ingest.decoding import Decoder
from pvtap.ingest.settings import WorkerSettings
from pvtap.ingest.worker_state import WorkerState
from pvtap.privacy import Privacy
from pvtap.records import Origin, RawPayload
from pvtap.store.local import LocalStore
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)
SIZE = 10  # bytes of each payload below


def payload(n: int) -> RawPayload:
    return RawPayload(Origin("enphase", "", f"flow-{n}", "up"), "task_complete", f"n={n:08d}".encode(), T0)


def archived_connections(path: Path) -> set[str]:
    with LocalStore(path, readonly=True) as store:
        return {stored.raw.origin.connection for stored in store.raw_payloads()}


def test_a_stop_with_the_worker_far_behind_archives_every_copy_the_channel_accepted(tmp_path):
    """The worker is stopped dead (SIGSTOP: it reads and archives nothing, as a worker starved of
    CPU) from the start, so it has no measurement yet; 60,000 copies are offered. Then it is told
    to stop (SIGTERM, as a supervisor signalling the whole process group does), with 2 s to archive
    what it holds. Without the bound the channel took them all (they fit in ingest.queue_mb) and
    the worker left most of them unread at its deadline, lost; now the channel takes the floor's
    worth, drops the rest as "behind", and every copy it took is in the archive."""
    store = tmp_path / "relay.sqlite"
    settings = WorkerSettings.of(store, Privacy(), InfluxConfig(), 32 << 20, cpu_priority="low")
    settings.archive_grace_s = 2.0
    channel = Channel.process(settings).start(wait_ready=30)
    pid = channel.ready["pid"]
    offered = 60_000
    os.kill(pid, signal.SIGSTOP)
    try:
        accepted = [n for n in range(offered) if channel.payload(payload(n))]
        os.kill(pid, signal.SIGTERM)  # delivered when it runs again: its archive grace starts then
    finally:
        os.kill(pid, signal.SIGCONT)
    assert channel.close(timeout=60)
    stats = channel.stats()
    assert stats["copies_lost"] == 0
    assert len(accepted) == stats["copies_sent"] == backlog.FLOOR_COPIES  # no measurement yet: the floor
    assert accepted == list(range(len(accepted)))  # the first ones; the rest were refused
    assert stats["copies_dropped"] == stats["copies_dropped_behind"] == offered - len(accepted)
    assert archived_connections(store) == {f"flow-{n}" for n in accepted}
    with LocalStore(store, readonly=True) as s:
        status = s.status()
    assert status is not None and status.counts["parent_copies_dropped_behind"] == offered - len(accepted)
    assert (f"  dropped copies {offered - len(accepted)} (ingest was busy or down; forwarding was not affected); "
            f"{offered - len(accepted)} of them because the worker was as far behind as it can archive within its "
            "stop grace") in describe_ingest(0, status, time.time_ns())


def test_the_worker_measures_what_archiving_costs_it_and_the_channel_follows(tmp_path):
    """After a busy run the worker reports the rate it archives at with a full core: between 500
    copies/s (a Raspberry Pi several times slower than this machine's ~12,000) and 200,000 (a copy
    is a read, a JSON header, a redaction and an SQLite row: several µs of Python at the least);
    bytes/s follow from the copies' size. The channel's bound is that rate over half the grace."""
    store = tmp_path / "relay.sqlite"
    channel = Channel.process(WorkerSettings.of(store, Privacy(), InfluxConfig(), 32 << 20,
                                                cpu_priority="low")).start(wait_ready=30)
    numbers = itertools.count()
    try:
        assert channel.stats()["unarchived_copies_max"] == backlog.FLOOR_COPIES  # before any measurement

        def measured() -> bool:
            for _ in range(200):
                channel.payload(payload(next(numbers)))
            return channel.stats().get("archive_rate", 0) > 0

        wait_until(measured, 60, interval=0.01, what="a measurement of the worker's archive rate")
        stats = channel.stats()
    finally:
        assert channel.close(30)
    rate, byte_rate = stats["archive_rate"], stats["archive_byte_rate"]
    assert 500 <= rate <= 200_000
    assert byte_rate == pytest.approx(rate * SIZE, rel=0.01)
    assert stats["unarchived_copies_max"] == max(backlog.FLOOR_COPIES,
                                                 int(rate * channel.settings.archive_grace_s * backlog.SHARE))
    assert channel.stats()["copies_lost"] == 0


def test_idle_seconds_do_not_make_a_copy_look_dear():
    """One copy a second costs a read and a commit each: such seconds are not measured; busy
    seconds are, smoothed."""
    cpu = {"reader": 0.0, "archiver": 0.0}
    cost = ArchiveCost(reader=lambda: cpu["reader"], archiver=lambda: cpu["archiver"])
    copies = 0

    def second(n: int, reader_s: float, archiver_s: float) -> dict[str, float]:
        nonlocal copies
        copies += n
        cpu["reader"] += reader_s
        cpu["archiver"] += archiver_s
        cost.sample((copies, copies * SIZE), (copies, copies * SIZE))
        return cost.rates()

    assert second(1, 0.001, 0.002) == {"archive_rate": 0.0, "archive_byte_rate": 0.0}
    assert second(1000, 0.04, 0.04) == {"archive_rate": 12500.0, "archive_byte_rate": 125000}  # 80 µs a copy
    slower = second(1000, 0.08, 0.08)  # 160 µs a copy, weighed in
    assert slower["archive_rate"] == round(1 / (80e-6 + backlog.WEIGHT * 80e-6), 1)
    assert second(1, 0.001, 0.002) == slower  # idle again: unchanged


def test_a_copy_larger_than_the_byte_bound_passes_and_small_ones_after_it_still_do():
    """A copy counts at most half the smallest byte bound: a 50 MB report that will not inflate
    is kept (as its size and hash), and so is the answer after it, also when the report came
    before the worker's first measurement and the bound was measured meanwhile (it once dropped
    that answer: tests/test_enphase_e2e.py, "50 MB body", in CI)."""
    bound = backlog.StopBound(grace_s=5.0)
    big, small = 50 << 20, 300
    assert bound.fits(big)
    bound.accepted(big)  # before any measurement
    bound.measured(rate=10_000, byte_rate=1 << 20)  # 2.5 MiB in the grace's half: the 4 MiB floor
    assert bound.max_bytes == backlog.FLOOR_BYTES
    assert bound.fits(small) and bound.fill() == 0.5
    bound.accepted(small)
    assert not bound.fits(backlog.FLOOR_BYTES // 2)  # half charged, plus the small one: no second big one
    bound.archived(1, big)
    assert (bound.copies, bound.bytes) == (1, small)
    bound.archived(2, big + small)
    assert (bound.copies, bound.bytes) == (0, 0)
    assert bound.fits(big)


class StandInEngine:
    """What the decoder calls of an engine and its store: a backlog of three payloads."""

    def __init__(self) -> None:
        self.store = self
        self.backlog = 3
        self.decoded = 0

    def decode_pending(self, *limits: float) -> int:
        done, self.backlog = self.backlog, 0
        self.decoded += done
        return done

    def decode_backlog(self) -> int:
        return self.backlog

    def decode_cursor(self) -> int:
        return self.decoded


def test_at_the_stop_the_decoder_waits_until_the_archiver_is_done(tmp_path):
    """Archiving has the worker's GIL to itself within its grace: once a stop is requested, the
    decoder does not decode while the archiver still runs, and then decodes its turn."""
    ours, theirs = socket.socketpair()
    archiving = threading.Event()
    archiver = threading.Thread(target=archiving.wait, daemon=True)
    archiver.start()
    engine = StandInEngine()
    with ours, theirs:
        state = WorkerState(ours, WorkerSettings(store=str(tmp_path / "relay.sqlite")))
        waits: list[float] = []
        wait = state.commits.wait

        def counted_wait(timeout: float) -> None:
            waits.append(timeout)
            wait(timeout)

        state.commits.wait = counted_wait  # type: ignore[method-assign]
        state.request_stop()
        decoder = threading.Thread(target=Decoder(state, [engine], archiver, dict).run, daemon=True)  # type: ignore[list-item]
        decoder.start()
        wait_until(lambda: len(waits) >= 3, 10, what="the decoder waiting for the archiver")
        assert engine.decoded == 0
        archiving.set()
        decoder.join(10)
        assert not decoder.is_alive() and engine.decoded == 3
