"""Firmware campaigns, their per-device targets and the progress outbox, in the buffer file
(schema v4), on top of the image cache (:mod:`edge.firmware_cache`).

Every state change of a campaign or target writes its progress record to ``fw_outbox`` in
the same transaction; :mod:`bridge.firmware_out` sends the outbox to Kafka.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from edge.buffer_types import now_ms
from edge.firmware_cache import (
    ACTIVE_CAMPAIGN_STATES,
    FirmwareCache,
    Release,
    add_event,
    fetch_one,
)
from edge.firmware_rollout import RingCounts, plan_rings

__all__ = ["Campaign", "FirmwareStore", "OutboxRow", "Release", "Target"]

log = logging.getLogger(__name__)

_OPEN_TARGET = "('waiting', 'offered', 'downloading')"


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


class FirmwareStore(FirmwareCache):
    """Releases (from :class:`FirmwareCache`), campaigns, targets and the outbox."""

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
            if await fetch_one(
                db, "SELECT 1 FROM fw_campaigns WHERE campaign_id = ?", (campaign_id,)
            ):
                return "campaign id already used"
            row = await fetch_one(
                db,
                "SELECT device_type, version FROM fw_releases WHERE release_id = ?",
                (release_id,),
            )
            if row is None:
                reason = f"release {release_id} not cached"
                await add_event(
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
        where = f" WHERE state IN {ACTIVE_CAMPAIGN_STATES}" if active_only else ""
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
            row = await fetch_one(
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
                f" AND c.state IN {ACTIVE_CAMPAIGN_STATES} AND t.ring <= c.ring",
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
        async with self._buffer.read() as db:  # the common case: nothing due, no commit
            due = await fetch_one(
                db,
                "SELECT 1 FROM fw_targets WHERE state IN ('offered', 'downloading')"
                " AND offered_ms < ? LIMIT 1",
                (now - timeout_ms,),
            )
        if due is None:
            return 0
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
                row = await fetch_one(
                    db,
                    "SELECT t.campaign_id, t.state, r.version, t.bytes, r.size FROM fw_targets t"
                    " JOIN fw_campaigns c ON c.campaign_id = t.campaign_id"
                    " JOIN fw_releases r ON r.release_id = c.release_id"
                    f" WHERE t.device_id = ? AND c.release_id = ? AND t.state IN {_OPEN_TARGET}",
                    (device_id, report["release_id"]),
                )
                if row is None:
                    continue
                campaign_id, old, version, old_bytes, size = row
                nbytes = report.get("bytes", 0)
                reason = report.get("reason")
                if state == "installed" and report.get("version") != version:
                    state, reason = "failed", f"reported version {report.get('version')!r}"
                if state == "downloading" and old == "downloading":
                    await db.execute(
                        "UPDATE fw_targets SET bytes = ?, updated_ms = ? WHERE campaign_id = ?"
                        " AND device_id = ?",
                        (nbytes, now, campaign_id, device_id),
                    )
                    # Progress to Kafka per quarter of the image at most: a device repeating
                    # reports cannot grow the outbox.
                    if 4 * nbytes // size <= 4 * old_bytes // size:
                        continue
                else:
                    await db.execute(
                        "UPDATE fw_targets SET state = ?, bytes = ?, reason = ?, updated_ms = ?"
                        " WHERE campaign_id = ? AND device_id = ?",
                        (state, nbytes, reason, now, campaign_id, device_id),
                    )
                await _device_event(
                    db,
                    campaign_id,
                    device_id,
                    state,
                    nbytes=nbytes,
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
            await add_event(db, campaign_id, {**summary, "reason": reason}, now)

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


async def _summary(db: aiosqlite.Connection, campaign_id: str) -> dict[str, Any] | None:
    row = await fetch_one(
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
    await add_event(
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
