"""The send worker: a backlog goes out from a child process (bridge/send_worker.py).

Real gateway, real Kafka over mTLS, real SQLite. Each test holds the backlog behind a
topic that does not exist yet, so the child is started (and declines the batches it cannot
send) before anything drains: the drain that follows goes through it, whatever the
machine's speed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from array import array
from pathlib import Path
from typing import Any

import pytest

from bench.drain import fill_backlog
from bridge import send_worker
from bridge.producer import PreparedSend, SendOutcome
from bridge.records import RecordBuilder, RecordRow
from bridge.send_worker import SendWorker
from edge.buffer import Buffer
from gateway.config import BufferConfig, ClassConfig, KafkaConfig
from gateway.dev.kafka import KafkaState, create_topics
from gateway.errors import KafkaUnavailableError
from tests.fixtures_kafka import topic_name_for
from tests.harness import GatewayProcess, read_topics, running_gateway, write_gateway_config
from tests.harness import kafka_tls as _tls


def _row_ids(records: list[Any]) -> list[int]:
    return [int(r.headers["tg-message-id"].split(b":")[1]) for r in records]


def _first_occurrences_in_order(records: list[Any]) -> bool:
    """Per device, row ids in Kafka order with repeats dropped are increasing (a resend
    after a crash may repeat a tail, never reorder)."""
    seen: set[int] = set()
    last: dict[bytes | None, int] = {}
    for record, row_id in zip(records, _row_ids(records), strict=True):
        if row_id in seen:
            continue
        seen.add(row_id)
        if row_id < last.get(record.key, -1):
            return False
        last[record.key] = row_id
    return True


# One child (the default) reads the leased rows from the buffer file itself (spans); two
# split each batch between them by device, so the gateway reads the rows and hands them over.
CHILDREN = pytest.mark.parametrize("children", [1, 2], ids=["one-child-spans", "two-children"])


def _held_backlog(
    tmp_path: Path, kafka: KafkaState, topic: str, rows: int, devices: int, *, children: int
) -> Path:
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"telemetry": topic},
        extra="[buffer]\nlease_batch = 500\n",
        kafka_extra=f"send_workers = {children}\n",
    )
    (tmp_path / "data").mkdir()
    fill_backlog(tmp_path / "data" / "buffer.sqlite3", rows, devices)
    return config


def _wait_worker_declining(gateway: GatewayProcess, children: int) -> dict[str, Any]:
    """The child runs and hands back the batches of the missing topic."""
    status = gateway.wait_status(
        lambda s: (s["kafka"]["send_worker"] or {}).get("declined", 0) >= 1,
        60,
        "the send worker started and declined a batch for the missing topic",
    )
    assert status["kafka"]["forwarded"] == 0
    worker: dict[str, Any] = status["kafka"]["send_worker"]
    assert worker["running"] == worker["children"] == children
    assert len(worker["pids"]) == children
    return worker


@pytest.mark.kafka
@CHILDREN
async def test_a_backlog_goes_out_from_the_send_worker_each_row_once_in_order(
    tmp_path: Path, kafka: KafkaState, request: pytest.FixtureRequest, children: int
) -> None:
    topic = topic_name_for(request.node.name, "telemetry")
    rows, devices = 40_000, 20
    held = functools.partial(_held_backlog, children=children)
    config = await asyncio.to_thread(held, tmp_path, kafka, topic, rows, devices)
    with running_gateway(config) as gateway:
        _wait_worker_declining(gateway, children)
        await asyncio.to_thread(create_topics, kafka, [topic], partitions=3)
        status = gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 120, "the drain")
    kafka_status = status["kafka"]
    worker = kafka_status["send_worker"]
    assert kafka_status["forwarded"] == rows
    # Every full batch after the topic appeared went from the child (the last, partial
    # lease of the backlog goes in-process; a batch may also go in-process before the
    # metadata of the new topic reached the child).
    assert worker["rows"] >= rows - 2 * 500, kafka_status
    assert worker["failed_batches"] == 0
    assert worker["starts"] == children
    if children == 1:  # the child read the rows: nearly every batch it sent was spans
        assert worker["span_batches"] >= worker["batches"] - 2, kafka_status
    else:
        assert worker["span_batches"] == 0, kafka_status
    assert kafka_status["releases_overlapped"] >= worker["batches"] // 2, kafka_status
    records = await read_topics(kafka.bootstrap, _tls(kafka), [topic])
    ids = _row_ids(records)
    first = min(ids)
    assert sorted(ids) == list(range(first, first + rows))  # each row once, none lost
    assert _first_occurrences_in_order(records)


@pytest.mark.kafka
@CHILDREN
async def test_a_send_worker_killed_mid_drain_loses_nothing_and_is_restarted(
    tmp_path: Path, kafka: KafkaState, request: pytest.FixtureRequest, children: int
) -> None:
    """SIGKILL of the child while it sends: the batch it had is not released, goes again
    (in-process, then from a new child), and every row reaches Kafka in per-device order."""
    topic = topic_name_for(request.node.name, "telemetry")
    rows, devices = 200_000, 50
    held = functools.partial(_held_backlog, children=children)
    config = await asyncio.to_thread(held, tmp_path, kafka, topic, rows, devices)
    with running_gateway(config) as gateway:
        pid = _wait_worker_declining(gateway, children)["pids"][0]
        await asyncio.to_thread(create_topics, kafka, [topic], partitions=3)
        sending = gateway.wait_status(
            lambda s: s["kafka"]["send_worker"]["rows"] > 0, 60, "the child sending"
        )
        os.kill(pid, signal.SIGKILL)
        left = gateway.status()["buffer"]["rows"]
        status = gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 120, "the drain")
        assert gateway.proc is not None
        assert gateway.proc.poll() is None  # the gateway did not go down with its child
    assert left > 0, f"the backlog drained before the kill ({sending['kafka']})"
    worker = status["kafka"]["send_worker"]
    assert worker["exits"] >= 1
    assert status["kafka"]["forwarded"] == rows
    records = await read_topics(kafka.bootstrap, _tls(kafka), [topic])
    ids = _row_ids(records)
    first = min(ids)
    assert set(ids) == set(range(first, first + rows))  # none lost (a resend may repeat)
    assert _first_occurrences_in_order(records)


async def test_a_child_that_cannot_start_leaves_sending_in_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child that dies at start is a warning, not an error: not ready, retried later."""
    monkeypatch.setattr(send_worker, "CHILD_MODULE", "bridge.no_such_module")
    kafka = KafkaConfig.model_construct(bootstrap_servers=["127.0.0.1:9"])  # never used
    builder = RecordBuilder(
        gateway_id="g", class_topics={}, content_types={}, dead_letter_topic="dlq"
    )
    now = [100.0]
    worker = SendWorker(kafka, builder, clock=lambda: now[0])
    try:
        worker.want()
        starting = worker._starting
        assert starting is not None
        await asyncio.wait_for(starting, 30)
        assert not worker.ready
        assert worker.stats.starts == 0
        assert worker.submit([], None, 1) is None
        worker.want()  # within the restart pause: no new attempt
        assert worker._starting is None
        now[0] += 60
        worker.want()
        assert worker._starting is not None
    finally:
        await worker.close()
    assert worker._children == []


