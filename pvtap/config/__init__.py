"""One configuration for every part of pvtap: a TOML file, then `PVTAP_*` environment overrides.

Each section is a dataclass; each setting carries its help text and, where a type is not enough,
a check. Loading validates everything at start-up and stops with a `ConfigError` that names the
key, the value, where it came from and the fix. Environment variables are named after the key:
`data_dir` → `PVTAP_DATA_DIR`, `enphase.local_mode` → `PVTAP_ENPHASE_LOCAL_MODE`. Lists of
tables (relay listeners) come only from the file. A `PVTAP_*` variable that names no setting is
reported (`env_warnings`) rather than silently ignored.

The modules: checks.py (setting(), ConfigError, Duration, shared checks), sections.py (the
settings table and Config), listeners.py ([relay] and its listeners), loading.py (file,
environment, describe). Callers import from `pvtap.config`.
"""

from pvtap.config.checks import (
    HIDDEN,
    ConfigError,
    Duration,
    is_loopback,
    listen_address,
    mask_url,
    parse_duration,
    positive,
    setting,
    split_host_port,
)
from pvtap.config.listeners import RELAY_POLICIES, RELAY_PROTOCOLS, ListenerConfig, check_listener
from pvtap.config.loading import CONFIG_ENV, ENV_PREFIX, describe, env_warnings, load_config, secret_keys, unknown_env
from pvtap.config.sections import (
    MAX_STOP_DECODE_S,
    Config,
    EnphaseConfig,
    HealthConfig,
    InfluxConfig,
    IngestConfig,
    MqttConfig,
    PrivacyConfig,
    WebConfig,
    broker_address,
)

__all__ = [
    "CONFIG_ENV", "ENV_PREFIX", "HIDDEN", "MAX_STOP_DECODE_S", "RELAY_POLICIES", "RELAY_PROTOCOLS", "Config",
    "ConfigError", "Duration", "EnphaseConfig", "HealthConfig", "InfluxConfig", "IngestConfig", "ListenerConfig",
    "MqttConfig", "PrivacyConfig", "WebConfig", "broker_address", "check_listener", "describe", "env_warnings",
    "is_loopback", "listen_address", "load_config", "mask_url", "parse_duration", "positive", "secret_keys",
    "setting", "split_host_port", "unknown_env",
]
