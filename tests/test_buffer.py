"""The SQLite buffer, on real files: durability settings, group commit, ids, bounds and
policies, expiry, retransmission dedup, dead letters, migration, corruption."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from edge.buffer import Buffer
from edge.buffer_sql import _lookup_statement, insert_rows, remembered_keys
from edge.ingest import InboundPublish
from edge.intake import Intake
from edge.lease_plan import plan_lease
from edge.registry import RegistryChanges
from edge.routing import TopicRouter
from edge.schema import APPLICATION_ID, SCHEMA_V1, SCHEMA_VERSION
from gateway.config import BufferConfig, ClassConfig
from gateway.errors import BufferCorruptError, BufferFullError
from tests.harness import eventually

CLASSES = {
    "event": ClassConfig(kafka_topic="e", priority=8),
    "telemetry": ClassConfig(kafka_topic="t", priority=5),
    "bulk": ClassConfig(kafka_topic="b", priority=2),
    "lossy_old": ClassConfig(kafka_topic="lo", priority=1, lossy=True, on_full="drop_oldest"),
    "lossy_new": ClassConfig(kafka_topic="ln", priority=1, lossy=True, on_full="drop_newest"),
    "ttl": ClassConfig(kafka_topic="x", priority=1, lossy=True, ttl_s=0.05),
}


def _buffer(path: Path, **limits: Any) -> Buffer:
    return Buffer(path, BufferConfig(**limits), CLASSES)


def _enqueue(
    buffer: Buffer,
    device: str,
    n: int,
    class_name: str = "event",
    *,
    qos: int = 1,
    payload: bytes | None = None,
    **extra: Any,
) -> list[asyncio.Future[None]]:
    return [
        buffer.enqueue(
            device_id=device,
            class_name=class_name,
            topic=f"d/{device}/up/{class_name}",
            qos=qos,
            payload=payload if payload is not None else f"{device}-{i}".encode(),
            ingest_ms=1_000 + i,
            priority=5,
            **extra,
        )
        for i in range(n)
    ]


def _envelope(seq: int, msg_id: str, **more: Any) -> bytes:
    return cbor2.dumps({"msg_id": msg_id, "seq": seq, "ts": 0, "body": b"x" * 10, **more})


async def _settle(buffer: Buffer) -> None:
    """The committer ran a full cycle after everything enqueued so far."""
    async with asyncio.timeout(5):
        await buffer.enqueue_marker()


async def test_runs_with_wal_and_synchronous_full(tmp_path: Path) -> None:
    async with _buffer(tmp_path / "b.sqlite3") as buffer:
        assert buffer.stats.journal_mode == "WAL"
        assert buffer.stats.synchronous == "FULL"


async def test_concurrent_publishes_share_commits_and_keep_order(tmp_path: Path) -> None:
    async with _buffer(tmp_path / "b.sqlite3") as buffer:
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
    async with _buffer(tmp_path / "b.sqlite3") as buffer:
        async with asyncio.timeout(1):
            await _enqueue(buffer, "a", 1)[0]
        assert buffer.stats.commits == 1


async def test_commit_linger_lets_a_trickle_share_one_commit(tmp_path: Path) -> None:
    """With ``commit_linger_ms``, publishes arriving within the linger share the first
    one's commit, and none is acknowledged before the linger has passed."""
    async with _buffer(tmp_path / "b.sqlite3", commit_linger_ms=50) as buffer:
        await _settle(buffer)  # the committer is idle, waiting for work
        before = buffer.stats.commits
        loop = asyncio.get_running_loop()
        started = loop.time()
        acked: list[float] = []
        first = _enqueue(buffer, "a", 1)[0]
        first.add_done_callback(lambda _f: acked.append(loop.time() - started))
        later = [f for i in range(3) for f in _enqueue(buffer, f"b{i}", 1)]
        async with asyncio.timeout(5):
            await asyncio.gather(first, *later)
        assert buffer.stats.commits == before + 1
        assert buffer.stats.rows_committed == 4
        assert acked[0] >= 0.05  # no PUBACK before the linger (0: about 1 ms)


async def test_ids_never_reused_after_drain_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    async with _buffer(path) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 3))
        first = await buffer.lease(10)
        await buffer.release(first)
        assert buffer.stats.rows == 0
        await asyncio.gather(*_enqueue(buffer, "a", 1))
        second = await buffer.lease(10)
        assert second[0].row_id > first[-1].row_id
        await buffer.release(second)
    async with _buffer(path) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 1))
        third = await buffer.lease(10)
        assert third[0].row_id > second[0].row_id


