"""The firmware progress outbox to Kafka (``firmware.status_topic``).

Release, campaign and device records are written to ``fw_outbox`` in the transaction of the
state change they report, and deleted only after Kafka acknowledged them (an acknowledged
prefix, so one key's records keep their order). Its own idempotent producer, every wait
bounded (:class:`bridge.producer.KafkaProducerHandle`). A record may be sent twice after a
crash: each carries ``event_id`` (gateway id plus the outbox row id, never reused).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

from bridge.producer import KafkaProducerHandle, acked_prefix
from bridge.records import KafkaRecord
from edge.firmware_store import FirmwareStore
from gateway.config import KafkaConfig
from gateway.errors import KafkaError

__all__ = ["FirmwareStatusSender"]

log = logging.getLogger(__name__)

_BATCH = 500


class FirmwareStatusSender:
    """``run()`` until cancelled; ``close()`` stops the producer within a deadline."""

    def __init__(
        self, kafka: KafkaConfig, *, topic: str, gateway_id: str, store: FirmwareStore
    ) -> None:
        self._producer = KafkaProducerHandle(kafka)
        self._kafka = kafka
        self._topic = topic
        self._gateway_id = gateway_id
        self._store = store
        self._added = asyncio.Event()
        self.sent = 0
        self.last_error: str | None = None

    def added(self) -> None:
        """Rows were committed to the outbox: send now rather than at the next poll."""
        self._added.set()

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                rows = await self._store.outbox(_BATCH)
            except Exception:
                log.exception("firmware outbox read failed; retrying")
                rows = []
            if not rows:
                self._added.clear()
                try:
                    async with asyncio.timeout(0.5):
                        await self._added.wait()
                except TimeoutError:
                    pass
                continue
            records = []
            for row in rows:
                event_id = f"{self._gateway_id}:{row.id}"
                value = {
                    "event_id": event_id,
                    "gateway_id": self._gateway_id,
                    **json.loads(row.value),
                }
                records.append(
                    KafkaRecord(
                        self._topic,
                        row.key.encode(),
                        json.dumps(value).encode(),
                        [
                            ("tg-gateway-id", self._gateway_id.encode()),
                            ("tg-event-id", event_id.encode()),
                        ],
                    )
                )
            try:
                outcome = await self._producer.send(records)
            except KafkaError as exc:
                outcome = None
                self.last_error = str(exc)
            prefix = acked_prefix(outcome)
            try:
                await self._store.sent([r.id for r in rows[:prefix]])
            except Exception:
                log.exception("firmware outbox delete failed; records may be sent twice")
            self.sent += prefix
            if prefix == len(rows):
                failures = 0
                self.last_error = None
                continue
            if outcome is not None and outcome.error is not None:
                self.last_error = str(outcome.error)
            failures += 1
            delay = min(self._kafka.retry_backoff_max_s, 0.2 * 2**failures)
            log.warning("firmware status not acked (%s); retry in %.1fs", self.last_error, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    async def close(self, deadline: float) -> None:
        await self._producer.close(deadline=deadline)
