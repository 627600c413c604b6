"""Redaction helpers shared by the decoders: secrets never leave the process (invariant 4)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pvtap.config import ConfigError
from pvtap.files import locked, replace_atomically

if TYPE_CHECKING:
    from pvtap.config import Config

REDACTED = "REDACTED"
_KEY_FILE = "pseudonym.key"
KEY_BYTES = 32


@functools.lru_cache(maxsize=4096)
def pseudonym(serial: str, key: bytes) -> str:
    """A stable stand-in for a serial: the same serial and key always give the same pseudonym.
    Cached: a device's serial recurs in every frame, and an HMAC costs more than the frame's decode."""
    digest = hmac.new(key, serial.encode(), hashlib.sha256).hexdigest()
    return f"anon-{digest[:12]}"


def pseudonym_key(data_dir: str | Path) -> bytes:
    """The data directory's pseudonym key, created (mode 0600) on first use so that pseudonyms
    stay stable across restarts but cannot be reversed by someone without the key.

    Made under a lock and written atomically, so two processes starting together agree on one
    key and a crash never leaves half a key. An empty file (left by an older pvtap that crashed
    while making it; no pseudonym was ever made with it) is replaced. A key of any other wrong
    size would change or weaken every pseudonym: ConfigError, saying what to do."""
    path = Path(data_dir) / _KEY_FILE
    with locked(path.with_name(_KEY_FILE + ".lock")):
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            key = b""
        if not key:
            key = os.urandom(KEY_BYTES)
            replace_atomically(path, key)
    if len(key) != KEY_BYTES:
        raise ConfigError(
            "privacy.pseudonymize_serials", True,
            f"the pseudonym key {path} holds {len(key)} bytes instead of {KEY_BYTES} (damaged)",
            f"restore {path} from a backup to keep today's pseudonyms, or delete it to make a new key "
            "(serials stored from then on get new pseudonyms)")
    return key


@dataclass(frozen=True)
class Privacy:
    """What a decoder's `redact_raw` may keep, from the `[privacy]` config section."""

    keep_network_identity: bool = False  # LAN IP, MAC, location
    pseudonym_key: bytes | None = None  # when set, serials are replaced by pseudonyms
    keep_unredacted: bool = False  # keep bytes that were not positively redacted (else size + SHA-256 only)

    def serial(self, serial: str) -> str:
        return pseudonym(serial, self.pseudonym_key) if self.pseudonym_key and serial else serial

    @classmethod
    def from_config(cls, config: Config) -> Privacy:
        key = pseudonym_key(config.data_dir) if config.privacy.pseudonymize_serials else None
        return cls(keep_network_identity=config.privacy.store_network_identity, pseudonym_key=key,
                   keep_unredacted=config.privacy.keep_unredacted)
