"""The MQTT publisher: follows local stores and publishes their devices to a broker, with Home
Assistant discovery.

Two loops share one event loop (the publisher's own: a thread of the ingest worker, or `pvtap
mqtt`), never the forwarding one:

- *follow* reads what the ingest worker committed after each store's cursor, folds it into the
  devices' state and commits state and cursor together. It goes on while the broker is away, so
  after an outage the devices' latest state is published, not the backlog.
- *connection* connects (last will: this publisher's availability `offline`, retained), says
  `online`, publishes discovery, state and availability, and then whatever changes: a device's
  state at most every `min_interval_s`, its availability when it turns. It publishes everything
  again when Home Assistant announces itself (`<discovery>/status` = `online`). A lost or
  refused connection is retried with back-off (1 s doubling to `retry_max_s`, with jitter); a
  refused password waits `retry_max_s` at once and is logged loudly once, not at every attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from pvtap.config import MqttConfig, broker_address
from pvtap.mqtt.catalog import DeviceRef
from pvtap.mqtt.discovery import OFFLINE, ONLINE, Topics, bridge_config, clearing, sensor_config
from pvtap.mqtt.follow import Follower, StoreTaken
from pvtap.mqtt.state import DeviceState, fold

log = logging.getLogger("pvtap.mqtt")

POLL_S = 0.5  # how often the follower looks for new records when it is caught up
STEP_BUDGET_S = 0.2  # the follower gives the loop back after this much reading
STATUS_EVERY_S = 5.0
RESCAN_S = 5.0
RETRY_INITIAL_S = 1.0
REPEAT_LOG_S = 600.0  # a failure that goes on is summarised this often
CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_S = 30
QOS = 1
BATCH = 200  # publishes in flight at once


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The publisher's state for `pvtap status`, /metrics and /readyz."""

    state: str  # connecting, connected, failing, stopped
    broker: str
    published: int  # messages since start
    backlog: int  # records in the stores not read yet
    devices: int
    last_error: str | None
    refused: int  # counter values refused (not published)


