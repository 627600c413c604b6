"""The [web] settings: loopback by default; the LAN only with a password from config, never a
default one; the password never shows in a repr or an error."""

from __future__ import annotations

import pytest

from pvtap.config import ConfigError, is_loopback, load_config


def test_defaults_listen_on_loopback_without_password():
    web = load_config(env={}).web
    assert (web.listen, web.password, web.refresh_s, web.silent_after_s) == ("127.0.0.1:8080", "", 5.0, 900.0)


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "*:8080", "192.0.2.7:8080", "[::]:8080", "pvtap.lan:8080"])
def test_lan_without_password_refused_naming_the_setting(listen):
    with pytest.raises(ConfigError) as caught:
        load_config(env={"PVTAP_WEB_LISTEN": listen})
    assert caught.value.key == "web.password"
    assert f"web.listen = {listen!r} opens the web view to the LAN" in str(caught.value)
    assert "set web.password (or PVTAP_WEB_PASSWORD)" in str(caught.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "127.0.0.2:9000", "[::1]:8080", "localhost:8080", ""])
def test_loopback_or_off_needs_no_password(listen):
    assert load_config(env={"PVTAP_WEB_LISTEN": listen}).web.listen == listen


def test_lan_with_password_loads_and_hides_it(tmp_path):
    path = tmp_path / "pvtap.toml"
    path.write_text('[web]\nlisten = "0.0.0.0:8080"\npassword = "correct horse"\n', encoding="utf-8")
    config = load_config(path, env={})
    assert config.web.password == "correct horse"
    assert "correct horse" not in repr(config)


def test_short_password_refused_without_showing_it():
    with pytest.raises(ConfigError) as caught:
        load_config(env={"PVTAP_WEB_PASSWORD": "hunter2"})
    assert caught.value.key == "web.password"
    assert "hunter2" not in str(caught.value)


def test_bad_listen_and_refresh_named():
    with pytest.raises(ConfigError) as caught:
        load_config(env={"PVTAP_WEB_LISTEN": "8080"})
    assert caught.value.key == "web.listen"
    with pytest.raises(ConfigError) as caught:
        load_config(env={"PVTAP_WEB_REFRESH_S": "0"})
    assert caught.value.key == "web.refresh_s"


def test_is_loopback():
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "0.0.0.0", "*", "192.0.2.1", "x")] \
        == [True, True, True, True, False, False, False, False]
