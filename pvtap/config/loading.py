"""Loading the config: the TOML file, then `PVTAP_*` environment overrides named after the keys,
each value coerced to its setting's type and checked (ConfigError otherwise); an unknown key in
the file is an error with the nearest known one, an unknown `PVTAP_*` variable a warning.
`describe()` lists every setting for `--help` and docs/config.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pvtap.config.checks import HIDDEN, ConfigError, Duration, parse_duration
from pvtap.config.sections import Config

ENV_PREFIX = "PVTAP_"
CONFIG_ENV = "PVTAP_CONFIG"


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


def unknown_env(env: Mapping[str, str] | None = None) -> list[str]:
    """The `PVTAP_*` variables that name no setting, sorted."""
    env = os.environ if env is None else env
    known = _env_names()
    return sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known)


def env_warnings(env: Mapping[str, str] | None = None) -> list[str]:
    """One line per `PVTAP_*` variable that names no setting (a typo is otherwise silently
    ignored), with the nearest setting's variable."""
    known = _env_names()
    out = []
    for name in unknown_env(env):
        guess = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f"did you mean {guess[0]}?" if guess else "settings and their variables: docs/config.md"
        out.append(f"warning: environment variable {name} is not a pvtap setting and is ignored; {hint}")
    return out


def _env_names() -> set[str]:
    return {CONFIG_ENV, *(name for _key, name, _default, _help in describe())}


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, env var, default, help) for every setting, for `--help` and the docs."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING, f"{key} has no default"
            default = f.default_factory()
        if dataclasses.is_dataclass(_hint(cls, f.name)):
            out.extend(describe(_hint(cls, f.name), key + "."))
        else:
            out.append((key, _env_name(key), default, f.metadata.get("help", "")))
    return out


def secret_keys(cls: type = Config, prefix: str = "") -> set[str]:
    """The keys of settings declared `secret`: never echoed in output or error messages."""
    out = set()
    for f in dataclasses.fields(cls):
        hint = _hint(cls, f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out |= secret_keys(hint, f"{prefix}{f.name}.")
        elif f.metadata.get("secret"):
            out.add(f"{prefix}{f.name}")
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
    secrets = {f.name for f in dataclasses.fields(cls) if f.metadata.get("secret")}
    for key in data:
        if key not in names:
            guess = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {prefix}{guess[0]}?" if guess else f"known keys: {', '.join(names)}"
            # a misspelt secret (`pasword`) is as secret as the right one
            value = HIDDEN if set(guess) & secrets or _SECRET_NAME.search(key) else data[key]
            raise ConfigError(f"{prefix}{key}", value, "unknown setting", hint, source)
    values = {}
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, data.get(f.name, {}), env, key + ".", source)
            continue
        if f.name in secrets:
            try:
                values[f.name] = _setting(f, key, hint, data, env, source)
            except ConfigError as exc:
                raise ConfigError(exc.key, HIDDEN, exc.problem, exc.fix, exc.source) from None
            continue
        values[f.name] = _setting(f, key, hint, data, env, source)
    return cls(**{k: v for k, v in values.items() if v is not _UNSET})


#: names of settings that hold a secret, for the "unknown setting" error of a misspelt one
_SECRET_NAME = re.compile(r"pass|token|secret|key", re.IGNORECASE)
_UNSET = object()


def _setting(f: dataclasses.Field[Any], key: str, hint: Any, data: Mapping[str, Any], env: Mapping[str, str],
             source: str) -> Any:
    """One setting's value from the environment, the file or its default (`_UNSET`), checked."""
    env_key = _env_name(key)
    if env_key in env and _is_table_list(hint):
        raise ConfigError(key, env[env_key], "listeners come only from the config file, not from the environment",
                          f"unset {env_key} and write each listener in the config file as a [[{key}]] table "
                          'with protocol, listen and policy on lines of their own (docs/relay.md)', env_key)
    if env_key in env:
        raw, where = env[env_key], env_key
        value = _from_env(key, hint, raw, where)
    elif f.name in data:
        raw, where = data[f.name], source
        value = _coerce(key, hint, raw, where, env)
    elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        raise ConfigError(key, None, "missing", f"add {key} ({f.metadata['help']})", source)
    else:
        return _UNSET
    check = f.metadata.get("check")
    problem = check(value) if check else None
    if problem:
        fix = f.metadata.get("fix") or f"set {key} to a valid value ({f.metadata['help']})"
        raise ConfigError(key, raw, problem, fix, where)
    return value


def _is_table_list(hint: Any) -> bool:
    """A list of settings tables (`[[relay.listeners]]`), which only the file can hold."""
    if typing.get_origin(hint) is not list:
        return False
    (item,) = typing.get_args(hint)
    return isinstance(item, type) and dataclasses.is_dataclass(item)


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
        if isinstance(raw, Mapping) and _is_table_list(hint):
            raise ConfigError(key, raw, f"[{key}] (single brackets) is one table, but {key} is a list of tables",
                              f"write [[{key}]] (double brackets) above each one", where)
        if not isinstance(raw, list):
            raise ConfigError(key, raw, "expected a list", f"write {key} = [ ... ]", where)
        if isinstance(item, type) and dataclasses.is_dataclass(item):
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
            raise ConfigError(key, raw, f"expected a number ({hint.__name__})", f"write a number for {key}",
                              where) from None
        if hint is int and isinstance(raw, float) and raw != value:
            raise ConfigError(key, raw, "expected a whole number", f"write an integer for {key}", where)
        return value
    if hint is Duration:
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise ConfigError(key, raw, str(exc), f'write {key} = "90s" (or 90, "15m", "2h")', where) from None
    if hint is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(key, raw, "expected a string", f'quote it: {key} = "..."', where)
    if hint is Path:
        if isinstance(raw, str) and raw:
            return Path(raw)
        raise ConfigError(key, raw, "expected a path", f'write {key} = "/some/dir"', where)
    raise TypeError(f"config field {key} has unsupported type {hint!r}")
