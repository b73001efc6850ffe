"""Firmware state in the buffer file (schema v4) and the image cache on disk.

Images are files ``<cache_dir>/<sha256>.img`` (content-addressed: a release published twice
is stored once); their rows are in ``fw_releases``. A file is moved into the cache (fsynced)
before its row is committed, and a row is deleted before its file, so a crash leaves at
worst an orphan file, which :meth:`FirmwareStore.open` deletes. The cache's bytes are set
aside from the buffer's byte bound (``Buffer.reserved_bytes``): the cache counts toward
the gateway's disk limit.

Every state change of a campaign or target writes its progress record to ``fw_outbox`` in
the same transaction; :mod:`bridge.firmware_out` sends the outbox to Kafka.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from edge.buffer import Buffer
from edge.buffer_types import now_ms
from edge.firmware_model import Manifest
from edge.firmware_rollout import (
    CacheEntry,
    RingCounts,
    plan_eviction,
    plan_rings,
    protected_releases,
)

__all__ = ["Campaign", "FirmwareStore", "OutboxRow", "Release", "Target"]

log = logging.getLogger(__name__)

_ACTIVE = "('running', 'paused')"
_OPEN_TARGET = "('waiting', 'offered', 'downloading')"
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


@dataclass(frozen=True, slots=True)
class Campaign:
    campaign_id: str
    release_id: str
    state: str
    rings: list[float]
    ring: int
    failure_threshold: float
    accepted_failures: int
    rollback_of: str | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class Target:
    campaign_id: str
    device_id: str
    release_id: str
    state: str
    campaign_state: str


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    key: str
    value: str


class FirmwareStore:
    """Releases, campaigns, targets and the progress outbox."""

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
                f"SELECT DISTINCT release_id FROM fw_campaigns WHERE state IN {_ACTIVE}"
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
                await _event(
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
            await _event(db, manifest.release_id, _release_event(manifest, "cached", None), now)
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
            await _event(db, release_id, value, now_ms())

    async def rejected(self, campaign_id: str, reason: str) -> None:
        """Report a campaign operation that was not applied."""
        async with self._buffer.transaction() as db:
            await _event(
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

    # -------------------------------------------------------------- campaigns

    async def start_campaign(
        self,
        campaign_id: str,
        release_id: str,
        devices: Sequence[str] | None,
        rings: Sequence[float],
        failure_threshold: float,
        *,
        rollback_of: str | None = None,
    ) -> str | None:
        """Create a campaign; None, or why it was rejected."""
        now = now_ms()
        async with self._buffer.transaction() as db:
            if await _one(db, "SELECT 1 FROM fw_campaigns WHERE campaign_id = ?", (campaign_id,)):
                return "campaign id already used"
            row = await _one(
                db,
                "SELECT device_type, version FROM fw_releases WHERE release_id = ?",
                (release_id,),
            )
            if row is None:
                reason = f"release {release_id} not cached"
                await _event(
                    db,
                    campaign_id,
                    {
                        "kind": "campaign",
                        "campaign_id": campaign_id,
                        "release_id": release_id,
                        "state": "rejected",
                        "reason": reason,
                    },
                    now,
                )
                return reason
            device_type = str(row[0])
            if devices is None:
                cursor = await db.execute(
                    "SELECT device_id FROM devices WHERE device_type = ?", (device_type,)
                )
                devices = [str(r[0]) for r in await cursor.fetchall()]
            cursor = await db.execute("SELECT device_id, firmware_version FROM devices")
            versions = {str(r[0]): r[1] for r in await cursor.fetchall()}
            rings_of = plan_rings(campaign_id, devices, rings)
            await db.execute(
                "INSERT INTO fw_campaigns (campaign_id, release_id, state, rings, ring,"
                " failure_threshold, rollback_of, created_ms, updated_ms)"
                " VALUES (?, ?, 'running', ?, 0, ?, ?, ?, ?)",
                (
                    campaign_id,
                    release_id,
                    json.dumps(list(rings)),
                    failure_threshold,
                    rollback_of,
                    now,
                    now,
                ),
            )
            await db.executemany(
                "INSERT INTO fw_targets (campaign_id, device_id, ring, state, from_version,"
                " updated_ms) VALUES (?, ?, ?, 'waiting', ?, ?)",
                [(campaign_id, d, r, versions.get(d), now) for d, r in rings_of.items()],
            )
            await self._campaign_event(db, campaign_id, f"started: {len(rings_of)} devices", now)
        log.info("campaign %s started: %s to %d devices", campaign_id, release_id, len(rings_of))
        return None

    async def campaigns(self, active_only: bool = True) -> list[Campaign]:
        where = f" WHERE state IN {_ACTIVE}" if active_only else ""
        async with self._buffer.read() as db:
            cursor = await db.execute(
                "SELECT campaign_id, release_id, state, rings, ring, failure_threshold,"
                f" accepted_failures, rollback_of, reason FROM fw_campaigns{where}"
                " ORDER BY created_ms"
            )
            rows = list(await cursor.fetchall())
        return [Campaign(r[0], r[1], r[2], json.loads(r[3]), *r[4:]) for r in rows]

    async def ring_counts(self, campaign_id: str, ring: int) -> RingCounts:
        async with self._buffer.read() as db:
            cursor = await db.execute(
                "SELECT state, count(*) FROM fw_targets WHERE campaign_id = ? AND ring = ?"
                " GROUP BY state",
                (campaign_id, ring),
            )
            by_state = {str(r[0]): int(r[1]) for r in await cursor.fetchall()}
        return RingCounts(
            size=sum(by_state.values()),
            installed=by_state.get("installed", 0),
            failed=by_state.get("failed", 0),
            aborted=by_state.get("aborted", 0),
        )

    async def set_campaign(
        self,
        campaign_id: str,
        *,
        from_states: Sequence[str],
        state: str,
        reason: str,
        ring: int | None = None,
        accept_failures: bool = False,
    ) -> bool:
        """Move a campaign between states (operator or decision); False if it was not in
        ``from_states``. Leaving for a final state closes its open targets."""
        now = now_ms()
        marks = ",".join("?" * len(from_states))
        async with self._buffer.transaction() as db:
            cursor = await db.execute(
                f"UPDATE fw_campaigns SET state = ?, reason = ?, updated_ms = ?,"
                f" ring = coalesce(?, ring) WHERE campaign_id = ? AND state IN ({marks})"
                " RETURNING ring",
                (state, reason, now, ring, campaign_id, *from_states),
            )
            row = await cursor.fetchone()
            if row is None:
                return False
            if accept_failures:
                await db.execute(
                    "UPDATE fw_campaigns SET accepted_failures = (SELECT count(*) FROM"
                    " fw_targets WHERE campaign_id = ? AND ring = ? AND state = 'failed')"
                    " WHERE campaign_id = ?",
                    (campaign_id, row[0], campaign_id),
                )
            elif ring is not None:
                await db.execute(
                    "UPDATE fw_campaigns SET accepted_failures = 0 WHERE campaign_id = ?",
                    (campaign_id,),
                )
            if state in ("aborted", "rolled_back"):
                await db.execute(
                    "UPDATE fw_targets SET state = 'aborted', reason = ?, updated_ms = ?"
                    f" WHERE campaign_id = ? AND state IN {_OPEN_TARGET}",
                    (state, now, campaign_id),
                )
            await self._campaign_event(db, campaign_id, reason, now)
        log.warning("campaign %s: %s (%s)", campaign_id, state, reason)
        return True

    async def previous_release(self, release_id: str) -> str | None:
        """The cached release of the same device type received just before this one."""
        async with self._buffer.read() as db:
            row = await _one(
                db,
                "SELECT p.release_id FROM fw_releases p JOIN fw_releases c"
                " ON p.device_type = c.device_type AND p.received_ms < c.received_ms"
                " WHERE c.release_id = ? ORDER BY p.received_ms DESC LIMIT 1",
                (release_id,),
            )
        return None if row is None else str(row[0])

    async def campaign_devices(self, campaign_id: str) -> list[str]:
        """Devices that were offered the campaign's release (the set a rollback covers)."""
        async with self._buffer.read() as db:
            cursor = await db.execute(
                "SELECT device_id FROM fw_targets WHERE campaign_id = ?"
                " AND (offered_ms IS NOT NULL OR state = 'installed')",
                (campaign_id,),
            )
            return [str(r[0]) for r in await cursor.fetchall()]

    # ---------------------------------------------------------------- targets

    async def offerable(self, campaign_id: str, ring: int, limit: int) -> list[str]:
        async with self._buffer.read() as db:
            cursor = await db.execute(
                "SELECT device_id FROM fw_targets WHERE campaign_id = ? AND ring <= ?"
                " AND state = 'waiting' LIMIT ?",
                (campaign_id, ring, limit),
            )
            return [str(r[0]) for r in await cursor.fetchall()]

    async def open_targets(self, device_id: str) -> list[Target]:
        """The device's unfinished targets in running or paused campaigns, in rings that
        started (what it may be offered and served)."""
        async with self._buffer.read() as db:
            cursor = await db.execute(
                "SELECT t.campaign_id, t.device_id, c.release_id, t.state, c.state"
                " FROM fw_targets t"
                " JOIN fw_campaigns c ON c.campaign_id = t.campaign_id"
                f" WHERE t.device_id = ? AND t.state IN {_OPEN_TARGET}"
                f" AND c.state IN {_ACTIVE} AND t.ring <= c.ring",
                (device_id,),
            )
            return [Target(*r) for r in await cursor.fetchall()]

    async def offered(self, campaign_id: str, device_id: str) -> None:
        now = now_ms()
        async with self._buffer.transaction() as db:
            cursor = await db.execute(
                "UPDATE fw_targets SET state = 'offered', offered_ms = ?, updated_ms = ?"
                " WHERE campaign_id = ? AND device_id = ? AND state = 'waiting' RETURNING 1",
                (now, now, campaign_id, device_id),
            )
            if await cursor.fetchone() is not None:
                await _device_event(db, campaign_id, device_id, "offered", now=now)

    async def unoffered(self, campaign_id: str, device_id: str) -> None:
        """The offer was not acknowledged: offer it again later (on the next tick or
        connection); a device that already reported on it keeps its state."""
        async with self._buffer.transaction() as db:
            await db.execute(
                "UPDATE fw_targets SET state = 'waiting', offered_ms = NULL"
                " WHERE campaign_id = ? AND device_id = ? AND state = 'offered'",
                (campaign_id, device_id),
            )

    async def time_out(self, timeout_ms: int) -> int:
        """Targets offered longer ago than ``timeout_ms`` and not finished: failed."""
        now = now_ms()
        async with self._buffer.transaction() as db:
            cursor = await db.execute(
                "UPDATE fw_targets SET state = 'failed', reason = 'timeout', updated_ms = ?"
                " WHERE state IN ('offered', 'downloading') AND offered_ms < ?"
                " RETURNING campaign_id, device_id",
                (now, now - timeout_ms),
            )
            rows = list(await cursor.fetchall())
            for campaign_id, device_id in rows:
                await _device_event(db, campaign_id, device_id, "failed", reason="timeout", now=now)
        return len(rows)

    async def apply_reports(self, reports: Sequence[tuple[str, dict[str, Any]]]) -> int:
        """Device status reports (``device_id``, parsed JSON) in one transaction."""
        now = now_ms()
        changed = 0
        async with self._buffer.transaction() as db:
            for device_id, report in reports:
                state = report["state"]
                row = await _one(
                    db,
                    "SELECT t.campaign_id, t.state, r.version FROM fw_targets t"
                    " JOIN fw_campaigns c ON c.campaign_id = t.campaign_id"
                    " JOIN fw_releases r ON r.release_id = c.release_id"
                    f" WHERE t.device_id = ? AND c.release_id = ? AND t.state IN {_OPEN_TARGET}",
                    (device_id, report["release_id"]),
                )
                if row is None:
                    continue
                campaign_id, old, version = row
                reason = report.get("reason")
                if state == "installed" and report.get("version") != version:
                    state, reason = "failed", f"reported version {report.get('version')!r}"
                if state == "downloading" and old == "downloading":
                    await db.execute(
                        "UPDATE fw_targets SET bytes = ?, updated_ms = ? WHERE campaign_id = ?"
                        " AND device_id = ?",
                        (report.get("bytes", 0), now, campaign_id, device_id),
                    )
                else:
                    await db.execute(
                        "UPDATE fw_targets SET state = ?, bytes = ?, reason = ?, updated_ms = ?"
                        " WHERE campaign_id = ? AND device_id = ?",
                        (state, report.get("bytes", 0), reason, now, campaign_id, device_id),
                    )
                await _device_event(
                    db,
                    campaign_id,
                    device_id,
                    state,
                    nbytes=report.get("bytes"),
                    reason=reason,
                    version=report.get("version"),
                    now=now,
                )
                changed += 1
        return changed

    async def summary(self, campaign_id: str) -> dict[str, Any] | None:
        async with self._buffer.read() as db:
            return await _summary(db, campaign_id)

    async def _campaign_event(
        self, db: aiosqlite.Connection, campaign_id: str, reason: str, now: int
    ) -> None:
        summary = await _summary(db, campaign_id)
        if summary is not None:
            await _event(db, campaign_id, {**summary, "reason": reason}, now)

    # ----------------------------------------------------------------- outbox

    async def outbox(self, limit: int) -> list[OutboxRow]:
        async with self._buffer.read() as db:
            cursor = await db.execute(
                "SELECT id, key, value FROM fw_outbox ORDER BY id LIMIT ?", (limit,)
            )
            return [OutboxRow(*r) for r in await cursor.fetchall()]

    async def sent(self, ids: Sequence[int]) -> None:
        if ids:
            async with self._buffer.transaction() as db:
                await db.executemany("DELETE FROM fw_outbox WHERE id = ?", [(i,) for i in ids])


