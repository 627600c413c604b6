"""The Compose stack's optional broker: the password file pvtap writes is mosquitto's own format
(checked against mosquitto_passwd and a real mosquitto), and the Compose fragment holds no secret."""

from __future__ import annotations

import base64
import stat
import subprocess

import aiomqtt
import pytest
from ruamel.yaml import YAML

from pvtap.config import MqttConfig
from pvtap.mqtt.broker import password_line, write_password_file
from pvtap.mqtt.publisher import client_for
from tests.conftest import REPO
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


def test_the_compose_fragment_puts_mosquitto_behind_a_profile_without_secrets():
    doc = YAML(typ="safe").load((REPO / "compose.mqtt.yaml").read_text())
    mosquitto = doc["services"]["mosquitto"]
    assert mosquitto["profiles"] == ["mqtt"]
    assert "./mosquitto:/pvtap-mosquitto:ro" in mosquitto["volumes"]
    env = doc["services"]["pvtap"]["environment"]
    assert env["PVTAP_MQTT_PASSWORD"] == "${MQTT_PASSWORD:-}" and env["PVTAP_MQTT_URL"] == "${PVTAP_MQTT_URL:-}"
    conf = (REPO / "mosquitto" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "password_file /mosquitto/data/passwd" in conf
    assert "/pvtap-mosquitto/passwd /mosquitto/data/passwd" in mosquitto["entrypoint"][2]
