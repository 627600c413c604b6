"""Secrets at rest: the pseudonym key is made once, atomically, under a lock, checked when read,
and private (0600 in a 0700 directory)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from pvtap.config import ConfigError
from pvtap.privacy import KEY_BYTES, pseudonym_key

MAKE_KEY = "import sys; from pvtap.privacy import pseudonym_key; sys.stdout.write(pseudonym_key(sys.argv[1]).hex())"


def test_the_key_is_made_once_private_and_stable(tmp_path):
    data_dir = tmp_path / "new" / "data"
    key = pseudonym_key(data_dir)
    assert len(key) == KEY_BYTES
    assert pseudonym_key(data_dir) == key
    path = data_dir / "pseudonym.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in data_dir.iterdir()) == ["pseudonym.key", "pseudonym.key.lock"]  # no temp file left
    assert stat.S_IMODE((data_dir / "pseudonym.key.lock").stat().st_mode) == 0o600


def test_processes_starting_together_agree_on_one_key(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", MAKE_KEY, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    keys = {proc.communicate(timeout=60)[0] for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(keys) == 1 and bytes.fromhex(keys.pop()) == (tmp_path / "pseudonym.key").read_bytes()


def test_an_empty_key_left_by_a_crash_is_replaced(tmp_path):
    (tmp_path / "pseudonym.key").write_bytes(b"")  # what the old create-then-write left after a crash
    key = pseudonym_key(tmp_path)
    assert len(key) == KEY_BYTES and (tmp_path / "pseudonym.key").read_bytes() == key


@pytest.mark.parametrize("size", [1, 31, 33])
def test_a_damaged_key_stops_start_up_with_the_fix(tmp_path, size):
    path = tmp_path / "pseudonym.key"
    path.write_bytes(os.urandom(size))
    before = path.read_bytes()
    with pytest.raises(ConfigError) as error:
        pseudonym_key(tmp_path)
    assert error.value.key == "privacy.pseudonymize_serials"
    assert f"holds {size} bytes instead of {KEY_BYTES}" in str(error.value)
    assert "restore" in error.value.fix and "delete it" in error.value.fix
    assert path.read_bytes() == before  # never overwritten: it may be the only copy
