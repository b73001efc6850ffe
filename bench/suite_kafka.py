"""Kafka side of the suite: per-run topics, record counts, publish → Kafka-ack latency.

Topics are created with ``message.timestamp.type=LogAppendTime``: the broker stamps each
record with the time it appended it, so ``record.timestamp - envelope.ts`` (the simulator's
wall clock at publish, both on this machine) is the publish → Kafka-ack latency, for tidegate
and for the naive bridge alike, without trusting either system's own counters. tidegate's
records also carry ``tg-ingest-ts`` (when the gateway read the PUBLISH), which splits that
latency into the way in (the simulator's send queue, the socket, the gateway's read) and the
gateway's own part (commit, forward, Kafka's append).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, NamedTuple, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from device_sim.envelope import try_decode_envelope
from gateway.dev.kafka import KafkaState
from gateway.dev.kafka_admin import client_ssl_context, open_admin

__all__ = ["Arrival", "count_records", "create_topic", "kafka_envelopes"]

_T = TypeVar("_T")
_TOPIC_ALREADY_EXISTS = 36


class Arrival(NamedTuple):
    """When one envelope was published, read by the gateway and appended by Kafka (ms)."""

    published_ms: float
    appended_ms: float
    ingested_ms: float | None
    """``tg-ingest-ts``: None for records without it (the naive bridge's)."""


_INGEST_HEADER = "tg-ingest-ts"


def _ingest_ms(headers: Any) -> float | None:
    for name, value in headers or ():
        if name == _INGEST_HEADER:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def create_topic(state: KafkaState, name: str, partitions: int = 3) -> None:
    """Create ``name`` with broker-side (LogAppendTime) timestamps; wait for its leaders."""

    async def go() -> None:
        async with asyncio.timeout(60):
            admin = await open_admin(state)
            try:
                topic = NewTopic(
                    name,
                    partitions,
                    1,
                    topic_configs={"message.timestamp.type": "LogAppendTime"},
                )
                response = await admin.create_topics([topic])
                for _topic, code, message in response.topic_errors:
                    if code not in (0, _TOPIC_ALREADY_EXISTS):
                        raise RuntimeError(f"creating {name}: {message or code}")
                while True:  # bounded by the timeout above
                    meta = await admin.describe_topics([name])
                    parts = meta[0].get("partitions", []) if meta else []
                    if len(parts) == partitions and all(p.get("leader", -1) >= 0 for p in parts):
                        return
                    await asyncio.sleep(0.1)
            finally:
                await admin.close()

    _run(go())


def _consumer(state: KafkaState) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=state.bootstrap_servers,
        security_protocol="SSL",
        ssl_context=client_ssl_context(state),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=20_000,
    )


async def _offsets(consumer: AIOKafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()  # no public refresh
        parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    if not tps:
        return {}
    ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
    return ends


def count_records(state: KafkaState, topic: str) -> int:
    """Records in ``topic`` (sum of end offsets; our topics are never truncated)."""

    async def go() -> int:
        consumer = _consumer(state)
        try:
            async with asyncio.timeout(30):
                await consumer.start()
                return sum((await _offsets(consumer, topic)).values())
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await consumer.stop()

    return _run(go())


def kafka_envelopes(
    state: KafkaState, topic: str, msg_id_prefix: str, timeout_s: float = 60.0
) -> dict[str, Arrival]:
    """msg_id → its :class:`Arrival`, for every envelope whose msg_id starts with
    ``msg_id_prefix`` in ``topic`` (the whole topic up to its current end; a duplicate keeps
    its first append)."""

    async def go() -> dict[str, Arrival]:
        consumer = _consumer(state)
        out: dict[str, Arrival] = {}
        try:
            async with asyncio.timeout(timeout_s):
                await consumer.start()
                ends = await _offsets(consumer, topic)
                remaining = {tp for tp, end in ends.items() if end > 0}
                if not remaining:
                    return out
                consumer.assign(list(ends))
                await consumer.seek_to_beginning(*ends)
                while remaining:
                    batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
                    for tp, records in batches.items():
                        for record in records:
                            env = try_decode_envelope(record.value)
                            if env is not None and env.msg_id.startswith(msg_id_prefix):
                                arrival = Arrival(
                                    float(env.ts),
                                    float(record.timestamp),
                                    _ingest_ms(record.headers),
                                )
                                out.setdefault(env.msg_id, arrival)
                        if records and records[-1].offset + 1 >= ends[tp]:
                            remaining.discard(tp)
            return out
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await consumer.stop()

    return _run(go())
