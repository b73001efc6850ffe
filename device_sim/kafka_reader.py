"""Read Kafka topics from the beginning to a snapshot of their end, for the oracle.

No consumer group (partitions are assigned by hand, nothing is committed), so verifying never
disturbs anyone's offsets and can run any number of times. End offsets are taken once at the
start: records produced while the verifier runs are not waited for, and the read finishes.
Every wait has a deadline (aiokafka can block forever on an unreachable or missing
partition); a read cut off by its deadline says which partitions were not read to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError as AioKafkaError

from bridge.kafka_security import ClientSecurity, SaslLogin
from device_sim.verify import RecordView
from gateway.errors import KafkaUnavailableError

__all__ = ["KafkaSource", "ReadSummary", "read_topics"]


@dataclass(frozen=True)
class KafkaSource:
    """Where and how to read."""

    bootstrap_servers: list[str]
    ssl_context: ssl.SSLContext | None
    topics: list[str]
    isolation_level: Literal["read_uncommitted", "read_committed"] = "read_uncommitted"
    client_id: str = "tidegate-verify"
    sasl: SaslLogin | None = None
    """SASL login (SASL_SSL; needs ``ssl_context``). None: mutual TLS, or plaintext."""


@dataclass
class ReadSummary:
    """What was read: per partition ``(start, end, reached)`` and remarks."""

    partitions: dict[tuple[str, int], tuple[int, int, int]] = field(default_factory=dict)
    records: int = 0
    missing_topics: list[str] = field(default_factory=list)
    complete: bool = False

    def notes(self) -> list[str]:
        """Human remarks for the report."""
        out = [f"topic {t!r} does not exist (nothing read)" for t in self.missing_topics]
        for (topic, partition), (_start, end, reached) in sorted(self.partitions.items()):
            if reached < end:
                out.append(
                    f"{topic}/{partition}: read stopped at offset {reached} of {end} (deadline)"
                )
        return out


async def read_topics(
    source: KafkaSource,
    sink: Callable[[RecordView], None],
    *,
    timeout_s: float = 120.0,
    connect_timeout_s: float = 30.0,
) -> ReadSummary:
    """Feed every record of ``source.topics`` (offset order per partition) to ``sink``.

    Raises :class:`KafkaUnavailableError` when Kafka cannot be reached or the offsets cannot
    be listed within ``connect_timeout_s``. A read that passes ``timeout_s`` returns with
    ``complete=False`` and what it read so far.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=source.bootstrap_servers,
        **ClientSecurity(ssl_context=source.ssl_context, sasl=source.sasl).kwargs(),
        client_id=source.client_id,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=source.isolation_level,
        request_timeout_ms=int(min(connect_timeout_s, 30.0) * 1000),
    )
    summary = ReadSummary()
    begin: dict[TopicPartition, int] = {}
    end: dict[TopicPartition, int] = {}
    try:
        try:
            async with asyncio.timeout(connect_timeout_s):
                await consumer.start()
                tps = await _partitions(consumer, source.topics, summary)
                if tps:
                    consumer.assign(tps)
                    begin = await consumer.beginning_offsets(tps)
                    end = await consumer.end_offsets(tps)
        except (TimeoutError, AioKafkaError, OSError) as exc:
            raise KafkaUnavailableError(
                f"cannot read offsets from Kafka at {','.join(source.bootstrap_servers)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not tps:
            summary.complete = True
            return summary
        for tp in tps:
            summary.partitions[(tp.topic, tp.partition)] = (begin[tp], end[tp], begin[tp])
        await consumer.seek_to_beginning(*tps)
        remaining = {tp for tp in tps if end[tp] > begin[tp]}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await _drain(consumer, remaining, end, sink, summary)
        summary.complete = not remaining
        return summary
    finally:
        # stop() can hang when Kafka went away (aiokafka #1101): give it its own deadline.
        with contextlib.suppress(TimeoutError, AioKafkaError, OSError):
            async with asyncio.timeout(10.0):
                await consumer.stop()


async def _partitions(
    consumer: AIOKafkaConsumer, topics: list[str], summary: ReadSummary
) -> list[TopicPartition]:
    # A consumer without subscriptions has no topic metadata, and aiokafka has no public call
    # that fills its cache (``topics()`` fetches into a throw-away copy). With no tracked
    # topics the client's refresh asks for all topics, which is what we need (aiokafka 0.14).
    if any(consumer.partitions_for_topic(t) is None for t in topics):
        await consumer._client.force_metadata_update()
    tps: list[TopicPartition] = []
    for topic in topics:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            summary.missing_topics.append(topic)
            continue
        tps.extend(TopicPartition(topic, p) for p in sorted(partitions))
    return tps


async def _drain(
    consumer: AIOKafkaConsumer,
    remaining: set[TopicPartition],
    end: dict[TopicPartition, int],
    sink: Callable[[RecordView], None],
    summary: ReadSummary,
) -> None:
    for tp in set(end) - remaining:
        consumer.pause(tp)
    while remaining:
        batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=5000)
        for tp, messages in batches.items():
            for message in messages:
                if message.offset >= end[tp]:
                    break  # produced after the snapshot: not part of this verification
                summary.records += 1
                sink(
                    RecordView(
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=message.offset,
                        key=message.key,
                        value=message.value,
                        headers={
                            name: value.decode("utf-8", errors="replace")
                            for name, value in (message.headers or ())
                        },
                    )
                )
        for tp in list(remaining):
            # position, not the last record's offset: transaction markers and aborted
            # records occupy offsets that are never returned.
            position = await consumer.position(tp)
            start, stop, _ = summary.partitions[(tp.topic, tp.partition)]
            summary.partitions[(tp.topic, tp.partition)] = (start, stop, min(position, stop))
            if position >= end[tp]:
                remaining.discard(tp)
                consumer.pause(tp)
