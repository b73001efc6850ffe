"""Rows that leave the uplink queue without Kafka: expiry, dead letters, the drop ledger."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from edge import buffer_sql as sql
from edge.buffer_core import BufferCore
from edge.buffer_types import (
    DeadLetter,
    DropRecord,
    Evicted,
    StoredMessage,
    id_filter,
    now_ms,
)

log = logging.getLogger("edge.buffer")

__all__ = ["DeadLetterStore"]


class DeadLetterStore(BufferCore):
    """Expiry sweeps, dead letters and the drop ledger."""

    async def _sweep_expired(self) -> None:
        mono = time.monotonic()
        if mono - self._last_expiry_sweep < 1.0:
            return
        self._last_expiry_sweep = mono
        lossy = [c for c, cfg in self._classes.items() if cfg.lossy]
        if not lossy:
            return
        to_dead = {c for c, cfg in self._classes.items() if cfg.expired_to_dead_letters}
        now = now_ms()
        async with self.transaction() as db:
            cursor = await db.execute(
                sql.EXPIRE.format(classes=",".join("?" for _ in lossy)), (now, *lossy)
            )
            expired = [Evicted.from_row(r, r[6]) for r in await cursor.fetchall()]
            if self._keyring is not None:  # for the drop ledger's seq
                expired = self._keyring.open_evicted(expired)
            await cursor.close()
            for item in expired:
                if item.class_name in to_dead:
                    await db.execute(sql.DEAD_FROM_UPLINK, ("expired", now, item.row_id))
            await db.executemany(
                sql.INSERT_DROP,
                [
                    item.as_drop(now, "expired")
                    for item in expired
                    if item.class_name not in to_dead
                ],
            )
            await db.executemany(
                "DELETE FROM uplink WHERE id = ?", [(item.row_id,) for item in expired]
            )
        for item in expired:
            self._count_rows(item.class_name, -1, item.size, item.device_id)
            reason = "expired (dead letter)" if item.class_name in to_dead else "expired"
            self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
            class_dropped = self.stats.class_dropped
            class_dropped[item.class_name] = class_dropped.get(item.class_name, 0) + 1
        if expired:
            self.stats.dead_letters += sum(1 for i in expired if i.class_name in to_dead)
            if self._should_log("expired"):
                log.warning("expired %d messages of lossy classes", len(expired))
            await self._after_removal()

    # ------------------------------------------------------------- dead letters

    async def dead_letter(self, messages: Sequence[StoredMessage], reason: str) -> None:
        """Move undeliverable rows to the dead letters (same message id), never blocking."""
        if not messages:
            return
        now = now_ms()
        async with self.transaction() as db:
            await db.executemany(sql.DEAD_FROM_UPLINK, [(reason, now, m.row_id) for m in messages])
            await db.executemany("DELETE FROM uplink WHERE id = ?", [(m.row_id,) for m in messages])
        for message in messages:
            self._count_rows(message.class_name, -1, len(message.payload), message.device_id)
        self.stats.dead_letters += len(messages)
        log.warning("%d messages moved to dead letters: %s", len(messages), reason)
        await self._after_removal()

    async def lease_dead_letters(self, limit: int) -> list[DeadLetter]:
        """Dead letters not yet acknowledged by the Kafka dead-letter topic."""
        async with self.read() as db:
            cursor = await db.execute(
                sql.SELECT_DEAD + " WHERE forwarded_ms IS NULL ORDER BY id LIMIT ?", (limit,)
            )
            letters = [DeadLetter(*r) for r in await cursor.fetchall()]
        return letters if self._keyring is None else self._keyring.open_rows(letters)

    async def dead_letters_forwarded(self, ids: Sequence[int]) -> None:
        """The Kafka dead-letter topic acknowledged these."""
        if not ids:
            return
        keep = self._config.keep_forwarded_dead_letters
        async with self.transaction() as db:
            if keep:
                await db.executemany(
                    "UPDATE dead_letters SET forwarded_ms = ? WHERE id = ?",
                    [(now_ms(), i) for i in ids],
                )
            else:
                await db.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in ids])
        if not keep:
            self.stats.dead_letters = max(0, self.stats.dead_letters - len(ids))
            await self._after_removal()

    async def list_dead_letters(self, limit: int = 100, after_id: int = 0) -> list[DeadLetter]:
        """Dead letters by id, for ``tidegate dlq list``."""
        async with self.read() as db:
            cursor = await db.execute(
                sql.SELECT_DEAD + " WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            )
            letters = [DeadLetter(*r) for r in await cursor.fetchall()]
        return letters if self._keyring is None else self._keyring.open_rows(letters)

    async def replay_dead_letters(self, ids: Sequence[int] | None) -> int:
        """Put dead letters back into the uplink queue (same ids); None replays all."""
        where, params = id_filter(ids)
        async with self.transaction() as db:
            cursor = await db.execute(
                "SELECT class, length(payload), device_id FROM dead_letters" + where, params
            )
            moved = list(await cursor.fetchall())
            await db.execute(sql.REPLAY_DEAD + where, params)
            await db.execute("DELETE FROM dead_letters" + where, params)
        for class_name, size, device_id in moved:
            self._count_rows(class_name, +1, int(size), device_id)
        self.stats.dead_letters = max(0, self.stats.dead_letters - len(moved))
        if moved:
            self._rows_committed.set()
        return len(moved)

    async def purge_dead_letters(self, ids: Sequence[int] | None) -> int:
        """Delete dead letters for good; None purges all."""
        where, params = id_filter(ids)
        async with self.transaction() as db:
            cursor = await db.execute("DELETE FROM dead_letters" + where, params)
            count = cursor.rowcount
        self.stats.dead_letters = max(0, self.stats.dead_letters - count)
        await self._after_removal()
        return count

    # ------------------------------------------------------------- drops, registry

    async def list_drops(self, after_id: int = 0, limit: int = 1000) -> list[DropRecord]:
        """The drop ledger, by id."""
        async with self.read() as db:
            cursor = await db.execute(sql.SELECT_DROPS, (after_id, limit))
            return [DropRecord(*r) for r in await cursor.fetchall()]
