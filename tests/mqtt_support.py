"""A real MQTT broker for tests (Debian's `mosquitto`) and a client that watches it.

    with Mosquitto(tmp_path) as broker:                  # anonymous on 127.0.0.1:<free port>
        broker.url                                        # mqtt://127.0.0.1:<port>
        with Watcher(broker) as watch:                    # subscribed to everything, records all
            watch.wait_for(lambda: "pvtap/..." in watch.last)
        broker.retained()                                 # {topic: payload} held retained, read fresh

`Mosquitto(tmp_path, users={"pvtap": "secret"}, tls=(ca, cert, key))` asks for a password and
speaks TLS. `stop()`/`start()` restart it on the same port (retained messages are not persisted,
so a restarted broker is empty, as one that lost its data); `refused()` tells when it refused
a password.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import free_port
from tests.servers import ServerProcess
from tests.waiting import wait_until as wait_until  # re-exported: the name its tests import

START_TIMEOUT = 20.0


class BrokerError(RuntimeError):
    pass


class Mosquitto(ServerProcess):
    def __init__(self, tmp_path: Path, *, users: dict[str, str] | None = None,
                 tls: tuple[Path, Path, Path] | None = None, password_file: Path | None = None) -> None:
        if shutil.which("mosquitto") is None:
            raise BrokerError("mosquitto is not installed (Debian package: see Makefile DEBIAN_PACKAGES)")
        self.dir = Path(tmp_path) / f"mosquitto-{os.getpid()}-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        self.users = users or {}
        self.tls = tls
        self.password_file = password_file  # made elsewhere (by pvtap); `users` then says who the tests are
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    def _config(self) -> Path:
        lines = [f"listener {self.port} 127.0.0.1", "user root", "persistence false",
                 f"log_dest file {self.log}", "log_type all", "connection_messages true", "log_timestamp true",
                 f"allow_anonymous {'false' if self.users else 'true'}"]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        elif self.users:
            passwd = self.dir / "passwd"
            passwd.touch(mode=0o600)
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True,
                               capture_output=True)
            lines.append(f"password_file {passwd}")
        if self.tls:
            ca, cert, key = self.tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> Mosquitto:
        if self.running:
            return self
        conf = self._config()
        offset = len(self.log_text())
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: "
                                  f"{self.proc.stderr.read().decode() if self.proc.stderr else ''}{self.log_text()}")
            if " running" in self.log_text()[offset:]:
                return self
            time.sleep(0.02)
        self.kill()
        raise BrokerError(f"mosquitto not ready within {START_TIMEOUT:.0f} s:\n{self.log_text()[-2000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def refused(self) -> list[float]:
        """When the broker refused a client's credentials (its log, whole seconds)."""
        return [float(line.partition(": ")[0]) for line in self.log_text().splitlines()
                if line.endswith("disconnected, not authorised.")]

    # -- a client's view ----------------------------------------------------------------------

    def client(self, client_id: str = "") -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex[:8]}")
        if self.users:
            user, password = next(iter(self.users.items()))
            client.username_pw_set(user, password)
        if self.tls:
            client.tls_set_context(ssl.create_default_context(cafile=str(self.tls[0])))
        return client

    def retained(self, timeout: float = 10.0) -> dict[str, bytes]:
        """Every retained message the broker holds now: {topic: payload} (a fresh subscriber's view)."""
        with Watcher(self) as watch:
            return dict(watch.retained_at_subscribe)


def mqtt_cursor(store: Path) -> tuple[int, int]:
    """(the MQTT publisher's saved cursor, the newest record id) of a store."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        cursor = db.execute("SELECT cursor FROM mqtt_progress").fetchone()[0] if "mqtt_progress" in tables else 0
        return cursor, db.execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()[0]
    finally:
        db.close()


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    at: float  # time.monotonic()

    def json(self) -> Any:
        return json.loads(self.payload)


class Watcher:
    """Subscribed to every topic from the start; `messages` is all it received, in order.
    `retained_at_subscribe` is what the broker held when it subscribed."""

    def __init__(self, broker: Mosquitto, topic: str = "#") -> None:
        self.broker = broker
        self.topic = topic
        self.messages: list[Message] = []
        self.retained_at_subscribe: dict[str, bytes] = {}
        self._sentinel = f"test/sentinel/{uuid.uuid4().hex}"
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self.client = broker.client()
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe(self.topic, qos=1)
        client.publish(self._sentinel, b"", qos=1)  # arrives after every retained message

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self._sentinel:
            self._ready.set()
            return
        with self._lock:
            if not self._ready.is_set() and msg.retain:
                if msg.payload:
                    self.retained_at_subscribe[msg.topic] = bytes(msg.payload)
                else:
                    self.retained_at_subscribe.pop(msg.topic, None)
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic()))

    def __enter__(self) -> Watcher:
        self.client.connect("localhost" if self.broker.tls else "127.0.0.1", self.broker.port)
        self.client.loop_start()
        if not self._ready.wait(START_TIMEOUT):
            raise BrokerError("the watcher did not get its subscription going")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def last(self) -> dict[str, bytes]:
        """The newest payload per topic (empty payloads included: a cleared topic)."""
        with self._lock:
            return {m.topic: m.payload for m in self.messages}

    def on(self, topic: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        if not predicate():
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}; topics seen: "
                                 f"{sorted(self.last)[:50]}")