async def _one(db: aiosqlite.Connection, query: str, params: tuple[Any, ...]) -> Any:
    cursor = await db.execute(query, params)
    return await cursor.fetchone()


async def _summary(db: aiosqlite.Connection, campaign_id: str) -> dict[str, Any] | None:
    row = await _one(
        db,
        "SELECT release_id, state, rings, ring, failure_threshold, rollback_of, reason"
        " FROM fw_campaigns WHERE campaign_id = ?",
        (campaign_id,),
    )
    if row is None:
        return None
    cursor = await db.execute(
        "SELECT state, count(*) FROM fw_targets WHERE campaign_id = ? GROUP BY state",
        (campaign_id,),
    )
    counts = {str(r[0]): int(r[1]) for r in await cursor.fetchall()}
    return {
        "kind": "campaign",
        "campaign_id": campaign_id,
        "release_id": row[0],
        "state": row[1],
        "rings": json.loads(row[2]),
        "ring": row[3],
        "failure_threshold": row[4],
        "rollback_of": row[5],
        "reason": row[6],
        "devices": counts,
    }


async def _event(db: aiosqlite.Connection, key: str, value: dict[str, Any], now: int) -> None:
    await db.execute(_OUTBOX, (key, json.dumps({**value, "at_ms": now}), now))


async def _device_event(
    db: aiosqlite.Connection,
    campaign_id: str,
    device_id: str,
    state: str,
    *,
    now: int,
    nbytes: int | None = None,
    reason: str | None = None,
    version: str | None = None,
) -> None:
    await _event(
        db,
        device_id,
        {
            "kind": "device",
            "campaign_id": campaign_id,
            "device_id": device_id,
            "state": state,
            "bytes": nbytes,
            "version": version,
            "reason": reason,
        },
        now,
    )


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
