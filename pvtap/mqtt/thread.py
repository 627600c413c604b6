"""The publisher on an event loop of its own in a thread: how the ingest worker runs it, beside
its archive, decode and forward threads and off the forwarding process altogether."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from pvtap.config import MqttConfig
from pvtap.mqtt.publisher import Publisher, Snapshot

log = logging.getLogger("pvtap.mqtt")

#: the longest stop() waits: publishing `offline` and disconnecting, then the last status row
STOP_TIMEOUT_S = 5.0


class PublisherThread:
    def __init__(self, config: MqttConfig, name: str, stores: Callable[[], Iterable[Path]]) -> None:
        # rescan: a store still followed by a stopping predecessor (a restarted worker) is taken up once free
        self.publisher = Publisher(config, name, stores, rescan=True)
        self._thread = threading.Thread(target=self._run, name=f"pvtap-mqtt-{name}", daemon=True)

    def start(self) -> PublisherThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self.publisher.run())
        except Exception:
            log.exception("mqtt: the publisher %s stopped on an unexpected error; records stay in the store",
                          self.publisher.name)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def snapshot(self) -> Snapshot:
        return self.publisher.snapshot()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Publish `offline`, disconnect and close the stores; True when done within `timeout`."""
        self.publisher.stop()
        self._thread.join(timeout)
        return not self._thread.is_alive()
