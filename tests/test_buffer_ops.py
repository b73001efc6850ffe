"""The buffer's operator operations on a real SQLite file: purge (in-flight rows skipped,
counters and drop ledger right) and bounds changed at runtime (a reload)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from edge.buffer import Buffer
from edge.buffer_core import LEASING
from edge.buffer_ops import PURGE_REASON, PurgeFilter
from gateway.config import BufferConfig, ClassConfig
from tests.harness import eventually

CLASSES = {
    "event": ClassConfig(kafka_topic="e", priority=8),
    "lossy": ClassConfig(kafka_topic="l", priority=1, lossy=True, on_full="drop_newest"),
}


async def _store(buffer: Buffer, device: str, n: int, class_name: str) -> None:
    futures = [
        buffer.enqueue(
            device_id=device,
            class_name=class_name,
            topic=f"d/{device}/up/{class_name}",
            qos=1,
            payload=f"{device}-{i}".encode(),
            ingest_ms=1_000 + i,
            priority=5,
        )
        for i in range(n)
    ]
    async with asyncio.timeout(10):
        await asyncio.gather(*futures)


async def test_purge_skips_rows_in_flight_and_keeps_counters_and_ledger_right(
    tmp_path: Path,
) -> None:
    async with Buffer(tmp_path / "b.sqlite3", BufferConfig(), CLASSES) as buffer:
        await _store(buffer, "a", 10, "event")
        await _store(buffer, "b", 3000, "event")
        leased = await buffer.lease(5)  # in the forwarder's hands: a's first five
        assert {m.device_id for m in leased} == {"a"}
        result = await buffer.purge(PurgeFilter(device_id="a"))
        assert (result.purged, result.skipped_in_flight) == (5, 5)
        # Chunked: more rows than one purge transaction takes.
        result = await buffer.purge(PurgeFilter(class_name="event", device_id="b"))
        assert result.purged == 3000
        assert buffer.stats.rows == 5
        assert buffer.stats.dropped == {PURGE_REASON: 3005}
        drops = await buffer.list_drops(limit=10_000)
        assert len(drops) == 3005
        assert {d.reason for d in drops} == {PURGE_REASON}
        await buffer.release(leased)  # the in-flight rows are acked later: counted once
        assert buffer.stats.rows == 0
        assert (await buffer.purge(PurgeFilter(older_than_s=0))).purged == 0


async def test_a_purge_waits_for_a_lease_being_read_instead_of_skipping_its_class(
    tmp_path: Path,
) -> None:
    """While a lease reads, its classes count as in flight whole (Buffer.lease). A purge at
    that moment waits for the read to end, then skips only what was leased. CI once saw a
    purge next to a forwarder retrying with Kafka down skip every row."""
    async with Buffer(tmp_path / "b.sqlite3", BufferConfig(), CLASSES) as buffer:
        await _store(buffer, "a", 20, "event")
        reader_free = threading.Event()
        blocker = asyncio.ensure_future(buffer.read_in_thread(lambda _: reader_free.wait(10)))
        leasing = asyncio.ensure_future(buffer.lease(5))  # queued behind the blocker
        await eventually(lambda: buffer.in_flight_mark("event") == LEASING, "the lease reading", 5)
        # Without the wait, this purge would skip all 20 rows (the class reads as in flight).
        purging = asyncio.ensure_future(buffer.purge(PurgeFilter(device_id="a")))
        # Tasks start in the order they were created: the purge reaches its first await
        # (before the fix, a chunk on the writer) before this no-op asks for the writer.
        writer_turn = asyncio.ensure_future(buffer.in_thread(lambda _: None))
        async with asyncio.timeout(10):
            await writer_turn  # the writer is free: the purge is waiting, not purging
        assert not purging.done()
        reader_free.set()
        async with asyncio.timeout(10):
            await blocker
            leased = await leasing
            result = await purging
        assert len(leased) == 5
        assert (result.purged, result.skipped_in_flight) == (15, 5)


async def test_update_limits_applies_to_the_next_commits(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite3", BufferConfig(max_rows=100), CLASSES) as buffer:
        await _store(buffer, "a", 150, "lossy")
        assert (buffer.stats.rows, buffer.stats.dropped) == (100, {"buffer full: drop_newest": 50})
        buffer.update_limits(BufferConfig(max_rows=300))
        await _store(buffer, "a", 150, "lossy")
        assert buffer.stats.rows == 250