async def test_recreated_file_does_not_repeat_ids(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    async with _buffer(path) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 1))
        old = (await buffer.lease(1))[0].row_id
    for leftover in tmp_path.glob("b.sqlite3*"):
        leftover.unlink()
    async with _buffer(path) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 1))
        assert (await buffer.lease(1))[0].row_id > old


# ------------------------------------------------------------- priorities, fairness


def test_plan_lease_priority_first_with_a_guaranteed_share() -> None:
    priority = {"event": 8, "telemetry": 5, "bulk": 2}
    plan = plan_lease({"event": 10_000, "telemetry": 10_000, "bulk": 10_000}, priority, 1000, 0.1)
    assert plan == {"event": 800, "telemetry": 100, "bulk": 100}
    # Unused share flows to the next class by priority.
    assert plan_lease({"event": 50, "telemetry": 10_000}, priority, 1000, 0.1) == {
        "event": 50,
        "telemetry": 950,
    }
    assert plan_lease({"bulk": 5}, priority, 1000, 0.1) == {"bulk": 5}
    assert plan_lease({}, priority, 1000, 0.1) == {}
    # No share configured: strict priority.
    assert plan_lease({"event": 10_000, "bulk": 10}, priority, 100, 0.0) == {"event": 100}


async def test_events_overtake_older_telemetry_which_still_progresses(tmp_path: Path) -> None:
    async with _buffer(tmp_path / "b.sqlite3", lease_min_share=0.1) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 300, "telemetry"))
        await asyncio.gather(*_enqueue(buffer, "a", 300, "event"))
        batch = await buffer.lease(100)
        classes = [m.class_name for m in batch]
        assert classes.count("event") == 90
        assert classes.count("telemetry") == 10
        telemetry = [m.payload for m in batch if m.class_name == "telemetry"]
        assert telemetry == [f"a-{i}".encode() for i in range(10)]  # FIFO inside a class


# ------------------------------------------------------------------ bounds, policies


async def test_full_buffer_blocks_then_resumes_when_rows_are_released(tmp_path: Path) -> None:
    async with _buffer(tmp_path / "b.sqlite3", max_rows=100) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 100))
        blocked = _enqueue(buffer, "a", 5)
        await _settle(buffer)
        assert not any(f.done() for f in blocked)
        assert buffer.is_full
        await buffer.release(await buffer.lease(10))
        async with asyncio.timeout(5):
            await asyncio.gather(*blocked)
        assert buffer.stats.rows == 95
        assert not buffer.is_full


async def test_blocked_device_is_disconnected_after_block_timeout(tmp_path: Path) -> None:
    async with _buffer(tmp_path / "b.sqlite3", max_rows=100, block_timeout_s=0.3) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 100))
        (blocked,) = _enqueue(buffer, "late", 1)
        with pytest.raises(BufferFullError, match="disconnecting late"):
            async with asyncio.timeout(5):
                await blocked
        assert buffer.stats.block_disconnects == 1
        assert buffer.stats.rows == 100  # nothing stored, nothing lost: it was never acked


async def test_lossy_classes_drop_by_policy_and_record_it(tmp_path: Path) -> None:
    async with _buffer(tmp_path / "b.sqlite3", max_rows=100) as buffer:
        olds = [
            buffer.enqueue(
                device_id="s",
                class_name="lossy_old",
                topic="d/s/up/lossy_old",
                qos=1,
                payload=_envelope(i, f"s:{i}"),
                ingest_ms=i,
                priority=1,
                msg_id=f"s:{i}",
            )
            for i in range(1, 101)
        ]
        await asyncio.gather(*olds)
        # Full: drop_oldest evicts the oldest row of its class to store the new one.
        newer = buffer.enqueue(
            device_id="s",
            class_name="lossy_old",
            topic="d/s/up/lossy_old",
            qos=1,
            payload=_envelope(101, "s:101"),
            ingest_ms=101,
            priority=1,
            msg_id="s:101",
        )
        # drop_newest and QoS0 are dropped on arrival (acknowledged: the operator chose it).
        (dropped_new,) = _enqueue(buffer, "n", 1, "lossy_new")
        (dropped_q0,) = _enqueue(buffer, "q", 1, "event", qos=0)
        async with asyncio.timeout(5):
            await asyncio.gather(newer, dropped_new, dropped_q0)
        # The new envelope is a few bytes longer than the oldest: two rows make room.
        assert buffer.stats.rows == 99
        rows = await buffer.lease(200)
        assert rows[0].msg_id == "s:3"
        assert rows[-1].msg_id == "s:101"
        drops = await buffer.list_drops()
        assert [(d.reason, d.msg_id, d.seq) for d in drops] == [
            ("buffer full: drop_oldest", "s:1", 1),
            ("buffer full: drop_oldest", "s:2", 2),
            ("buffer full: drop_newest", None, None),
            ("buffer full: qos0", None, None),
        ]
        assert drops[0].message_id is not None
        assert buffer.stats.dropped == {
            "buffer full: drop_oldest": 2,
            "buffer full: drop_newest": 1,
            "buffer full: qos0": 1,
        }


