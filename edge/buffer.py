"""The store-and-forward buffer: one SQLite file in WAL mode, one writer connection.

Durability model
- Every write goes through one aiosqlite connection opened with ``synchronous=FULL``: a
  commit that returned survives power loss, which is what a PUBACK promises.
- Publishes are group-committed: :meth:`Buffer.enqueue` appends to a pending list and the
  committer task writes everything pending in one transaction. While one commit runs, new
  publishes queue up, so load batches itself and an idle publish is committed at once
  (no linger timer).
- Rows are deleted only by :meth:`Buffer.release`, which the bridge calls after Kafka
  acknowledged them. Nothing else deletes uplink rows (later: expiry/drop policies, which
  record each drop in a ledger).

Message ids are ``{gateway_id}:{row id}`` with ``AUTOINCREMENT`` so a row id is never reused,
not even after the table empties. The sequence is seeded from the clock (microseconds) when a
file is created, so a re-created buffer does not repeat the ids of a lost one either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.errors import BufferCorruptError, BufferStoreError

__all__ = [
    "SCHEMA_VERSION",
    "Buffer",
    "BufferStats",
    "DeviceRecord",
    "PendingWrite",
    "StoredMessage",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_APPLICATION_ID = 0x54494447  # "TIDG": marks a file as a tidegate buffer

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE uplink (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- message counter, never reused
    device_id  TEXT    NOT NULL,
    class      TEXT    NOT NULL,
    topic      TEXT    NOT NULL,
    qos        INTEGER NOT NULL,
    payload    BLOB    NOT NULL,
    ingest_ms  INTEGER NOT NULL,
    priority   INTEGER NOT NULL DEFAULT 0,
    expires_ms INTEGER                                  -- NULL: never expires
);
CREATE INDEX uplink_forward_order ON uplink (priority DESC, id);
CREATE TABLE devices (
    device_id        TEXT PRIMARY KEY,
    first_seen_ms    INTEGER NOT NULL,
    last_seen_ms     INTEGER NOT NULL,
    connected        INTEGER NOT NULL DEFAULT 0,
    peer             TEXT,
    device_type      TEXT,
    firmware_version TEXT,
    info_updated_ms  INTEGER
) WITHOUT ROWID;
"""

