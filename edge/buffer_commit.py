"""Group commit: pending publishes → one durable transaction, with the bounds and the
drop policies applied on the way (see docs/buffer.md)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from edge import buffer_sql as sql
from edge.buffer_core import BufferCore, in_transaction, used_bytes
from edge.buffer_types import (
    ROW_OVERHEAD,
    Evicted,
    Outcome,
    PendingWrite,
    first_of,
    now_ms,
)
from edge.registry import RegistryChanges
from edge.tenant_share import TENANT_SHARE_DROP
from gateway.errors import BufferFullError, BufferStoreError

log = logging.getLogger("edge.buffer")

__all__ = ["GroupCommitter"]

_LEDGER_ROW_BYTES = 128
"""Bytes set aside per drop-ledger entry (row, topic, msg id, reason)."""


class GroupCommitter(BufferCore):
    """The committer task and everything it decides for a batch."""

    @property
    def drop_ledger_cap(self) -> int:
        """Most entries the drop ledger keeps (also bounded by ``max_bytes``)."""
        return min(self._config.drop_ledger_max_rows, max(100, self._config.max_bytes // 1024))

    # ----------------------------------------------------------------- committer

    async def _commit_loop(self) -> None:
        backoff = 0.05
        while True:
            if not self._pending and not self._barriers and not self._registry.due():
                if not self._closing:
                    await self._wait_for_work()
                    continue
                if not self._registry:
                    return  # closing, and nothing is left to write
            await self._linger()
            self._check_disk()
            self._fail_timed_out_blocks()
            batch = self._take_batch()
            # A barrier promises the registry durable; close writes what is left.
            changes = self._registry.take(everything=self._closing or bool(self._barriers))
            barriers, self._barriers = self._barriers, []
            if not batch and not changes and not barriers:
                if self._closing or not self._pending:
                    continue
                # Everything pending waits for room. Wake on a release, a new publish, or
                # after a second to enforce block_timeout_s.
                self._space_freed.clear()
                self._wakeup.clear()
                await first_of(self._space_freed.wait(), self._wakeup.wait(), max_wait=1.0)
                continue
            try:
                outcome, used = await self.in_thread(
                    functools.partial(self._commit_in_thread, batch, changes)
                )
            except sqlite3.Error as exc:
                # Disk full or I/O error: nothing of this batch is acknowledged; keep it at
                # the head of the queue and retry with backoff. PUBACKs stop meanwhile.
                self._commit_failed(exc, batch, changes, barriers)
                if self._closing:
                    return
                if self.stats.disk_full:
                    await self._shed_bookkeeping()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception as exc:
                # A bug, not the disk: fail this batch (its devices are disconnected without
                # PUBACK and resend) rather than let the committer die and stall every device.
                log.exception("buffer commit crashed; failing %d publishes", len(batch))
                for future in [w.future for w in batch] + barriers:
                    if not future.done():
                        future.set_exception(BufferStoreError(f"commit failed: {exc!r}"))
                continue
            backoff = 0.05
            self.stats.disk_full = self.stats.commit_failing = False
            if batch and self.on_commit is not None:
                # Once per commit, not per message: the batch's oldest publish waited longest.
                self.on_commit(len(batch), time.monotonic() - batch[0].enqueued)
            self._after_commit(batch, outcome)
            for future in [w.future for w in batch] + barriers:
                if not future.done():
                    future.set_result(None)
            self.stats.used_bytes = used
            await self._maybe_cleanup_dedup()

    async def _wait_for_work(self) -> None:
        """Until something is enqueued, or pending last-seen times fall due."""
        self._wakeup.clear()
        if not self._registry:
            await self._wakeup.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, self._registry.seen_due_in())):
                await self._wakeup.wait()

    async def _linger(self) -> None:
        """With ``commit_linger_ms``: no commit before its oldest publish waited that long,
        so a trickle shares commits. Under load the oldest already waited a whole commit."""
        linger = self._config.commit_linger_ms / 1000
        if linger and self._pending and not self._closing:
            wait = self._pending[0].enqueued + linger - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)

    def _commit_failed(
        self,
        exc: sqlite3.Error,
        batch: list[PendingWrite],
        changes: RegistryChanges,
        barriers: list[asyncio.Future[None]],
    ) -> None:
        self.stats.commit_failures += 1
        self.stats.commit_failing = True
        self.stats.last_error = str(exc)
        full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)
        self.stats.disk_full = full
        if self._should_log("commit-failed"):
            log.error(
                "buffer commit of %d publishes failed (%s); acknowledgements stop until it"
                " succeeds%s",
                len(batch),
                exc,
                ": the disk or buffer file is full" if full else "",
            )
        for write in batch:
            write.action = "insert"
        self._pending[:0] = batch
        self._registry.put_back(changes)
        self._barriers[:0] = barriers

    async def _shed_bookkeeping(self) -> None:
        """The file is full: bookkeeping yields to data. Forget the older half of the
        retransmission memory (only weakens duplicate suppression) and trim the drop ledger
        by half (its counters stay), so acknowledgements can resume once rows are released
        instead of the bookkeeping itself keeping the file full."""
        try:
            async with self.transaction() as db:
                await db.execute(
                    "DELETE FROM inbound_dedup WHERE seen_ms <= (SELECT seen_ms FROM"
                    " inbound_dedup ORDER BY seen_ms LIMIT 1 OFFSET"
                    " (SELECT count(*) / 2 FROM inbound_dedup))"
                )
                cursor = await db.execute(
                    "DELETE FROM drops WHERE id IN (SELECT id FROM drops ORDER BY id LIMIT"
                    " (SELECT count(*) / 2 FROM drops))"
                )
                trimmed = max(0, cursor.rowcount)
        except sqlite3.Error as exc:
            log.error("could not shed bookkeeping rows in a full buffer: %s", exc)
            return
        self._drop_rows = max(0, self._drop_rows - trimmed)
        self.stats.drops_trimmed += trimmed
        await self._refresh_used_bytes(self.db)

    def _check_disk(self) -> None:
        now = time.monotonic()
        if now - self._free_disk_checked < 0.25:
            return
        self._free_disk_checked = now
        try:
            free = shutil.disk_usage(self._path.parent).free
        except OSError:
            return
        low = free < self._config.min_free_disk_bytes
        if low and not self.stats.low_disk and self._should_log("low-disk"):
            log.error(
                "free disk %d bytes below buffer.min_free_disk_bytes; acknowledgements stop", free
            )
        self.stats.low_disk = low

    def _fail_timed_out_blocks(self) -> None:
        """Disconnect devices whose publish waited longer than ``block_timeout_s`` for room."""
        if not self.stats.blocked_writes:
            return
        limit = time.monotonic() - self._config.block_timeout_s
        expired = {w.device_id for w in self._pending if w.enqueued < limit}
        if not expired:
            return
        keep: list[PendingWrite] = []
        for write in self._pending:
            if write.device_id in expired:
                if not write.future.done():
                    write.future.set_exception(
                        BufferFullError(
                            f"buffer full for {self._config.block_timeout_s:.0f} s:"
                            f" disconnecting {write.device_id} without acknowledgement"
                        )
                    )
            else:
                keep.append(write)
        self._pending = keep
        self.stats.block_disconnects += len(expired)
        log.warning("buffer full: disconnecting %d blocked devices", len(expired))

    def _take_batch(self) -> list[PendingWrite]:
        """The writes for the next commit, with each one's fate when the buffer is full."""
        batch: list[PendingWrite] = []
        keep: list[PendingWrite] = []
        blocked: set[tuple[str, str]] = set()
        rows, extra = self.stats.rows, 0
        no_room_at_all = self.stats.low_disk
        # The drop ledger lives in the same bounded file: its room is set aside up front.
        limit_rows = self._config.max_rows
        limit_bytes = (
            self._config.max_bytes - self.drop_ledger_cap * _LEDGER_ROW_BYTES - self.reserved_bytes
        )
        self._reclaim = max(0, self.stats.used_bytes - self._config.max_bytes)
        shares, taken = self.tenant_shares, dict[str, list[int]]()
        for write in self._pending:
            stream = (write.device_id, write.class_name)
            if len(batch) >= self._config.commit_max_batch or stream in blocked:
                keep.append(write)
                continue
            size = len(write.payload) + ROW_OVERHEAD
            room = (
                not no_room_at_all
                and rows < limit_rows
                and self.stats.used_bytes + extra + size <= limit_bytes
            )
            if room and (shares is None or shares.admit(write.device_id, size, taken)):
                write.action = "insert"
                batch.append(write)
                rows += 1
                extra += size
                continue
            policy = self._classes.get(write.class_name)
            if room:  # the buffer has room, the device's tenant is at its share
                if write.qos == 0 or (policy is not None and policy.lossy):
                    write.action = "drop_tenant_share"
                    batch.append(write)
                else:
                    blocked.add(stream)
                    keep.append(write)
                continue
            if write.qos == 0 or (policy is not None and policy.on_full == "drop_newest"):
                write.action = "drop_newest"
                batch.append(write)
            elif policy is not None and policy.on_full == "drop_oldest" and not no_room_at_all:
                write.action = "evict_oldest"
                batch.append(write)
            else:
                blocked.add(stream)
                keep.append(write)
        self._pending = keep
        self.stats.blocked_writes = len(keep) if blocked else 0
        return batch

    def _commit_in_thread(
        self, batch: Sequence[PendingWrite], changes: RegistryChanges, conn: sqlite3.Connection
    ) -> tuple[Outcome, int]:
        """One group commit, in aiosqlite's thread (one hand-off; see BufferCore.in_thread).
        Returns what happened and the file's used bytes after it."""

        def body(c: sqlite3.Connection) -> Outcome:
            outcome = self._write(c, batch)
            changes.write_sync(c)
            return outcome

        return in_transaction(conn, body), used_bytes(conn)

    def _write(self, db: sqlite3.Connection, batch: Sequence[PendingWrite]) -> Outcome:
        outcome = Outcome()
        if not batch:
            return outcome
        now = now_ms()
        duplicates = self._find_duplicates(db, batch)
        inserts: list[tuple[Any, ...]] = []
        keys: list[tuple[str, str, str, int]] = []
        drops: list[tuple[Any, ...]] = []
        for write in batch:
            if write.action in ("drop_newest", "drop_tenant_share"):
                reason = "buffer full: qos0" if write.qos == 0 else "buffer full: drop_newest"
                if write.action == "drop_tenant_share":
                    reason = TENANT_SHARE_DROP
                drops.append(sql.drop_row(None, write, reason, now))
                outcome.dropped.append((reason, write.class_name))
                continue
            if id(write) in duplicates:
                outcome.duplicates += 1
                continue
            if write.action == "evict_oldest":
                # Free as many payload bytes as the new row brings. Bytes freed beyond that
                # are the class's credit for its next row, so the room a lossy class frees
                # never leaks to other classes (a blocked class stays blocked).
                credit = self._evict_credit.get(write.class_name, 0)
                # Pages left half-empty by deletes can push the file past its bound: give
                # back that overshoot too, so the file converges under max_bytes.
                freed, need = 0, len(write.payload) - credit + self._reclaim
                self._reclaim = 0
                while freed < need:
                    evicted = self._evict_oldest(db, write.class_name)
                    if evicted is None:
                        break
                    drops.append(evicted.as_drop(now))
                    outcome.evicted.append(evicted)
                    outcome.dropped.append(("buffer full: drop_oldest", write.class_name))
                    freed += evicted.size
                if freed < need:
                    drops.append(sql.drop_row(None, write, "buffer full: drop_oldest", now))
                    outcome.dropped.append(("buffer full: drop_oldest", write.class_name))
                    continue
                self._evict_credit[write.class_name] = freed - need
            inserts.append(sql.insert_row(write))
            keys.extend((write.device_id, slot, fp, now) for slot, fp in write.dedup_keys)
            outcome.inserted.append(write)
        if inserts:
            if self._keyring is not None:  # at-rest encryption: one call per batch
                # Already off the event loop: the whole commit runs in aiosqlite's thread.
                inserts = self._keyring.seal_inserts(inserts)
            sql.insert_rows(db, sql.INSERT_UPLINK, inserts)
        if keys:
            sql.insert_rows(db, sql.REMEMBER_KEY, keys)
        if drops:
            db.executemany(sql.INSERT_DROP, drops)
            self._trim_drop_ledger(db, len(drops))
        return outcome

    def _trim_drop_ledger(self, db: sqlite3.Connection, added: int) -> None:
        """Keep the ledger bounded (it lives inside the bounded file too)."""
        self._drop_rows += added
        cap = self.drop_ledger_cap
        if self._drop_rows <= cap:
            return
        excess = self._drop_rows - cap
        db.execute(
            "DELETE FROM drops WHERE id IN (SELECT id FROM drops ORDER BY id LIMIT ?)", (excess,)
        )
        self._drop_rows = cap
        self.stats.drops_trimmed += excess

    def _find_duplicates(self, db: sqlite3.Connection, batch: Sequence[PendingWrite]) -> set[int]:
        """Writes that repeat a remembered (or earlier in this batch) message of their device."""
        dropping = ("drop_newest", "drop_tenant_share")
        checked = [w for w in batch if w.check_dedup and w.dedup_keys and w.action not in dropping]
        if not checked:
            return set()
        pairs = {(w.device_id, slot) for w in checked for slot, _ in w.dedup_keys}
        remembered = sql.remembered_keys(db, sorted(pairs))
        duplicates: set[int] = set()
        for write in batch:
            slots = [((write.device_id, slot), fp) for slot, fp in write.dedup_keys]
            if write.check_dedup and any(remembered.get(key) == fp for key, fp in slots):
                duplicates.add(id(write))
            remembered.update(slots)
        return duplicates

    def _evict_oldest(self, db: sqlite3.Connection, class_name: str) -> Evicted | None:
        floor = self._in_flight_max.get(class_name, 0)
        row = db.execute(sql.EVICT_OLDEST, (class_name, floor)).fetchone()
        if row is None:
            return None
        evicted = Evicted.from_row(row, class_name)
        return evicted if self._keyring is None else self._keyring.open_evicted([evicted])[0]

    def _after_commit(self, batch: Sequence[PendingWrite], outcome: Outcome) -> None:
        stats = self.stats
        if outcome.inserted:
            stats.commits += 1
            stats.rows_committed += len(outcome.inserted)
            stats.largest_commit = max(stats.largest_commit, len(outcome.inserted))
            self._rows_committed.set()
        committed = stats.class_committed
        for write in outcome.inserted:
            self._count_rows(write.class_name, +1, len(write.payload), write.device_id)
            committed[write.class_name] = committed.get(write.class_name, 0) + 1
            if stats.oldest_ingest_ms is None:
                stats.oldest_ingest_ms = write.ingest_ms
        for evicted in outcome.evicted:
            self._count_rows(evicted.class_name, -1, evicted.size, evicted.device_id)
        stats.duplicates_suppressed += outcome.duplicates
        for reason, class_name in outcome.dropped:
            stats.dropped[reason] = stats.dropped.get(reason, 0) + 1
            stats.class_dropped[class_name] = stats.class_dropped.get(class_name, 0) + 1
            if self._should_log(reason):
                log.warning(
                    "dropping by policy (%s); total so far %d", reason, stats.dropped[reason]
                )
        del batch
