"""Redaction helpers shared by the decoders: secrets never leave the process (invariant 4)."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pvtap.config import Config

REDACTED = "REDACTED"
_KEY_FILE = "pseudonym.key"


def pseudonym(serial: str, key: bytes) -> str:
    """A stable stand-in for a serial: the same serial and key always give the same pseudonym."""
    digest = hmac.new(key, serial.encode(), hashlib.sha256).hexdigest()
    return f"anon-{digest[:12]}"


def pseudonym_key(data_dir: str | Path) -> bytes:
    """The data directory's pseudonym key, created (mode 0600) on first use so that pseudonyms
    stay stable across restarts but cannot be reversed by someone without the key."""
    path = Path(data_dir) / _KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        return key


@dataclass(frozen=True)
class Privacy:
    """What a decoder's `redact_raw` may keep, from the `[privacy]` config section."""

    keep_network_identity: bool = False  # LAN IP, MAC, location
    pseudonym_key: bytes | None = None  # when set, serials are replaced by pseudonyms

    def serial(self, serial: str) -> str:
        return pseudonym(serial, self.pseudonym_key) if self.pseudonym_key and serial else serial

    @classmethod
    def from_config(cls, config: Config) -> Privacy:
        key = pseudonym_key(config.data_dir) if config.privacy.pseudonymize_serials else None
        return cls(keep_network_identity=config.privacy.store_network_identity, pseudonym_key=key)