async def test_disk_full_stops_acks_without_corruption_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    payload = b"p" * 8000
    async with _buffer(path, max_file_bytes=1 << 20, max_bytes=1 << 30) as buffer:
        stored = 0
        stuck: asyncio.Future[None] | None = None
        for _ in range(400):  # bounded: the 1 MiB cap is hit long before
            (future,) = _enqueue(buffer, "a", 1, payload=payload)
            done, _ = await asyncio.wait([future], timeout=2)
            if not done:
                stuck = future
                break
            stored += 1
        assert stuck is not None, "the 1 MiB file cap was never hit"
        assert buffer.stats.disk_full
        assert stored > 50
        await buffer.release(await buffer.lease(20))
        async with asyncio.timeout(10):
            await stuck  # acknowledged once there is room again
        assert not buffer.stats.disk_full
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM uplink").fetchone() == (stored - 20 + 1,)


# -------------------------------------------------------------------------- expiry


async def test_expired_messages_of_lossy_classes_are_dropped_and_recorded(
    tmp_path: Path,
) -> None:
    async with _buffer(tmp_path / "b.sqlite3") as buffer:
        now = time.time_ns() // 1_000_000
        futures = [
            buffer.enqueue(
                device_id="t",
                class_name="ttl",
                topic="d/t/up/ttl",
                qos=1,
                payload=_envelope(i, f"t:{i}"),
                ingest_ms=now,
                priority=1,
                expires_ms=now - 1 if i < 3 else now + 60_000,
                msg_id=f"t:{i}",
            )
            for i in range(1, 5)
        ]
        await asyncio.gather(*futures)
        rows = await buffer.lease(10)
        assert [m.msg_id for m in rows] == ["t:3", "t:4"]
        drops = await buffer.list_drops()
        assert [(d.msg_id, d.seq, d.reason) for d in drops] == [
            ("t:1", 1, "expired"),
            ("t:2", 2, "expired"),
        ]


# ------------------------------------------------------------------ retransmissions


