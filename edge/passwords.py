"""Device password file: salted scrypt hashes only, never a password.

One line per device::

    <device_id>:scrypt$<n>$<r>$<p>$<salt base64>$<hash base64>

Lines starting with ``#`` and blank lines are ignored. The file is written atomically with
mode 0600 by ``tidegate devices add|remove``. :class:`PasswordFile` re-reads it when its
modification time or size changed, so a device added while the gateway runs can connect
without a restart (a file that became unreadable or invalid keeps the last good contents and
says why in the log).

scrypt parameters: n=2**14, r=8, p=1 (about 16 MiB and a few tens of ms per check). A check
runs in a worker thread so a reconnect storm does not stall the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway.errors import TidegateError

__all__ = [
    "PasswordFile",
    "PasswordFileError",
    "hash_password",
    "read_entries",
    "verify_password",
    "write_entries",
]

log = logging.getLogger(__name__)

SCRYPT_N: Final = 1 << 14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_SALT_BYTES: Final = 16
_HASH_BYTES: Final = 32
_MAXMEM: Final = 64 << 20


class PasswordFileError(TidegateError):
    """The password file is unreadable or has an invalid line."""


def hash_password(password: str) -> str:
    """A new salted scrypt hash of ``password`` in the file's encoding."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=_MAXMEM,
        dklen=_HASH_BYTES,
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not an scrypt$n$r$p$salt$hash entry")
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or n > 1 << 20:
        raise ValueError("scrypt parameters out of range")
    return (
        n,
        r,
        p,
        base64.b64decode(parts[4], validate=True),
        base64.b64decode(parts[5], validate=True),
    )


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches ``encoded`` (constant-time comparison)."""
    try:
        n, r, p, salt, expected = _parse_hash(encoded)
    except ValueError:
        return False
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(expected)
    )
    return hmac.compare_digest(digest, expected)


def read_entries(path: Path) -> dict[str, str]:
    """Device id -> encoded hash; a missing file is empty. Raises :class:`PasswordFileError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise PasswordFileError(f"{path}: cannot read: {exc}") from exc
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        device_id, sep, encoded = line.rpartition(":")
        if not sep or not device_id:
            raise PasswordFileError(f"{path}:{number}: expected <device_id>:<scrypt hash>")
        try:
            _parse_hash(encoded)
        except ValueError as exc:
            raise PasswordFileError(f"{path}:{number}: {exc}") from exc
        entries[device_id] = encoded
    return entries


def write_entries(path: Path, entries: dict[str, str]) -> None:
    """Replace the file atomically (mode 0600)."""
    tmp = path.with_name(path.name + ".tmp")
    body = "".join(f"{device_id}:{encoded}\n" for device_id, encoded in sorted(entries.items()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)


@dataclass
class PasswordFile:
    """The password file of a running gateway, re-read when it changes on disk."""

    path: Path
    _entries: dict[str, str] | None = None
    _stamp: tuple[int, int] | None = None

    def load(self) -> None:
        """Read the file now; raises :class:`PasswordFileError` (used at start)."""
        self._entries = read_entries(self.path)
        self._stamp = self._current_stamp()

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def entries(self) -> dict[str, str]:
        """Device id -> encoded hash, as last read (a copy)."""
        return dict(self._entries or {})

    def lookup(self, device_id: str) -> str | None:
        """The encoded hash of ``device_id`` (re-reading the file if it changed)."""
        stamp = self._current_stamp()
        if self._entries is None or stamp != self._stamp:
            try:
                self._entries = read_entries(self.path)
                self._stamp = stamp
            except PasswordFileError as exc:
                log.error("%s; keeping the previous device passwords", exc)
                self._stamp = stamp
                if self._entries is None:
                    self._entries = {}
        return self._entries.get(device_id)
