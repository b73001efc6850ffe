"""WAL checkpoints beside the commits, not inside them.

SQLite's own checkpoint runs in the commit that pushes the write-ahead log past
``wal_autocheckpoint`` pages: that commit copies the log's pages into the database file and
fsyncs it twice before it returns, and every PUBACK waiting for it waits too. At 1,000
devices x 1 msg/s the log grows ~5,000 pages a second (a commit of 1-2 rows touches ~8
pages: the row, its index, the AUTOINCREMENT sequence, retransmission fingerprints, freed
pages), so a
checkpoint ran five times a second inside a commit and set the PUBACK p99 (docs/benchmarks.md,
"PUBACK p99 at 1,000 devices").

:class:`WalCheckpointer` runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its own connection, in its
own thread, at most once per ``buffer.checkpoint_interval_ms`` while anything is written.
A passive checkpoint never blocks the writer or the lease reader. The writer keeps SQLite's
automatic checkpoint at :data:`WRITER_AUTOCHECKPOINT_PAGES` as a safety net: it only runs
when this one falls behind, and then finds most pages already copied. Checkpoints move
committed pages between two files SQLite keeps consistent; durability does not depend on
them (a commit is durable once its log frames are fsynced).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

__all__ = ["WRITER_AUTOCHECKPOINT_PAGES", "WalCheckpointer", "WalCheckpointStats"]

log = logging.getLogger("edge.buffer")

WRITER_AUTOCHECKPOINT_PAGES = 2000
"""The writer's own ``wal_autocheckpoint`` while a checkpointer runs (SQLite's default is
1,000): high enough that the background keeps the log below it, low enough that the log
stays within the 8 MB gateway/sizing.py budgets for it."""


@dataclass(slots=True)
class WalCheckpointStats:
    """What the checkpointer did (``/status`` → ``buffer.wal``)."""

    checkpoints: int = 0
    failures: int = 0
    last_log_frames: int = 0
    """Frames in the log when the last checkpoint started (it restarts from 0 once a
    checkpoint finished with no commit in between)."""
    max_log_frames: int = 0
    seconds: float = 0.0
    """Time spent checkpointing, in the checkpointer's thread."""


class WalCheckpointer:
    """Checkpoints the WAL of ``path`` in the background while writes happen."""

    def __init__(self, path: Path, interval_s: float) -> None:
        self._path = path
        self._interval_s = interval_s
        self._conn: aiosqlite.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._written = asyncio.Event()
        self.stats = WalCheckpointStats()

    async def start(self) -> None:
        conn = await aiosqlite.connect(self._path, isolation_level=None)
        try:
            # The checkpoint's own syncs (the log before copying, the file after) follow the
            # connection's setting; FULL like the writer.
            await conn.execute("PRAGMA synchronous=FULL")
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._task = asyncio.create_task(self._run(), name="buffer-wal-checkpoint")

    def note_write(self) -> None:
        """Something was committed: checkpoint within the interval."""
        self._written.set()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _run(self) -> None:
        while True:
            await self._written.wait()
            # Let the interval's commits gather: one checkpoint copies each page once, however
            # many commits rewrote it.
            await asyncio.sleep(self._interval_s)
            self._written.clear()
            await self.checkpoint()

    async def checkpoint(self) -> None:
        """One passive checkpoint now (errors are counted and logged, never raised: the
        writer's own checkpoint is the fallback)."""
        conn = self._conn
        if conn is None:
            return
        started = time.perf_counter()
        try:
            cursor = await conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            row = await cursor.fetchone()
        except (sqlite3.Error, ValueError) as exc:
            # ValueError: aiosqlite's connection closed under it. Either way the writer's own
            # checkpoint stands in; the buffer must not stop for this.
            self.stats.failures += 1
            log.warning("background WAL checkpoint failed: %r", exc)
            return
        finally:
            self.stats.seconds += time.perf_counter() - started
        self.stats.checkpoints += 1
        if row is not None:
            frames = int(row[1])
            self.stats.last_log_frames = frames
            self.stats.max_log_frames = max(self.stats.max_log_frames, frames)
