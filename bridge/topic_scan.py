"""Read a JSON topic from its beginning up to its end *now*: how the CLI answers "what is
the history of command X" or "where is campaign Y" from the records the gateway wrote."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError as AioKafkaError

from bridge.kafka_security import client_security, explain_login_failure
from gateway.config import KafkaConfig

__all__ = ["scan_json_topic"]


async def scan_json_topic(
    kafka: KafkaConfig, topic: str, visit: Callable[[dict[str, Any]], None]
) -> None:
    """Call ``visit`` with every JSON object in ``topic`` up to the end offsets taken at the
    start (records written later are not waited for), within the request timeout + 30 s."""
    security = client_security(kafka)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        **security.kwargs(),
        enable_auto_commit=False,
    )
    async with asyncio.timeout(kafka.request_timeout_s + 30):
        try:
            await consumer.start()
        except AioKafkaError as exc:
            await consumer.stop()
            await explain_login_failure(kafka, security, exc)
            raise
        try:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer._client.force_metadata_update()  # a topic not yet in metadata
                parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            remaining = {tp for tp in tps if ends[tp] > 0}
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=500)
                for tp, records in batch.items():
                    for record in records:
                        if record.offset >= ends[tp] or record.value is None:
                            continue
                        try:
                            item = json.loads(record.value)
                        except ValueError:
                            continue  # not ours: someone else wrote to the topic
                        if isinstance(item, dict):
                            visit(item)
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
        finally:
            await consumer.stop()
