"""Forward the buffer to Kafka: lease a batch, send it, release only what Kafka acked.

One batch is in flight at a time. That keeps per-device order simple to prove: a batch is
resent only before anything after it was sent. Throughput comes from large batches (the
lease size) rather than from pipelining; the performance work may pipeline later.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bridge.producer import KafkaProducerHandle
from bridge.records import RecordBuilder
from edge.buffer import Buffer, StoredMessage
from gateway.config import KafkaConfig
from gateway.errors import KafkaError

__all__ = ["Forwarder", "ForwarderStatus", "releasable"]

log = logging.getLogger(__name__)


def releasable(
    batch: Sequence[StoredMessage], acked: Sequence[bool], topics: Sequence[str]
) -> list[StoredMessage]:
    """The rows of a batch that may be deleted after a partly failed send.

    A row is released only if it was acked and every earlier row of the same device and
    Kafka topic (one partition stream) was acked too: releasing a later row while an
    earlier one is resent would put the stream out of order.
    """
    blocked: set[tuple[str, str]] = set()
    out: list[StoredMessage] = []
    for message, ok, topic in zip(batch, acked, topics, strict=True):
        stream = (message.device_id, topic)
        if ok and stream not in blocked:
            out.append(message)
        else:
            blocked.add(stream)
    return out


@dataclass(slots=True)
class ForwarderStatus:
    """What the admin API reports about the cloud side."""

    kafka_connected: bool = False
    last_error: str | None = None
    last_error_at: float | None = None
    forwarded: int = 0
    batches: int = 0
    failed_batches: int = 0
    producer_rebuilds: int = 0


class Forwarder:
    """The bridge's main loop. Run with :meth:`run` inside the gateway's TaskGroup."""

    def __init__(
        self,
        buffer: Buffer,
        builder: RecordBuilder,
        kafka: KafkaConfig,
        *,
        lease_batch: int,
    ) -> None:
        self._buffer = buffer
        self._builder = builder
        self._kafka = kafka
        self._lease_batch = lease_batch
        self._producer = KafkaProducerHandle(kafka)
        self.status = ForwarderStatus()

    async def run(self) -> None:
        """Forward forever (until cancelled). Errors are logged and retried with backoff."""
        failures = 0
        while True:
            batch = await self._buffer.lease(self._lease_batch)
            if not batch:
                await self._buffer.wait_for_rows(max_wait=1.0)
                continue
            try:
                await self._producer.ensure_started()
            except KafkaError as exc:
                failures += 1
                self._note_error(exc)
                await asyncio.sleep(self._backoff(failures))
                continue
            self.status.kafka_connected = True
            records = [self._builder.build(m) for m in batch]
            outcome = await self._producer.send(records)
            done = releasable(batch, outcome.acked, [r.topic for r in records])
            # Release what was acked even when the rest failed: fewer duplicates on resend.
            await self._buffer.release(done)
            self.status.forwarded += len(done)
            self.status.batches += 1
            self.status.producer_rebuilds = self._producer.rebuilds
            if outcome.error is None:
                failures = 0
                continue
            failures += 1
            self.status.failed_batches += 1
            if outcome.stuck:
                self.status.kafka_connected = False
            self._note_error(outcome.error)
            await asyncio.sleep(self._backoff(failures))

    def _note_error(self, exc: KafkaError) -> None:
        message = str(exc)
        if message != self.status.last_error:
            log.error("Kafka: %s (buffering continues, retrying with backoff)", message)
        self.status.kafka_connected = self._producer.connected
        self.status.last_error = message
        self.status.last_error_at = time.time()

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._kafka.retry_backoff_max_s, 0.2 * 2 ** min(failures, 10))
        return random.uniform(ceiling / 2, ceiling)  # jitter, not crypto

    async def close(self, deadline: float) -> None:
        """Stop the producer within ``deadline`` (aiokafka's stop can hang while Kafka is down)."""
        await self._producer.close(deadline)
        self.status.kafka_connected = False
