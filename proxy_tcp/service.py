"""Starting and stopping the relay.

Modelled on aiohttp's `background_tasks.py`: everything starts inside one async context manager
(`relay_running`) and, on the way out, every connection task is cancelled and awaited, so each
open connection still sends its record. `serve` adds the relay's ingest workers (processes that
frame, archive and decode the copies; the relay process does only I/O); `run` is the blocking
entry point of `pvtap relay` and `python -m proxy_tcp`.

Stopping, and how long it may take. This is the one place the numbers are written down; each
grace bounds one step and the steps add up:

    connections close both sides at once        CLOSE_GRACE           5 s  (connection.py)
    the listener waits for its connections      STOP_GRACE            8 s  (listeners.py; > CLOSE_GRACE)
    each ingest worker gets the rest of the copies and
      archives them                             ARCHIVE_STOP_GRACE_S  5 s  (pvtap/ingest/settings.py)
      decodes on, leaving the rest archived     ingest.stop_decode_s  2 s  (0 to 10 s, config)
      stops its forwarders and MQTT publisher together, a second spare  5 + 1 s
    in all: relay_stop_grace(config)                                21 s by default, 29 s at most

A worker still running after its grace is killed; the copies it had not archived are counted as
lost (`relay stopped: …` in the log, `lost at stop` in `pvtap status`). `pvtap run` gives each
service STOP_TIMEOUT (30 s, more than the 29 s) before it kills it, the relay first, then
mitmdump (whose addon hands its worker the last payloads within 10 s and waits for it to exit:
5 + stop_decode_s + 5 + 1 s). So a supervisor around `pvtap run` (Docker: compose's
stop_grace_period) must allow 2 × STOP_TIMEOUT = 60 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from pvtap import datadir
from pvtap.config import MAX_STOP_DECODE_S, Config, ConfigError, InfluxConfig, ListenerConfig
from pvtap.decode import Codec, StreamCodec, codec_for, stream_codec
from pvtap.health import Health
from pvtap.ingest.channel import Channel, IngestStartError
from pvtap.ingest.pool import ChannelPool
from pvtap.ingest.settings import WORKER_STOP_GRACE_S, WorkerSettings, worker_stop_grace
from pvtap.metrics import WorkerStats
from pvtap.peers import PeerNames
from pvtap.privacy import Privacy
from pvtap.store.local import LocalStore

from .listeners import STOP_GRACE, Listener, default_listeners
from .pump import CopySink
from .stats import RelayStats
from .tls import in_data_dir
from .upstream import SelfGuard

log = logging.getLogger("proxy_tcp")

#: the line that tells a supervisor (`pvtap run`) the relay is listening
READY = "relay ready:"


def relay_stop_grace(config: Config) -> float:
    """The longest this relay takes to stop (see the module docstring)."""
    return STOP_GRACE + worker_stop_grace(config.ingest.stop_decode_s)


#: the longest a relay takes to stop with the default settings, and with any allowed setting
RELAY_STOP_GRACE = STOP_GRACE + WORKER_STOP_GRACE_S
RELAY_STOP_GRACE_MAX = STOP_GRACE + worker_stop_grace(MAX_STOP_DECODE_S)
#: bytes of copies buffered for an in-process worker (relay_running without `copies`)
TEST_QUEUE_BYTES = 32 * 2**20


def config_key(index: int, name: str) -> str:
    return f"relay.listeners[{index}].{name}"


class Relay:
    """The listeners of one process and what they share: where copies go, the privacy settings,
    the protocols and the guard against connecting back to itself."""

    def __init__(self, listeners: Sequence[ListenerConfig], *, copies: CopySink, privacy: Privacy | None = None,
                 codecs: Callable[[str], Codec] = codec_for,
                 keys: Callable[[int, str], str] = config_key) -> None:
        self.configs = list(listeners)
        self.copies = copies
        self.privacy = privacy or Privacy()
        self.peers = PeerNames(self.privacy)  # how peer addresses appear in the log
        self.codecs = codecs
        self.keys = keys
        self.guard = SelfGuard()
        self.stats = RelayStats()
        self.listeners: list[Listener] = []

    async def start(self) -> None:
        """Listen on every address, then check the upstreams against them. Raises ConfigError
        (naming the setting and the fix) and leaves nothing open when something is wrong."""
        try:
            for index, config in enumerate(self.configs):
                key = lambda name, index=index: self.keys(index, name)  # noqa: E731
                listener = Listener(config, key, self._codec(config, key), self)
                self.listeners.append(listener)
                await listener.start()
            self.guard.listening = [endpoint for listener in self.listeners for endpoint in listener.endpoints]
            for listener in self.listeners:
                await listener.check_upstream()
        except BaseException:
            await self.stop()
            raise
        for listener in self.listeners:
            log.info("relay listening: %s", listener)
        log.info("%s %d listener(s)", READY, len(self.listeners))

    def _codec(self, config: ListenerConfig, key: Callable[[str], str]) -> StreamCodec:
        try:
            codec = self.codecs(config.protocol)
        except (ValueError, ImportError) as exc:
            raise ConfigError(key("protocol"), config.protocol, f"no decoder for it ({exc})",
                              "use a protocol the relay carries") from None
        stream = stream_codec(codec)
        if stream is None:
            raise ConfigError(key("protocol"), config.protocol, "its decoder has no Tap/LocalAnswerer for the relay",
                              "use a protocol the relay carries")
        return stream

    @property
    def connections(self) -> int:
        return sum(len(listener.connections) for listener in self.listeners)

    async def stop(self) -> None:
        for listener in self.listeners:
            await listener.close()
        self.listeners.clear()


@contextlib.asynccontextmanager
async def relay_running(listeners: Sequence[ListenerConfig], *, copies: CopySink | None = None,
                        store: LocalStore | Path | None = None, privacy: Privacy | None = None,
                        codecs: Callable[[str], Codec] = codec_for, queue_bytes: int = TEST_QUEUE_BYTES,
                        keys: Callable[[int, str], str] = config_key) -> AsyncIterator[Relay]:
    """A started Relay for the duration of the block; stopped (connections ended and recorded)
    on the way out, whatever happened. Copies go to `copies`; without it, to an ingest worker
    in a thread of this process writing `store` (tests inject their `codecs` there), which is
    stopped after the relay, once everything is archived and decoded."""
    channel: Channel | None = None
    if copies is None:
        if store is None:
            raise ValueError("relay_running needs copies= or store=")
        path = store.path if isinstance(store, LocalStore) else Path(store)
        settings = WorkerSettings.of(path, privacy or Privacy(), InfluxConfig(), queue_bytes)
        channel = Channel.thread(settings, codecs=codecs, privacy=privacy or Privacy(), name="relay ingest")
        copies = channel.start(wait_ready=30)
        channel.attach()
    relay = Relay(listeners, copies=copies, privacy=privacy, codecs=codecs, keys=keys)
    try:
        await relay.start()
        try:
            yield relay
        finally:
            await relay.stop()
    finally:
        if channel is not None:
            try:
                await channel.idle(timeout=60)  # tests read the store next: all decoded
            finally:
                channel.close(channel.settings.stop_grace)


def listeners_of(config: Config) -> list[ListenerConfig]:
    """The configured listeners, or one per supported device on its usual port."""
    if config.relay.listeners:
        return list(config.relay.listeners)
    log.info("no [[relay.listeners]] configured: one listener per supported device on its usual port")
    return default_listeners()


def warn_obsolete(listeners: Sequence[ListenerConfig], keys: Callable[[int, str], str], config: Config) -> None:
    """Settings that are still accepted (so that an older config starts) but do nothing."""
    for index, listener in enumerate(listeners):
        if listener.decode_queue:
            key = keys(index, "decode_queue")
            log.warning("%s = %d is no longer used: the copies of every listener share ingest.queue_mb (%d MiB) "
                        "on their way to the ingest worker. Fix: remove %s from the config", key,
                        listener.decode_queue, config.ingest.queue_mb, key)


async def serve(config: Config, listeners: Sequence[ListenerConfig] | None = None, *,
                keys: Callable[[int, str], str] = config_key, stop: asyncio.Event | None = None) -> None:
    """Run the relay until `stop` is set or the task is cancelled: its listeners and its ingest
    workers (`ingest.workers` processes, each writing `<data_dir>/relay*.sqlite` and forwarding
    it when [influx] url is set), which archive everything they got before this returns."""
    data_dir = datadir.prepare(config.data_dir)  # ConfigError: one line naming the directory and the fix
    datadir.check_stores(data_dir, "relay")
    privacy = Privacy.from_config(config)
    chosen = [in_data_dir(listener, config.data_dir)
              for listener in (listeners if listeners is not None else listeners_of(config))]
    warn_obsolete(chosen, keys, config)
    health = Health("relay", config.health).serve(config.health.relay_listen, "health.relay_listen")
    health.watch_loop(asyncio.get_running_loop())
    try:
        pool = ChannelPool.start(config, "relay", privacy)  # on this thread: PR_SET_PDEATHSIG follows it
    except IngestStartError as exc:
        health.stop()
        raise ConfigError("data_dir", str(config.data_dir), str(exc), "see the message before the colon") from None
    pool.attach()
    # what /readyz and /metrics read (pvtap/health.py): the stores, the workers' snapshot, the relay
    health.attach([Path(channel.settings.store) for channel in pool.channels],
                  lambda: WorkerStats.of(pool.stats(poll=False)))
    health.record_stats(pool.channels[0].record, asyncio.get_running_loop().call_soon_threadsafe)
    log.info("relay event loop: %s (relay.event_loop)", config.relay.event_loop)
    try:
        async with relay_running(chosen, copies=pool, privacy=privacy, keys=keys) as relay:
            health.providers.traffic.append(lambda: relay.stats.traffic(relay))
            health.listening(f"{len(relay.listeners)} listener(s) up")
            # What start-up made (modules, decoders, settings: some 75,000 objects) lives as long
            # as the process: out of the collector's sight, a full collection among 1,000 open
            # connections takes a fraction of the time, and such pauses are what a busy fleet's
            # worst round trips wait for.
            gc.collect()
            gc.freeze()
            await (stop or asyncio.Event()).wait()
            log.info("relay stopping")
    finally:
        health.stop()  # its last pvtap_stats payload goes to the workers before they close
        finished = pool.close(pool.stop_grace)
        stats = pool.stats()  # after the close: copies not taken in time, and lost at the stop, are counted
        lost = stats.get("copies_lost", 0)
        log.log(logging.ERROR if lost else logging.INFO,
                "relay stopped: %d copies sent to %d ingest worker(s), %d dropped (ingest busy or down), %d lost%s",
                stats.get("copies_sent", 0), len(pool.channels), stats.get("copies_dropped", 0), lost,
                "" if finished else " (a worker had to be killed before it archived them)")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """relay.event_loop: uvloop (libuv) or the standard library's loop."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def raise_open_files_limit() -> None:
    """Each relayed connection holds two sockets: lift the soft limit on open files (often 1024)
    to the hard one, so a fleet is not refused at a few hundred devices."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("open files limit raised from %d to %d", soft, hard)


def run(config: Config, listeners: Sequence[ListenerConfig] | None = None, *,
        keys: Callable[[int, str], str] = config_key, prog: str = "pvtap relay") -> int:
    """Run the relay in the foreground until SIGINT or SIGTERM; 0 after a clean stop, 2 when
    the configuration or start-up failed (the message names the setting and the fix)."""
    chosen = listeners if listeners is not None else listeners_of(config)
    raise_open_files_limit()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, chosen, keys=keys, stop=stop)

    try:
        asyncio.run(main(), loop_factory=loop_factory(config.relay.event_loop))
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0
