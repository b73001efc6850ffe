"""Row and counter types of the buffer, and small helpers its modules share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosqlite

from edge import buffer_sql as sql

__all__ = [
    "ROW_OVERHEAD",
    "BufferStats",
    "DeadLetter",
    "DropRecord",
    "Evicted",
    "LeaseSpan",
    "Outcome",
    "PendingWrite",
    "StoredMessage",
    "first_of",
    "id_filter",
    "now_ms",
    "scalar",
]

ROW_OVERHEAD = 96
"""Bytes a row costs beyond its payload (row header, columns, index entries), estimated."""


# Not frozen: a frozen dataclass's __init__ costs ~4x more (object.__setattr__ per
# field), and this one is built for every message on the hot path. Treat it as immutable.
@dataclass(slots=True, unsafe_hash=True)
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
class LeaseSpan:
    """Leased rows of one class, described rather than read: the rows of ``class_name``
    with ids after ``after_id`` up to ``last_id``, ``rows`` of them when leased. The send
    worker's child reads them itself (bridge/send_worker.py says why)."""

    class_name: str
    after_id: int
    last_id: int
    rows: int


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
    """``insert``, ``drop_newest`` (dropped on arrival), ``drop_tenant_share`` (dropped:
    its tenant is at its buffer share) or ``evict_oldest``."""


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
    class_dropped: dict[str, int] = field(default_factory=dict)
    """Messages dropped by policy (full, expiry), per class."""
    class_committed: dict[str, int] = field(default_factory=dict)
    """Rows stored (acknowledgeable), per class, since start (``/metrics``)."""
    class_released: dict[str, int] = field(default_factory=dict)
    """Rows released after Kafka acknowledged them, per class, since start."""
    commit_failing: bool = False
    """The last group commit failed (``/readyz``: the buffer is not writable)."""


@dataclass(slots=True)
class Outcome:
    inserted: list[PendingWrite] = field(default_factory=list)
    evicted: list[Evicted] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    """``(reason, class)`` per message dropped by policy."""
    duplicates: int = 0


@dataclass(slots=True)
class Evicted:
    """A row removed by policy, with what the drop ledger needs."""

    row_id: int
    device_id: str
    topic: str
    msg_id: str | None
    payload: bytes
    size: int
    class_name: str = ""

    @classmethod
    def from_row(cls, row: Any, class_name: str) -> Evicted:
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


def id_filter(ids: Sequence[int] | None) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    if not ids:
        return " WHERE 0", ()
    return f" WHERE id IN ({','.join('?' for _ in ids)})", tuple(ids)


async def scalar(db: aiosqlite.Connection, query: str, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row, or None.

    One trip to aiosqlite's thread (``execute_fetchall``), not three (execute, fetchone,
    close): every trip is a thread hand-off and an event-loop wake-up.
    """
    rows = list(await db.execute_fetchall(query, params))
    return rows[0][0] if rows else None


async def first_of(*aws: Any, max_wait: float) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=max_wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def now_ms() -> int:
    return time.time_ns() // 1_000_000