async def test_retransmission_is_stored_once(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    async with _buffer(path) as buffer:
        (first,) = _enqueue(buffer, "a", 1, payload=b"\x00opaque", dedup_keys=(("p7", "7:abcd"),))
        await first
    # After a crash the device resends with DUP: same packet id and content.
    async with _buffer(path) as buffer:
        (again,) = _enqueue(
            buffer, "a", 1, payload=b"\x00opaque", dedup_keys=(("p7", "7:abcd"),), check_dedup=True
        )
        (other,) = _enqueue(
            buffer, "a", 1, payload=b"\x00other", dedup_keys=(("p8", "8:ef01"),), check_dedup=True
        )
        await asyncio.gather(again, other)
        assert buffer.stats.duplicates_suppressed == 1
        assert [m.payload for m in await buffer.lease(10)] == [b"\x00opaque", b"\x00other"]


def _intake(buffer: Buffer) -> Intake:
    return Intake(buffer, TopicRouter("d/{device_id}/up/{class}", CLASSES), CLASSES)


def _inbound(device: str, packet_id: int, payload: bytes, *, dup: bool = False) -> InboundPublish:
    topic = f"d/{device}/up/telemetry"
    return InboundPublish(device, topic, 1, False, payload, time.time(), packet_id, dup)


async def _remembered_slots(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT device_id, slot FROM inbound_dedup ORDER BY 1, 2").fetchall()


async def test_an_envelope_with_seq_remembers_one_key_and_other_payloads_the_packet_id(
    tmp_path: Path,
) -> None:
    """Every remembered key is a random page rewritten in the commit: an envelope with a
    seq needs only its seq slot (edge/intake.py); opaque payloads and envelopes without seq
    keep the packet-id ring."""
    path = tmp_path / "b.sqlite3"
    async with _buffer(path) as buffer:
        intake = _intake(buffer)
        no_seq = cbor2.dumps({"msg_id": "n-1", "body": b"x"})
        async with asyncio.timeout(10):
            await asyncio.gather(
                intake.submit(_inbound("env", 5, _envelope(70, "env-70"))),
                intake.submit(_inbound("opaque", 6, b"\x00raw")),
                intake.submit(_inbound("noseq", 7, no_seq)),
            )
        slots = await _remembered_slots(path)
    hashed = [slot for device, slot in slots if device == "noseq" and slot.startswith("m")]
    assert [s for s in slots if s[0] != "noseq"] == [("env", "mtelemetry:6"), ("opaque", "p6")]
    assert ("noseq", "p7") in slots
    assert len(hashed) == 1


async def test_dup_resends_of_a_full_window_of_envelopes_are_all_recognised(
    tmp_path: Path,
) -> None:
    """64 envelopes in flight, the gateway restarts before any PUBACK: every DUP resend is
    recognised by its seq slot alone, as the packet-id ring did (it held 64 too)."""
    path = tmp_path / "b.sqlite3"
    window = [(seq, 100 + seq, _envelope(seq, f"w-{seq}")) for seq in range(1000, 1064)]
    async with _buffer(path) as buffer:
        intake = _intake(buffer)
        async with asyncio.timeout(10):
            await asyncio.gather(*(intake.submit(_inbound("w", p, b)) for _, p, b in window))
    async with _buffer(path) as buffer:
        intake = _intake(buffer)
        async with asyncio.timeout(10):
            await asyncio.gather(
                *(intake.submit(_inbound("w", p, b, dup=True)) for _, p, b in window)
            )
            await intake.submit(_inbound("w", 200, _envelope(1064, "w-1064")))
        assert buffer.stats.duplicates_suppressed == 64
        leased = await buffer.lease(200)
    assert [m.msg_id for m in leased] == [f"w-{seq}" for seq in range(1000, 1065)]


async def test_a_group_commit_takes_a_few_statements_whatever_its_size(tmp_path: Path) -> None:
    """A commit runs in aiosqlite's thread beside a busy event loop, and every SQLite step
    gives up the GIL and waits to get it back: rows, dedup keys and their lookups go in a
    few multi-row statements, not one step per row (edge/buffer_sql.py). Duplicates are
    still found, and rows keep their order."""
    devices = [f"dev-{i:03d}" for i in range(150)]

    def publish(buffer: Buffer, device: str, seq: int) -> asyncio.Future[None]:
        msg_id = f"{device}:{seq}"
        return buffer.enqueue(
            device_id=device,
            class_name="telemetry",
            topic=f"d/{device}/up/telemetry",
            qos=1,
            payload=_envelope(seq, msg_id),
            ingest_ms=1_000 + seq,
            priority=5,
            msg_id=msg_id,
            dedup_keys=((f"mtelemetry:{seq % 32}", msg_id), (f"p{seq % 64}", f"{seq}:x")),
            check_dedup=True,
        )

    async with _buffer(tmp_path / "b.sqlite3") as buffer:
        async with asyncio.timeout(10):
            await asyncio.gather(*(publish(buffer, d, 1) for d in devices))
        statements: list[str] = []
        await buffer.in_thread(lambda conn: conn.set_trace_callback(statements.append))
        commits = buffer.stats.commits
        # 20 devices resend seq 1 (lost PUBACKs); every device sends seq 2 and 3.
        futures = [publish(buffer, d, 1) for d in devices[:20]]
        futures += [publish(buffer, d, seq) for seq in (2, 3) for d in devices]
        async with asyncio.timeout(10):
            await asyncio.gather(*futures)
        await buffer.in_thread(lambda conn: conn.set_trace_callback(None))
        commits = buffer.stats.commits - commits
        assert buffer.stats.duplicates_suppressed == 20
        assert buffer.stats.rows == 3 * len(devices)
        # 320 publishes, 640 keys, 150 devices seen: ~35 statements, not ~1,200 row steps.
        assert len(statements) <= 50 * commits, (commits, len(statements))
        rows = await buffer.lease(1000)
        for device in devices[:3]:
            assert [m.msg_id for m in rows if m.device_id == device] == [
                f"{device}:{seq}" for seq in (1, 2, 3)
            ]


def test_multi_row_inserts_and_key_lookups_match_row_by_row() -> None:
    """insert_rows stores what executemany stores, in the same order (the same ids), and
    remembered_keys finds what a lookup per pair finds, for any batch size and any text."""
    rng = random.Random(3)
    dedup = (
        "CREATE TABLE inbound_dedup (device_id TEXT NOT NULL, slot TEXT NOT NULL,"
        " fingerprint TEXT NOT NULL, seen_ms INTEGER NOT NULL, PRIMARY KEY (device_id, slot))"
        " WITHOUT ROWID"
    )
    for _ in range(60):
        one_by_one, batched = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
        for conn in (one_by_one, batched):
            conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, x TEXT, y BLOB)")
            conn.execute(dedup)
        rows = [
            (f"x{rng.random()}", rng.randbytes(rng.randrange(5))) for _ in range(rng.randrange(300))
        ]
        one_by_one.executemany("INSERT INTO t (x, y) VALUES (?, ?)", rows)
        insert_rows(batched, "INSERT INTO t (x, y) VALUES", rows)
        table = "SELECT * FROM t ORDER BY id"
        assert batched.execute(table).fetchall() == one_by_one.execute(table).fetchall()
        keys = [
            (f"d{rng.randrange(20)}é\"'", f"s{rng.randrange(10)}", f"fp{rng.random()}\n\\", 0)
            for _ in range(rng.randrange(200))
        ]  # (repeats: the last one of a pair wins, as with executemany)
        one_by_one.executemany("INSERT OR REPLACE INTO inbound_dedup VALUES (?, ?, ?, ?)", keys)
        insert_rows(batched, "INSERT OR REPLACE INTO inbound_dedup VALUES", keys)
        table = "SELECT * FROM inbound_dedup ORDER BY 1, 2"
        assert batched.execute(table).fetchall() == one_by_one.execute(table).fetchall()
        pairs = sorted(
            {(f"d{rng.randrange(25)}é\"'", f"s{rng.randrange(12)}") for _ in range(1100)}
        )
        stored = {(d, s): f for d, s, f, _ in one_by_one.execute(table)}
        assert remembered_keys(batched, pairs) == {p: stored[p] for p in pairs if p in stored}
    # One primary-key search per pair: a lookup that scanned the table was once most of the
    # gateway's CPU at 1,000 msg/s (docs/benchmarks.md, "Hot path work").
    plan = batched.execute("EXPLAIN QUERY PLAN " + _lookup_statement(4), ["x"] * 8).fetchall()
    steps = [row[-1] for row in plan]
    assert any(s.startswith("SEARCH d USING PRIMARY KEY") for s in steps), steps  # d: the table
    assert not any(s.startswith("SCAN d") for s in steps), steps


# --------------------------------------------------------------------- dead letters


async def test_dead_letters_keep_their_id_and_can_be_replayed_or_purged(tmp_path: Path) -> None:
    async with _buffer(tmp_path / "b.sqlite3", keep_forwarded_dead_letters=True) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 3))
        rows = await buffer.lease(10)
        await buffer.dead_letter(rows[:2], "too large for Kafka")
        assert buffer.stats.rows == 1
        dead = await buffer.list_dead_letters()
        assert [(d.row_id, d.reason) for d in dead] == [
            (rows[0].row_id, "too large for Kafka"),
            (rows[1].row_id, "too large for Kafka"),
        ]
        assert [d.row_id for d in await buffer.lease_dead_letters(10)] == [d.row_id for d in dead]
        await buffer.dead_letters_forwarded([dead[0].row_id])
        assert [d.row_id for d in await buffer.lease_dead_letters(10)] == [dead[1].row_id]
        assert await buffer.replay_dead_letters([dead[1].row_id]) == 1
        assert sorted(m.row_id for m in await buffer.lease(10)) == sorted(
            [rows[1].row_id, rows[2].row_id]
        )
        assert await buffer.purge_dead_letters(None) == 1
        assert await buffer.list_dead_letters() == []


