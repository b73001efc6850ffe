"""Operator views and operations on the buffer: ``tidegate buffer stats | peek | purge``.

Stats and peek are reads: they run on their own read-only SQLite connection (the file is in
WAL mode, so a reader never waits for the gateway's writer nor holds it up), either inside
the running gateway (admin API) or in the CLI on the file of a stopped gateway.

Purge removes queued messages for good and only runs inside the gateway (:class:`BufferOps`,
a part of :class:`edge.buffer.Buffer`): in chunks, each one transaction under the buffer
lock (PUBACKs wait at most one chunk), each purged message recorded in the drop ledger with
reason :data:`PURGE_REASON`, the in-memory counters adjusted as the rows go. Rows leased to
Kafka at that moment are skipped (their fate is Kafka's now) and counted as such.
"""

from __future__ import annotations

import base64
import functools
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge import buffer_sql as sql
from edge.buffer_core import LEASING, BufferCore, in_transaction, used_bytes
from edge.buffer_crypto import OVERHEAD, Keyring
from edge.buffer_types import Evicted, StoredMessage, now_ms
from gateway.config import BufferConfig

__all__ = [
    "PURGE_REASON",
    "BufferOps",
    "PurgeFilter",
    "PurgeResult",
    "open_read_only",
    "peek_rows",
    "read_stats",
]

PURGE_REASON = "purged by operator"
_PURGE_CHUNK = 2000
"""Rows per purge transaction: bounds how long ingest commits wait behind a purge."""
_PREVIEW = 64
"""Bytes of payload a peek shows as text when the payload is printable."""


@dataclass(frozen=True)
class PurgeFilter:
    """Which queued messages a purge removes: all of the given conditions hold. At least one
    condition is required (an operator never purges everything by accident)."""

    class_name: str | None = None
    device_id: str | None = None
    older_than_s: float | None = None
    """Ingested more than this many seconds ago."""

    def __post_init__(self) -> None:
        if self.class_name is None and self.device_id is None and self.older_than_s is None:
            raise ValueError("a purge needs a class, a device or an age")
        if self.older_than_s is not None and self.older_than_s < 0:
            raise ValueError("older_than_s must be >= 0")

    def where(self, now: int) -> tuple[str, tuple[Any, ...]]:
        """SQL condition and parameters (``now`` in ms)."""
        terms: list[str] = []
        params: list[Any] = []
        if self.class_name is not None:
            terms.append("class = ?")
            params.append(self.class_name)
        if self.device_id is not None:
            terms.append("device_id = ?")
            params.append(self.device_id)
        if self.older_than_s is not None:
            terms.append("ingest_ms < ?")
            params.append(now - int(self.older_than_s * 1000))
        return " AND ".join(terms), tuple(params)


@dataclass(frozen=True)
class PurgeResult:
    purged: int
    purged_bytes: int
    skipped_in_flight: int


