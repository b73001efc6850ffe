"""SQL statements and row shapes of the buffer (schema in :mod:`edge.schema`)."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cbor2

if TYPE_CHECKING:
    from edge.buffer import PendingWrite

__all__ = [
    "DEAD_FROM_UPLINK",
    "EVICT_OLDEST",
    "EXPIRE",
    "INSERT_DROP",
    "INSERT_UPLINK",
    "LEASE_CLASS",
    "SPAN_CLASS",
    "RANGE_HOLDS",
    "RELEASE_RANGE",
    "REMEMBER_KEY",
    "REPLAY_DEAD",
    "SELECT_DEAD",
    "SELECT_DROPS",
    "TOTALS",
    "drop_row",
    "envelope_seq",
    "insert_row",
    "insert_rows",
    "remembered_keys",
]

TOTALS = "SELECT count(*), coalesce(sum(length(payload)), 0), min(ingest_ms) FROM uplink"

INSERT_UPLINK = (
    "INSERT INTO uplink (device_id, class, topic, qos, payload, ingest_ms, priority,"
    " expires_ms, msg_id) VALUES"
)
"""The head of an insert: :func:`insert_rows` adds the rows."""

REMEMBER_KEY = "INSERT OR REPLACE INTO inbound_dedup (device_id, slot, fingerprint, seen_ms) VALUES"
"""The head of an insert: :func:`insert_rows` adds the rows."""

INSERT_DROP = (
    "INSERT INTO drops (message_id, device_id, class, topic, msg_id, seq, reason, dropped_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

# The oldest row of a class that is not part of the batch in flight to Kafka.
EVICT_OLDEST = (
    "DELETE FROM uplink WHERE id = (SELECT id FROM uplink WHERE class = ? AND id > ?"
    " ORDER BY id LIMIT 1) RETURNING id, device_id, topic, msg_id, payload, length(payload)"
)

RANGE_HOLDS = "SELECT count(*), sum(id) FROM uplink WHERE class = ? AND id BETWEEN ? AND ?"
RELEASE_RANGE = "DELETE FROM uplink WHERE class = ? AND id BETWEEN ? AND ?"

SPAN_CLASS = (
    "SELECT count(*), max(id) FROM"
    " (SELECT id FROM uplink WHERE class = ? AND id > ? ORDER BY id LIMIT ?)"
)

LEASE_CLASS = (
    "SELECT id, device_id, class, topic, qos, payload, ingest_ms, priority, msg_id"
    " FROM uplink WHERE class = ? AND id > ? ORDER BY id LIMIT ?"
)

EXPIRE = (
    "SELECT id, device_id, topic, msg_id, payload, length(payload), class FROM uplink"
    " WHERE expires_ms IS NOT NULL AND expires_ms <= ? AND class IN ({classes})"
)

DEAD_FROM_UPLINK = (
    "INSERT INTO dead_letters (id, device_id, class, topic, qos, payload, ingest_ms, msg_id,"
    " reason, dead_ms) SELECT id, device_id, class, topic, qos, payload, ingest_ms, msg_id,"
    " ?, ? FROM uplink WHERE id = ?"
)

SELECT_DEAD = (
    "SELECT id, device_id, class, topic, qos, payload, ingest_ms, msg_id, reason, dead_ms,"
    " forwarded_ms FROM dead_letters"
)

REPLAY_DEAD = (
    "INSERT INTO uplink (id, device_id, class, topic, qos, payload, ingest_ms, priority, msg_id)"
    " SELECT id, device_id, class, topic, qos, payload, ingest_ms, 0, msg_id FROM dead_letters"
)

SELECT_DROPS = (
    "SELECT id, message_id, device_id, class, topic, msg_id, seq, reason, dropped_ms"
    " FROM drops WHERE id > ? ORDER BY id LIMIT ?"
)


def insert_row(write: PendingWrite) -> tuple[Any, ...]:
    """Parameters of :data:`INSERT_UPLINK` for a pending write."""
    return (
        write.device_id,
        write.class_name,
        write.topic,
        write.qos,
        write.payload,
        write.ingest_ms,
        write.priority,
        write.expires_ms,
        write.msg_id,
    )


def drop_row(
    message_id: int | None, write: PendingWrite, reason: str, now_ms: int
) -> tuple[Any, ...]:
    """Parameters of :data:`INSERT_DROP` for a write dropped before it was stored."""
    return (
        message_id,
        write.device_id,
        write.class_name,
        write.topic,
        write.msg_id,
        envelope_seq(write.payload),
        reason,
        now_ms,
    )


def envelope_seq(payload: bytes) -> int | None:
    """The ``seq`` of a tidegate CBOR envelope, for the drop ledger; None otherwise.

    Only called when something is dropped, so the hot path never decodes payloads for it.
    """
    if not payload or not 0xA0 <= payload[0] <= 0xBF:
        return None
    try:
        data = cbor2.loads(payload)
    except Exception:  # cbor2 raises several types on arbitrary bytes
        return None
    seq = data.get("seq") if isinstance(data, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


# A group commit runs in aiosqlite's thread while the event loop runs ingest. Every
# sqlite3_step gives up the GIL, and taking it back waits for the loop to let go of it: up
# to the 5 ms switch interval while the loop is busy. executemany steps once per row and a
# SELECT once per result row, so a commit of 93 rows (186 dedup keys, a lookup per device)
# gave up the GIL ~400 times; at half the maximum rate commits took 3.5 ms at the median and
# 85 ms at the p99 (docs/benchmarks.md). The helpers below do the same work in a few steps.

_ROWS_PER_STATEMENT = (64, 16, 4, 1)
"""Statement sizes: a few texts per table for the statement cache, whatever the batch."""


def insert_rows(
    conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]], tail: str = ""
) -> None:
    """Insert ``rows`` (all of one width) with ``head`` (``INSERT … VALUES``) and ``tail``
    (an ``ON CONFLICT`` clause), in order: a few multi-row statements instead of one step
    per row (ids ascend in row order, as with executemany)."""
    if not rows:
        return
    width, start, total = len(rows[0]), 0, len(rows)
    for size in _ROWS_PER_STATEMENT:
        while total - start >= size:
            chunk = rows[start : start + size]
            statement = _values_statement(head, width, size, tail)
            conn.execute(statement, [v for row in chunk for v in row])
            start += size


@functools.lru_cache(maxsize=64)
def _values_statement(head: str, width: int, size: int, tail: str) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return f"{head} {', '.join([row] * size)}{tail}"


_LOOKUP_SIZES = tuple(2**k for k in range(10))  # 1 … 512 (device, slot) pairs a statement


def remembered_keys(
    conn: sqlite3.Connection, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    """The remembered fingerprint of each ``(device_id, slot)`` that has one, in one
    statement per 512 pairs, its answer one JSON row (one step, whatever it holds)."""
    found: dict[tuple[str, str], str] = {}
    largest = _LOOKUP_SIZES[-1]
    for start in range(0, len(pairs), largest):
        chunk = list(pairs[start : start + largest])
        size = next(s for s in _LOOKUP_SIZES if s >= len(chunk))
        chunk += [chunk[-1]] * (size - len(chunk))  # padded: one text per size, not per count
        row = conn.execute(_lookup_statement(size), [v for pair in chunk for v in pair]).fetchone()
        for device_id, slot, fingerprint in json.loads(row[0]):
            found[(device_id, slot)] = fingerprint
    return found


@functools.lru_cache(maxsize=16)
def _lookup_statement(size: int) -> str:
    # CROSS JOIN keeps the pairs as the outer loop: one primary-key search each. (A row-value
    # "(device_id, slot) IN (VALUES ...)" once made SQLite scan the whole table on every
    # commit, most of the CPU at 1,000 msg/s; tests/test_buffer.py checks the plan.)
    values = ", ".join(["(?, ?)"] * size)
    return (
        f"WITH wanted(device_id, slot) AS (VALUES {values})"
        " SELECT json_group_array(json_array(d.device_id, d.slot, d.fingerprint))"
        " FROM wanted CROSS JOIN inbound_dedup AS d"
        " ON d.device_id = wanted.device_id AND d.slot = wanted.slot"
    )
