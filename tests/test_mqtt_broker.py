"""The Compose stack's optional broker: the password file pvtap writes is mosquitto's own format
(checked against mosquitto_passwd and a real mosquitto), compose.yaml's Mosquitto service holds no
secret, and its config file and healthcheck work on a real mosquitto."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import aiomqtt
import pytest
from ruamel.yaml import YAML

from pvtap.cli import main
from pvtap.config import MqttConfig
from pvtap.mqtt.broker import MQTT_USER, password_line, write_password_file
from pvtap.mqtt.publisher import client_for
from tests.conftest import REPO, free_port
from tests.mqtt_support import Mosquitto


def test_password_line_is_what_mosquitto_passwd_writes(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.touch(mode=0o600)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "pvtap", "s3cret"], check=True, capture_output=True)
    theirs = passwd.read_text().strip()
    salt = base64.b64decode(theirs.split("$")[3])
    assert password_line("pvtap", "s3cret", salt) == theirs


async def test_a_real_mosquitto_takes_the_file_pvtap_writes(tmp_path):
    path = tmp_path / "mosquitto" / "passwd"
    write_password_file(path, "pvtap", "generated-password")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Mosquitto(tmp_path, users={"pvtap": "generated-password"}, password_file=path) as broker:
        async with client_for(MqttConfig(url=broker.url, username="pvtap", password="generated-password"), "t") as c:
            await c.publish("pvtap/test", b"ok", qos=1)
        with pytest.raises(aiomqtt.MqttCodeError):
            async with client_for(MqttConfig(url=broker.url, username="pvtap", password="wrong"), "t"):
                pass


def mosquitto_service() -> dict:
    return YAML(typ="safe").load((REPO / "compose.yaml").read_text())["services"]["mosquitto"]


def test_the_compose_broker_sits_behind_a_profile_without_secrets():
    mosquitto = mosquitto_service()
    assert mosquitto["profiles"] == ["mqtt"]
    assert "./mosquitto:/pvtap-mosquitto:ro" in mosquitto["volumes"]
    assert mosquitto["environment"] == {"MQTT_PASSWORD": "${MQTT_PASSWORD:-}"}  # no default: empty
    env = YAML(typ="safe").load((REPO / "compose.yaml").read_text())["services"]["pvtap"]["environment"]
    assert env["PVTAP_MQTT_PASSWORD"] == "${MQTT_PASSWORD:-}" and env["PVTAP_MQTT_URL"] == "${PVTAP_MQTT_URL:-}"
    assert env["PVTAP_MQTT_USERNAME"] == f"${{PVTAP_MQTT_USERNAME:-{MQTT_USER}}}"
    conf = (REPO / "mosquitto" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "password_file /mosquitto/data/passwd" in conf
    assert "/pvtap-mosquitto/passwd /mosquitto/data/passwd" in mosquitto["entrypoint"][2]


def container_script(text: str, tmp_path: Path) -> str:
    """A command of the Mosquitto service with the container's paths mapped into tmp_path, and `$$`
    as Compose passes it on."""
    return text.replace("$$", "$").replace("/pvtap-mosquitto/", f"{tmp_path}/mosquitto/") \
        .replace("/mosquitto/data/", f"{tmp_path}/data/")


def test_without_its_password_file_the_broker_stops_and_says_how_to_make_it(tmp_path):
    (tmp_path / "mosquitto").mkdir()
    script = container_script(mosquitto_service()["entrypoint"][2], tmp_path)
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "mosquitto/passwd is missing: run pvtap init --mqtt (it writes the broker's " \
                                    "password file and MQTT_PASSWORD in .env)"


def test_the_compose_broker_config_and_healthcheck_on_a_real_mosquitto(tmp_path):
    """The repository's mosquitto.conf and the password file `pvtap init --mqtt` writes, run by
    Debian's mosquitto; the service's healthcheck passes with MQTT_PASSWORD and fails without."""
    assert main(["init", "--dir", str(tmp_path), "--mqtt"]) == 0
    password = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines()
                    if not line.startswith("#"))["MQTT_PASSWORD"]
    (tmp_path / "data").mkdir()
    shutil.copy(tmp_path / "mosquitto" / "passwd", tmp_path / "data" / "passwd")  # as the entrypoint does
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    # the tests run as root: the broker keeps it (in the container it drops to its own user, who owns the copy)
    conf.write_text(container_script((REPO / "mosquitto" / "mosquitto.conf").read_text(), tmp_path)
                    .replace("listener 1883", f"listener {port} 127.0.0.1") + "user root\n")
    healthcheck = mosquitto_service()["healthcheck"]["test"]
    assert healthcheck[0] == "CMD-SHELL" and " -p 1883 " in healthcheck[1]
    check = container_script(healthcheck[1], tmp_path).replace(" -p 1883 ", f" -p {port} ")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        wait_for_port(port, broker)

        def healthy(secret: str) -> bool:
            return subprocess.run(["sh", "-c", check], env={"PATH": os.environ["PATH"], "MQTT_PASSWORD": secret},
                                  capture_output=True, timeout=30, check=False).returncode == 0

        assert healthy(password)
        assert not healthy("wrong") and not healthy("")
    finally:
        broker.terminate()
        output = broker.communicate(timeout=10)[0]
    assert output.count("(p2, c1, k60, u'pvtap')") == 1 and output.count("not authorised") == 2, output


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port} after {timeout:.0f} s")