class Publisher:
    """One MQTT connection for the devices of some stores. `stores` gives the store files to follow
    (called again every RESCAN_S when `rescan`); `name` tells this publisher's topics and client id
    apart from the others'."""

    def __init__(self, config: MqttConfig, name: str, stores: Callable[[], Iterable[Path]], *,
                 rescan: bool = False, poll_s: float = POLL_S) -> None:
        if not config.url:
            raise ValueError("mqtt.url is empty: there is no broker to publish to")
        self.config = config
        self.name = name
        self.stores = stores
        self.rescan = rescan
        self.poll_s = poll_s
        self.topics = Topics(config.topic_prefix, config.discovery_prefix, name)
        self.host, self.port, self.tls = broker_address(config.url)
        self.broker = f"{config.url} as {config.client_id}-{name}"
        self.devices: dict[DeviceRef, DeviceState] = {}
        self.followers: dict[Path, Follower] = {}
        self.published = 0
        self.connected = False
        self.attempts = 0  # connection attempts
        self.last_error: str | None = None
        self.last_error_ns: int | None = None
        self._failing_since: float | None = None
        self._logged: dict[str, float] = {}
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._lost: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # per connection: what this broker session has had from us
        self._announced: dict[DeviceRef, tuple] = {}
        self._sent: dict[DeviceRef, tuple[int, float]] = {}  # (state version, monotonic time)
        self._availability: dict[DeviceRef, bool] = {}
        self._everything = True  # publish all again (a new connection, Home Assistant's birth)
        self._to_clear: dict[DeviceRef, set[str]] = {}  # excluded or forgotten: empty retained configs
        self._scanned = 0.0

    # -- life ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop soon (thread-safe): `offline` is published and the connection closed cleanly."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: it stopped already
                self._loop.call_soon_threadsafe(self._stop_now)
                return
        self._stop_now()

    def _stop_now(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Follow and publish until stop()."""
        self._loop = asyncio.get_running_loop()
        self._open_stores()
        try:
            follow = asyncio.create_task(self._follow_loop(), name="mqtt-follow")
            try:
                await self._connection_loop()
            finally:
                self._stop_now()
                await follow
        finally:
            self._close_stores()

    def snapshot(self) -> Snapshot:
        if self._stop.is_set():
            state = "stopped"
        elif self.connected:
            state = "connected"
        else:
            state = "failing" if self.last_error else "connecting"
        backlog = sum(max(0, f.newest_seen - f.cursor) for f in self.followers.values())
        return Snapshot(state, self.broker, self.published, backlog,
                        sum(1 for d in self.devices.values() if d.values),
                        self.last_error if not self.connected else None,
                        sum(d.refused for d in self.devices.values()))

    # -- the stores ------------------------------------------------------------------------------

    def _open_stores(self) -> None:
        self._scanned = time.monotonic()
        for path in self.stores():
            if path in self.followers:
                continue
            try:
                follower = Follower(path)
            except StoreTaken as exc:
                self._log_once(f"taken {path}", logging.INFO, "mqtt: not publishing %s: %s", path.name, exc)
                continue
            except Exception as exc:
                self._log_once(f"open {path}", logging.ERROR, "mqtt: cannot follow %s (%s: %s)", path.name,
                               type(exc).__name__, exc)
                continue
            self.followers[path] = follower
            for state in follower.load():
                self._adopt(state)
            log.info("mqtt: following %s from record #%d (%d records to read)", path.name, follower.cursor,
                     follower.newest_seen - follower.cursor)

    def _adopt(self, state: DeviceState) -> None:
        if self._excluded(state):
            self._to_clear.setdefault(state.device, set()).update(state.sensors)
            return
        mine = self.devices.get(state.device)
        if mine is None:
            self.devices[state.device] = state
        else:
            mine.merge(state)

    def _close_stores(self) -> None:
        for follower in self.followers.values():
            with contextlib.suppress(Exception):
                self._write_status(follower, running=False)
            follower.close()
        self.followers.clear()

    def _excluded(self, state: DeviceState) -> bool:
        exclude = self.config.exclude
        return state.device.serial in exclude or (state.parent is not None and state.parent.serial in exclude)

    # -- following -------------------------------------------------------------------------------

    async def _follow_loop(self) -> None:
        next_status = 0.0
        while not self._stop.is_set():
            try:
                more = self._follow_once()
            except Exception as exc:  # a locked or failing disk: try again later, never crash
                more = False
                self._log_once("follow", logging.ERROR, "mqtt: cannot read the store (%s: %s); retrying",
                               type(exc).__name__, exc)
            now = time.monotonic()
            if now >= next_status:
                next_status = now + STATUS_EVERY_S
                for follower in self.followers.values():
                    with contextlib.suppress(Exception):
                        self._write_status(follower, running=True)
            if self.rescan and now - self._scanned >= RESCAN_S:
                self._open_stores()
            if more:
                await asyncio.sleep(0)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.poll_s)

    def _follow_once(self) -> bool:
        """Fold what is new in every store; True when there is more to read."""
        deadline = time.monotonic() + STEP_BUDGET_S
        more = False
        for follower in list(self.followers.values()):
            for serial in follower.forget_requests():
                self._forget(serial)
            while True:
                step = follower.step()
                if step is None:
                    break
                touched = self._fold(step.devices, step.readings)
                follower.save(step.cursor, [self.devices[ref] for ref in touched if ref in self.devices])
                if touched:
                    self._wake.set()
                if time.monotonic() > deadline:
                    more = True
                    break
        return more

    def _fold(self, seen: dict, readings: list) -> set[DeviceRef]:
        touched = set()
        for ref, what in seen.items():
            state = self.devices.get(ref) or DeviceState(ref)
            for facts in what.facts:
                state.learn(facts)
            state.heard(what.heard_ns)
            if self._excluded(state):
                continue
            self.devices[ref] = state
            touched.add(ref)
        fold(self.devices, [r for r in readings if r.device in touched])
        return touched

    def _forget(self, serial: str) -> None:
        for ref in [ref for ref in self.devices if ref.serial == serial]:
            del self.devices[ref]
            for per_connection in (self._announced, self._sent, self._availability):
                per_connection.pop(ref, None)
            log.info("mqtt: forgot %s %s (pvtap mqtt --forget); it returns if it is heard from again", ref.vendor,
                     serial)

    def _write_status(self, follower: Follower, running: bool) -> None:
        snap = self.snapshot()
        follower.write_status(self.name, self.broker, running=running, connected=self.connected,
                              published=self.published, devices=snap.devices, last_error=self.last_error,
                              last_error_ns=self.last_error_ns)

    # -- connecting ------------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        return client_for(self.config, self.name, aiomqtt.Will(self.topics.bridge, OFFLINE, qos=QOS, retain=True))

    async def _connection_loop(self) -> None:
        delay = RETRY_INITIAL_S
        while not self._stop.is_set():
            self.attempts += 1
            connected_at: float | None = None
            try:
                client = self._client()
                async with client:
                    connected_at = time.monotonic()
                    await self._serve(client)
                return  # stopped
            except aiomqtt.MqttError as exc:
                refused = _refused_credentials(exc)
                self._failed(exc, refused, connected_at)
                delay = self.config.retry_max_s if refused else \
                    RETRY_INITIAL_S if connected_at is not None else min(self.config.retry_max_s, delay * 2)
            except (ssl.SSLError, OSError) as exc:
                self._failed(exc, False, connected_at)
                delay = min(self.config.retry_max_s, delay * 2)
            finally:
                self.connected = False
            wait = delay * random.uniform(0.8, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)

    def _failed(self, exc: BaseException, refused: bool, connected_at: float | None) -> None:
        text = _describe(exc)
        self.last_error, self.last_error_ns = text, time.time_ns()
        if connected_at is not None:
            log.warning("mqtt: lost the connection to %s after %.1f s (%s); %d messages published so far; "
                        "reconnecting", self.broker, time.monotonic() - connected_at, text, self.published)
            self._failing_since = None
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if refused:
            self._log_once(f"refused {text}", logging.ERROR,
                           "mqtt: %s REFUSED the connection: %s. Fix: check mqtt.username and mqtt.password (and the "
                           "broker's password file or ACL); retrying every %.0f s", self.broker, text,
                           self.config.retry_max_s)
        else:
            self._log_once(f"connect {text}", logging.WARNING,
                           "mqtt: cannot connect to %s: %s. Fix: check mqtt.url (and mqtt.ca_file for mqtts://) and "
                           "that the broker runs; retrying with back-off up to %.0f s", self.broker, text,
                           self.config.retry_max_s)

    def _log_once(self, key: str, level: int, message: str, *args: Any) -> None:
        """Log a message the first time, then at most every REPEAT_LOG_S (with how long it goes on)."""
        now = time.monotonic()
        last = self._logged.get(key)
        if last is None:
            self._logged[key] = now
            log.log(level, message, *args)
        elif now - last >= REPEAT_LOG_S:
            self._logged[key] = now
            log.log(level, "still (%d connection attempts): " + message, self.attempts, *args)

    # -- publishing ------------------------------------------------------------------------------

    async def _serve(self, client: aiomqtt.Client) -> None:
        """One connection: say online, publish everything, then what changes; at stop what is due, then offline."""
        client.pending_calls_threshold = BATCH * 2
        self.connected = True
        self._failing_since = None
        self._logged = {k: v for k, v in self._logged.items() if not k.startswith(("refused", "connect"))}
        self._lost = None
        self._everything = True
        log.info("mqtt: connected to %s (%d devices; %s)", self.broker, len(self.devices),
                 f"discovery under {self.config.discovery_prefix}/" if self.config.discovery else "discovery off")
        await client.subscribe(self.topics.homeassistant_status, qos=QOS)
        await self._send(client, [(self.topics.bridge, ONLINE)])
        listener = asyncio.create_task(self._listen(client), name="mqtt-listen")
        try:
            while not self._stop.is_set():
                if self._lost is not None:
                    raise self._lost
                self._wake.clear()
                await self._publish_due(client)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._next_due())
            await self._publish_due(client)  # what was folded just before the stop
            await self._send(client, [(self.topics.bridge, OFFLINE)])
            log.info("mqtt: disconnecting from %s: %d messages published", self.broker, self.published)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await listener

    async def _listen(self, client: aiomqtt.Client) -> None:
        try:
            async for message in client.messages:
                if message.topic.matches(self.topics.homeassistant_status) and message.payload in (b"online", "online"):
                    log.info("mqtt: Home Assistant announced itself: publishing discovery and state again")
                    self._everything = True
                    self._wake.set()
        except aiomqtt.MqttError as exc:
            self._lost = exc
            self._wake.set()

    async def _publish_due(self, client: aiomqtt.Client) -> None:
        now, now_ns = time.monotonic(), time.time_ns()
        messages: list[tuple[str, str | None]] = []
        done: list[tuple[dict, DeviceRef, Any]] = []  # remembered once the broker took the messages
        cleared: list[DeviceRef] = []
        if self._everything:
            self._everything = False
            self._announced.clear()
            self._sent.clear()
            self._availability.clear()
            if self.config.discovery:
                messages.append((self.topics.bridge_config, json.dumps(bridge_config(self.topics))))
            for ref, keys in list(self._to_clear.items()):
                messages += clearing(self.topics, ref, keys)
                cleared.append(ref)
        for ref, state in list(self.devices.items()):
            if not state.values:
                continue
            signature = state.signature()
            if self.config.discovery and self._announced.get(ref) != signature:
                messages += [(self.topics.config(ref, key), json.dumps(sensor_config(self.topics, state, sensor)))
                             for key, sensor in sorted(state.sensors.items())]
                done.append((self._announced, ref, signature))
            version, sent_at = self._sent.get(ref, (-1, -float("inf")))
            if version != state.version and now - sent_at >= self.config.min_interval_s:
                messages.append((self.topics.state(ref), json.dumps(state.payload())))
                done.append((self._sent, ref, (state.version, now)))
            online = state.online(now_ns, self.config.offline_after_s)
            if self._availability.get(ref) != online:
                messages.append((self.topics.availability(ref), ONLINE if online else OFFLINE))
                done.append((self._availability, ref, online))
        await self._send(client, messages)
        for memory, ref, value in done:
            memory[ref] = value
        for ref in cleared:
            self._cleared(ref)

    def _cleared(self, ref: DeviceRef) -> None:
        self._to_clear.pop(ref, None)
        for follower in self.followers.values():
            follower.save(follower.cursor, [], forget=[ref])
        log.info("mqtt: %s %s is excluded (mqtt.exclude): its retained topics are cleared", ref.vendor, ref.serial)

    def _next_due(self) -> float:
        """Seconds until a held-back state or an availability change is due (at most 60)."""
        now, now_ns = time.monotonic(), time.time_ns()
        due = 60.0
        for ref, state in self.devices.items():
            version, sent_at = self._sent.get(ref, (-1, -float("inf")))
            if state.values and version != state.version:
                due = min(due, sent_at + self.config.min_interval_s - now)
            if self._availability.get(ref):
                due = min(due, (state.heard_ns + self.config.offline_after_s * 1e9 - now_ns) / 1e9)
        return max(0.01, due)

    async def _send(self, client: aiomqtt.Client, messages: list[tuple[str, str | None]]) -> None:
        for i in range(0, len(messages), BATCH):
            await send(client, messages[i:i + BATCH])
            self.published += len(messages[i:i + BATCH])


def client_for(config: MqttConfig, name: str, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    """A client for mqtt.url with the configured credentials and TLS, as `<client_id>-<name>`."""
    host, port, tls = broker_address(config.url)
    tls_context = ssl.create_default_context(cafile=config.ca_file or None) if tls else None
    return aiomqtt.Client(
        host, port, username=config.username or None, password=config.password or None,
        identifier=f"{config.client_id}-{name}", tls_context=tls_context, timeout=CONNECT_TIMEOUT_S,
        keepalive=KEEPALIVE_S, logger=logging.getLogger("pvtap.mqtt.client"), will=will)


async def send(client: aiomqtt.Client, messages: list[tuple[str, str | None]]) -> None:
    """Publish retained at QoS 1, BATCH at a time in flight; returns when the broker took them all."""
    for i in range(0, len(messages), BATCH):
        chunk = messages[i:i + BATCH]
        await asyncio.gather(*(client.publish(topic, payload, qos=QOS, retain=True) for topic, payload in chunk))


def _refused_credentials(exc: BaseException) -> bool:
    """A CONNACK refusing the user name or password (MQTT 3.1.1: 4 or 5; 5.0: 0x86, 0x87)."""
    rc = getattr(exc, "rc", None)
    value = rc.value if isinstance(rc, ReasonCode) else rc
    return isinstance(exc, aiomqtt.MqttCodeError) and value in (4, 5, 0x86, 0x87)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]
