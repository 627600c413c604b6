"""The Compose stack as files: compose.yaml through a real Compose parser (Debian's
docker-compose) with and without the .env `pvtap init` writes, pinned images, the Dockerfile, and
`pvtap init` itself. No Docker engine is needed (or used)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from pvtap.cli import main
from pvtap.cli.run import STOP_TIMEOUT
from pvtap.config import load_config
from tests.conftest import REPO

COMPOSE = REPO / "compose.yaml"
SECRETS = ("INFLUXDB_ADMIN_PASSWORD", "INFLUXDB_ADMIN_TOKEN", "GRAFANA_ADMIN_PASSWORD")
compose_needed = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                    reason="docker-compose (Debian package) is not installed: make debian-packages")


def compose_file() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def compose_config(directory: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker-compose", "--project-directory", str(directory),
                           "-f", str(directory / "compose.yaml"), *options, "config"],
                          capture_output=True, text=True, cwd=directory, check=False, timeout=60)


@pytest.fixture
def stack_dir(tmp_path: Path) -> Path:
    """compose.yaml where `pvtap init` may write its .env (never into the repository)."""
    shutil.copy(COMPOSE, tmp_path / "compose.yaml")
    return tmp_path


@compose_needed
def test_compose_parses_with_the_env_pvtap_init_wrote(stack_dir: Path, capsys) -> None:
    assert main(["init", "--dir", str(stack_dir), "--tz", "Europe/Berlin"]) == 0
    env = read_env(stack_dir / ".env")
    result = compose_config(stack_dir)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert services["influxdb"]["environment"]["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"] == env["INFLUXDB_ADMIN_TOKEN"]
    assert services["influxdb"]["environment"]["DOCKER_INFLUXDB_INIT_PASSWORD"] == env["INFLUXDB_ADMIN_PASSWORD"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == env["GRAFANA_ADMIN_PASSWORD"]
    assert services["grafana"]["environment"]["INFLUX_TOKEN"] == env["INFLUXDB_ADMIN_TOKEN"]
    pvtap = services["pvtap"]["environment"]
    assert pvtap["PVTAP_INFLUX_TOKEN"] == env["INFLUXDB_ADMIN_TOKEN"] and pvtap["TZ"] == "Europe/Berlin"
    # pvtap's settings from the environment are real, valid settings
    config_from_env = load_config(env={k: str(v) for k, v in pvtap.items() if k.startswith("PVTAP_")})
    assert config_from_env.influx.url == "http://127.0.0.1:8086" and config_from_env.influx.org == "pvtap"
    assert config_from_env.health.relay_listen == "127.0.0.1:9108"


@compose_needed
def test_compose_refuses_to_start_without_env_and_names_the_variable(stack_dir: Path) -> None:
    result = compose_config(stack_dir)
    assert result.returncode != 0
    named = [name for name in SECRETS if f"{name} is not set, run pvtap init to write .env" in result.stderr]
    assert named, result.stderr
    # every secret in the file is required that way, none has a default
    text = COMPOSE.read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"(.*?)\}", text)
        assert uses and all(use == f":?{name} is not set, run pvtap init to write .env" for use in uses), uses


def test_every_image_is_pinned_to_a_version() -> None:
    services = compose_file()["services"]
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and re.fullmatch(r"\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned to x.y.z"
    # not latest (InfluxDB 3): the 2.x line whose tokens are hashed, so the admin token is set, not read back
    assert services["influxdb"]["image"].startswith("influxdb:2.9.")
    token = services["influxdb"]["environment"]["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]
    assert token.startswith("${INFLUXDB_ADMIN_TOKEN:?")
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert services["pvtap"]["image"] == f"pvtap:{version}" and services["pvtap"]["build"] == "."
    base = re.search(r"^FROM (\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert base and re.fullmatch(r"python:3\.12\.\d+-slim-\w+", base[1]), base


def test_the_stack_is_shaped_as_promised() -> None:
    compose = compose_file()
    services = compose["services"]
    pvtap = services["pvtap"]
    assert pvtap["network_mode"] == "host"  # REDIRECT and SO_ORIGINAL_DST on the host
    assert "depends_on" not in pvtap  # forwarding from the first second, InfluxDB or not
    grace = int(pvtap["stop_grace_period"].removesuffix("s"))
    assert grace > 2 * STOP_TIMEOUT + 2 * 2  # two services stopped in turn, each STOP_TIMEOUT, then output joins
    assert pvtap["environment"]["TZ"] == "${TZ:-UTC}"
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name
    assert pvtap["healthcheck"]["test"] == ["CMD", "pvtap", "health"]
    assert services["influxdb"]["environment"]["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    assert set(compose["volumes"]) == {"pvtap-data", "pvtap-certs", "influxdb-data", "influxdb-config", "grafana-data",
                                       "mosquitto-data"}
    # the broker is optional: behind its profile; everything else always runs
    assert {name: service.get("profiles") for name, service in services.items()} == \
        {"pvtap": None, "influxdb": None, "grafana": None, "mosquitto": ["mqtt"]}
    assert "mosquitto-data:/mosquitto/data" in services["mosquitto"]["volumes"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in pvtap["volumes"] if not m.startswith("#")}
    assert mounts == {"/var/lib/pvtap/data": "pvtap-data", "/var/lib/pvtap/data/certs": "pvtap-certs"}
    assert "confdir=/var/lib/pvtap/data/certs/mitmproxy" in pvtap["command"]  # mitmproxy's CA on the certs volume
    for mount in services["grafana"]["volumes"]:
        source = mount.split(":")[0]
        assert not source.startswith("./") or (REPO / source).is_dir(), mount


def test_the_dockerfile_runs_pvtap_as_a_user_with_what_it_copies() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users == ["pvtap"]
    assert 'ENTRYPOINT ["pvtap"]' in dockerfile and 'CMD ["run"]' in dockerfile
    assert 'CMD ["pvtap", "health"]' in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, re.MULTILINE):
        for item in source.split():
            assert (REPO / item).exists(), item
            assert f"!{item.rstrip('/')}/" in ignored or f"!{item}" in ignored, item


def test_env_is_private_ignored_and_never_overwritten_by_accident(tmp_path: Path, capsys) -> None:
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO, check=False).returncode == 0
    assert main(["init", "--dir", str(tmp_path)]) == 0
    env_file = tmp_path / ".env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    first = read_env(env_file)
    assert set(first) >= {*SECRETS, "TZ", "INFLUXDB_ORG", "INFLUXDB_BUCKET"}
    assert all(len(first[name]) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", first[name]) for name in SECRETS)
    assert len({first[name] for name in SECRETS}) == 3
    capsys.readouterr()
    assert main(["init", "--dir", str(tmp_path)]) == 1
    assert "exists; kept it. Fix: --force" in capsys.readouterr().err
    assert read_env(env_file) == first
    assert main(["init", "--dir", str(tmp_path), "--force"]) == 0
    second = read_env(env_file)
    assert all(second[name] != first[name] for name in SECRETS) and env_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [".env"]  # no temporary file left behind


def test_init_refuses_values_compose_would_misread(tmp_path: Path, capsys) -> None:
    assert main(["init", "--dir", str(tmp_path), "--bucket", "my bucket"]) == 2
    assert "INFLUXDB_BUCKET = 'my bucket'" in capsys.readouterr().err
    assert not (tmp_path / ".env").exists()


@compose_needed
def test_init_mqtt_adds_the_broker_and_its_password_file(stack_dir: Path, capsys) -> None:
    from pvtap.mqtt.broker import ITERATIONS, MQTT_USER, password_line

    assert main(["init", "--dir", str(stack_dir), "--mqtt"]) == 0
    env = read_env(stack_dir / ".env")
    assert (env["COMPOSE_PROFILES"], env["PVTAP_MQTT_URL"]) == ("mqtt", "mqtt://127.0.0.1:1883")
    assert "next: docker compose up -d" in capsys.readouterr().out  # one file: the profile is in .env
    passwd = stack_dir / "mosquitto" / "passwd"
    assert passwd.stat().st_mode & 0o777 == 0o600
    user, _, line = passwd.read_text().strip().partition(":")
    salt = base64.b64decode(line.split("$")[3])
    assert user == MQTT_USER and f"{user}:{line}" == password_line(MQTT_USER, env["MQTT_PASSWORD"], salt)
    assert f"$7${ITERATIONS}$" in line
    for profile in ([], ["--profile", "mqtt"]):  # from .env's COMPOSE_PROFILES, and named
        result = compose_config(stack_dir, *profile)
        assert result.returncode == 0, result.stderr
        services = yaml.safe_load(result.stdout)["services"]
        pvtap = services["pvtap"]["environment"]
        assert (pvtap["PVTAP_MQTT_URL"], pvtap["PVTAP_MQTT_USERNAME"], pvtap["PVTAP_MQTT_PASSWORD"]) == \
            ("mqtt://127.0.0.1:1883", MQTT_USER, env["MQTT_PASSWORD"])
        assert services["mosquitto"]["environment"]["MQTT_PASSWORD"] == env["MQTT_PASSWORD"]
        assert services["mosquitto"]["profiles"] == ["mqtt"] and pvtap["PVTAP_INFLUX_TOKEN"]
    mqtt = load_config(env={k: str(v) for k, v in pvtap.items() if k.startswith("PVTAP_")}).mqtt
    assert (mqtt.url, mqtt.username, mqtt.password) == ("mqtt://127.0.0.1:1883", MQTT_USER, env["MQTT_PASSWORD"])


@compose_needed
def test_without_the_profile_mqtt_is_off_and_needs_nothing(stack_dir: Path, capsys) -> None:
    assert main(["init", "--dir", str(stack_dir)]) == 0
    env = read_env(stack_dir / ".env")
    assert not {"COMPOSE_PROFILES", "PVTAP_MQTT_URL", "MQTT_PASSWORD"} & set(env)
    assert not (stack_dir / "mosquitto").exists()
    for profile in ([], ["--profile", "mqtt"]):  # the broker's service needs no variable of its own to parse
        result = compose_config(stack_dir, *profile)
        assert result.returncode == 0, result.stderr
    pvtap = yaml.safe_load(result.stdout)["services"]["pvtap"]["environment"]
    assert (pvtap["PVTAP_MQTT_URL"], pvtap["PVTAP_MQTT_PASSWORD"]) == ("", "")
    assert load_config(env={k: str(v) for k, v in pvtap.items() if k.startswith("PVTAP_")}).mqtt.url == ""
