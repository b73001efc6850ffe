"""The store-and-forward buffer: one SQLite file in WAL mode, one writer connection.

Durability model
- Every write goes through one aiosqlite connection opened with ``synchronous=FULL``: a
  commit that returned survives power loss, which is what a PUBACK promises.
- Publishes are group-committed: :meth:`Buffer.enqueue` appends to a pending list and the
  committer task writes everything pending in one transaction. While one commit runs, new
  publishes queue up, so load batches itself and an idle publish is committed at once.
- Uplink rows leave the table only when Kafka acknowledged them (:meth:`release`), when
  they become dead letters, or by a lossy class's policy (drop-oldest, expiry), and every
  such drop is written to the ``drops`` ledger in the same transaction.

Bounds (``[buffer]`` config): rows, bytes of the whole file in use (pages, so dead letters,
ledger and registry count too), free disk, and optionally a hard file cap (SQLite then
reports "disk full"). When a bound is hit a ``block`` class waits (its PUBACKs are withheld,
the broker stops reading the device at its in-flight cap, and after ``block_timeout_s`` the
device is disconnected unacknowledged); lossy classes drop by policy; QoS0 is dropped.
Pending writes are bounded by (devices x in-flight cap), so memory stays bounded however long
Kafka is away. A failing commit (disk full, I/O error) is retried; nothing is acknowledged
meanwhile and nothing committed is touched.

Message ids are ``{gateway_id}:{row id}`` with ``AUTOINCREMENT`` so a row id is never reused,
not even after the table empties. The sequence is seeded from the clock (microseconds) when a
file is created, so a re-created buffer does not repeat the ids of a lost one either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from edge import buffer_sql as sql
from edge.lease_plan import plan_lease
from edge.registry import DeviceRecord, RegistryChanges, read_devices
from edge.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, create_statements
from gateway.config import BufferConfig, ClassConfig
from gateway.errors import BufferCorruptError, BufferFullError, BufferStoreError

__all__ = [
    "SCHEMA_VERSION",
    "Buffer",
    "BufferStats",
    "DeadLetter",
    "DeviceRecord",
    "DropRecord",
    "PendingWrite",
    "StoredMessage",
]

log = logging.getLogger(__name__)

_ROW_OVERHEAD = 96
"""Bytes a row costs beyond its payload (row header, columns, index entries), estimated."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One uplink row as the bridge sees it."""

    row_id: int
    device_id: str
    class_name: str
    topic: str
    qos: int
    payload: bytes
    ingest_ms: int
    priority: int
    msg_id: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be delivered, with why."""

    row_id: int
    device_id: str
    class_name: str
    topic: str
    qos: int
    payload: bytes
    ingest_ms: int
    msg_id: str | None
    reason: str
    dead_ms: int
    forwarded_ms: int | None


@dataclass(frozen=True, slots=True)
class DropRecord:
    """One entry of the drop ledger."""

    id: int
    message_id: int | None
    device_id: str
    class_name: str
    topic: str
    msg_id: str | None
    seq: int | None
    reason: str
    dropped_ms: int


@dataclass(slots=True)
class PendingWrite:
    """A publish waiting for the next group commit."""

    device_id: str
    class_name: str
    topic: str
    qos: int
    payload: bytes
    ingest_ms: int
    priority: int
    expires_ms: int | None
    msg_id: str | None
    dedup_keys: tuple[tuple[str, str], ...]
    """``(slot, fingerprint)`` pairs remembered for this device (see ``inbound_dedup``)."""
    check_dedup: bool
    """Whether to look the keys up first (a DUP retransmission, or an envelope msg id)."""
    future: asyncio.Future[None]
    enqueued: float = field(default_factory=time.monotonic)
    action: str = "insert"
    """``insert``, ``drop_newest`` (dropped on arrival) or ``evict_oldest``."""


@dataclass(slots=True)
class BufferStats:
    """Counters an operator (and the durability tests) look at."""

    rows: int = 0
    payload_bytes: int = 0
    used_bytes: int = 0
    commits: int = 0
    rows_committed: int = 0
    largest_commit: int = 0
    commit_failures: int = 0
    released: int = 0
    synchronous: str = ""
    journal_mode: str = ""
    oldest_ingest_ms: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    duplicates_suppressed: int = 0
    drops_trimmed: int = 0
    dead_letters: int = 0
    blocked_writes: int = 0
    block_disconnects: int = 0
    disk_full: bool = False
    low_disk: bool = False
    last_error: str | None = None
    class_rows: dict[str, int] = field(default_factory=dict)


class Buffer:
    """The gateway's only writer of the buffer file. Use as ``async with Buffer(...)``."""

    def __init__(
        self,
        path: Path,
        config: BufferConfig | None = None,
        classes: Mapping[str, ClassConfig] | None = None,
    ) -> None:
        self._path = path
        self._config = config or BufferConfig()
        self._classes = dict(classes or {})
        self._db: aiosqlite.Connection | None = None
        self._pending: list[PendingWrite] = []
        self._registry = RegistryChanges()
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
        self._free_disk_checked = 0.0
        self._last_expiry_sweep = 0.0
        self._last_dedup_cleanup = 0.0
        self._drop_log_at: dict[str, float] = {}
        self._drop_rows = 0
        self.stats = BufferStats()

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Buffer:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open (or create, or migrate) the file, check it is ours, start the committer."""
        if self._db is not None:
            return
        creating = not self._path.exists() or self._path.stat().st_size == 0
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self._path, isolation_level=None)
        try:
            await self._prepare(db, creating)
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise BufferCorruptError(
                f"{self._path}: not a usable tidegate buffer ({exc}); refusing to start."
                f" To keep the data, run: sqlite3 {self._path} '.recover' > recovered.sql;"
                " to start empty, move the file aside."
            ) from exc
        except BaseException:
            await db.close()
            raise
        self._db = db
        self._closing = False
        self._committer = asyncio.create_task(self._commit_loop(), name="buffer-committer")

    async def _prepare(self, db: aiosqlite.Connection, creating: bool) -> None:
        if not creating:
            await self._check_and_migrate(db)
        journal = await _scalar(db, "PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        if self._config.max_file_bytes is not None:
            page = int(await _scalar(db, "PRAGMA page_size"))
            await db.execute(f"PRAGMA max_page_count={self._config.max_file_bytes // page}")
        if creating:
            await db.execute("BEGIN")
            for statement in create_statements():
                await db.execute(statement)
            await db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            # Seed AUTOINCREMENT from the clock: a re-created file never repeats old ids.
            await db.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('uplink', ?)",
                (time.time_ns() // 1000,),
            )
            await db.execute(
                "INSERT INTO meta (key, value) VALUES ('created_ms', ?)", (str(_now_ms()),)
            )
            await db.execute("COMMIT")
        self.stats.journal_mode = str(journal).upper()
        level = int(await _scalar(db, "PRAGMA synchronous"))
        self.stats.synchronous = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(level, "?")
        row = await (await db.execute(sql.TOTALS)).fetchone()
        assert row is not None
        self.stats.rows, self.stats.payload_bytes = int(row[0]), int(row[1])
        self.stats.oldest_ingest_ms = row[2]
        cursor = await db.execute("SELECT class, count(*) FROM uplink GROUP BY class")
        self.stats.class_rows = {c: int(n) for c, n in await cursor.fetchall()}
        self.stats.dead_letters = int(await _scalar(db, "SELECT count(*) FROM dead_letters"))
        self._drop_rows = int(await _scalar(db, "SELECT count(*) FROM drops"))
        await self._refresh_used_bytes(db)
        await db.execute("UPDATE devices SET connected = 0 WHERE connected != 0")

    async def _check_and_migrate(self, db: aiosqlite.Connection) -> None:
        app_id = int(await _scalar(db, "PRAGMA application_id"))
        if app_id != APPLICATION_ID:
            raise BufferCorruptError(
                f"{self._path}: not a tidegate buffer (application_id={app_id:#x});"
                " refusing to start rather than overwrite it"
            )
        check = await _scalar(db, "PRAGMA quick_check")
        if check != "ok":
            raise BufferCorruptError(
                f"{self._path}: integrity check failed ({check}); refusing to start. To keep"
                f" the data, run: sqlite3 {self._path} '.recover' > recovered.sql"
            )
        version = int(await _scalar(db, "PRAGMA user_version"))
        if version > SCHEMA_VERSION:
            raise BufferCorruptError(
                f"{self._path}: written by a newer tidegate (schema {version}, this one knows"
                f" {SCHEMA_VERSION}); refusing to start"
            )
        if version == SCHEMA_VERSION:
            return
        log.warning("migrating buffer %s from schema %d to %d", self._path, version, SCHEMA_VERSION)
        # One transaction: an interrupted migration leaves the old schema and rows intact.
        await db.execute("BEGIN IMMEDIATE")
        try:
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    await db.execute(statement)
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Commit what is pending and has room, stop the committer, close the connection."""
        if self._db is None:
            return
        self._closing = True
        self._wakeup.set()
        if self._committer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
            self._committer = None
        for future in [w.future for w in self._pending] + self._barriers:
            if not future.done():
                future.set_exception(BufferStoreError("buffer closed before commit"))
        self._pending.clear()
        self._barriers.clear()
        db, self._db = self._db, None
        await db.close()

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

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection for reads, under the buffer lock (sees only committed rows)."""
        async with self._txn_lock:
            yield self.db

    # -------------------------------------------------------------------- ingest

    def enqueue(
        self,
        *,
        device_id: str,
        class_name: str,
        topic: str,
        qos: int,
        payload: bytes,
        ingest_ms: int,
        priority: int,
        expires_ms: int | None = None,
        msg_id: str | None = None,
        dedup_keys: tuple[tuple[str, str], ...] = (),
        check_dedup: bool = False,
    ) -> asyncio.Future[None]:
        """Queue one publish for the next group commit; the future resolves when durable."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._db is None or self._closing:
            future.set_exception(BufferStoreError("buffer is not open"))
            return future
        self._pending.append(
            PendingWrite(
                device_id,
                class_name,
                topic,
                qos,
                payload,
                ingest_ms,
                priority,
                expires_ms,
                msg_id,
                dedup_keys,
                check_dedup,
                future,
            )
        )
        self._registry.seen(device_id, ingest_ms)
        self._wakeup.set()
        return future

    def enqueue_marker(self) -> asyncio.Future[None]:
        """A future that resolves after the next commit (registry writes are then durable)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._db is None or self._closing:
            future.set_exception(BufferStoreError("buffer is not open"))
            return future
        self._barriers.append(future)
        self._wakeup.set()
        return future

    def device_connected(self, device_id: str, peer: str) -> None:
        """Registry: a device connected (written with the next commit)."""
        self._registry.connected(device_id, peer, _now_ms())
        self._wakeup.set()

    def device_disconnected(self, device_id: str) -> None:
        """Registry: a device's session ended."""
        self._registry.disconnected(device_id, _now_ms())
        self._wakeup.set()

    def device_info(
        self, device_id: str, *, device_type: str | None, firmware_version: str | None
    ) -> None:
        """Registry: what a device reported about itself."""
        self._registry.info(device_id, device_type, firmware_version, _now_ms())
        self._wakeup.set()

    @property
    def is_full(self) -> bool:
        """True while publishes wait for room (acknowledgements withheld)."""
        return self.stats.blocked_writes > 0

    # ----------------------------------------------------------------- committer

    async def _commit_loop(self) -> None:
        backoff = 0.05
        while True:
            if not self._pending and not self._registry and not self._barriers:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._check_disk()
            self._fail_timed_out_blocks()
            batch = self._take_batch()
            changes = self._registry.take()
            barriers, self._barriers = self._barriers, []
            if not batch and not changes and not barriers:
                if self._closing or not self._pending:
                    continue
                # Everything pending waits for room. Wake on a release, a new publish, or
                # after a second to enforce block_timeout_s.
                self._space_freed.clear()
                self._wakeup.clear()
                await _first_of(self._space_freed.wait(), self._wakeup.wait(), max_wait=1.0)
                continue
            try:
                async with self.transaction() as db:
                    outcome = await self._write(db, batch)
                    await changes.write(db)
            except sqlite3.Error as exc:
                # Disk full or I/O error: nothing of this batch is acknowledged; keep it at
                # the head of the queue and retry with backoff. PUBACKs stop meanwhile.
                self._commit_failed(exc, batch, changes, barriers)
                if self._closing:
                    return
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
            self.stats.disk_full = False
            self._after_commit(batch, outcome)
            for future in [w.future for w in batch] + barriers:
                if not future.done():
                    future.set_result(None)
            await self._refresh_used_bytes(self.db)
            await self._maybe_cleanup_dedup()

    def _commit_failed(
        self,
        exc: sqlite3.Error,
        batch: list[PendingWrite],
        changes: RegistryChanges,
        barriers: list[asyncio.Future[None]],
    ) -> None:
        self.stats.commit_failures += 1
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
        limit_rows, limit_bytes = self._config.max_rows, self._config.max_bytes
        for write in self._pending:
            stream = (write.device_id, write.class_name)
            if len(batch) >= self._config.commit_max_batch or stream in blocked:
                keep.append(write)
                continue
            size = len(write.payload) + _ROW_OVERHEAD
            if (
                not no_room_at_all
                and rows < limit_rows
                and self.stats.used_bytes + extra + size <= limit_bytes
            ):
                write.action = "insert"
                batch.append(write)
                rows += 1
                extra += size
                continue
            policy = self._classes.get(write.class_name)
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

    async def _write(self, db: aiosqlite.Connection, batch: Sequence[PendingWrite]) -> _Outcome:
        outcome = _Outcome()
        if not batch:
            return outcome
        now = _now_ms()
        duplicates = await self._find_duplicates(db, batch)
        inserts: list[tuple[Any, ...]] = []
        keys: list[tuple[str, str, str, int]] = []
        drops: list[tuple[Any, ...]] = []
        for write in batch:
            if write.action == "drop_newest":
                reason = "buffer full: qos0" if write.qos == 0 else "buffer full: drop_newest"
                drops.append(sql.drop_row(None, write, reason, now))
                outcome.dropped.append(reason)
                continue
            if id(write) in duplicates:
                outcome.duplicates += 1
                continue
            if write.action == "evict_oldest":
                evicted = await self._evict_oldest(db, write.class_name)
                if evicted is None:
                    drops.append(sql.drop_row(None, write, "buffer full: drop_oldest", now))
                    outcome.dropped.append("buffer full: drop_oldest")
                    continue
                drops.append(evicted.as_drop(now))
                outcome.evicted.append(evicted)
                outcome.dropped.append("buffer full: drop_oldest")
            inserts.append(sql.insert_row(write))
            keys.extend((write.device_id, slot, fp, now) for slot, fp in write.dedup_keys)
            outcome.inserted.append(write)
        if inserts:
            await db.executemany(sql.INSERT_UPLINK, inserts)
        if keys:
            await db.executemany(sql.REMEMBER_KEY, keys)
        if drops:
            await db.executemany(sql.INSERT_DROP, drops)
            await self._trim_drop_ledger(db, len(drops))
        return outcome

    async def _trim_drop_ledger(self, db: aiosqlite.Connection, added: int) -> None:
        """Keep the ledger bounded (it lives inside the bounded file too)."""
        self._drop_rows += added
        cap = min(self._config.drop_ledger_max_rows, max(100, self._config.max_bytes // 1024))
        if self._drop_rows <= cap:
            return
        excess = self._drop_rows - cap
        await db.execute(
            "DELETE FROM drops WHERE id IN (SELECT id FROM drops ORDER BY id LIMIT ?)", (excess,)
        )
        self._drop_rows = cap
        self.stats.drops_trimmed += excess

    async def _find_duplicates(
        self, db: aiosqlite.Connection, batch: Sequence[PendingWrite]
    ) -> set[int]:
        """Writes that repeat a remembered (or earlier in this batch) message of their device."""
        checked = [w for w in batch if w.check_dedup and w.dedup_keys and w.action != "drop_newest"]
        if not checked:
            return set()
        pairs = sorted({(w.device_id, slot) for w in checked for slot, _ in w.dedup_keys})
        remembered: dict[tuple[str, str], str] = {}
        for start in range(0, len(pairs), 400):
            chunk = pairs[start : start + 400]
            values = ",".join("(?,?)" for _ in chunk)
            cursor = await db.execute(
                "SELECT device_id, slot, fingerprint FROM inbound_dedup"
                f" WHERE (device_id, slot) IN (VALUES {values})",
                [x for pair in chunk for x in pair],
            )
            remembered.update(((r[0], r[1]), r[2]) for r in await cursor.fetchall())
        duplicates: set[int] = set()
        for write in batch:
            slots = [((write.device_id, slot), fp) for slot, fp in write.dedup_keys]
            if write.check_dedup and any(remembered.get(key) == fp for key, fp in slots):
                duplicates.add(id(write))
            remembered.update(slots)
        return duplicates

    async def _evict_oldest(self, db: aiosqlite.Connection, class_name: str) -> _Evicted | None:
        floor = self._in_flight_max.get(class_name, 0)
        cursor = await db.execute(sql.EVICT_OLDEST, (class_name, floor))
        row = await cursor.fetchone()
        await cursor.close()
        return None if row is None else _Evicted.from_row(row, class_name)

    def _after_commit(self, batch: Sequence[PendingWrite], outcome: _Outcome) -> None:
        stats = self.stats
        if outcome.inserted:
            stats.commits += 1
            stats.rows_committed += len(outcome.inserted)
            stats.largest_commit = max(stats.largest_commit, len(outcome.inserted))
            self._rows_committed.set()
        for write in outcome.inserted:
            self._count_rows(write.class_name, +1, len(write.payload))
            if stats.oldest_ingest_ms is None:
                stats.oldest_ingest_ms = write.ingest_ms
        for evicted in outcome.evicted:
            self._count_rows(evicted.class_name, -1, evicted.size)
        stats.duplicates_suppressed += outcome.duplicates
        for reason in outcome.dropped:
            stats.dropped[reason] = stats.dropped.get(reason, 0) + 1
            if self._should_log(reason):
                log.warning(
                    "dropping by policy (%s); total so far %d", reason, stats.dropped[reason]
                )
        del batch

    def _count_rows(self, class_name: str, delta: int, nbytes: int) -> None:
        rows = self.stats.class_rows
        rows[class_name] = max(0, rows.get(class_name, 0) + delta)
        if not rows[class_name]:
            del rows[class_name]
        self.stats.rows = max(0, self.stats.rows + delta)
        self.stats.payload_bytes = max(0, self.stats.payload_bytes + delta * nbytes)

    async def _refresh_used_bytes(self, db: aiosqlite.Connection) -> None:
        pages = int(await _scalar(db, "PRAGMA page_count"))
        free = int(await _scalar(db, "PRAGMA freelist_count"))
        size = int(await _scalar(db, "PRAGMA page_size"))
        self.stats.used_bytes = (pages - free) * size

    async def _maybe_cleanup_dedup(self) -> None:
        now = time.monotonic()
        if now - self._last_dedup_cleanup < 30:
            return
        self._last_dedup_cleanup = now
        horizon = _now_ms() - int(self._config.dedup_window_s * 1000)
        async with self.transaction() as db:
            await db.execute("DELETE FROM inbound_dedup WHERE seen_ms < ?", (horizon,))

    def _should_log(self, reason: str) -> bool:
        """Rate limit: one log line per reason every 5 seconds."""
        now = time.monotonic()
        if now - self._drop_log_at.get(reason, -1e9) < 5:
            return False
        self._drop_log_at[reason] = now
        return True

    # ------------------------------------------------------------------- forward

    async def wait_for_rows(self, max_wait: float) -> None:
        """Return when new rows were committed, or after ``max_wait`` seconds."""
        self._rows_committed.clear()
        if self.stats.rows:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait):
                await self._rows_committed.wait()

    async def lease(self, limit: int) -> list[StoredMessage]:
        """The next rows to forward: by class priority with a guaranteed share for lower
        classes, FIFO inside a class (so per device and class in order). Expired rows of
        lossy classes are swept first and never returned."""
        await self._sweep_expired()
        priority = {c: cfg.priority for c, cfg in self._classes.items()}
        plan = plan_lease(self.stats.class_rows, priority, limit, self._config.lease_min_share)
        out: list[StoredMessage] = []
        async with self.read() as db:
            for class_name, count in plan.items():
                cursor = await db.execute(sql.LEASE_CLASS, (class_name, count))
                rows = [StoredMessage(*r) for r in await cursor.fetchall()]
                if rows:
                    self._in_flight_max[class_name] = rows[-1].row_id
                out.extend(rows)
        return out

    async def release(self, messages: Iterable[StoredMessage]) -> None:
        """Delete rows that Kafka acknowledged. Only the bridge calls this, only after acks."""
        done = list(messages)
        if not done:
            return
        async with self.transaction() as db:
            await db.executemany("DELETE FROM uplink WHERE id = ?", [(m.row_id,) for m in done])
        self.stats.released += len(done)
        for message in done:
            self._count_rows(message.class_name, -1, len(message.payload))
        await self._after_removal()

    async def _after_removal(self) -> None:
        async with self.read() as db:
            oldest = await _scalar(db, "SELECT min(ingest_ms) FROM uplink")
            await self._refresh_used_bytes(db)
        self.stats.oldest_ingest_ms = None if oldest is None else int(oldest)
        self._space_freed.set()

    async def _sweep_expired(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry_sweep < 1.0:
            return
        self._last_expiry_sweep = now
        lossy = [c for c, cfg in self._classes.items() if cfg.lossy]
        if not lossy:
            return
        to_dead = {c for c, cfg in self._classes.items() if cfg.expired_to_dead_letters}
        now_ms = _now_ms()
        async with self.transaction() as db:
            cursor = await db.execute(
                sql.EXPIRE.format(classes=",".join("?" for _ in lossy)), (now_ms, *lossy)
            )
            expired = [_Evicted.from_row(r, r[6]) for r in await cursor.fetchall()]
            await cursor.close()
            for item in expired:
                if item.class_name in to_dead:
                    await db.execute(sql.DEAD_FROM_UPLINK, ("expired", now_ms, item.row_id))
            await db.executemany(
                sql.INSERT_DROP,
                [
                    item.as_drop(now_ms, "expired")
                    for item in expired
                    if item.class_name not in to_dead
                ],
            )
            await db.executemany(
                "DELETE FROM uplink WHERE id = ?", [(item.row_id,) for item in expired]
            )
        for item in expired:
            self._count_rows(item.class_name, -1, item.size)
            reason = "expired (dead letter)" if item.class_name in to_dead else "expired"
            self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
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
        now = _now_ms()
        async with self.transaction() as db:
            await db.executemany(sql.DEAD_FROM_UPLINK, [(reason, now, m.row_id) for m in messages])
            await db.executemany("DELETE FROM uplink WHERE id = ?", [(m.row_id,) for m in messages])
        for message in messages:
            self._count_rows(message.class_name, -1, len(message.payload))
        self.stats.dead_letters += len(messages)
        log.warning("%d messages moved to dead letters: %s", len(messages), reason)
        await self._after_removal()

    async def lease_dead_letters(self, limit: int) -> list[DeadLetter]:
        """Dead letters not yet acknowledged by the Kafka dead-letter topic."""
        async with self.read() as db:
            cursor = await db.execute(
                sql.SELECT_DEAD + " WHERE forwarded_ms IS NULL ORDER BY id LIMIT ?", (limit,)
            )
            return [DeadLetter(*r) for r in await cursor.fetchall()]

    async def dead_letters_forwarded(self, ids: Sequence[int]) -> None:
        """The Kafka dead-letter topic acknowledged these."""
        if not ids:
            return
        keep = self._config.keep_forwarded_dead_letters
        async with self.transaction() as db:
            if keep:
                await db.executemany(
                    "UPDATE dead_letters SET forwarded_ms = ? WHERE id = ?",
                    [(_now_ms(), i) for i in ids],
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
            return [DeadLetter(*r) for r in await cursor.fetchall()]

    async def replay_dead_letters(self, ids: Sequence[int] | None) -> int:
        """Put dead letters back into the uplink queue (same ids); None replays all."""
        where, params = _id_filter(ids)
        async with self.transaction() as db:
            cursor = await db.execute(
                "SELECT class, length(payload) FROM dead_letters" + where, params
            )
            moved = list(await cursor.fetchall())
            await db.execute(sql.REPLAY_DEAD + where, params)
            await db.execute("DELETE FROM dead_letters" + where, params)
        for class_name, size in moved:
            self._count_rows(class_name, +1, int(size))
        self.stats.dead_letters = max(0, self.stats.dead_letters - len(moved))
        if moved:
            self._rows_committed.set()
        return len(moved)

    async def purge_dead_letters(self, ids: Sequence[int] | None) -> int:
        """Delete dead letters for good; None purges all."""
        where, params = _id_filter(ids)
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

    async def devices(self) -> list[DeviceRecord]:
        """The device registry, as committed."""
        async with self.read() as db:
            return await read_devices(db)

    async def mark_all_disconnected(self) -> None:
        """At start no device is connected, whatever the last run recorded (done in open)."""


@dataclass(slots=True)
class _Outcome:
    inserted: list[PendingWrite] = field(default_factory=list)
    evicted: list[_Evicted] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    duplicates: int = 0


@dataclass(slots=True)
class _Evicted:
    """A row removed by policy, with what the drop ledger needs."""

    row_id: int
    device_id: str
    topic: str
    msg_id: str | None
    payload: bytes
    size: int
    class_name: str = ""

    @classmethod
    def from_row(cls, row: Any, class_name: str) -> _Evicted:
        return cls(row[0], row[1], row[2], row[3], bytes(row[4]), int(row[5]), class_name)

    def as_drop(self, now_ms: int, reason: str = "buffer full: drop_oldest") -> tuple[Any, ...]:
        return (
            self.row_id,
            self.device_id,
            self.class_name,
            self.topic,
            self.msg_id,
            sql.envelope_seq(self.payload),
            reason,
            now_ms,
        )


def _id_filter(ids: Sequence[int] | None) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    if not ids:
        return " WHERE 0", ()
    return f" WHERE id IN ({','.join('?' for _ in ids)})", tuple(ids)


async def _scalar(db: aiosqlite.Connection, query: str) -> Any:
    cursor = await db.execute(query)
    row = await cursor.fetchone()
    await cursor.close()
    return None if row is None else row[0]


async def _first_of(*aws: Any, max_wait: float) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=max_wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
