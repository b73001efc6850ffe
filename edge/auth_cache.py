"""Bounded in-memory cache of successful password checks, so a reconnect skips scrypt.

A scrypt check costs about 16 MiB and tens of milliseconds of CPU. A fleet of 10,000 devices
reconnecting after a network blip (or a gateway restart of the network, not of the gateway)
would burn minutes of CPU re-proving passwords the gateway verified seconds ago.

What is kept per device: the encoded scrypt hash the password was checked against, and
HMAC-SHA256 of the presented password under a key drawn at random when the process starts.
No password is kept, and the MACs are useless outside this process (a memory dump gives
neither passwords nor anything checkable offline faster than the scrypt hashes themselves).

A hit needs the device's *current* entry in the password file to be the very hash the
password was verified against, so changing a device's password or removing it (``tidegate
devices add|remove``, then the file is re-read) invalidates its entry at once;
:meth:`VerificationCache.clear` drops everything (a reload that replaced the file).
Only successes are cached: a wrong password always pays scrypt. Bounded by ``max_entries``
(least recently used evicted). Used from the event loop only (no locking).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from typing import Final

__all__ = ["DEFAULT_MAX_ENTRIES", "VerificationCache"]

DEFAULT_MAX_ENTRIES: Final = 50_000
"""About 250 bytes each: ~12 MiB at the bound."""


class VerificationCache:
    """Device id -> (hash verified against, HMAC of the password); see the module docstring."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _mac(self, device_id: str, password: str) -> bytes:
        # The device id is part of the message: one device's entry cannot vouch for another.
        message = device_id.encode() + b"\x00" + password.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def verified(self, device_id: str, password: str, encoded: str) -> bool:
        """True if ``password`` was verified against ``encoded`` for this device before."""
        entry = self._entries.get(device_id)
        if (
            entry is not None
            and hmac.compare_digest(entry[0], encoded)
            and hmac.compare_digest(entry[1], self._mac(device_id, password))
        ):
            self._entries.move_to_end(device_id)
            self.hits += 1
            return True
        self.misses += 1
        return False

    def remember(self, device_id: str, password: str, encoded: str) -> None:
        """Record a successful scrypt verification."""
        self._entries[device_id] = (encoded, self._mac(device_id, password))
        self._entries.move_to_end(device_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, device_id: str) -> None:
        """Drop one device (revoked, removed)."""
        self._entries.pop(device_id, None)

    def clear(self) -> None:
        self._entries.clear()
