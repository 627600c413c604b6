"""Secret settings (passwords, tokens) are never echoed: not in a config error, whichever way the
value is wrong, not in `pvtap status`, not in docs/config.md beyond an empty placeholder. Each error
still names the key, so the user knows what to fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pvtap.cli import main
from pvtap.config import HIDDEN, ConfigError, load_config, mask_url, secret_keys
from pvtap.store.local import IngestStatus, LocalStore

SECRET = "s3cr3t-PLACEHOLDER"
REPO = Path(__file__).resolve().parent.parent


def test_every_password_and_token_setting_is_declared_secret():
    assert secret_keys() == {"influx.token", "mqtt.password", "web.password"}


def _error(tmp_path: Path, toml: str = "", env: dict[str, str] | None = None) -> ConfigError:
    path = tmp_path / "pvtap.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=env or {})
    return caught.value


@pytest.mark.parametrize(("toml", "env", "key"), [
    # the wrong type, from the file and from the environment
    (f'[influx]\ntoken = ["{SECRET}"]\n', {}, "influx.token"),
    (f'[mqtt]\npassword = ["{SECRET}"]\n', {}, "mqtt.password"),
    (f'[web]\npassword = ["{SECRET}"]\n', {}, "web.password"),
    # a check that fails
    ("", {"PVTAP_MQTT_PASSWORD": SECRET}, "mqtt.password"),  # without a user name
    ("", {"PVTAP_WEB_PASSWORD": SECRET[:7]}, "web.password"),  # too short
    # a misspelt secret is as secret as the right one
    (f'[mqtt]\nusername = "u"\npasword = "{SECRET}"\n', {}, "mqtt.pasword"),
    (f'[influx]\ntokn = "{SECRET}"\n', {}, "influx.tokn"),
    # a password written into a URL: mqtt.url refuses user info, influx.url must still mask it
    ("", {"PVTAP_MQTT_URL": f"mqtt://pvtap:{SECRET}@broker.lan:1883"}, "mqtt.url"),
    ("", {"PVTAP_INFLUX_URL": f"http://pvtap:{SECRET}@influx lan:8086"}, "influx.url"),
    (f'[mqtt]\nurl = "mqtts://pvtap:{SECRET}@broker.lan:99999"\n', {}, "mqtt.url"),
])
def test_a_config_error_names_the_key_and_hides_the_secret(tmp_path, toml, env, key):
    error = _error(tmp_path, toml, env)
    assert error.key == key
    assert SECRET not in str(error) and SECRET[:7] not in str(error)
    assert SECRET not in repr(error.value) and f"config error: {key} = " in str(error)


def test_a_url_keeps_its_user_and_host_so_the_error_stays_useful(tmp_path):
    error = _error(tmp_path, env={"PVTAP_MQTT_URL": f"mqtt://pvtap:{SECRET}@broker.lan/x"})
    assert f"'mqtt://pvtap:{HIDDEN}@broker.lan/x'" in str(error)
    assert mask_url(f"see http://u:{SECRET}@h:1/p and mqtt://h") == f"see http://u:{HIDDEN}@h:1/p and mqtt://h"


def test_a_loaded_config_does_not_show_secrets_in_its_repr():
    config = load_config(env={"PVTAP_INFLUX_TOKEN": SECRET, "PVTAP_MQTT_USERNAME": "u",
                              "PVTAP_MQTT_PASSWORD": SECRET, "PVTAP_WEB_PASSWORD": SECRET})
    assert (config.influx.token, config.mqtt.password, config.web.password) == (SECRET, SECRET, SECRET)
    assert SECRET not in repr(config)


def test_pvtap_status_masks_a_password_in_the_influx_url_and_in_a_noted_error(data_dir, capsys, monkeypatch):
    monkeypatch.setenv("PVTAP_INFLUX_URL", f"http://pvtap:{SECRET}@influx.lan:8086")
    monkeypatch.setenv("PVTAP_INFLUX_ORG", "-")
    monkeypatch.setenv("PVTAP_INFLUX_TOKEN", SECRET)
    with LocalStore.for_process(data_dir, "relay") as store:
        store.write_status(IngestStatus(running=True, pid=7, dropped_copies=0, decode_backlog=0, forwarder="stuck",
                                        forwarder_error=f"cannot reach http://pvtap:{SECRET}@influx.lan:8086"))
    assert main(["--data-dir", str(data_dir), "status"]) == 0
    out = capsys.readouterr().out
    assert f"InfluxDB: http://pvtap:{HIDDEN}@influx.lan:8086 (org -" in out
    assert f"STUCK: cannot reach http://pvtap:{HIDDEN}@influx.lan:8086" in out
    assert main(["--data-dir", str(data_dir), "status", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["ingest"]["forwarder_error"] == f"cannot reach http://pvtap:{HIDDEN}@influx.lan:8086"
    assert SECRET not in out


def test_a_config_error_at_start_up_hides_the_secret_on_the_terminal(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PVTAP_MQTT_PASSWORD": SECRET}  # without mqtt.username: refused
    proc = subprocess.run([sys.executable, "-m", "pvtap", "--data-dir", str(tmp_path), "status"], env=env,
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "mqtt.password" in proc.stderr and SECRET not in proc.stdout + proc.stderr


def test_the_config_doc_marks_secrets_and_shows_only_empty_placeholders():
    doc = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    for key in secret_keys():
        section, name = key.split(".")
        assert f"| `{key}` | `PVTAP_{section.upper()}_{name.upper()}` | `\"\"` | **Secret.** " in doc
    example = doc.split("## Every setting at its default")[1]
    assert example.count('password = ""') == 2 and example.count('token = ""') == 1
