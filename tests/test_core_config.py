"""The configuration loader: defaults, TOML file, PVTAP_* environment, and errors that name the
key, the value, where it came from and the fix. Also keeps docs/config.md current."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from pvtap.config import CONFIG_ENV, Config, ConfigError, ListenerConfig, describe, load_config, positive, setting
from pvtap.config import loading as config_loading

from .conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pvtap.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_environment():
    config = load_config(env={})
    assert config == Config()
    assert config.data_dir == Path("data")
    assert config.log_level == "info"
    assert config.privacy.store_network_identity is False
    assert config.privacy.pseudonymize_serials is False
    assert config.enphase.local_mode is False
    assert config.enphase.hosts == ["reports.enphaseenergy.com"]
    assert config.relay.listeners == []
    assert config.influx.url == ""


def test_file_then_environment(tmp_path):
    path = write(tmp_path, """
        data_dir = "/srv/pvtap"
        log_level = "warning"
        [privacy]
        pseudonymize_serials = true
        [enphase]
        hosts = ["reports.example", "other.example"]
    """.replace("\n        ", "\n"))
    config = load_config(path, env={})
    assert config.data_dir == Path("/srv/pvtap")
    assert config.log_level == "warning"
    assert config.privacy.pseudonymize_serials is True
    assert config.privacy.store_network_identity is False  # not in the file: default
    assert config.enphase.hosts == ["reports.example", "other.example"]

    env = {"PVTAP_LOG_LEVEL": "debug", "PVTAP_DATA_DIR": "/var/lib/pvtap",
           "PVTAP_PRIVACY_PSEUDONYMIZE_SERIALS": "off", "PVTAP_ENPHASE_HOSTS": " a.example , b.example ,"}
    config = load_config(path, env=env)
    assert config.log_level == "debug"
    assert config.data_dir == Path("/var/lib/pvtap")
    assert config.privacy.pseudonymize_serials is False
    assert config.enphase.hosts == ["a.example", "b.example"]


def test_config_file_named_by_environment(tmp_path):
    named = write(tmp_path, 'log_level = "error"\n')
    assert load_config(env={CONFIG_ENV: str(named)}).log_level == "error"
    other = tmp_path / "other.toml"
    other.write_text('log_level = "debug"\n')
    assert load_config(other, env={CONFIG_ENV: str(named)}).log_level == "debug"  # an explicit path wins
    assert load_config(env={CONFIG_ENV: ""}) == Config()


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("1", True), ("YES", True), (" on ", True),
    ("false", False), ("0", False), ("No", False), ("off", False),
])
def test_environment_booleans(text, expected):
    config = load_config(env={"PVTAP_ENPHASE_LOCAL_MODE": text})
    assert config.enphase.local_mode is expected


def test_bad_environment_boolean_names_the_variable():
    with pytest.raises(ConfigError) as info:
        load_config(env={"PVTAP_PRIVACY_STORE_NETWORK_IDENTITY": "maybe"})
    err = info.value
    assert (err.key, err.value, err.source) == ("privacy.store_network_identity", "maybe",
                                                 "PVTAP_PRIVACY_STORE_NETWORK_IDENTITY")
    assert str(err) == ("config error: privacy.store_network_identity = 'maybe' (from "
                        "PVTAP_PRIVACY_STORE_NETWORK_IDENTITY): expected a boolean. Fix: set "
                        "PVTAP_PRIVACY_STORE_NETWORK_IDENTITY to true or false")


def test_check_failure_names_key_value_source_and_fix(tmp_path):
    path = write(tmp_path, 'log_level = "loud"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    assert (err.key, err.value, err.source) == ("log_level", "loud", str(path))
    assert err.problem == "must be one of debug, info, warning, error"
    assert str(err).startswith(f"config error: log_level = 'loud' (from {path}): must be one of debug, info, "
                               "warning, error. Fix: set log_level to a valid value")
    with pytest.raises(ConfigError, match=r"log_level = 'loud' \(from PVTAP_LOG_LEVEL\)"):
        load_config(env={"PVTAP_LOG_LEVEL": "loud"})


def test_empty_list_from_environment_fails_its_check():
    with pytest.raises(ConfigError) as info:
        load_config(env={"PVTAP_ENPHASE_HOSTS": " , "})
    assert info.value.key == "enphase.hosts"
    assert info.value.problem == "needs at least one host name"


@pytest.mark.parametrize("text, key, problem, fix", [
    ("log_levle = 'info'", "log_levle", "unknown setting", "did you mean log_level?"),
    ("[privacy]\npseudonymise_serials = true", "privacy.pseudonymise_serials", "unknown setting",
     "did you mean privacy.pseudonymize_serials?"),
    ("[privacy]\ncolour = 1", "privacy.colour", "unknown setting",
     "known keys: store_network_identity, pseudonymize_serials, keep_unredacted"),
    ("log_level = 3", "log_level", "expected a string", 'quote it: log_level = "..."'),
    ("[privacy]\nstore_network_identity = 'yes'", "privacy.store_network_identity", "expected a boolean",
     "write privacy.store_network_identity = true or false"),
    ("data_dir = ''", "data_dir", "expected a path", 'write data_dir = "/some/dir"'),
    ("[enphase]\nhosts = 'a.example'", "enphase.hosts", "expected a list", "write enphase.hosts = [ ... ]"),
    ("[enphase]\nhosts = ['a.example', 7]", "enphase.hosts[1]", "expected a string", None),
    ("privacy = 3", "privacy", "expected a table", "write [privacy]"),
    ("[ingest]\nstop_decode_s = 11", "ingest.stop_decode_s", "must be between 0 and 10", None),
    ("[ingest]\nstop_decode_s = -1", "ingest.stop_decode_s", "must be between 0 and 10", None),
])
def test_file_errors(tmp_path, text, key, problem, fix):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert (info.value.key, info.value.problem) == (key, problem)
    if fix is not None:
        assert info.value.fix == fix
    assert key in str(info.value) and problem in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", env={})
    assert (info.value.key, info.value.problem) == ("config file", "the file does not exist")
    assert "docs/config.md" in info.value.fix
    bad = write(tmp_path, "log_level = \n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, env={})
    assert info.value.key == "config file" and info.value.problem.startswith("not valid TOML")


def test_relay_listeners_from_the_file(tmp_path):
    path = write(tmp_path, """
