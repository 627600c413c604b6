"""What a forwarding process tells its ingest worker (WorkerSettings, the SETTINGS message, the
first on the channel) and how long a worker may take to stop.

Both ends need these: the forwarding process builds the settings and waits out the stop grace, the
worker reads them. Kept apart from the worker so the parent's side does not import the worker's
threads to learn a number.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvtap.config import Config, InfluxConfig, MqttConfig
from pvtap.ingest import wire
from pvtap.ingest.wire import Kind
from pvtap.privacy import Privacy

#: after its channel ended, how long the worker keeps decoding its backlog before leaving the rest
#: (the default of ingest.stop_decode_s)
DECODE_STOP_GRACE_S = 2.0
#: after its channel ended (or a SIGTERM), how long archiving what was received may take; the
#: channel holds back no more than the worker archives in half of it (backlog.py)
ARCHIVE_STOP_GRACE_S = 5.0
#: how long the worker's outputs may take to stop, together: its forwarders (pvtap/store/forwarder.py
#: STOP_TIMEOUT_S, 4 s) and its MQTT publisher (pvtap/mqtt/thread.py STOP_TIMEOUT_S, 5 s); and a second to spare
OUTPUTS_STOP_S = 5.0
SPARE_S = 1.0


def worker_stop_grace(stop_decode_s: float = DECODE_STOP_GRACE_S, archive_s: float = ARCHIVE_STOP_GRACE_S) -> float:
    """The longest a worker takes to exit after its channel ended: archiving (`archive_s`), then
    decoding for `stop_decode_s` (ingest.stop_decode_s), its forwarders and a second to spare. Its
    parent waits this long before it kills it."""
    return archive_s + stop_decode_s + OUTPUTS_STOP_S + SPARE_S


WORKER_STOP_GRACE_S = worker_stop_grace()


@dataclass
class WorkerSettings:
    """What the forwarding process tells its worker (the SETTINGS message)."""

    store: str  # the store file this worker writes
    adopt: list[str] = field(default_factory=list)  # stores left by more workers: decode and forward their backlog
    privacy: dict[str, Any] = field(default_factory=dict)  # Privacy fields, bytes as hex
    influx: dict[str, Any] = field(default_factory=dict)  # InfluxConfig fields; url "" = no forwarder
    mqtt: dict[str, Any] = field(default_factory=dict)  # MqttConfig fields; url "" (or none) = no MQTT publisher
    queue_bytes: int = 32 * 2**20
    log_level: str = "info"
    parent_pid: int = 0
    stop_decode_s: float = DECODE_STOP_GRACE_S  # ingest.stop_decode_s
    cpu_priority: str = "adaptive"  # ingest.cpu_priority
    archive_grace_s: float = ARCHIVE_STOP_GRACE_S  # not a config key: shorter only in tests

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, store: Path, privacy: Privacy, influx: InfluxConfig, queue_bytes: int, log_level: str = "info",
           adopt: list[Path] | None = None, mqtt: MqttConfig | None = None,
           stop_decode_s: float = DECODE_STOP_GRACE_S, cpu_priority: str = "adaptive") -> WorkerSettings:
        fields = {f.name: getattr(privacy, f.name) for f in dataclasses.fields(privacy)}
        return cls(store=str(store), adopt=[str(p) for p in adopt or []],
                   privacy={k: v.hex() if isinstance(v, bytes) else v for k, v in fields.items()},
                   influx=dataclasses.asdict(influx), mqtt=dataclasses.asdict(mqtt) if mqtt else {},
                   queue_bytes=queue_bytes, log_level=log_level, parent_pid=os.getpid(), stop_decode_s=stop_decode_s,
                   cpu_priority=cpu_priority)

    @classmethod
    def of_config(cls, store: Path, privacy: Privacy, config: Config,
                  adopt: list[Path] | None = None) -> WorkerSettings:
        """The settings of a worker for `store` from the pvtap config ([ingest], [influx], [mqtt], log level)."""
        return cls.of(store, privacy, config.influx, config.ingest.queue_mb * 2**20, config.log_level, adopt,
                      config.mqtt, config.ingest.stop_decode_s, config.ingest.cpu_priority)

    @property
    def stop_grace(self) -> float:
        """How long the parent waits for this worker to exit after the channel ended."""
        return worker_stop_grace(self.stop_decode_s, self.archive_grace_s)

    def make_privacy(self) -> Privacy:
        hints = {f.name: str(f.type) for f in dataclasses.fields(Privacy)}
        values: dict[str, Any] = {k: bytes.fromhex(v) if isinstance(v, str) and "bytes" in hints[k] else v
                                  for k, v in self.privacy.items() if k in hints}
        return Privacy(**values)


def read_settings(sock: socket.socket, timeout: float = 30.0) -> WorkerSettings:
    """The first message, read exactly (what follows it stays in the socket for the worker)."""
    sock.settimeout(timeout)

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = sock.recv(n - len(data))
            if not more:
                raise EOFError("the channel closed before the settings came")
            data += more
        return data

    size, kind = wire.HEADER.unpack(exactly(wire.HEADER.size))
    if kind != Kind.SETTINGS or size > wire.MAX_BODY:
        raise wire.WireError("the first message must be SETTINGS")
    return WorkerSettings(**wire.doc(exactly(size)))
