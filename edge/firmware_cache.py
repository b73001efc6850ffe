"""The firmware image cache: files on disk, rows in ``fw_releases`` (schema v4).

Images are files ``<cache_dir>/<sha256>.img`` (content-addressed: a release published twice
is stored once). A file is moved into the cache (fsynced) before its row is committed, and a
row is deleted before its file, so a crash leaves at worst an orphan file, which
:meth:`FirmwareCache.open` deletes. The cache's bytes are set aside from the buffer's byte
bound (``Buffer.reserved_bytes``): the cache counts toward the gateway's disk limit.
Eviction follows :func:`edge.firmware_rollout.plan_eviction` (docs/firmware.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from edge.buffer import Buffer
from edge.buffer_types import now_ms
from edge.firmware_model import Manifest
from edge.firmware_rollout import CacheEntry, plan_eviction, protected_releases

__all__ = ["ACTIVE_CAMPAIGN_STATES", "FirmwareCache", "Release", "add_event", "fetch_one"]

log = logging.getLogger(__name__)

ACTIVE_CAMPAIGN_STATES = "('running', 'paused')"
_OUTBOX = "INSERT INTO fw_outbox (key, value, at_ms) VALUES (?, ?, ?)"


@dataclass(frozen=True, slots=True)
class Release:
    release_id: str
    device_type: str
    version: str
    size: int
    sha256: str
    manifest: str
    signature: str


class FirmwareCache:
    """Cached releases; the base of :class:`edge.firmware_store.FirmwareStore`."""

    def __init__(self, buffer: Buffer, cache_dir: Path, *, cache_max_bytes: int) -> None:
        self._buffer = buffer
        self.cache_dir = cache_dir
        self._cap = cache_max_bytes
        self.cache_bytes = 0

    # ------------------------------------------------------------------ cache

    def image_path(self, sha256: str) -> Path:
        return self.cache_dir / f"{sha256}.img"

    def staging_path(self, release_id: str) -> Path:
        return self.cache_dir / "staging" / f"{release_id}.part"

    async def open(self) -> None:
        """Create the directories, delete orphans, and charge the cache to the buffer bound."""
        (self.cache_dir / "staging").mkdir(parents=True, exist_ok=True)
        for part in (self.cache_dir / "staging").iterdir():
            part.unlink(missing_ok=True)  # the consumer re-reads an unfinished release
        async with self._buffer.read() as db:
            cursor = await db.execute("SELECT sha256, size FROM fw_releases")
            rows = list(await cursor.fetchall())
        known = {f"{r[0]}.img" for r in rows}
        for path in self.cache_dir.glob("*.img"):
            if path.name not in known:
                log.info("deleting orphan cache file %s", path)
                path.unlink(missing_ok=True)
        self._charge(sum(int(r[1]) for r in {r[0]: r for r in rows}.values()))

    def _charge(self, total: int) -> None:
        self.cache_bytes = total
        self._buffer.reserved_bytes = total

    async def release(self, release_id: str) -> Release | None:
        async with self._buffer.read() as db:
            cursor = await db.execute(
                "SELECT release_id, device_type, version, size, sha256, manifest, signature"
                " FROM fw_releases WHERE release_id = ?",
                (release_id,),
            )
            row = await cursor.fetchone()
        return None if row is None else Release(*row)

    async def add_release(self, manifest: Manifest, staged: Path) -> str | None:
        """Move a verified image into the cache; None, or the reason it was refused."""
        if manifest.size > self._cap:
            _unlink(staged)
            return f"image of {manifest.size} bytes is larger than the cache"
        now = now_ms()
        async with self._buffer.read() as db:
            cursor = await db.execute(
                "SELECT release_id, device_type, size, received_ms, last_used_ms, sha256"
                " FROM fw_releases"
            )
            rows = list(await cursor.fetchall())
            cursor = await db.execute(
                "SELECT DISTINCT release_id FROM fw_campaigns"
                f" WHERE state IN {ACTIVE_CAMPAIGN_STATES}"
            )
            in_campaigns = [str(r[0]) for r in await cursor.fetchall()]
        entries = [CacheEntry(r[0], r[1], r[2], r[3], r[4]) for r in rows]
        shared = any(r[5] == manifest.sha256 for r in rows)
        incoming = 0 if shared else manifest.size
        victims = plan_eviction(
            entries,
            protected_releases(entries, in_campaigns),
            cap=self._cap,
            incoming=incoming,
        )
        if victims is None:
            _unlink(staged)
            return "cache full: every cached release is protected"
        target = self.image_path(manifest.sha256)
        os.replace(staged, target)
        _fsync_dir(self.cache_dir)
        async with self._buffer.transaction() as db:
            for victim in victims:
                await db.execute("DELETE FROM fw_releases WHERE release_id = ?", (victim,))
                await add_event(
                    db,
                    victim,
                    {
                        "kind": "release",
                        "release_id": victim,
                        "state": "evicted",
                        "reason": "cache cap (LRU)",
                    },
                    now,
                )
            await db.execute(
                "INSERT OR REPLACE INTO fw_releases (release_id, device_type, version, size,"
                " sha256, manifest, signature, received_ms, last_used_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    manifest.release_id,
                    manifest.device_type,
                    manifest.version,
                    manifest.size,
                    manifest.sha256,
                    manifest.signed,
                    manifest.signature,
                    now,
                    now,
                ),
            )
            await add_event(db, manifest.release_id, _release_event(manifest, "cached", None), now)
            cursor = await db.execute("SELECT sha256, size FROM fw_releases")
            remaining = {str(r[0]): int(r[1]) for r in await cursor.fetchall()}
        for victim_row in rows:
            if victim_row[0] in victims and victim_row[5] not in remaining:
                self.image_path(victim_row[5]).unlink(missing_ok=True)
        self._charge(sum(remaining.values()))
        log.info(
            "firmware %s cached (%d bytes); evicted %s",
            manifest.release_id,
            manifest.size,
            victims or "none",
        )
        return None

    async def refused(self, manifest: Manifest | None, release_id: str, reason: str) -> None:
        """Report a refused release (nothing cached)."""
        log.error("firmware release %s refused: %s", release_id, reason)
        value = (
            _release_event(manifest, "refused", reason)
            if manifest is not None
            else {"kind": "release", "release_id": release_id, "state": "refused", "reason": reason}
        )
        async with self._buffer.transaction() as db:
            await add_event(db, release_id, value, now_ms())

    async def rejected(self, campaign_id: str, reason: str) -> None:
        """Report a campaign operation that was not applied."""
        async with self._buffer.transaction() as db:
            await add_event(
                db,
                campaign_id or "-",
                {
                    "kind": "campaign",
                    "campaign_id": campaign_id,
                    "state": "rejected",
                    "reason": reason,
                },
                now_ms(),
            )

    async def touch(self, release_id: str) -> None:
        async with self._buffer.transaction() as db:
            await db.execute(
                "UPDATE fw_releases SET last_used_ms = ? WHERE release_id = ?",
                (now_ms(), release_id),
            )


async def fetch_one(db: aiosqlite.Connection, query: str, params: tuple[Any, ...]) -> Any:
    cursor = await db.execute(query, params)
    return await cursor.fetchone()


async def add_event(db: aiosqlite.Connection, key: str, value: dict[str, Any], now: int) -> None:
    """A progress record into the outbox (same transaction as the change it reports)."""
    await db.execute(_OUTBOX, (key, json.dumps({**value, "at_ms": now}), now))


def _release_event(manifest: Manifest, state: str, reason: str | None) -> dict[str, Any]:
    return {
        "kind": "release",
        "release_id": manifest.release_id,
        "state": state,
        "version": manifest.version,
        "device_type": manifest.device_type,
        "size": manifest.size,
        "sha256": manifest.sha256,
        "reason": reason,
    }


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
