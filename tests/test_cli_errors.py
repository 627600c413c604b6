"""A newcomer's mistakes, made as a user makes them: each one gives one clear line (what, where,
the fix) and the right exit status, and starts nothing. Every test runs the real command."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from pvtap.config import ConfigError, env_warnings, load_config, unknown_env
from pvtap.datadir import prepare, problem

USER = f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
FIX = (f"Fix: make it writable for user {USER}, or point data_dir at a directory pvtap may write to: "
       "--data-dir, PVTAP_DATA_DIR or data_dir in the config file")
#: root writes anywhere; without these capabilities it meets permissions as any user does
AS_A_USER = (["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])


def command(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, as_user: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python ARGS` as a user types it, with no PVTAP_* variable but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PVTAP_")}
    return subprocess.run([*(AS_A_USER if as_user else []), sys.executable, *args], env={**clean, **(env or {})},
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          check=False)


def pvtap(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return command("-m", "pvtap", *args, **kwargs)


# -- the environment ---------------------------------------------------------------------------

def test_a_misspelled_environment_variable_is_named_with_the_nearest_setting(tmp_path: Path) -> None:
    done = pvtap("--data-dir", str(tmp_path), "status", env={"PVTAP_DATADIR": str(tmp_path / "elsewhere")})
    assert done.returncode == 0
    assert done.stderr == ("pvtap: warning: environment variable PVTAP_DATADIR is not a pvtap setting and is "
                           "ignored; did you mean PVTAP_DATA_DIR?\n")


def test_env_warnings_know_every_setting_and_the_config_file_variable() -> None:
    env = {"PVTAP_CONFIG": "x.toml", "PVTAP_DATA_DIR": "d", "PVTAP_ENPHASE_LISTN": ":1", "PVTAP_COLOUR": "red",
           "PVTAP_INFLUX_URL": "", "HOME": "/root"}
    assert unknown_env(env) == ["PVTAP_COLOUR", "PVTAP_ENPHASE_LISTN"]
    assert env_warnings(env) == [
        "warning: environment variable PVTAP_COLOUR is not a pvtap setting and is ignored; settings and their "
        "variables: docs/config.md",
        "warning: environment variable PVTAP_ENPHASE_LISTN is not a pvtap setting and is ignored; did you mean "
        "PVTAP_ENPHASE_LISTEN?"]


def test_listeners_from_the_environment_say_they_come_only_from_the_file() -> None:
    done = pvtap("relay", env={"PVTAP_RELAY_LISTENERS": "alphaess:0.0.0.0:7777"})
    assert done.returncode == 2
    assert done.stderr == (
        "pvtap: config error: relay.listeners = 'alphaess:0.0.0.0:7777' (from PVTAP_RELAY_LISTENERS): listeners "
        "come only from the config file, not from the environment. Fix: unset PVTAP_RELAY_LISTENERS and write each "
        "listener in the config file as a [[relay.listeners]] table with protocol, listen and policy on lines of "
        "their own (docs/relay.md)\n")


def test_a_single_bracket_listener_table_says_to_use_double_brackets(tmp_path: Path) -> None:
    config = tmp_path / "pvtap.toml"
    config.write_text('[relay.listeners]\nprotocol = "alphaess"\nlisten = "127.0.0.1:0"\npolicy = "local"\n')
    done = pvtap("--config", str(config), "relay")
    assert done.returncode == 2
    assert done.stderr == (
        "pvtap: config error: relay.listeners = {'protocol': 'alphaess', 'listen': '127.0.0.1:0', 'policy': 'local'} "
        f"(from {config}): [relay.listeners] (single brackets) is one table, but relay.listeners is a list of "
        "tables. Fix: write [[relay.listeners]] (double brackets) above each one\n")
    with pytest.raises(ConfigError) as info:  # the same check for any list of tables, from the loader itself
        load_config(config, env={})
    assert info.value.key == "relay.listeners"


# -- the data directory --------------------------------------------------------------------------

@pytest.fixture
def read_only(tmp_path: Path):
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    yield directory
    directory.chmod(0o755)


def _relay_config(tmp_path: Path) -> Path:
    """One loopback listener: were anything started, it would take no real port."""
    path = tmp_path / "pvtap.toml"
    path.write_text('[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "127.0.0.1:0"\npolicy = "local"\n')
    return path


@pytest.mark.parametrize("argv, prog", [
    (["-m", "pvtap", "--config", "{config}", "--data-dir", "{data}", "run"], "pvtap run"),
    (["-m", "pvtap", "--config", "{config}", "--data-dir", "{data}", "relay"], "pvtap relay"),
    (["-m", "proxy_tcp", "--config", "{config}", "--data-dir", "{data}"], "python -m proxy_tcp"),
])
def test_a_data_dir_that_cannot_be_written_is_one_line_and_starts_nothing(tmp_path: Path, read_only: Path,
                                                                          argv: list[str], prog: str) -> None:
    data = read_only / "data"
    config = _relay_config(tmp_path)
    done = command(*(a.format(config=config, data=data) for a in argv), as_user=True)
    assert done.returncode == 2
    assert done.stderr == (f"{prog}: config error: data_dir = '{data}': cannot create it: {read_only} is not "
                           f"writable. {FIX}\n")
    assert done.stdout == ""  # nothing started: no "starting mitmproxy", no "relay listening"
    assert not data.exists()


def test_an_existing_data_dir_that_cannot_be_written(tmp_path: Path, read_only: Path) -> None:
    done = pvtap("--config", str(_relay_config(tmp_path)), "--data-dir", str(read_only), "relay", as_user=True)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"pvtap relay: config error: data_dir = '{read_only}': it is not writable. {FIX}\n"


def test_a_store_file_that_cannot_be_written(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "relay.sqlite").write_bytes(b"")
    (data / "relay.sqlite").chmod(0o444)
    done = pvtap("--config", str(_relay_config(tmp_path)), "--data-dir", str(data), "run", as_user=True)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"pvtap run: config error: data_dir = '{data}': relay.sqlite in it is not writable. "
                           f"{FIX}\n")


def test_a_data_dir_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    done = pvtap("--config", str(_relay_config(tmp_path)), "--data-dir", str(tmp_path / "afile" / "data"), "relay")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"pvtap relay: config error: data_dir = '{tmp_path / 'afile' / 'data'}': "
                           f"{tmp_path / 'afile'} is a file, not a directory. {FIX}\n")


def test_a_store_that_is_not_a_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "relay.sqlite").write_bytes(b"this is no sqlite database, but it is long enough to be read" * 20)
    done = pvtap("--config", str(_relay_config(tmp_path)), "--data-dir", str(data), "relay")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"pvtap relay: config error: data_dir = '{data}': relay.sqlite in it cannot be "
                                  "opened (file is not a database). Fix: move relay.sqlite out of the way (it is "
                                  "not a pvtap store), or make it writable")
    assert done.stderr.count("\n") == 1


def test_prepare_creates_the_directory_private(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    assert problem(data) is None
    assert prepare(data) == data
    assert data.is_dir() and data.stat().st_mode & 0o777 == 0o700
    assert list(data.iterdir()) == []  # the write test left nothing behind