class _FakeProducer:
    """Stands in for the child's Kafka producer (pure logic of the epoch rule only)."""

    def __init__(self) -> None:
        self.rebuilds = 0
        self.missing: set[str] = set()
        self.fail_next = False
        self.sent: list[list[bytes]] = []

    async def close(self, deadline: float) -> None:
        del deadline

    async def topic_state(self, topic: str) -> str:
        return "missing" if topic in self.missing else "ok"

    async def prepare(self, records: list[Any], *, yielding: bool = False) -> PreparedSend:
        return PreparedSend(records, [], {}, 0)

    async def send_prepared(self, prepared: PreparedSend) -> SendOutcome:
        self.sent.append([r.value for r in prepared.records])
        total = len(prepared.records)
        if self.fail_next:
            self.fail_next = False
            acked = [i < total // 2 for i in range(total)]
            return SendOutcome(acked, KafkaUnavailableError("refused"), False, [None] * total)
        return SendOutcome([True] * total, None, False, [None] * total)


def _rows(first: int, count: int) -> list[RecordRow]:
    return [
        (first + i, f"dev-{i % 2}", "telemetry", "d/x/up/telemetry", 1, b"%d" % (first + i), 0)
        for i in range(count)
    ]


async def test_a_failed_part_makes_the_child_decline_the_rest_of_its_epoch() -> None:
    """The gateway may ask for batch N+1 before it learns that N failed: the child must not
    send N+1 (its rows would overtake N's unacked ones). A fresh lease (new epoch) goes."""
    from bridge.send_worker_child import _Child

    kafka = KafkaConfig.model_construct(max_request_bytes=1 << 20)
    builder = RecordBuilder(
        gateway_id="g", class_topics={"telemetry": "t"}, content_types={}, dead_letter_topic="dlq"
    )
    child = _Child(kafka, builder)
    fake = _FakeProducer()
    child._producer = fake  # type: ignore[assignment]

    child.stage(1, _rows(1, 4))
    first = child.take(1)
    child.stage(2, _rows(5, 4))  # staged while the first is out, then asked for at once
    second = child.take(2)
    fake.fail_next = True
    answer = await child.send(first, epoch=7)
    assert answer[0] == "sent"
    assert answer[1] == [0, 1]  # dev-0 and dev-1 each acked their first row only
    assert answer[2] is not None
    assert await child.send(second, epoch=7) == (
        "declined",
        "an earlier part of this epoch failed",
    )
    assert len(fake.sent) == 1  # the second part never reached Kafka

    child.stage(3, _rows(3, 6))  # the gateway's fresh lease: from the oldest unreleased row
    assert (await child.send(child.take(3), epoch=8))[:2] == ("sent", list(range(6)))

    # A decline (a missing topic) also ends the epoch for what was queued behind it.
    fake.missing.add("t")
    child.stage(4, _rows(9, 2))
    fourth = child.take(4)
    assert fourth is not None
    await fourth  # prepared while the topic is missing
    fake.missing.clear()
    child.stage(5, _rows(11, 2))
    fifth = child.take(5)
    assert (await child.send(fourth, epoch=8))[0] == "declined"
    assert await child.send(fifth, epoch=8) == ("declined", "an earlier part of this epoch failed")
    assert len(fake.sent) == 2
    # Staging a part drops one never asked for (the gateway stages one ahead at most).
    child.stage(6, _rows(13, 2))
    child.stage(7, _rows(15, 2))
    assert child.take(6) is None
    assert (await child.send(child.take(7), epoch=9))[0] == "sent"


async def test_the_child_reads_spans_from_the_buffer_and_declines_one_that_changed(
    tmp_path: Path,
) -> None:
    """With one child, the gateway leases spans (class, ids after, last id, count) and the
    child reads those rows from the buffer file itself; its answer names the acked ids per
    class, which the gateway deletes. A span that holds other rows than leased (a dead
    letter replayed into it) is declined unsent: the gateway then leases afresh."""
    from bridge.send_worker_child import _Child

    path = tmp_path / "a dir #1?" / "buffer.sqlite3"  # the child opens it by URI
    path.parent.mkdir()
    await asyncio.to_thread(fill_backlog, path, 300, 3)
    kafka = KafkaConfig.model_construct(max_request_bytes=1 << 20)
    builder = RecordBuilder(
        gateway_id="g", class_topics={"telemetry": "t"}, content_types={}, dead_letter_topic="dlq"
    )
    config = BufferConfig()
    async with Buffer(path, config, {"telemetry": ClassConfig(kafka_topic="t")}) as buffer:
        assert buffer.spans_possible
        spans = await buffer.lease_spans(100)
        assert [(s.class_name, s.rows) for s in spans] == [("telemetry", 100)]
        child = _Child(kafka, builder, str(path))
        fake = _FakeProducer()
        child._producer = fake  # type: ignore[assignment]
        try:
            child.stage_spans(1, spans)
            answer = await child.send(child.take(1), epoch=1)
            assert answer[0] == "sent"
            assert answer[1] == list(range(100))
            by_class = answer[5]
            ids = array("q", by_class["telemetry"][0]).tolist()
            assert ids == list(range(ids[0], ids[0] + 100))  # the oldest 100, in order
            assert ids[-1] == spans[0].last_id
            assert by_class["telemetry"][1] == sum(len(v) for v in fake.sent[0])
            await buffer.release_ids({"telemetry": (ids, by_class["telemetry"][1])})
            assert buffer.stats.rows == 200

            later = await buffer.lease_spans(100)
            rows = await buffer.read_spans(later)
            await buffer.dead_letter(rows[50:51], "test")
            await buffer.release(rows[:50] + rows[51:])
            after = await buffer.lease_spans(100)  # spans the dead letter's id
            assert await buffer.replay_dead_letters([rows[50].row_id]) == 1
            child.stage_spans(2, after)
            answer = await child.send(child.take(2), epoch=2)
            assert answer[0] == "declined"
            assert "holds 101 rows, not 100" in answer[1]
            assert len(fake.sent) == 1
        finally:
            await child.close()
