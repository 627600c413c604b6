"""The building blocks of the settings table: `setting()` (a field with its help text and check),
ConfigError (the message that names the key, the value, where it came from and the fix), the
Duration type, and the checks several sections share (addresses, networks, choices).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable
from typing import Any

#: what a config error, `pvtap status` or the web view show in place of a secret
HIDDEN = "(hidden)"

_URL_PASSWORD = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/:@\s]*):[^/@\s]*@")


def mask_url(text: str) -> str:
    """`scheme://user:password@host` with the password hidden, wherever such a URL is in `text`."""
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{HIDDEN}@", text)


class ConfigError(ValueError):
    """A setting is wrong; the message says which, why, and how to fix it. A password in a URL
    (`mqtt://user:password@host`) is masked: the message goes to logs and terminals."""

    def __init__(self, key: str, value: object, problem: str, fix: str, source: str = "") -> None:
        value = mask_url(value) if isinstance(value, str) else value
        self.key, self.value, self.problem, self.fix, self.source = key, value, problem, fix, source
        where = f" (from {source})" if source else ""
        super().__init__(f"config error: {key} = {value!r}{where}: {problem}. Fix: {fix}")


def setting(default: Any, help: str, check: Callable[[Any], str | None] | None = None,
            fix: str = "", secret: bool = False) -> Any:
    """A config field: its default, one line of help, an optional check returning a problem.
    A `secret` one is left out of the config's repr and its value out of config errors, so a
    logged config or a typo never shows it."""
    metadata = {"help": help, "check": check, "fix": fix, "secret": secret}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata, repr=not secret)


# -- reusable checks --------------------------------------------------------------------------

def host_port(value: str) -> str | None:
    """`host:port` or `[v6]:port` with a port in 1–65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "expected host:port with a port between 1 and 65535 (IPv6 as [::1]:7777)"
    return None


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"
    return check


class Duration(float):
    """Seconds, written in the config as a number of seconds or with a unit: 90, "90s", "15m", "2h"."""


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86_400}


def parse_duration(value: object) -> Duration:
    """A Duration from a number of seconds or a string such as "90s", "15m", "2h"; ValueError
    (saying what is accepted) for anything else, negative numbers included."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a duration: a number of seconds or e.g. \"90s\", \"15m\", \"2h\"")
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if not match:
            raise ValueError("expected a duration: a number of seconds or e.g. \"90s\", \"15m\", \"2h\"")
        return Duration(float(match[1]) * _DURATION_UNITS[(match[2] or "s").lower()])
    if value < 0 or value != value or value == float("inf"):
        raise ValueError("a duration must be a finite number of seconds, 0 or more")
    return Duration(value)


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)



def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """A check that lets the empty value (meaning "not set") through."""
    return lambda value: None if value in ("", None) else check(value)


def listen_address(value: str) -> str | None:
    """`host:port` as for host_port, where port 0 takes any free port (the log says which)."""
    host, sep, port = value.rpartition(":")
    return None if sep and host and port == "0" else host_port(value)


def ip_with_optional_port(value: str) -> str | None:
    """An IP address, optionally with a port: `192.0.2.53`, `192.0.2.53:5353`, `[2001:db8::53]:53`."""
    host, port = value, ""
    if value.startswith("["):
        host, _, port = value[1:].partition("]")
        port = port.removeprefix(":")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "expected the IP address of a DNS server (optionally :port), not a name"
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        return "the port must be between 1 and 65535"
    return None


def networks(value: list[str]) -> str | None:
    """Each entry an IP network with no host bits set (`192.168.1.0/24`) or a single address."""
    for index, entry in enumerate(value):
        try:
            ipaddress.ip_network(entry.strip())
        except ValueError as exc:
            return f"entry {index} ({entry!r}) is not an IP network: {exc}"
    return None


def sha256_hex(value: str) -> str | None:
    """64 hex digits, colons between the bytes allowed (as browsers and openssl print them)."""
    return None if re.fullmatch(r"[0-9a-fA-F]{64}", value.replace(":", "")) else "expected 64 hex digits (a SHA-256)"



def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
