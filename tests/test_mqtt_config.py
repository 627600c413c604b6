"""The [mqtt] settings: defaults, PVTAP_MQTT_* overrides, and errors that name the key and the fix."""

from __future__ import annotations

import pytest

from pvtap.config import ConfigError, broker_address, load_config


def test_off_by_default_with_home_assistant_defaults():
    mqtt = load_config(env={}).mqtt
    assert mqtt.url == ""
    assert (mqtt.topic_prefix, mqtt.discovery_prefix, mqtt.discovery, mqtt.client_id) == \
        ("pvtap", "homeassistant", True, "pvtap")
    assert mqtt.exclude == []


def test_file_then_environment(tmp_path):
    path = tmp_path / "pvtap.toml"
    path.write_text('[mqtt]\nurl = "mqtt://broker.lan"\nusername = "pvtap"\npassword = "from-file"\n'
                    'exclude = ["AL0123456789012"]\nmin_interval_s = 30\n')
    mqtt = load_config(path, env={"PVTAP_MQTT_PASSWORD": "from-env", "PVTAP_MQTT_EXCLUDE": "a, b",
                                  "PVTAP_MQTT_DISCOVERY": "false"}).mqtt
    assert (mqtt.url, mqtt.username, mqtt.password) == ("mqtt://broker.lan", "pvtap", "from-env")
    assert mqtt.exclude == ["a", "b"] and mqtt.discovery is False and mqtt.min_interval_s == 30.0


@pytest.mark.parametrize("url, expected", [
    ("mqtt://broker.lan", ("broker.lan", 1883, False)),
    ("mqtts://broker.lan", ("broker.lan", 8883, True)),
    ("mqtt://192.0.2.10:1884/", ("192.0.2.10", 1884, False)),
    ("mqtts://[2001:db8::1]:8884", ("2001:db8::1", 8884, True)),
])
def test_broker_addresses(url, expected):
    assert broker_address(load_config(env={"PVTAP_MQTT_URL": url}).mqtt.url) == expected


@pytest.mark.parametrize("env, key, problem, fix", [
    ({"PVTAP_MQTT_URL": "http://broker"}, "mqtt.url", "expected mqtt://host", "set mqtt.url"),
    ({"PVTAP_MQTT_URL": "mqtt://broker:0"}, "mqtt.url", "expected mqtt://host", "set mqtt.url"),
    ({"PVTAP_MQTT_PASSWORD": "x"}, "mqtt.password", "without a user name", "set mqtt.username"),
    ({"PVTAP_MQTT_URL": "mqtt://b", "PVTAP_MQTT_CA_FILE": "/etc/hostname"}, "mqtt.ca_file", "only used for TLS",
     "mqtts://"),
    ({"PVTAP_MQTT_CA_FILE": "/nonexistent.pem"}, "mqtt.ca_file", "no such file", "existing PEM file"),
    ({"PVTAP_MQTT_TOPIC_PREFIX": "pvtap/#"}, "mqtt.topic_prefix", "no #", "set mqtt.topic_prefix"),
    ({"PVTAP_MQTT_TOPIC_PREFIX": "/pvtap"}, "mqtt.topic_prefix", "leading", "set mqtt.topic_prefix"),
    ({"PVTAP_MQTT_TOPIC_PREFIX": "homeassistant"}, "mqtt.topic_prefix", "discovery_prefix", "own prefix"),
    ({"PVTAP_MQTT_CLIENT_ID": "pv tap"}, "mqtt.client_id", "letters, digits", "set mqtt.client_id"),
    ({"PVTAP_MQTT_MIN_INTERVAL_S": "-1"}, "mqtt.min_interval_s", "at least 0", "set mqtt.min_interval_s"),
    ({"PVTAP_MQTT_OFFLINE_AFTER_S": "0"}, "mqtt.offline_after_s", "greater than 0", "set mqtt.offline_after_s"),
])
def test_errors_name_key_and_fix(env, key, problem, fix):
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert info.value.key == key
    assert problem in info.value.problem and fix in info.value.fix


def test_a_refused_password_is_not_echoed():
    with pytest.raises(ConfigError) as info:
        load_config(env={"PVTAP_MQTT_PASSWORD": "hunter2-secret"})
    assert "hunter2-secret" not in str(info.value)
