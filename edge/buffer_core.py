"""Shared state of the buffer: the one connection and its lock, counters, bounds."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from edge.buffer_crypto import Keyring
from edge.buffer_types import (
    BufferStats,
    PendingWrite,
    now_ms,
    scalar,
)
from edge.registry import RegistryChanges
from edge.tenant_share import TenantShares
from edge.wal_checkpoint import WalCheckpointer
from gateway.config import BufferConfig, ClassConfig
from gateway.errors import BufferStoreError

log = logging.getLogger("edge.buffer")

_T = TypeVar("_T")

__all__ = ["LEASING", "USED_BYTES", "BufferCore", "in_transaction", "used_bytes"]

LEASING = sys.maxsize
"""In-flight mark of a class while a lease reads it (see Buffer.lease)."""


class BufferCore:
    """State and primitives the buffer's parts share (see :class:`edge.buffer.Buffer`)."""

    def __init__(
        self,
        path: Path,
        config: BufferConfig | None = None,
        classes: Mapping[str, ClassConfig] | None = None,
        *,
        relaxed_release: bool = True,
    ) -> None:
        self._path = path
        self._config = config or BufferConfig()
        self._classes = dict(classes or {})
        self._db: aiosqlite.Connection | None = None
        self._checkpointer: WalCheckpointer | None = None
        """Background WAL checkpoints (``buffer.checkpoint_interval_ms``; None: SQLite's
        own, in the commit that fills the log)."""
        self._reader: aiosqlite.Connection | None = None
        """Leases read here, in their own thread, without the lock: a WAL reader sees only
        committed rows and never waits for the writer (whose every commit waits an fsync)."""
        self._pending: list[PendingWrite] = []
        self._registry = RegistryChanges(self._config.registry_seen_interval_ms / 1000)
        self._barriers: list[asyncio.Future[None]] = []
        self._wakeup = asyncio.Event()
        self._space_freed = asyncio.Event()
        self._rows_committed = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        # One connection, one transaction at a time: the committer, the bridge's calls and
        # admin calls take turns. (A lease must not see rows of an uncommitted transaction.)
        self._txn_lock = asyncio.Lock()
        self._in_flight_max: dict[str, int] = {}
        self._leases_reading = 0
        self._lease_idle = asyncio.Event()
        """Set while no lease is reading (no class is marked :data:`LEASING`)."""
        self._lease_idle.set()
        self._free_disk_checked = 0.0
        self._last_expiry_sweep = 0.0
        self._last_dedup_cleanup = 0.0
        self._drop_log_at: dict[str, float] = {}
        self._drop_rows = 0
        self._evict_credit: dict[str, int] = {}
        self._reclaim = 0
        self.reserved_bytes = 0
        """Bytes kept outside the file that count toward ``max_bytes`` (the firmware cache)."""
        self._unclean: list[str] = []
        self._relaxed_release = relaxed_release
        """Commit releases with synchronous=NORMAL (see Buffer.release); exactly-once: no."""
        self.stats = BufferStats()
        self._keyring: Keyring | None = None
        """At-rest encryption of payloads (``buffer.encryption``), loaded at open."""
        self.tenant_shares: TenantShares | None = None
        """Per-tenant buffer caps (``tenants.max_buffer_share``); set before :meth:`open`."""
        self.on_commit: Callable[[int, float], None] | None = None
        """Called after each successful group commit with its publishes and the seconds
        its oldest publish waited (gateway/metrics.py: PUBACK latency, once per commit)."""

    @property
    def path(self) -> Path:
        """The buffer's file."""
        return self._path

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise BufferStoreError("buffer is not open")
        return self._db

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` on the writer connection, under the buffer lock."""
        async with self._txn_lock:
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")
            self._note_write()

    async def in_thread(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work(connection)`` in aiosqlite's worker thread, under the buffer lock.

        Each aiosqlite call is a hand-off to its thread and a wake-up of the event loop back
        (about 40 µs of CPU); a commit or a release made of six statements paid that six
        times. Hot paths (group commit, lease, release) run their statements here in one
        hand-off. aiosqlite has no public call for this: ``_execute`` and ``_conn`` are the
        seams its own ``execute_*`` methods are built on (pinned by tests/test_buffer.py).
        """
        async with self._txn_lock:
            db = self.db
            execute: Callable[..., Awaitable[_T]] = db._execute  # untyped in aiosqlite
            result = await execute(work, db._conn)
        self._note_write()
        return result

    def _note_write(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.note_write()

    def wal_status(self) -> dict[str, float | int | bool]:
        """The background checkpointer's work (``/status`` → ``buffer.wal``)."""
        checkpointer = self._checkpointer
        if checkpointer is None:
            return {"background_checkpoints": False}
        return {"background_checkpoints": True, **dataclasses.asdict(checkpointer.stats)}

    def in_flight_mark(self, class_name: str) -> int:
        """The highest row id of the class leased to Kafka: drop-oldest and purges spare
        the rows up to it (while a lease reads, every row of the class)."""
        return self._in_flight_max.get(class_name, 0)

    async def read_in_thread(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run the read-only ``work(connection)`` in the reader connection's thread. Not
        under the buffer lock: it runs while commits and deletes go on."""
        reader = self._reader
        if reader is None:
            raise BufferStoreError("buffer is not open")
        execute: Callable[..., Awaitable[_T]] = reader._execute  # as in in_thread
        return await execute(work, reader._conn)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection for reads, under the buffer lock (sees only committed rows)."""
        async with self._txn_lock:
            yield self.db

    def _count_rows(self, class_name: str, delta: int, nbytes: int, device_id: str) -> None:
        if self.tenant_shares is not None:
            self.tenant_shares.count(device_id, delta, nbytes)
        self._count_class(class_name, delta, delta * nbytes)

    def _count_class(self, class_name: str, rows_delta: int, bytes_delta: int) -> None:
        rows = self.stats.class_rows
        rows[class_name] = max(0, rows.get(class_name, 0) + rows_delta)
        if not rows[class_name]:
            del rows[class_name]
        self.stats.rows = max(0, self.stats.rows + rows_delta)
        self.stats.payload_bytes = max(0, self.stats.payload_bytes + bytes_delta)

    async def _refresh_used_bytes(self, db: aiosqlite.Connection) -> None:
        self.stats.used_bytes = int(await scalar(db, USED_BYTES))

    async def _maybe_cleanup_dedup(self) -> None:
        now = time.monotonic()
        if now - self._last_dedup_cleanup < 30:
            return
        self._last_dedup_cleanup = now
        horizon = now_ms() - int(self._config.dedup_window_s * 1000)
        async with self.transaction() as db:
            await db.execute("DELETE FROM inbound_dedup WHERE seen_ms < ?", (horizon,))

    def _should_log(self, reason: str) -> bool:
        """Rate limit: one log line per reason every 5 seconds."""
        now = time.monotonic()
        if now - self._drop_log_at.get(reason, -1e9) < 5:
            return False
        self._drop_log_at[reason] = now
        return True

    async def _after_removal(self) -> None:
        self._note_removal(*await self.in_thread(self._heads_and_size))

    def _heads_and_size(self, conn: sqlite3.Connection) -> tuple[list[int], int]:
        """Oldest ingest time of each class with rows, and the file's used bytes."""
        # The head of each class (index on class, id) instead of min() over the table:
        # a scan of a million-row backlog here held the lock long enough to stall PUBACKs.
        heads = []
        for class_name in list(self.stats.class_rows):
            row = conn.execute(
                "SELECT ingest_ms FROM uplink WHERE class = ? ORDER BY id LIMIT 1", (class_name,)
            ).fetchone()
            if row is not None:
                heads.append(int(row[0]))
        return heads, used_bytes(conn)

    def _note_removal(self, heads: list[int], used: int) -> None:
        self.stats.used_bytes = used
        self.stats.oldest_ingest_ms = min(heads) if heads else None
        self._space_freed.set()


def in_transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T]) -> _T:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` around ``work`` on a plain connection (for
    :meth:`BufferCore.in_thread`); rolled back if ``work`` or the commit fails."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return result


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the file in use (pages minus free pages)."""
    row: Any = conn.execute(USED_BYTES).fetchone()
    return int(row[0])


USED_BYTES = (
    "SELECT (page_count - freelist_count) * page_size"
    " FROM pragma_page_count, pragma_freelist_count, pragma_page_size"
)
