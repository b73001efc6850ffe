"""The SQLite buffer, on real files: durability settings, group commit, ids, corruption."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from edge.buffer import Buffer
from gateway.errors import BufferCorruptError


def _enqueue(
    buffer: Buffer, device: str, n: int, class_name: str = "event"
) -> list[asyncio.Future[None]]:
    return [
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


async def test_runs_with_wal_and_synchronous_full(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite3") as buffer:
        assert buffer.stats.journal_mode == "WAL"
        assert buffer.stats.synchronous == "FULL"


async def test_concurrent_publishes_share_commits_and_keep_order(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite3") as buffer:
        futures = _enqueue(buffer, "a", 500) + _enqueue(buffer, "b", 500)
        async with asyncio.timeout(10):
            await asyncio.gather(*futures)
        assert buffer.stats.rows == 1000
        assert buffer.stats.commits < 100  # grouped, not one fsync per publish
        rows = await buffer.lease(2000)
        for device in ("a", "b"):
            payloads = [m.payload for m in rows if m.device_id == device]
            assert payloads == [f"{device}-{i}".encode() for i in range(500)]


async def test_idle_publish_is_committed_at_once(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite3") as buffer:
        async with asyncio.timeout(1):
            await _enqueue(buffer, "a", 1)[0]
        assert buffer.stats.commits == 1


async def test_ids_never_reused_after_drain_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    async with Buffer(path) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 3))
        first = await buffer.lease(10)
        await buffer.release(first)
        assert buffer.stats.rows == 0
        await asyncio.gather(*_enqueue(buffer, "a", 1))
        second = await buffer.lease(10)
        assert second[0].row_id > first[-1].row_id
        await buffer.release(second)
    async with Buffer(path) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 1))
        third = await buffer.lease(10)
        assert third[0].row_id > second[0].row_id


async def test_recreated_file_does_not_repeat_ids(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    async with Buffer(path) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 1))
        old = (await buffer.lease(1))[0].row_id
    for leftover in tmp_path.glob("b.sqlite3*"):
        leftover.unlink()
    async with Buffer(path) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 1))
        assert (await buffer.lease(1))[0].row_id > old


async def test_priority_first_then_fifo(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite3") as buffer:
        low = buffer.enqueue(
            device_id="a",
            class_name="bulk",
            topic="t",
            qos=1,
            payload=b"low",
            ingest_ms=1,
            priority=1,
        )
        high = buffer.enqueue(
            device_id="a",
            class_name="event",
            topic="t",
            qos=1,
            payload=b"high",
            ingest_ms=2,
            priority=9,
        )
        await asyncio.gather(low, high)
        assert [m.payload for m in await buffer.lease(10)] == [b"high", b"low"]


async def test_full_buffer_withholds_commit_until_rows_are_released(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite3", max_rows=100) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 100))
        blocked = _enqueue(buffer, "a", 5)
        async with asyncio.timeout(5):
            await buffer.enqueue_marker()  # the committer ran a full cycle since
        assert not any(f.done() for f in blocked)
        assert buffer.is_full
        await buffer.release(await buffer.lease(10))
        async with asyncio.timeout(5):
            await asyncio.gather(*blocked)
        assert buffer.stats.rows == 95


async def test_registry_records_devices(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite3") as buffer:
        buffer.device_connected("dev-1", "127.0.0.1:5000")
        buffer.device_info("dev-1", device_type="thermo", firmware_version="1.2.3")
        await buffer.enqueue_marker()
        (device,) = await buffer.devices()
        assert device.connected
        assert device.peer == "127.0.0.1:5000"
        assert (device.device_type, device.firmware_version) == ("thermo", "1.2.3")
        buffer.device_disconnected("dev-1")
        await asyncio.gather(*_enqueue(buffer, "dev-2", 1))
        devices = {d.device_id: d for d in await buffer.devices()}
        assert not devices["dev-1"].connected
        assert devices["dev-2"].first_seen_ms <= devices["dev-2"].last_seen_ms


async def test_refuses_a_file_that_is_not_a_buffer(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BufferCorruptError, match="refusing to start"):
        await Buffer(garbage).open()
    assert garbage.read_bytes() == b"this is not sqlite" * 100  # never recreated silently

    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE x (y)")
    with pytest.raises(BufferCorruptError, match="not a tidegate buffer"):
        await Buffer(foreign).open()


async def test_refuses_a_damaged_buffer(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    async with Buffer(path) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 2000))
    data = bytearray(path.read_bytes())
    data[8192:12288] = b"\xa5" * 4096  # trash pages in the middle of the file
    path.write_bytes(bytes(data))
    with pytest.raises(BufferCorruptError):
        await Buffer(path).open()