[[relay.listeners]]
protocol = "alphaess"
listen = "127.0.0.1:7777"
policy = "fixed"
upstream = "cloud.example:7777"

[[relay.listeners]]
protocol = "foxess"
listen = "[::1]:10001"
policy = "transparent"
""")
    listeners = load_config(path, env={}).relay.listeners
    assert [type(x) for x in listeners] == [ListenerConfig, ListenerConfig]
    assert [(x.protocol, x.listen, x.policy, x.upstream) for x in listeners] == [
        ("alphaess", "127.0.0.1:7777", "fixed", "cloud.example:7777"),
        ("foxess", "[::1]:10001", "transparent", "")]


def test_relay_listener_error_names_its_index(tmp_path):
    path = write(tmp_path, """
[[relay.listeners]]
protocol = "alphaess"
listen = "127.0.0.1:7777"
policy = "fixed"
upstream = "cloud.example:7777"

[[relay.listeners]]
protocol = "foxess"
listen = "localhost"
policy = "transparent"
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert (info.value.key, info.value.value) == ("relay.listeners[1].listen", "localhost")
    assert "host:port" in info.value.problem


def test_config_is_immutable():
    config = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log_level = "debug"  # type: ignore[misc]


def test_describe_lists_every_leaf_setting():
    described = describe()
    keys = [key for key, *_ in described]
    assert len(keys) == len(set(keys))
    assert {"data_dir", "log_level", "privacy.store_network_identity", "privacy.pseudonymize_serials",
            "enphase.local_mode", "enphase.hosts", "relay.listeners", "influx.url"} <= set(keys)
    defaults = Config()
    for key, env, default, help_text in described:
        assert env == "PVTAP_" + key.replace(".", "_").upper()
        assert help_text.strip(), f"{key} has no help text"
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        assert value == default, key


# -- the loader's type handling, on a section of its own -----------------------------------------

@dataclass(frozen=True)
class Sample:
    count: int = setting(3, "a whole number", check=positive)
    ratio: float = setting(0.5, "a number")
    label: str | None = setting(None, "optional text")


def build(data: dict, env: dict | None = None) -> Sample:
    return config_loading._build(Sample, data, env or {}, prefix="", source="sample.toml")


def test_numbers_and_optionals():
    assert build({}) == Sample()
    assert build({"count": 7, "ratio": 2}) == Sample(count=7, ratio=2.0)
    assert isinstance(build({"ratio": 2}).ratio, float)
    assert build({"count": 4.0}).count == 4
    assert build({}, {"PVTAP_COUNT": "42", "PVTAP_RATIO": "1e-3", "PVTAP_LABEL": "x"}) == Sample(42, 0.001, "x")
    assert build({"label": ""}).label is None
    cases: list[tuple[dict[str, object], dict[str, str], str]] = [
        ({"count": 2.5}, {}, "expected a whole number"),
        ({"count": True}, {}, "expected a number (int)"),
        ({"count": "many"}, {}, "expected a number (int)"),
        ({}, {"PVTAP_COUNT": "4.5"}, "expected a number (int)"),
        ({"count": 0}, {}, "must be greater than 0"),
    ]
    for data, env, problem in cases:
        with pytest.raises(ConfigError) as info:
            build(data, env)
        assert (info.value.key, info.value.problem) == ("count", problem)


# -- docs/config.md ----------------------------------------------------------------------------

def test_config_doc_is_current():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-config-doc"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_config_doc_examples_load(tmp_path):
    page = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    examples = re.findall(r"```toml\n(.*?)```", page, re.S)
    assert len(examples) == 2
    listeners, everything = examples
    assert load_config(write(tmp_path, everything), env={}) == Config()
    loaded = load_config(write(tmp_path, listeners), env={}).relay.listeners
    assert [(x.protocol, x.policy) for x in loaded] == [("alphaess", "fixed"), ("foxess", "transparent")]
    assert tomllib.loads(everything)  # plain TOML, nothing pvtap-specific
