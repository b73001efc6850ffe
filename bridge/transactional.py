"""Exactly-once recovery: read this gateway's last committed progress record from Kafka.

Called after every (re)built transactional producer got its producer id, which fenced any
older producer with our transactional id and settled its open transaction. Reading with
``read_committed`` up to the partition's high watermark (taken *after* that) then sees the
last batch Kafka really committed; a transaction of another gateway that is still open on
the same partition only delays the read (bounded by the deadline), it cannot hide ours.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError as AioKafkaError
from aiokafka.partitioner import DefaultPartitioner

from bridge.kafka_security import client_security
from bridge.progress import Progress
from gateway.config import KafkaConfig
from gateway.errors import KafkaError, KafkaUnavailableError

__all__ = ["MissingProgressTopicError", "read_last_progress"]

_FIRST_WINDOW = 256


class MissingProgressTopicError(KafkaError):
    """The exactly-once progress topic does not exist (create it, compacted)."""


async def read_last_progress(config: KafkaConfig, gateway_id: str) -> Progress | None:
    """The newest committed progress record keyed ``gateway_id``, or None if there is none.

    Bounded by ``request_timeout_s + send_deadline_s``; raises a translated KafkaError.
    """
    deadline = config.request_timeout_s + config.send_deadline_s
    try:
        async with asyncio.timeout(deadline):
            return await _read(config, gateway_id)
    except TimeoutError as exc:
        raise KafkaUnavailableError(
            f"reading the progress topic {config.progress_topic!r} took over {deadline:.0f}s"
        ) from exc
    except AioKafkaError as exc:
        raise KafkaUnavailableError(f"reading the progress topic failed: {exc!r}") from exc


def _consumer(config: KafkaConfig, isolation: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=config.bootstrap_servers,
        client_id=f"{config.client_id}-recovery",
        **client_security(config).kwargs(),
        enable_auto_commit=False,
        isolation_level=isolation,
        request_timeout_ms=int(config.request_timeout_s * 1000),
    )


async def _read(config: KafkaConfig, gateway_id: str) -> Progress | None:
    key = gateway_id.encode()
    topic = config.progress_topic
    raw = _consumer(config, "read_uncommitted")
    committed = _consumer(config, "read_committed")
    try:
        await raw.start()
        await committed.start()
        if topic not in await raw.topics():
            raise MissingProgressTopicError(
                f"exactly-once: the progress topic {topic!r} does not exist"
                " (create it with cleanup.policy=compact; see docs/delivery-modes.md)"
            )
        partitions = await _partitions(raw, topic)
        # The producer's default partitioner picked the partition from the key.
        tp = TopicPartition(topic, DefaultPartitioner()(key, partitions, partitions))
        high = (await raw.end_offsets([tp]))[tp]
        low = (await raw.beginning_offsets([tp]))[tp]
        committed.assign([tp])
        stop, window = high, _FIRST_WINDOW
        while stop > low:
            start = max(low, stop - window)
            found = await _last_in(committed, tp, start, stop, key=key, gw=gateway_id)
            if found is not None:
                return found
            stop, window = start, window * 4
        return None
    finally:
        for consumer in (committed, raw):
            with contextlib.suppress(Exception):
                await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """The topic's partitions; the consumer learns them only once it asked for the topic."""
    client = consumer._client  # aiokafka: a consumer has no public "metadata for topic"
    client.add_topic(topic)
    while True:
        found = consumer.partitions_for_topic(topic)
        if found:
            return sorted(found)
        await client.force_metadata_update()  # bounded by the caller's deadline


async def _last_in(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, stop: int, *, key: bytes, gw: str
) -> Progress | None:
    consumer.seek(tp, start)
    found: Progress | None = None
    while await consumer.position(tp) < stop:
        batch: dict[Any, Any] = await consumer.getmany(tp, timeout_ms=500)
        for message in batch.get(tp, []):
            if message.offset >= stop:
                return found
            if message.key == key:
                progress = Progress.decode(message.value)
                if progress is not None and progress.gateway_id == gw:
                    found = progress
    return found
