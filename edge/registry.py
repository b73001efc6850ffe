"""The device registry: who this gateway has seen, written behind with the buffer's commits.

Connects, disconnects and self-descriptions arrive as synchronous calls from the broker;
they are coalesced per device in memory and written in the next group commit, so the
registry never costs a transaction of its own. A publish only moves its device's last-seen
time: those are written together at most once per ``buffer.registry_seen_interval_ms``
(with any other change of the device, at a barrier, and at close), because a per-commit
upsert rewrote a random page of ``devices`` for nearly every message (docs/benchmarks.md,
"Last seen once a second").
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

import aiosqlite

from edge.buffer_sql import insert_rows

__all__ = ["DeviceRecord", "RegistryChanges", "read_devices"]

_UPSERT_SEEN = "INSERT INTO devices (device_id, first_seen_ms, last_seen_ms) VALUES"
_UPSERT_SEEN_TAIL = (
    " ON CONFLICT (device_id) DO UPDATE"
    " SET last_seen_ms = max(devices.last_seen_ms, excluded.last_seen_ms)"
)
_UPDATE_CONNECTED = "UPDATE devices SET connected = ?, peer = coalesce(?, peer) WHERE device_id = ?"
_UPDATE_INFO = (
    "UPDATE devices SET device_type = coalesce(?, device_type),"
    " firmware_version = coalesce(?, firmware_version), info_updated_ms = ?"
    " WHERE device_id = ?"
)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A row of the device registry."""

    device_id: str
    first_seen_ms: int
    last_seen_ms: int
    connected: bool
    peer: str | None
    device_type: str | None
    firmware_version: str | None


@dataclass(slots=True)
class _DeviceSeen:
    last_seen_ms: int
    connected: int | None = None
    peer: str | None = None
    info: tuple[str | None, str | None] | None = None


class RegistryChanges:
    """Registry changes not yet written, coalesced per device.

    Connects, disconnects and self-descriptions are urgent: the next commit writes them.
    Last-seen times alone wait until ``seen_interval_s`` passed since they were last written,
    then all go in one commit."""

    def __init__(self, seen_interval_s: float = 0.0) -> None:
        self._dirty: dict[str, _DeviceSeen] = {}
        self._urgent: set[str] = set()
        self._seen_interval_s = seen_interval_s
        self._seen_written = time.monotonic()

    def __bool__(self) -> bool:
        return bool(self._dirty)

    def device_ids(self) -> list[str]:
        """The devices with a change not yet written."""
        return list(self._dirty)

    def due(self) -> bool:
        """Whether the next commit has something of the registry to write."""
        return bool(self._urgent) or (bool(self._dirty) and self.seen_due_in() <= 0)

    def seen_due_in(self) -> float:
        """Seconds until pending last-seen times are due (<= 0: due now)."""
        return self._seen_written + self._seen_interval_s - time.monotonic()

    def seen(self, device_id: str, now_ms: int) -> None:
        self._touch(device_id, now_ms)

    def connected(self, device_id: str, peer: str, now_ms: int) -> None:
        seen = self._touch(device_id, now_ms)
        seen.connected, seen.peer = 1, peer
        self._urgent.add(device_id)

    def disconnected(self, device_id: str, now_ms: int) -> None:
        self._touch(device_id, now_ms).connected = 0
        self._urgent.add(device_id)

    def info(
        self, device_id: str, device_type: str | None, firmware_version: str | None, now_ms: int
    ) -> None:
        self._touch(device_id, now_ms).info = (device_type, firmware_version)
        self._urgent.add(device_id)

    def _touch(self, device_id: str, now_ms: int) -> _DeviceSeen:
        seen = self._dirty.get(device_id)
        if seen is None:
            seen = self._dirty[device_id] = _DeviceSeen(now_ms)
        else:
            seen.last_seen_ms = max(seen.last_seen_ms, now_ms)
        return seen

    def take(self, everything: bool = False) -> RegistryChanges:
        """Hand over what the next commit writes: the urgent changes, and every pending
        last-seen time once they are due (or with ``everything``: barriers, close)."""
        taken = RegistryChanges()
        if self._dirty and (everything or self.seen_due_in() <= 0):
            taken._dirty, self._dirty = self._dirty, {}
            self._seen_written = time.monotonic()
        elif self._urgent:
            taken._dirty = {d: self._dirty.pop(d) for d in self._urgent}
        self._urgent = set()
        return taken

    def put_back(self, failed: RegistryChanges) -> None:
        """A commit failed: keep its changes unless newer ones replaced them."""
        for device_id, seen in failed._dirty.items():
            kept = self._dirty.setdefault(device_id, seen)
            if kept.connected is not None or kept.info is not None:
                self._urgent.add(device_id)

    def write_sync(self, db: sqlite3.Connection) -> None:
        """Write inside the caller's transaction (a plain connection, in aiosqlite's thread)."""
        if not self._dirty:
            return
        items = self._dirty.items()
        # Every device that published since the last commit: multi-row statements, not a
        # step per device (edge/buffer_sql.py says why).
        seen = [(d, s.last_seen_ms, s.last_seen_ms) for d, s in items]
        insert_rows(db, _UPSERT_SEEN, seen, _UPSERT_SEEN_TAIL)
        changes = [(s.connected, s.peer, d) for d, s in items if s.connected is not None]
        if changes:
            db.executemany(_UPDATE_CONNECTED, changes)
        infos = [(s.info[0], s.info[1], s.last_seen_ms, d) for d, s in items if s.info]
        if infos:
            db.executemany(_UPDATE_INFO, infos)


async def read_devices(db: aiosqlite.Connection) -> list[DeviceRecord]:
    """Every registered device, by id."""
    cursor = await db.execute(
        "SELECT device_id, first_seen_ms, last_seen_ms, connected, peer, device_type,"
        " firmware_version FROM devices ORDER BY device_id"
    )
    return [
        DeviceRecord(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6])
        for r in await cursor.fetchall()
    ]
