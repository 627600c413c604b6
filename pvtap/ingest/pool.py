"""N ingest workers for one forwarding process, each with its own store file.

Worker 0 writes `<name>.sqlite`, worker i `<name>-<i>.sqlite`. Connections are spread over the
workers by the device's address (a device's data stays in one file), whole payloads by their
connection. When `ingest.workers` shrinks, the stores of the workers that are gone may still
hold a decode backlog or undelivered records: each is adopted by worker `i % workers`, which
decodes and forwards it like its own (and writes nothing new to it).
"""

from __future__ import annotations

import logging
import os
import re
import time
import zlib
from pathlib import Path
from typing import Any

from pvtap.config import Config
from pvtap.files import private_dir
from pvtap.ingest.channel import Channel, CopyStream, hang_up_together
from pvtap.ingest.framing import ConnectionRecord
from pvtap.ingest.settings import WorkerSettings
from pvtap.privacy import Privacy
from pvtap.records import RawPayload, Record
from pvtap.store.local import SUFFIX

log = logging.getLogger("pvtap.ingest")

MAX_AUTO_WORKERS = 4


def auto_workers(configured: int) -> int:
    """`ingest.workers`, where 0 means one per core beyond the first (the forwarding process
    keeps one), at least 1 and at most MAX_AUTO_WORKERS."""
    if configured:
        return configured
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 1) - 1))


def store_path(data_dir: Path, name: str, index: int) -> Path:
    return data_dir / (f"{name}{SUFFIX}" if index == 0 else f"{name}-{index}{SUFFIX}")


def left_over(data_dir: Path, name: str, workers: int) -> dict[int, Path]:
    """Stores of workers beyond `workers` (index → path)."""
    pattern = re.compile(rf"{re.escape(name)}-(\d+){re.escape(SUFFIX)}")
    found = {}
    for path in data_dir.glob(f"{name}-*{SUFFIX}"):
        match = pattern.fullmatch(path.name)
        if match and int(match[1]) >= workers:
            found[int(match[1])] = path
    return dict(sorted(found.items()))


class ChannelPool:
    """The channels of one forwarding process, used like one (`open`, `payload`, `record`, `stats`)."""

    def __init__(self, channels: list[Channel]) -> None:
        self.channels = channels

    @classmethod
    def start(cls, config: Config, name: str, privacy: Privacy, *, wait_ready: float = 30.0) -> ChannelPool:
        """Start `ingest.workers` worker processes for `<data_dir>/<name>*.sqlite` and wait
        until each has opened its store (IngestStartError otherwise). Call it on the event
        loop's thread (PR_SET_PDEATHSIG follows the spawning thread)."""
        data_dir = private_dir(config.data_dir)
        workers = auto_workers(config.ingest.workers)
        orphans = left_over(data_dir, name, workers)
        channels: list[Channel] = []
        try:
            for index in range(workers):
                adopt = [path for k, path in orphans.items() if k % workers == index]
                settings = WorkerSettings.of_config(store_path(data_dir, name, index), privacy, config, adopt)
                channels.append(Channel.process(settings, name=f"{name} ingest {index}").start(wait_ready))
        except BaseException:
            for channel in channels:
                channel.close(5.0)
            raise
        if orphans:
            log.info("%s: %d store(s) of earlier workers adopted for decoding and forwarding: %s", name,
                     len(orphans), ", ".join(p.name for p in orphans.values()))
        return cls(channels)

    def attach(self) -> None:
        for channel in self.channels:
            channel.attach()

    def _for(self, key: str) -> Channel:
        if len(self.channels) == 1:
            return self.channels[0]
        return self.channels[zlib.crc32(key.encode()) % len(self.channels)]

    def open(self, record: ConnectionRecord, device: str = "", spread_by: str = "") -> CopyStream:
        """`spread_by`: the device's address (the record's peer is only a name for it when the
        privacy settings do not keep addresses, and numbered per process)."""
        return self._for(spread_by or record.peer.rpartition(":")[0] or record.peer).open(record, device)

    def payload(self, raw: RawPayload) -> bool:
        return self._for(raw.origin.connection).payload(raw)

    def record(self, record: Record) -> None:
        """Always to the first worker: the records of one condition (an alert on, then off) land
        in one store, in order, so the latest one says how it stands."""
        self.channels[0].record(record)

    def stats(self, poll: bool = True) -> dict[str, Any]:
        """Sums over the workers (numbers), and each worker's own under `workers` (`poll`: see
        Channel.stats)."""
        each = [channel.stats(poll) for channel in self.channels]
        total: dict[str, Any] = {}
        for stats in each:
            for key, value in stats.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                total[key] = total.get(key, 0) + value
        total["workers_alive"] = sum(bool(s.get("worker_alive")) for s in each)
        total["workers"] = each
        return total

    async def idle(self, timeout: float = 30.0) -> None:
        for channel in self.channels:
            await channel.idle(timeout)

    @property
    def stop_grace(self) -> float:
        """How long the workers may take to exit once their channels ended (ingest.stop_decode_s included)."""
        return max(channel.settings.stop_grace for channel in self.channels)

    def close(self, timeout: float) -> bool:
        """End every channel and wait (up to `timeout` in all) for the workers to exit."""
        deadline = time.monotonic() + timeout
        hang_up_together(self.channels, deadline)
        return all([channel.wait_closed(deadline) for channel in self.channels])