async def test_a_release_deletes_exactly_the_released_rows(tmp_path: Path) -> None:
    """A release deletes a class's rows by id range when the range holds only them
    (edge/buffer.py, _delete_class_rows); every other row in that range must survive: one
    that was not released, a dead letter replayed into the range, another class's rows."""
    async with _buffer(tmp_path / "b.sqlite3", lease_min_share=0.5) as buffer:
        enqueued = []
        for i in range(50):  # ids alternate between the two classes
            enqueued += _enqueue(buffer, "a", 1, payload=b"a%d" % i)
            enqueued += _enqueue(buffer, "b", 1, "telemetry", payload=b"b%d" % i)
        await asyncio.gather(*enqueued)
        leased = await buffer.lease(100)
        events = [m for m in leased if m.class_name == "event"]
        assert len(events) == 50
        assert events[-1].row_id - events[0].row_id == 98  # telemetry rows in between
        kept = events[10]
        replayed = events[30]
        await buffer.dead_letter([replayed], "test")
        assert await buffer.replay_dead_letters([replayed.row_id]) == 1
        await buffer.release([m for m in events if m not in (kept, replayed)])
        rest = await buffer.lease(100)
        assert sorted(m.row_id for m in rest if m.class_name == "event") == [
            kept.row_id,
            replayed.row_id,
        ]
        assert sum(m.class_name == "telemetry" for m in rest) == 50
        await buffer.release(rest)  # whole ranges of both classes
        assert buffer.stats.rows == 0
    with sqlite3.connect(tmp_path / "b.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM uplink").fetchone() == (0,)


