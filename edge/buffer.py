"""The store-and-forward buffer: one SQLite file in WAL mode, one writer connection (and a
reader for leases, which must not queue behind every commit's fsync).

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
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from edge import buffer_sql as sql
from edge.buffer_commit import GroupCommitter
from edge.buffer_core import LEASING, in_transaction
from edge.buffer_crypto import OVERHEAD, load_keyring, prepare_file, reencrypt
from edge.buffer_dead import DeadLetterStore
from edge.buffer_ops import BufferOps
from edge.buffer_types import (
    BufferStats,
    DeadLetter,
    DropRecord,
    LeaseSpan,
    PendingWrite,
    StoredMessage,
    now_ms,
    scalar,
)
from edge.lease_plan import plan_lease
from edge.registry import DeviceRecord, read_devices
from edge.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, create_statements
from edge.wal_checkpoint import WRITER_AUTOCHECKPOINT_PAGES, WalCheckpointer
from gateway.errors import BufferCorruptError, BufferStoreError

log = logging.getLogger("edge.buffer")

__all__ = [
    "SCHEMA_VERSION",
    "Buffer",
    "BufferStats",
    "DeadLetter",
    "DeviceRecord",
    "DropRecord",
    "LeaseSpan",
    "PendingWrite",
    "StoredMessage",
]

_L = TypeVar("_L")


class Buffer(GroupCommitter, DeadLetterStore, BufferOps):
    """The gateway's only writer of the buffer file. Use as ``async with Buffer(...)``.

    Parts: :class:`~edge.buffer_core.BufferCore` (connection, lock, counters),
    :class:`~edge.buffer_commit.GroupCommitter` (ingest commits and policies) and
    :class:`~edge.buffer_dead.DeadLetterStore` (expiry, dead letters, drop ledger) and
    :class:`~edge.buffer_ops.BufferOps` (the operator's purge).
    """

    on_unclean_devices: Callable[[list[str]], None] | None = None
    """Called by :meth:`open`, before the first commit, with the devices the last run left
    marked connected (it ended without closing them: crash, kill -9). Their registry rows
    are set disconnected in that first commit, so whatever the callback enqueues (the
    lifecycle service's ``gateway_restart`` events) is committed in the same transaction."""

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
        try:
            self._reader = await _open_reader(self._path)
            if self._config.checkpoint_interval_ms:
                checkpointer = WalCheckpointer(
                    self._path, self._config.checkpoint_interval_ms / 1000
                )
                await checkpointer.start()
                self._checkpointer = checkpointer
        except BaseException:  # not half open: without its reader the buffer cannot lease
            if self._reader is not None:
                await self._reader.close()
                self._reader = None
            await db.close()
            raise
        self._db = db
        self._closing = False
        unclean = self._unclean
        for device_id in unclean:
            self._registry.disconnected(device_id, now_ms())
        if unclean and self.on_unclean_devices is not None:
            self.on_unclean_devices(list(unclean))
        self._committer = asyncio.create_task(self._commit_loop(), name="buffer-committer")

    async def _prepare(self, db: aiosqlite.Connection, creating: bool) -> None:
        if not creating:
            await self._check_and_migrate(db)
        journal = await scalar(db, "PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        if self._config.checkpoint_interval_ms:
            # The background checkpointer keeps the log short; this is its safety net.
            await db.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
        if self._config.max_file_bytes is not None:
            page = int(await scalar(db, "PRAGMA page_size"))
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
                "INSERT INTO meta (key, value) VALUES ('created_ms', ?)", (str(now_ms()),)
            )
            await db.execute("COMMIT")
        encryption = self._config.encryption
        self._keyring = None if encryption is None else load_keyring(encryption)
        await prepare_file(db, self._keyring, creating=creating)
        if self._keyring is not None and encryption is not None and encryption.reencrypt_on_start:
            await reencrypt(db, self._keyring)
        self.stats.journal_mode = str(journal).upper()
        level = int(await scalar(db, "PRAGMA synchronous"))
        self.stats.synchronous = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(level, "?")
        row = await (await db.execute(sql.TOTALS)).fetchone()
        assert row is not None
        # Counters are in plaintext bytes (what the committer and release count).
        overhead = 0 if self._keyring is None else OVERHEAD
        self.stats.rows = int(row[0])
        self.stats.payload_bytes = max(0, int(row[1]) - overhead * self.stats.rows)
        self.stats.oldest_ingest_ms = row[2]
        cursor = await db.execute("SELECT class, count(*) FROM uplink GROUP BY class")
        self.stats.class_rows = {c: int(n) for c, n in await cursor.fetchall()}
        if self.tenant_shares is not None:
            self.tenant_shares.reset()
            cursor = await db.execute(
                "SELECT device_id, count(*), sum(length(payload)) FROM uplink GROUP BY device_id"
            )
            for device_id, count, size in await cursor.fetchall():
                average = int(size) // max(1, int(count)) - overhead
                self.tenant_shares.count(device_id, int(count), max(0, average))
        self.stats.dead_letters = int(await scalar(db, "SELECT count(*) FROM dead_letters"))
        self._drop_rows = int(await scalar(db, "SELECT count(*) FROM drops"))
        await self._refresh_used_bytes(db)
        # At start no device is connected, whatever the last run recorded: open() queues
        # the correction for the first commit (with the lifecycle events, if any).
        cursor = await db.execute("SELECT device_id FROM devices WHERE connected != 0")
        self._unclean = [str(r[0]) for r in await cursor.fetchall()]

    async def _check_and_migrate(self, db: aiosqlite.Connection) -> None:
        app_id = int(await scalar(db, "PRAGMA application_id"))
        if app_id != APPLICATION_ID:
            raise BufferCorruptError(
                f"{self._path}: not a tidegate buffer (application_id={app_id:#x});"
                " refusing to start rather than overwrite it"
            )
        check = await scalar(db, "PRAGMA quick_check")
        if check != "ok":
            raise BufferCorruptError(
                f"{self._path}: integrity check failed ({check}); refusing to start. To keep"
                f" the data, run: sqlite3 {self._path} '.recover' > recovered.sql"
            )
        version = int(await scalar(db, "PRAGMA user_version"))
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
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            await checkpointer.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()
        await db.close()

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
        register_device: bool = True,
    ) -> asyncio.Future[None]:
        """Queue one publish for the next group commit; the future resolves when durable.

        ``register_device=False`` for rows the gateway writes itself under an id that is
        not a device's (heartbeats): the device registry is left alone."""
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
        if register_device:
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
        self._registry.connected(device_id, peer, now_ms())
        self._wakeup.set()

    def device_disconnected(self, device_id: str) -> None:
        """Registry: a device's session ended."""
        self._registry.disconnected(device_id, now_ms())
        self._wakeup.set()

    def device_info(
        self, device_id: str, *, device_type: str | None, firmware_version: str | None
    ) -> None:
        """Registry: what a device reported about itself."""
        self._registry.info(device_id, device_type, firmware_version, now_ms())
        self._wakeup.set()

    @property
    def is_full(self) -> bool:
        """True while publishes wait for room (acknowledgements withheld)."""
        return self.stats.blocked_writes > 0

    @property
    def writable(self) -> bool:
        """Open, its committer running, the last commit did not fail and the disk is not
        below ``min_free_disk_bytes`` (``/readyz``). A full buffer is still writable."""
        committer = self._committer
        return (
            self._db is not None
            and committer is not None
            and not committer.done()
            and not self.stats.commit_failing
            and not self.stats.low_disk
        )

    # ------------------------------------------------------------------- forward

    async def wait_for_rows(self, max_wait: float) -> None:
        """Return when new rows were committed, or after ``max_wait`` seconds."""
        self._rows_committed.clear()
        if self.stats.rows:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait):
                await self._rows_committed.wait()

    async def wait_for_class_empty(self, class_name: str, max_wait: float) -> bool:
        """Wait until no row of ``class_name`` is left (released after Kafka acks, or
        dropped), at most ``max_wait`` seconds; True when none is left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait):
                while self.stats.class_rows.get(class_name, 0):
                    # Set after every removal (release, drop, dead letter). Clearing it here
                    # cannot make the committer miss a wake-up: it clears it itself before
                    # each wait, and set() wakes whoever already waits.
                    self._space_freed.clear()
                    await self._space_freed.wait()
        return not self.stats.class_rows.get(class_name, 0)

    async def lease(
        self, limit: int, *, after: Mapping[str, int] | None = None
    ) -> list[StoredMessage]:
        """The next rows to forward: by class priority with a guaranteed share for lower
        classes, FIFO inside a class (so per device and class in order). Expired rows of
        lossy classes are swept first and never returned.

        ``after`` (class -> row id) leases ahead: only rows after a batch still in flight,
        and without the expiry sweep (it could delete rows of that batch under it).
        """
        rows = await self._read_lease(limit, after, _lease_rows)
        out: list[StoredMessage] = []
        for class_name, class_rows in rows.items():
            messages = [StoredMessage(*r) for r in class_rows]
            self._in_flight_max[class_name] = messages[-1].row_id
            out.extend(messages)
        return out if self._keyring is None else self._keyring.open_rows(out)

    @property
    def spans_possible(self) -> bool:
        """Whether :meth:`lease_spans` may be used: the rows' payloads are stored as sent
        (no keyring) and no per-device tenant share needs counting on release."""
        return self._keyring is None and self.tenant_shares is None

    async def lease_spans(
        self, limit: int, *, after: Mapping[str, int] | None = None
    ) -> list[LeaseSpan]:
        """:meth:`lease`, but the rows are described, not read: one index-only count per
        class. The send worker's child reads them (the gateway then spends nothing per row
        on the lease). Only when :attr:`spans_possible`."""
        assert self.spans_possible
        spans = await self._read_lease(limit, after, _lease_spans)
        for span in spans.values():
            self._in_flight_max[span.class_name] = span.last_id
        return list(spans.values())

    async def read_spans(self, spans: Sequence[LeaseSpan]) -> list[StoredMessage]:
        """The rows of leased spans (when the child cannot send them after all)."""
        plan = {span.class_name: span.rows for span in spans}
        floors = {span.class_name: span.after_id for span in spans}
        rows = await self.read_in_thread(functools.partial(_lease_rows, plan, floors))
        return [StoredMessage(*r) for class_rows in rows.values() for r in class_rows]

    async def _read_lease(
        self,
        limit: int,
        after: Mapping[str, int] | None,
        read: Callable[[Mapping[str, int], Mapping[str, int], sqlite3.Connection], dict[str, _L]],
    ) -> dict[str, _L]:
        if after is None:
            await self._sweep_expired()
        priority = {c: cfg.priority for c, cfg in self._classes.items()}
        plan = plan_lease(self.stats.class_rows, priority, limit, self._config.lease_min_share)
        floors = dict(after or {})
        # The reader's snapshot may hold rows that drop-oldest or a purge would delete
        # meanwhile (both skip rows up to the in-flight mark): while it reads, the whole
        # class counts as in flight. Drop-oldest then drops the new message instead.
        before = {c: self._in_flight_max.get(c, 0) for c in plan}
        self._in_flight_max.update(dict.fromkeys(plan, LEASING))
        self._leases_reading += 1
        self._lease_idle.clear()
        try:
            return await self.read_in_thread(functools.partial(read, plan, floors))
        finally:
            self._in_flight_max.update(before)
            self._leases_reading -= 1
            if not self._leases_reading:
                self._lease_idle.set()

    async def release(self, messages: Iterable[StoredMessage]) -> None:
        """Delete rows that Kafka acknowledged. Only the bridge calls this, only after acks.

        At-least-once: the delete is committed with ``synchronous=NORMAL`` (not fsynced at
        once; the next FULL commit of an ingest carries it to disk). A delete lost to a power
        cut only sends those rows again, which at-least-once allows; meanwhile ingest
        commits no longer queue behind a release's fsync. Exactly-once keeps FULL.

        A large release goes in transactions of :data:`_RELEASE_CHUNK` rows, so the ingest
        commits waiting for the writer get their turn between them (a 4,000-row delete of
        the send workers' batches held PUBACKs back for its whole length).
        """
        everything = list(messages)
        if not everything:
            return
        relaxed = self._relaxed_release
        heads: list[int] = []
        used = 0
        for start in range(0, len(everything), _RELEASE_CHUNK):
            done = everything[start : start + _RELEASE_CHUNK]
            by_class: dict[str, list[int]] = {}
            for message in done:
                by_class.setdefault(message.class_name, []).append(message.row_id)
            delete = functools.partial(
                _delete_rows, by_class=by_class, relaxed=relaxed, after=self._heads_and_size
            )
            heads, used = await self.in_thread(delete)
            self._count_released(done)
        self._note_removal(heads, used)

    async def release_ids(self, by_class: Mapping[str, tuple[Sequence[int], int]]) -> None:
        """:meth:`release` for rows the gateway did not read (leased as spans): per class,
        the acked row ids and their payload bytes. Counted chunk by chunk, as deleted."""
        heads: list[int] = []
        used = 0
        released = self.stats.class_released
        for class_name, (ids, nbytes) in by_class.items():
            counted_bytes = 0
            for start in range(0, len(ids), _RELEASE_CHUNK):
                chunk = ids[start : start + _RELEASE_CHUNK]
                delete = functools.partial(
                    _delete_rows, by_class={class_name: chunk}, relaxed=self._relaxed_release,
                    after=self._heads_and_size,
                )  # fmt: skip
                heads, used = await self.in_thread(delete)
                # Bytes in proportion to rows (only the whole is known); exact at the end.
                chunk_bytes = nbytes * (start + len(chunk)) // len(ids) - counted_bytes
                counted_bytes += chunk_bytes
                self.stats.released += len(chunk)
                self._count_class(class_name, -len(chunk), -chunk_bytes)
                released[class_name] = released.get(class_name, 0) + len(chunk)
        if any(ids for ids, _ in by_class.values()):
            self._note_removal(heads, used)

    def _count_released(self, done: list[StoredMessage]) -> None:
        self.stats.released += len(done)
        # Counted per class, not per row: a drain releases tens of thousands a second.
        removed: dict[str, list[int]] = {}
        shares = self.tenant_shares
        for message in done:
            counts = removed.get(message.class_name)
            if counts is None:
                counts = removed[message.class_name] = [0, 0]
            counts[0] += 1
            counts[1] += len(message.payload)
            if shares is not None:
                shares.count(message.device_id, -1, len(message.payload))
        released = self.stats.class_released
        for class_name, (rows, nbytes) in removed.items():
            self._count_class(class_name, -rows, -nbytes)
            released[class_name] = released.get(class_name, 0) + rows

    async def devices(self) -> list[DeviceRecord]:
        """The device registry, as committed."""
        async with self.read() as db:
            return await read_devices(db)

    async def mark_all_disconnected(self) -> None:
        """At start no device is connected, whatever the last run recorded (done in open)."""


async def _open_reader(path: Path) -> aiosqlite.Connection:
    reader = await aiosqlite.connect(path, isolation_level=None)
    try:
        await reader.execute("PRAGMA query_only=ON")
        await reader.execute("PRAGMA busy_timeout=5000")
    except BaseException:
        await reader.close()
        raise
    return reader


def _lease_spans(
    plan: Mapping[str, int], floors: Mapping[str, int], conn: sqlite3.Connection
) -> dict[str, LeaseSpan]:
    """The leased spans of each class (in the worker thread; index-only counts)."""
    out: dict[str, LeaseSpan] = {}
    for class_name, count in plan.items():
        floor = floors.get(class_name, 0)
        rows, last = conn.execute(sql.SPAN_CLASS, (class_name, floor, count)).fetchone()
        if rows:
            out[class_name] = LeaseSpan(class_name, floor, last, rows)
    return out


def _lease_rows(
    plan: Mapping[str, int], floors: Mapping[str, int], conn: sqlite3.Connection
) -> dict[str, list[Any]]:
    """The leased rows of each class (in the worker thread, one hand-off for all classes)."""
    out: dict[str, list[Any]] = {}
    for class_name, count in plan.items():
        floor = floors.get(class_name, 0)
        rows = conn.execute(sql.LEASE_CLASS, (class_name, floor, count)).fetchall()
        if rows:
            out[class_name] = rows
    return out


_DELETE_CHUNK = 500
"""Row ids per DELETE statement (below SQLite's oldest default limit of 999 parameters)."""
_RANGE_MIN = 32
"""Rows of one class from which a release first tries one range delete."""
_RELEASE_CHUNK = 2000
"""Rows per release transaction (see Buffer.release)."""


def _delete_rows(
    conn: sqlite3.Connection,
    by_class: Mapping[str, Sequence[int]],
    relaxed: bool,
    after: Callable[[sqlite3.Connection], tuple[list[int], int]],
) -> tuple[list[int], int]:
    def delete(c: sqlite3.Connection) -> None:
        for class_name, ids in by_class.items():
            _delete_class_rows(c, class_name, ids)

    if relaxed:
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        in_transaction(conn, delete)
    finally:
        if relaxed:
            conn.execute("PRAGMA synchronous=FULL")
    return after(conn)


def _delete_class_rows(conn: sqlite3.Connection, class_name: str, ids: Sequence[int]) -> None:
    """Delete these rows of one class (inside the caller's transaction, so nothing changes
    between the check and the delete).

    A released batch is usually every row of its class from its first id to its last (a
    lease reads a class in id order). Then one range delete over the (class, id) index
    does it, ~20 % cheaper per row than lists of ids (session 8, docs/benchmarks.md). The
    range is used only when the rows it holds are the released ones: same count and same
    sum of ids. A row in the range that was not released (one that failed, or a dead letter
    replayed into the range meanwhile) changes the count, so those ids go one list at a time.
    The check is an index-only aggregate; a SELECT of the ids cost what the range saved.
    """
    if len(ids) >= _RANGE_MIN:
        low, high = min(ids), max(ids)
        held = conn.execute(sql.RANGE_HOLDS, (class_name, low, high)).fetchone()
        if held == (len(ids), sum(ids)):
            conn.execute(sql.RELEASE_RANGE, (class_name, low, high))
            return
    # A few statements of 500 ids, not one per row: executemany hands the GIL back and
    # forth with the event loop for every row (2.5 -> 1.3 µs/row, bench/drain.py).
    for start in range(0, len(ids), _DELETE_CHUNK):
        chunk = ids[start : start + _DELETE_CHUNK]
        conn.execute(f"DELETE FROM uplink WHERE id IN ({','.join('?' * len(chunk))})", chunk)
