"""One configuration for every part of pvtap: a TOML file, then `PVTAP_*` environment overrides.

Each section is a dataclass; each setting carries its help text and, where a type is not enough,
a check. Loading validates everything at start-up and stops with a `ConfigError` that names the
key, the value, where it came from and the fix. Environment variables are named after the key:
`data_dir` → `PVTAP_DATA_DIR`, `enphase.local_mode` → `PVTAP_ENPHASE_LOCAL_MODE`. Lists of
tables (relay listeners) come only from the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

ENV_PREFIX = "PVTAP_"
CONFIG_ENV = "PVTAP_CONFIG"


class ConfigError(ValueError):
    """A setting is wrong; the message says which, why, and how to fix it."""

    def __init__(self, key: str, value: object, problem: str, fix: str, source: str = "") -> None:
        self.key, self.value, self.problem, self.fix, self.source = key, value, problem, fix, source
        where = f" (from {source})" if source else ""
        super().__init__(f"config error: {key} = {value!r}{where}: {problem}. Fix: {fix}")


def setting(default: Any, help: str, check: Callable[[Any], str | None] | None = None,
            fix: str = "") -> Any:
    """A config field: its default, one line of help, an optional check returning a problem."""
    factory = (lambda: default) if isinstance(default, (list, dict)) else dataclasses.MISSING
    return dataclasses.field(
        default=default if factory is dataclasses.MISSING else dataclasses.MISSING,
        default_factory=factory,
        metadata={"help": help, "check": check, "fix": fix},
    )


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


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# -- the sections -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PrivacyConfig:
    store_network_identity: bool = setting(
        False, "Keep the device's LAN IP, MAC and location in records and raw payloads (redacted by default).")
    pseudonymize_serials: bool = setting(
        False, "Replace every device serial with a stable pseudonym before it is stored or logged.")


@dataclass(frozen=True)
class EnphaseConfig:
    local_mode: bool = setting(
        False, "Answer performance reports locally (status success) instead of forwarding to the cloud.")
    hosts: list[str] = setting(
        ["reports.enphaseenergy.com"],
        "Hosts whose /emu_reports/ posts are decoded; other traffic passes untouched.",
        check=lambda v: None if v and all(h and " " not in h for h in v) else "needs at least one host name",
    )


@dataclass(frozen=True)
class ListenerConfig:
    """One relay listener (a `[[relay.listeners]]` table)."""

    protocol: str = setting("", "Protocol spoken on this port (alphaess, foxess, ...).")
    listen: str = setting("", "Address to listen on, host:port.", check=host_port)
    policy: str = setting("fixed", "Where connections go: fixed, transparent, local or auto.",
                          check=one_of("fixed", "transparent", "local", "auto"))
    upstream: str = setting("", "Cloud host:port for the fixed and auto policies.")


@dataclass(frozen=True)
class RelayConfig:
    listeners: list[ListenerConfig] = setting([], "The relay's listeners; see docs/config.md.")


@dataclass(frozen=True)
class InfluxConfig:
    url: str = setting("", "InfluxDB URL (e.g. http://influxdb:8086); empty keeps records in the local store only.")
    token: str = setting("", "API token (InfluxDB 1.8: user:password).")
    org: str = setting("", "Organisation (InfluxDB 1.8: -).")
    bucket: str = setting("pvtap", "Bucket (InfluxDB 1.8: database/retention_policy).")


@dataclass(frozen=True)
class Config:
    data_dir: Path = setting(Path("./data"), "Directory holding the local SQLite stores.")
    log_level: str = setting("info", "Log verbosity.", check=one_of("debug", "info", "warning", "error"))
    privacy: PrivacyConfig = setting(PrivacyConfig(), "")
    enphase: EnphaseConfig = setting(EnphaseConfig(), "")
    relay: RelayConfig = setting(RelayConfig(), "")
    influx: InfluxConfig = setting(InfluxConfig(), "")


# -- loading ----------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any; `PVTAP_CONFIG` names it when `path` is None), apply the
    environment, validate. Raises ConfigError."""
    env = os.environ if env is None else env
    path = path if path is not None else env.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config file", str(p), "the file does not exist",
                              "create it (see docs/config.md) or drop --config / PVTAP_CONFIG") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config file", str(p), f"not valid TOML ({exc})", "correct the TOML syntax") from None
        source = str(p)
    return _build(Config, data, env, prefix="", source=source)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, env var, default, help) for every setting, for `--help` and the docs."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(_hint(cls, f.name)):
            out.extend(describe(_hint(cls, f.name), key + "."))
        else:
            out.append((key, _env_name(key), default, f.metadata.get("help", "")))
    return out


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


def _build(cls: type, data: Mapping[str, Any], env: Mapping[str, str], prefix: str, source: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "config", data, "expected a table", f"write [{prefix.rstrip('.')}]")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            guess = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {prefix}{guess[0]}?" if guess else f"known keys: {', '.join(names)}"
            raise ConfigError(f"{prefix}{key}", data[key], "unknown setting", hint, source)
    values = {}
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, data.get(f.name, {}), env, key + ".", source)
            continue
        env_key = _env_name(key)
        if env_key in env:
            raw, where = env[env_key], env_key
            value = _from_env(key, hint, raw, where)
        elif f.name in data:
            raw, where = data[f.name], source
            value = _coerce(key, hint, raw, where, env)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, None, "missing", f"add {key} ({f.metadata['help']})", source)
        else:
            continue
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(key, raw, problem, f.metadata.get("fix") or f"set {key} to a valid value ({f.metadata['help']})", where)
        values[f.name] = value
    return cls(**values)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_env(key: str, hint: Any, raw: str, where: str) -> Any:
    if hint is bool:
        if raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigError(key, raw, "expected a boolean", f"set {where} to true or false", where)
    if typing.get_origin(hint) is list:
        return _coerce(key, hint, [part.strip() for part in raw.split(",") if part.strip()], where, {})
    return _coerce(key, hint, raw, where, {})


def _coerce(key: str, hint: Any, raw: Any, where: str, env: Mapping[str, str]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if raw in (None, "") else _coerce(key, args[0], raw, where, env)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(raw, list):
            raise ConfigError(key, raw, "expected a list", f"write {key} = [ ... ]", where)
        if dataclasses.is_dataclass(item):
            return [_build(item, entry, {}, f"{key}[{i}].", where) for i, entry in enumerate(raw)]
        return [_coerce(f"{key}[{i}]", item, v, where, env) for i, v in enumerate(raw)]
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        raise ConfigError(key, raw, "expected a boolean", f"write {key} = true or false", where)
    if hint in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(key, raw, f"expected a number ({hint.__name__})", f"write a number for {key}", where)
        try:
            value = hint(raw)
        except (TypeError, ValueError):
            raise ConfigError(key, raw, f"expected a number ({hint.__name__})", f"write a number for {key}", where) from None
        if hint is int and isinstance(raw, float) and raw != value:
            raise ConfigError(key, raw, "expected a whole number", f"write an integer for {key}", where)
        return value
    if hint is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(key, raw, "expected a string", f'quote it: {key} = "..."', where)
    if hint is Path:
        if isinstance(raw, str) and raw:
            return Path(raw)
        raise ConfigError(key, raw, "expected a path", f'write {key} = "/some/dir"', where)
    raise TypeError(f"config field {key} has unsupported type {hint!r}")
