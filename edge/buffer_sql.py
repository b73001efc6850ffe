"""SQL statements and row shapes of the buffer (schema in :mod:`edge.schema`)."""

from __future__ import annotations

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
]

TOTALS = "SELECT count(*), coalesce(sum(length(payload)), 0), min(ingest_ms) FROM uplink"

INSERT_UPLINK = (
    "INSERT INTO uplink (device_id, class, topic, qos, payload, ingest_ms, priority,"
    " expires_ms, msg_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

REMEMBER_KEY = (
    "INSERT OR REPLACE INTO inbound_dedup (device_id, slot, fingerprint, seen_ms)"
    " VALUES (?, ?, ?, ?)"
)

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