_INSERT_UPLINK = (
    "INSERT INTO uplink (device_id, class, topic, qos, payload, ingest_ms, priority, expires_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

_UPSERT_SEEN = (
    "INSERT INTO devices (device_id, first_seen_ms, last_seen_ms) VALUES (?, ?, ?)"
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
    future: asyncio.Future[None]


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
class BufferStats:
    """Counters an operator (and the durability tests) look at."""

    rows: int = 0
    payload_bytes: int = 0
    commits: int = 0
    rows_committed: int = 0
    largest_commit: int = 0
    commit_failures: int = 0
    released: int = 0
    synchronous: str = ""
    journal_mode: str = ""
    oldest_ingest_ms: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _DeviceSeen:
    last_seen_ms: int
    connected: int | None = None
    peer: str | None = None
    info: tuple[str | None, str | None] | None = None


class Buffer:
    """The gateway's only writer of the buffer file. Use as ``async with Buffer(...)``."""

    def __init__(
        self,
        path: Path,
        *,
        commit_max_batch: int = 2048,
        max_rows: int = 5_000_000,
        max_bytes: int = 1 << 30,
    ) -> None:
        self._path = path
        self._commit_max_batch = commit_max_batch
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._db: aiosqlite.Connection | None = None
        self._pending: list[PendingWrite] = []
        self._devices_dirty: dict[str, _DeviceSeen] = {}
        self._barriers: list[asyncio.Future[None]] = []
        self._wakeup = asyncio.Event()
        self._space_freed = asyncio.Event()
        self._rows_committed = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        # One connection, one transaction at a time: the committer, release() and lease()
        # take turns. (lease() must not read rows of a transaction that is not committed.)
        self._txn_lock = asyncio.Lock()
        self.stats = BufferStats()

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Buffer:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open (or create) the file, check it is ours and intact, start the committer."""
        if self._db is not None:
            return
        creating = not self._path.exists() or self._path.stat().st_size == 0
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self._path, isolation_level=None)
        try:
            await self._prepare(db, creating)
        except BaseException:
            await db.close()
            raise
        self._db = db
        self._closing = False
        self._committer = asyncio.create_task(self._commit_loop(), name="buffer-committer")

    async def _prepare(self, db: aiosqlite.Connection, creating: bool) -> None:
        try:
            if not creating:
                await self._check_existing(db)
            journal = await _scalar(db, "PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            if creating:
                await db.executescript(
                    "BEGIN;"
                    + _SCHEMA
                    + f"PRAGMA application_id={_APPLICATION_ID};"
                    + f"PRAGMA user_version={SCHEMA_VERSION};"
                    + "COMMIT;"
                )
                # Seed AUTOINCREMENT from the clock: a re-created file never repeats old ids.
                seed = time.time_ns() // 1000
                await db.execute("BEGIN")
                await db.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('uplink', ?)", (seed,)
                )
                await db.execute(
                    "INSERT INTO meta (key, value) VALUES ('created_ms', ?)",
                    (str(time.time_ns() // 1_000_000),),
                )
                await db.execute("COMMIT")
            self.stats.journal_mode = str(journal).upper()
            self.stats.synchronous = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                int(await _scalar(db, "PRAGMA synchronous")), "?"
            )
            row = await (
                await db.execute(
                    "SELECT count(*), coalesce(sum(length(payload)), 0), min(ingest_ms) FROM uplink"
                )
            ).fetchone()
            assert row is not None
            self.stats.rows, self.stats.payload_bytes = int(row[0]), int(row[1])
            self.stats.oldest_ingest_ms = row[2]
        except sqlite3.DatabaseError as exc:
            raise BufferCorruptError(
                f"{self._path}: not a usable tidegate buffer ({exc}); refusing to start."
                " Move the file aside to start empty, or restore it from a backup."
            ) from exc

    async def _check_existing(self, db: aiosqlite.Connection) -> None:
        app_id = int(await _scalar(db, "PRAGMA application_id"))
        if app_id != _APPLICATION_ID:
            raise BufferCorruptError(
                f"{self._path}: not a tidegate buffer (application_id={app_id:#x});"
                " refusing to start rather than overwrite it"
            )
        version = int(await _scalar(db, "PRAGMA user_version"))
        if version != SCHEMA_VERSION:
            raise BufferCorruptError(
                f"{self._path}: schema version {version}, this gateway needs {SCHEMA_VERSION}"
            )
        check = await _scalar(db, "PRAGMA quick_check")
        if check != "ok":
            raise BufferCorruptError(f"{self._path}: integrity check failed: {check}")

    async def close(self) -> None:
        """Commit what is pending, stop the committer, close the connection."""
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
    ) -> asyncio.Future[None]:
        """Queue one publish for the next group commit; the future resolves when durable."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._db is None or self._closing:
            future.set_exception(BufferStoreError("buffer is not open"))
            return future
        self._pending.append(
            PendingWrite(
                device_id, class_name, topic, qos, payload, ingest_ms, priority, expires_ms, future
            )
        )
        self._touch_device(device_id, ingest_ms)
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
        seen = self._touch_device(device_id, _now_ms())
        seen.connected, seen.peer = 1, peer
        self._wakeup.set()

    def device_disconnected(self, device_id: str) -> None:
        """Registry: a device's session ended."""
        seen = self._touch_device(device_id, _now_ms())
        seen.connected = 0
        self._wakeup.set()

    def device_info(
        self, device_id: str, *, device_type: str | None, firmware_version: str | None
    ) -> None:
        """Registry: what a device reported about itself."""
        seen = self._touch_device(device_id, _now_ms())
        seen.info = (device_type, firmware_version)
        self._wakeup.set()

    def _touch_device(self, device_id: str, now_ms: int) -> _DeviceSeen:
        seen = self._devices_dirty.get(device_id)
        if seen is None:
            seen = self._devices_dirty[device_id] = _DeviceSeen(now_ms)
        else:
            seen.last_seen_ms = max(seen.last_seen_ms, now_ms)
        return seen

    def _has_room(self, write: PendingWrite) -> bool:
        return (
            self.stats.rows < self._max_rows
            and self.stats.payload_bytes + len(write.payload) <= self._max_bytes
        )

    async def _commit_loop(self) -> None:
        backoff = 0.05
        while True:
            if not self._pending and not self._devices_dirty and not self._barriers:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take_batch()
            devices, self._devices_dirty = self._devices_dirty, {}
            barriers, self._barriers = self._barriers, []
            if not batch and not devices and not barriers:
                # Everything pending waits for space: block (withhold PUBACKs) until the
                # bridge releases rows. Nothing is dropped here.
                if self._closing:
                    return
                self._space_freed.clear()
                self._wakeup.clear()
                await _first_of(self._space_freed.wait(), self._wakeup.wait())
                continue
            try:
                async with self._txn_lock:
                    try:
                        await self._write(batch, devices)
                    except sqlite3.Error:
                        with contextlib.suppress(sqlite3.Error):
                            await self.db.execute("ROLLBACK")
                        raise
            except sqlite3.Error as exc:
                # Disk full or I/O error: nothing of this batch is acknowledged; keep it at
                # the head of the queue and retry with backoff. PUBACKs stop meanwhile.
                self.stats.commit_failures += 1
                log.error("buffer commit of %d rows failed, will retry: %s", len(batch), exc)
                self._pending[:0] = batch
                for device_id, seen in devices.items():
                    self._devices_dirty.setdefault(device_id, seen)
                self._barriers[:0] = barriers
                if self._closing:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            for write in batch:
                if not write.future.done():
                    write.future.set_result(None)
            for barrier in barriers:
                if not barrier.done():
                    barrier.set_result(None)
            if batch:
                self._rows_committed.set()

    def _take_batch(self) -> list[PendingWrite]:
        batch: list[PendingWrite] = []
        rows, nbytes = self.stats.rows, self.stats.payload_bytes
        for write in self._pending:
            if len(batch) >= self._commit_max_batch:
                break
            if rows >= self._max_rows or nbytes + len(write.payload) > self._max_bytes:
                break
            batch.append(write)
            rows += 1
            nbytes += len(write.payload)
        del self._pending[: len(batch)]
        return batch

    async def _write(self, batch: Sequence[PendingWrite], devices: dict[str, _DeviceSeen]) -> None:
        db = self.db
        await db.execute("BEGIN IMMEDIATE")
        if batch:
            await db.executemany(
                _INSERT_UPLINK,
                [
                    (
                        w.device_id,
                        w.class_name,
                        w.topic,
                        w.qos,
                        w.payload,
                        w.ingest_ms,
                        w.priority,
                        w.expires_ms,
                    )
                    for w in batch
                ],
            )
        if devices:
            await db.executemany(
                _UPSERT_SEEN, [(d, s.last_seen_ms, s.last_seen_ms) for d, s in devices.items()]
            )
            changes = [
                (s.connected, s.peer, d) for d, s in devices.items() if s.connected is not None
            ]
            if changes:
                await db.executemany(_UPDATE_CONNECTED, changes)
            infos = [
                (s.info[0], s.info[1], s.last_seen_ms, d) for d, s in devices.items() if s.info
            ]
            if infos:
                await db.executemany(_UPDATE_INFO, infos)
        await db.execute("COMMIT")
        if batch:
            self.stats.commits += 1
            self.stats.rows_committed += len(batch)
            self.stats.largest_commit = max(self.stats.largest_commit, len(batch))
            self.stats.rows += len(batch)
            self.stats.payload_bytes += sum(len(w.payload) for w in batch)
            if self.stats.oldest_ingest_ms is None:
                self.stats.oldest_ingest_ms = batch[0].ingest_ms

    # ------------------------------------------------------------------- forward

    async def lease(self, limit: int) -> list[StoredMessage]:
        """The next rows to forward: higher priority first, then arrival (FIFO per device)."""
        async with self._txn_lock:
            cursor = await self.db.execute(
                "SELECT id, device_id, class, topic, qos, payload, ingest_ms, priority"
                " FROM uplink ORDER BY priority DESC, id LIMIT ?",
                (limit,),
            )
            rows = await cursor.fetchall()
        return [
            StoredMessage(
                row_id=r[0],
                device_id=r[1],
                class_name=r[2],
                topic=r[3],
                qos=r[4],
                payload=bytes(r[5]),
                ingest_ms=r[6],
                priority=r[7],
            )
            for r in rows
        ]

    async def wait_for_rows(self, max_wait: float) -> None:
        """Return when new rows were committed, or after ``max_wait`` seconds."""
        self._rows_committed.clear()
        if self.stats.rows:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait):
                await self._rows_committed.wait()

    async def release(self, messages: Iterable[StoredMessage]) -> None:
        """Delete rows that Kafka acknowledged. Only the bridge calls this, only after acks."""
        done = list(messages)
        if not done:
            return
        db = self.db
        async with self._txn_lock:
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.executemany("DELETE FROM uplink WHERE id = ?", [(m.row_id,) for m in done])
                await db.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                raise
            oldest = await _scalar(db, "SELECT min(ingest_ms) FROM uplink")
        self.stats.released += len(done)
        self.stats.rows = max(0, self.stats.rows - len(done))
        self.stats.payload_bytes = max(
            0, self.stats.payload_bytes - sum(len(m.payload) for m in done)
        )
        self.stats.oldest_ingest_ms = None if oldest is None else int(oldest)
        self._space_freed.set()

    # ------------------------------------------------------------------ registry

    async def devices(self) -> list[DeviceRecord]:
        """The device registry, as committed."""
        cursor = await self.db.execute(
            "SELECT device_id, first_seen_ms, last_seen_ms, connected, peer, device_type,"
            " firmware_version FROM devices ORDER BY device_id"
        )
        return [
            DeviceRecord(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6])
            for r in await cursor.fetchall()
        ]

    async def mark_all_disconnected(self) -> None:
        """At start no device is connected, whatever the last run recorded."""
        async with self._txn_lock:
            await self.db.execute("UPDATE devices SET connected = 0 WHERE connected != 0")

    @property
    def is_full(self) -> bool:
        """True while publishes are waiting for room (acknowledgements withheld)."""
        return bool(self._pending) and not self._has_room(self._pending[0])


async def _scalar(db: aiosqlite.Connection, sql: str) -> Any:
    cursor = await db.execute(sql)
    row = await cursor.fetchone()
    return None if row is None else row[0]


async def _first_of(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