# ------------------------------------------------------------------------ migration


async def test_a_version_1_buffer_is_migrated_without_loss(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    with sqlite3.connect(path) as db:
        for statement in SCHEMA_V1:
            db.execute(statement)
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute("PRAGMA user_version=1")
        db.executemany(
            "INSERT INTO uplink (device_id, class, topic, qos, payload, ingest_ms, priority)"
            " VALUES (?, 'event', 'd/x/up/event', 1, ?, 1, 8)",
            [("x", f"v1-{i}".encode()) for i in range(50)],
        )
    db.close()
    async with _buffer(path) as buffer:
        rows = await buffer.lease(100)
        assert [m.payload for m in rows] == [f"v1-{i}".encode() for i in range(50)]
        await buffer.release(rows)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite3"
    async with _buffer(path):
        pass
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(BufferCorruptError, match="newer tidegate"):
        await _buffer(path).open()


# ------------------------------------------------------------------- registry, files


async def test_registry_records_devices(tmp_path: Path) -> None:
    async with _buffer(tmp_path / "b.sqlite3") as buffer:
        buffer.device_connected("dev-1", "127.0.0.1:5000")
        buffer.device_info("dev-1", device_type="thermo", firmware_version="1.2.3")
        await buffer.enqueue_marker()
        (device,) = await buffer.devices()
        assert device.connected
        assert device.peer == "127.0.0.1:5000"
        assert (device.device_type, device.firmware_version) == ("thermo", "1.2.3")
        buffer.device_disconnected("dev-1")
        await asyncio.gather(*_enqueue(buffer, "dev-2", 1))
        await buffer.enqueue_marker()  # dev-2's last-seen alone waits for its interval
        devices = {d.device_id: d for d in await buffer.devices()}
        assert not devices["dev-1"].connected
        assert devices["dev-2"].first_seen_ms <= devices["dev-2"].last_seen_ms


async def test_last_seen_alone_waits_for_its_interval_connects_do_not(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    async with _buffer(path, registry_seen_interval_ms=60_000) as buffer:
        await asyncio.gather(*_enqueue(buffer, "dev-quiet", 3))
        assert await buffer.devices() == []  # committed rows, last-seen not yet due
        buffer.device_connected("dev-new", "127.0.0.1:5001")
        await asyncio.gather(*_enqueue(buffer, "dev-quiet", 1))
        assert [d.device_id for d in await buffer.devices()] == ["dev-new"]
        await buffer.enqueue_marker()  # a barrier makes the whole registry durable
        assert [d.device_id for d in await buffer.devices()] == ["dev-new", "dev-quiet"]
        await asyncio.gather(*_enqueue(buffer, "dev-late", 1))
    async with _buffer(path) as buffer:  # close wrote what was pending
        devices = {d.device_id: d for d in await buffer.devices()}
        assert set(devices) == {"dev-new", "dev-quiet", "dev-late"}
        assert devices["dev-quiet"].last_seen_ms == 1_002  # the latest of its four publishes


async def test_last_seen_is_written_when_due_without_more_traffic(tmp_path: Path) -> None:
    async with _buffer(tmp_path / "b.sqlite3", registry_seen_interval_ms=50) as buffer:
        await asyncio.gather(*_enqueue(buffer, "dev-1", 1))

        async def registered() -> bool:
            return [d.device_id for d in await buffer.devices()] == ["dev-1"]

        await eventually(registered, "the last-seen time written once due", 10.0)


def test_registry_changes_take_urgent_now_and_last_seen_when_due() -> None:
    changes = RegistryChanges(seen_interval_s=3600)
    changes.seen("dev-1", 10)
    assert changes.device_ids() == ["dev-1"]
    assert not changes.due()
    assert not changes.take()
    changes.disconnected("dev-2", 11)
    assert changes.due()
    assert changes.take().device_ids() == ["dev-2"]
    assert not changes.due()
    assert changes.take(everything=True).device_ids() == ["dev-1"]
    changes.info("dev-3", "thermo", "1.0", 12)
    changes.put_back(changes.take())  # a failed commit keeps its urgent changes urgent
    assert changes.due()
    assert changes.take().device_ids() == ["dev-3"]
    due_at_once = RegistryChanges(seen_interval_s=0)
    due_at_once.seen("dev-1", 10)
    assert due_at_once.due()
    assert due_at_once.take().device_ids() == ["dev-1"]


async def test_refuses_a_file_that_is_not_a_buffer(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BufferCorruptError, match="refusing to start"):
        await _buffer(garbage).open()
    assert garbage.read_bytes() == b"this is not sqlite" * 100  # never recreated silently

    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE x (y)")
    db.close()
    with pytest.raises(BufferCorruptError, match="not a tidegate buffer"):
        await _buffer(foreign).open()


async def test_refuses_a_damaged_buffer_and_says_how_to_recover(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    async with _buffer(path) as buffer:
        await asyncio.gather(*_enqueue(buffer, "a", 2000))
    data = bytearray(path.read_bytes())
    data[8192:12288] = b"\xa5" * 4096  # trash pages in the middle of the file
    path.write_bytes(bytes(data))
    with pytest.raises(BufferCorruptError, match=r"\.recover"):
        await _buffer(path).open()


async def test_bookkeeping_that_fills_a_capped_file_yields_to_data(tmp_path: Path) -> None:
    """Retransmission memory filling the file while the queue is empty must not wedge acks."""
    now = time.time_ns() // 1_000_000
    async with _buffer(tmp_path / "b.sqlite3", max_file_bytes=1 << 20) as buffer:
        n = 0
        for size in (500, 50, 5, 1):  # fill the 1 MiB cap to the last page, bounded
            for _ in range(300):
                try:
                    async with buffer.transaction() as db:
                        await db.executemany(
                            "INSERT INTO inbound_dedup (device_id, slot, fingerprint, seen_ms)"
                            " VALUES (?, ?, ?, ?)",
                            [(f"d{n + i}", "p0", "x" * 40, now) for i in range(size)],
                        )
                    n += size
                except sqlite3.OperationalError as exc:
                    if "full" not in str(exc):
                        raise
                    break
        (first,) = _enqueue(buffer, "a", 1, payload=b"y" * 9000)
        async with asyncio.timeout(10):
            await first
        assert buffer.stats.commit_failures >= 1  # it was full ...
        assert not buffer.stats.disk_full  # ... and recovered without any row released


async def test_in_thread_runs_on_aiosqlite_worker_under_the_lock_and_release_is_relaxed(
    tmp_path: Path,
) -> None:
    """Pins the aiosqlite seams BufferCore.in_thread relies on (``_execute``, ``_conn``):
    the work runs in aiosqlite's own thread on its connection, one call at a time, and a
    release in at-least-once mode leaves the connection at synchronous=FULL afterwards."""
    import threading

    async with _buffer(tmp_path / "b.sqlite3") as buffer:
        main = threading.get_ident()
        ident, value = await buffer.in_thread(
            lambda conn: (threading.get_ident(), conn.execute("SELECT 41 + 1").fetchone()[0])
        )
        assert ident != main
        assert value == 42
        await asyncio.gather(*_enqueue(buffer, "d1", 5))
        leased = await buffer.lease(10)
        assert [m.device_id for m in leased] == ["d1"] * 5
        await buffer.release(leased)
        assert buffer.stats.rows == 0
        assert buffer.stats.oldest_ingest_ms is None
        level = await buffer.in_thread(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        assert level == 2  # FULL again for the next ingest commit


async def test_a_lease_reads_beside_the_writer_and_drop_oldest_spares_what_it_reads(
    tmp_path: Path,
) -> None:
    """Leases read on their own connection, so a lease does not queue behind commits; while
    one reads, drop-oldest takes none of that class's rows (the reader's snapshot may hold
    them): the new message is dropped instead, and every leased row is still stored."""
    async with _buffer(tmp_path / "b.sqlite3", max_rows=100) as buffer:
        await asyncio.gather(*_enqueue(buffer, "s", 100, "lossy_old", payload=b"s"))
        reading, go_on = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def hold_reader(_: sqlite3.Connection) -> None:
            loop.call_soon_threadsafe(reading.set)
            asyncio.run_coroutine_threadsafe(go_on.wait(), loop).result(timeout=10)

        held = asyncio.ensure_future(buffer.read_in_thread(hold_reader))
        async with asyncio.timeout(5):
            await reading.wait()
        lease = asyncio.ensure_future(buffer.lease(5))  # queued behind the held reader
        await eventually(
            lambda: buffer.in_flight_mark("lossy_old") >= 2**62, "the lease to mark its class", 5
        )
        # The writer is not held up by the reader: this commit completes meanwhile.
        (newer,) = _enqueue(buffer, "s", 1, "lossy_old", payload=b"x")
        async with asyncio.timeout(5):
            await newer
        assert not lease.done()
        go_on.set()
        async with asyncio.timeout(5):
            await held
            rows = await lease
        assert len(rows) == 5
        assert buffer.in_flight_mark("lossy_old") == rows[-1].row_id
        assert buffer.stats.dropped == {"buffer full: drop_oldest": 1}
        assert buffer.stats.rows == 100  # nothing of the class was evicted under the lease
        # With the lease done, drop-oldest evicts again: the oldest row not in flight.
        (later,) = _enqueue(buffer, "s", 1, "lossy_old", payload=b"y")
        async with asyncio.timeout(5):
            await later
        assert buffer.stats.dropped == {"buffer full: drop_oldest": 2}
        stored = await buffer.lease(200)
        assert stored[:5] == rows
        assert stored[5].row_id > rows[-1].row_id + 1  # the sixth row was evicted
        assert [r.payload for r in stored][-1] == b"y"
        assert b"x" not in [r.payload for r in stored]


async def test_the_wal_is_checkpointed_beside_the_commits(tmp_path: Path) -> None:
    """With ``checkpoint_interval_ms`` the log is copied into the database file by the
    background checkpointer long before the writer's own checkpoint (2,000 pages) would run
    inside a commit; with 0, SQLite's own checkpoint (1,000 pages) is left as it was."""
    path = tmp_path / "b.sqlite3"
    async with _buffer(path, checkpoint_interval_ms=10) as buffer:
        pages = await buffer.in_thread(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone())
        assert pages == (2000,)
        size_before = path.stat().st_size
        for i in range(20):  # 20 small commits: a few dozen log frames, far below 2,000
            await asyncio.gather(*_enqueue(buffer, f"d{i}", 3, payload=bytes(2000)))
        # The file grows while the checkpoint is still running in its thread; the counter
        # moves only once it returned, so wait for both (CI once saw the size first).
        await eventually(
            lambda: (
                path.stat().st_size > size_before and buffer.wal_status().get("checkpoints", 0) >= 1
            ),
            "the rows copied into the file by a finished checkpoint",
            5,
        )
        wal = buffer.wal_status()
        assert wal["background_checkpoints"] is True
        assert wal["failures"] == 0
        assert 0 < wal["max_log_frames"] < 2000
        assert buffer.stats.rows == 60
    async with _buffer(path, checkpoint_interval_ms=0) as buffer:
        pages = await buffer.in_thread(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone())
        assert pages == (1000,)
        assert buffer.wal_status() == {"background_checkpoints": False}
        assert len(await buffer.lease(100)) == 60


async def test_a_failing_background_checkpoint_is_counted_not_raised(tmp_path: Path) -> None:
    """The checkpointer never takes the buffer down: the writer's own checkpoint stands in."""
    from edge.wal_checkpoint import WalCheckpointer

    path = tmp_path / "b.sqlite3"
    async with _buffer(path):  # creates the file in WAL mode
        pass
    checkpointer = WalCheckpointer(path, interval_s=0.01)
    await checkpointer.start()
    await checkpointer.checkpoint()
    assert (checkpointer.stats.checkpoints, checkpointer.stats.failures) == (1, 0)
    assert checkpointer._conn is not None
    await checkpointer._conn.close()  # the connection gone under it
    await checkpointer.checkpoint()
    assert (checkpointer.stats.checkpoints, checkpointer.stats.failures) == (1, 1)
    await checkpointer.close()