def open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to a buffer file (``FileNotFoundError`` if there is none)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no buffer file")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def read_stats(
    conn: sqlite3.Connection, *, encrypted: bool, top_devices: int = 10
) -> dict[str, Any]:
    """Rows, bytes and age per class, the devices with most rows, dead letters and drops
    by reason. Full scans: for an operator's command, never a hot path."""
    overhead = OVERHEAD if encrypted else 0
    now = now_ms()
    classes = {}
    for name, rows, size, oldest, newest in conn.execute(
        "SELECT class, count(*), sum(length(payload)), min(ingest_ms), max(ingest_ms)"
        " FROM uplink GROUP BY class ORDER BY class"
    ):
        classes[name] = {
            "rows": rows,
            "payload_bytes": int(size) - overhead * rows,
            "oldest_age_s": round((now - oldest) / 1000, 3),
            "newest_age_s": round((now - newest) / 1000, 3),
        }
    devices = [
        {"device_id": d, "rows": n, "payload_bytes": int(size) - overhead * n}
        for d, n, size in conn.execute(
            "SELECT device_id, count(*), sum(length(payload)) FROM uplink GROUP BY device_id"
            " ORDER BY count(*) DESC, device_id LIMIT ?",
            (top_devices,),
        )
    ]
    dead = dict(conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason"))
    drops = dict(conn.execute("SELECT reason, count(*) FROM drops GROUP BY reason"))
    page_size, page_count = conn.execute(
        "SELECT * FROM pragma_page_size, pragma_page_count"
    ).fetchone() or (0, 0)
    return {
        "rows": sum(c["rows"] for c in classes.values()),
        "payload_bytes": sum(c["payload_bytes"] for c in classes.values()),
        "classes": classes,
        "top_devices": top_devices and devices,
        "dead_letters": dead,
        "drops": drops,
        "file_bytes": int(page_size) * int(page_count),
        "used_bytes": used_bytes(conn),
        "encrypted": encrypted,
    }


def peek_rows(
    conn: sqlite3.Connection,
    keyring: Keyring | None,
    *,
    class_name: str | None = None,
    device_id: str | None = None,
    limit: int = 10,
    after_id: int = 0,
) -> list[dict[str, Any]]:
    """The next ``limit`` queued messages (forward order inside a class), payloads base64
    (decrypted when a keyring is given; ``encrypted: true`` when they stay sealed)."""
    terms: list[str] = ["id > ?"]
    params: list[Any] = [after_id]
    if class_name is not None:
        terms.append("class = ?")
        params.append(class_name)
    if device_id is not None:
        terms.append("device_id = ?")
        params.append(device_id)
    rows = [
        StoredMessage(*r)
        for r in conn.execute(
            "SELECT id, device_id, class, topic, qos, payload, ingest_ms, priority, msg_id"
            f" FROM uplink WHERE {' AND '.join(terms)} ORDER BY id LIMIT ?",
            (*params, limit),
        )
    ]
    encrypted = keyring is None and any(_sealed(r.payload) for r in rows)
    if keyring is not None:
        rows = keyring.open_rows(rows)
    now = now_ms()
    return [
        {
            "row_id": r.row_id,
            "device_id": r.device_id,
            "class": r.class_name,
            "topic": r.topic,
            "qos": r.qos,
            "msg_id": r.msg_id,
            "age_s": round((now - r.ingest_ms) / 1000, 3),
            "payload_bytes": len(r.payload),
            "payload": base64.b64encode(r.payload).decode("ascii"),
            "preview": _preview(r.payload),
            "encrypted": encrypted,
        }
        for r in rows
    ]


def _sealed(payload: bytes) -> bool:
    from edge.buffer_crypto import key_id_of

    return key_id_of(payload) is not None


def _preview(payload: bytes) -> str | None:
    head = payload[:_PREVIEW]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.isprintable():
        return None
    return text + ("…" if len(payload) > _PREVIEW else "")


class BufferOps(BufferCore):
    """The purge, as part of the buffer (module docstring)."""

    def update_limits(self, config: BufferConfig) -> None:
        """New bounds (``max_rows``, ``max_bytes``; a reload) for the next commits; a raised
        bound lets waiting ``block`` writes in at once."""
        self._config = config
        self._space_freed.set()
        self._wakeup.set()

    def _trim_drop_ledger(self, db: sqlite3.Connection, added: int) -> None:
        raise NotImplementedError  # GroupCommitter's, earlier in Buffer's MRO

    async def purge(self, which: PurgeFilter) -> PurgeResult:
        """Remove the queued messages ``which`` selects, recording each as a drop."""
        purged = purged_bytes = 0
        skipped: set[int] = set()
        after = 0
        while True:
            # A class being leased counts as in flight whole (Buffer.lease): wait for the
            # read to end rather than skip every row of it (a purge next to a forwarder that
            # leases again and again, Kafka down, skipped them all).
            await self._lease_idle.wait()
            chunk_of = functools.partial(self._purge_in_transaction, which, after)
            found = await self.in_thread(chunk_of)
            if found is None:  # a lease started meanwhile: wait for it, then this chunk again
                continue
            chunk, in_flight, after = found
            skipped.update(in_flight)
            for item in chunk:
                self._count_rows(item.class_name, -1, item.size, item.device_id)
                self.stats.dropped[PURGE_REASON] = self.stats.dropped.get(PURGE_REASON, 0) + 1
                class_dropped = self.stats.class_dropped
                class_dropped[item.class_name] = class_dropped.get(item.class_name, 0) + 1
                purged_bytes += item.size
            purged += len(chunk)
            if not chunk and not in_flight:
                break
        if purged:
            await self._after_removal()
        return PurgeResult(purged, purged_bytes, len(skipped))

    def _purge_in_transaction(
        self, which: PurgeFilter, after: int, conn: sqlite3.Connection
    ) -> tuple[list[Evicted], list[int], int] | None:
        return in_transaction(conn, lambda c: self._purge_chunk(c, which, after))

    def _purge_chunk(
        self, conn: sqlite3.Connection, which: PurgeFilter, after: int
    ) -> tuple[list[Evicted], list[int], int] | None:
        """One chunk, in the worker thread inside a transaction: (purged, in flight, last id);
        None (nothing done) when a class of it is being leased."""
        where, params = which.where(now_ms())
        rows = conn.execute(
            "SELECT id, device_id, topic, msg_id, payload, length(payload), class FROM uplink"
            f" WHERE id > ? AND {where} ORDER BY id LIMIT ?",
            (after, *params, _PURGE_CHUNK),
        ).fetchall()
        if not rows:
            return [], [], after
        items = [Evicted.from_row(r, r[6]) for r in rows]
        marks = self._in_flight_max
        if any(marks.get(i.class_name, 0) == LEASING for i in items):
            return None
        in_flight = [
            i.row_id for i in items if i.row_id <= self._in_flight_max.get(i.class_name, 0)
        ]
        items = [i for i in items if i.row_id > self._in_flight_max.get(i.class_name, 0)]
        if self._keyring is not None:  # the drop ledger's seq, and plaintext sizes
            items = self._keyring.open_evicted(items)
        now = now_ms()
        conn.executemany(sql.INSERT_DROP, [i.as_drop(now, PURGE_REASON) for i in items])
        self._trim_drop_ledger(conn, len(items))
        conn.executemany("DELETE FROM uplink WHERE id = ?", [(i.row_id,) for i in items])
        return items, in_flight, int(rows[-1][0])
