"""The optional Mosquitto broker of the Compose stack: its password file, made by pvtap.

Mosquitto 2 keeps `user:$7$101$<salt>$<hash>` lines: PBKDF2-HMAC-SHA512 over the password with a
12-byte random salt and 101 iterations, both base64 (mosquitto_passwd's own format, which the
tests check against Debian's mosquitto). The password itself goes to `.env` for pvtap, so
nothing secret is in the repository and no default password exists.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

from pvtap.files import replace_atomically

MQTT_USER = "pvtap"
ITERATIONS = 101


def password_line(user: str, password: str, salt: bytes | None = None) -> str:
    """One line of a mosquitto password file."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"{user}:$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def new_password() -> str:
    return secrets.token_urlsafe(24)


def write_password_file(path: Path, user: str, password: str) -> None:
    """Write the broker's password file (mode 0600, atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, (password_line(user, password) + "\n").encode())
